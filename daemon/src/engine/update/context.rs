//! What every step may use: the job, cancellation, and the reporting of progress, messages and
//! warnings.

use std::collections::BTreeMap;

use module_updater_dbus::types::Step;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::super::events::{Event, priority};
use super::super::instance::Instance;
use super::super::shared_images::SharedModule;

/// What a worker does to its instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// NS8's update-module.
    #[default]
    Update,
    /// Back to the kept previous version (`engine/kept.rs`).
    Rollback,
    /// Drop the kept previous version and its images.
    Prune,
}

impl Action {
    /// The job's action, as the history names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Update => "update-module",
            Action::Rollback => "rollback",
            Action::Prune => "prune",
        }
    }
}

/// Everything a worker needs to update one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateJob {
    pub job_id: u64,
    #[serde(default)]
    pub action: Action,
    pub instance: Instance,
    pub module_url: String,
    pub force: bool,
    /// The request JSON as the caller sent it: the scripts' stdin.
    pub request_json: String,
    pub script_timeout_secs: u64,
    /// How long a pull may take (`pull_timeout`).
    #[serde(default = "default_pull_timeout")]
    pub pull_timeout_secs: u64,
    /// How long the health gate may wait for the instance to be healthy (`health_timeout`).
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: u64,
    /// Keep the previous version for a rollback (`keep_previous`).
    #[serde(default)]
    pub keep_previous: bool,
    /// Roll back when the health gate or a module step fails (`rollback_on_failure`).
    #[serde(default)]
    pub rollback_on_failure: bool,
    /// The worker's niceness (0: the daemon's priority), which its children inherit.
    #[serde(default)]
    pub nice: u8,
    /// Where the systemd manager of a rootful instance answers (None: the system bus).
    pub system_manager_address: Option<String>,
    /// Global podman options (empty on a real node).
    pub podman_args: Vec<String>,
    /// Reference → OCI archive of the image, when the daemon downloaded it once for the node
    /// (`engine/shared_images.rs`): a missing reference is loaded from it instead of pulled.
    #[serde(default)]
    pub shared_images: BTreeMap<String, std::path::PathBuf>,
    /// What the daemon knows of the module image it downloaded (with `shared_images`).
    #[serde(default)]
    pub shared_module: Option<SharedModule>,
}

/// `health_timeout`'s default, in seconds.
pub const DEFAULT_HEALTH_TIMEOUT: u64 = 120;

fn default_health_timeout() -> u64 {
    DEFAULT_HEALTH_TIMEOUT
}

fn default_pull_timeout() -> u64 {
    1800
}

/// A step failed: where and why.
#[derive(Debug)]
pub struct Failed {
    pub step: Step,
    pub reason: String,
}

/// A step's failure from its reason, for `map_err`.
pub fn failed(step: Step) -> impl Fn(String) -> Failed {
    move |reason| Failed { step, reason }
}

pub type StepResult<T> = Result<T, Failed>;

/// The reason of a failure that is a cancel between steps.
pub const CANCELLED: &str = "cancelled";

/// The instance's progress (0–100) at the start of each step; the step fills the gap to the next.
pub fn progress_window(step: Step) -> (u8, u8) {
    match step {
        Step::Prepare => (0, 2),
        Step::PullImage => (2, 25),
        Step::PullExtraImages => (25, 50),
        Step::Extract => (50, 60),
        Step::Reload => (60, 62),
        Step::UpdateEnvironment => (62, 65),
        Step::RunScripts | Step::ModuleStep => (65, 85),
        Step::HealthGate => (85, 90),
        Step::Restore => (50, 60),
        Step::CleanupImages => (90, 100),
    }
}

/// The job, the cancel, and where events go. Steps report through it; what they produce they
/// return.
pub struct Ctx<'a> {
    pub job: &'a UpdateJob,
    pub cancel: watch::Receiver<bool>,
    emit: &'a mut (dyn FnMut(Event) + Send),
    progress: u8,
    /// The step under way (the last one begun).
    step: Step,
    warnings: Vec<String>,
    /// Whether files or the environment were touched: a failure after that keeps the
    /// in-progress marker, so the next update runs in full again.
    pub touched: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(
        job: &'a UpdateJob,
        cancel: watch::Receiver<bool>,
        emit: &'a mut (dyn FnMut(Event) + Send),
    ) -> Self {
        Ctx {
            job,
            cancel,
            emit,
            progress: 0,
            step: Step::Prepare,
            warnings: Vec::new(),
            touched: false,
        }
    }

    pub fn instance(&self) -> &'a Instance {
        &self.job.instance
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Fails with [`CANCELLED`] once a cancel was asked for.
    pub fn check_cancel(&self) -> StepResult<()> {
        if self.cancelled() {
            Err(Failed {
                step: Step::Prepare,
                reason: CANCELLED.to_owned(),
            })
        } else {
            Ok(())
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    pub fn begin(&mut self, step: Step) {
        self.step = step;
        (self.emit)(Event::StepStarted { step });
        let (low, _) = progress_window(step);
        self.set_progress(step, low);
    }

    pub fn end(&mut self, step: Step) {
        let (_, high) = progress_window(step);
        self.set_progress(step, high);
        (self.emit)(Event::StepFinished { step });
    }

    /// Reports progress; never decreasing.
    pub fn set_progress(&mut self, step: Step, percent: u8) {
        if percent > self.progress {
            self.progress = percent.min(100);
            (self.emit)(Event::Progress {
                step,
                percent: self.progress,
            });
        }
    }

    pub fn message(&mut self, priority: u8, text: String) {
        (self.emit)(Event::Message { priority, text });
    }

    /// A message that is also one of the result's warnings.
    pub fn warning(&mut self, text: String) {
        self.message(priority::WARNING, text.clone());
        self.warnings.push(text);
    }

    /// The warnings so far, for the result.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_windows_are_ordered() {
        let steps = [
            Step::Prepare,
            Step::PullImage,
            Step::PullExtraImages,
            Step::Extract,
            Step::Reload,
            Step::UpdateEnvironment,
            Step::RunScripts,
            Step::HealthGate,
            Step::CleanupImages,
        ];
        for pair in steps.windows(2) {
            assert_eq!(progress_window(pair[0]).1, progress_window(pair[1]).0);
        }
        assert_eq!(progress_window(Step::CleanupImages).1, 100);
    }
}
