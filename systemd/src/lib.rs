//! systemd integration shared by the daemon and its workers: the service manager's D-Bus API
//! (only what we use), sd-notify, and logging to the journal or to stderr with priority prefixes.

pub mod logging;
pub mod manager;
pub mod notify;
pub mod scope;

pub use manager::{ManagerProxy, UnitProxy};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the bus at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd manager call {method} failed: {source}")]
    Call {
        method: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd manager call {method} for {unit} failed: {source}")]
    Unit {
        unit: String,
        method: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("the systemd manager's {action} job of {unit} ended with result {result:?}")]
    Job {
        unit: String,
        action: &'static str,
        result: String,
    },
    #[error("cannot install the logger: {0}")]
    Logger(String),
}
