//! What a worker reports to the daemon while it updates one instance: one JSON object per line.

use module_updater_dbus::types::{InstanceResult, Step};
use serde::{Deserialize, Serialize};

/// A typed report from the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A step begins.
    StepStarted { step: Step },
    /// The instance's overall progress (0–100, never decreasing) while in `step`.
    Progress { step: Step, percent: u8 },
    /// A log line with a journal priority (0–7): warnings, and every line the scripts print.
    Message { priority: u8, text: String },
    /// A step ended.
    StepFinished { step: Step },
    /// The update of the instance is over; always the last event.
    Finished { result: Box<InstanceResult> },
}

/// Journal priorities used by the engine.
pub mod priority {
    pub const ERR: u8 = 3;
    pub const WARNING: u8 = 4;
    pub const INFO: u8 = 6;
    pub const DEBUG: u8 = 7;
}
