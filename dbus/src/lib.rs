//! The wire contract of `org.nethserver.ModuleUpdater`, shared by the daemon, the client and the tests.
//!
//! Everything a stock D-Bus tool sees (bus name, object paths, interface names, error names) is defined
//! here once. The bus configuration files the project ships live in `dbus/data/` and are exposed as
//! paths so that tests run against exactly what is installed.

pub mod error;
pub mod proxy;
pub mod types;

pub use error::Error;
pub use proxy::{JobProxy, ModuleUpdaterProxy};

/// The well-known name the daemon owns on the system bus.
pub const BUS_NAME: &str = "org.nethserver.ModuleUpdater";
/// The manager object.
pub const OBJECT_PATH: &str = "/org/nethserver/ModuleUpdater";
/// The manager interface.
pub const MANAGER_INTERFACE: &str = "org.nethserver.ModuleUpdater";
/// The interface of job objects.
pub const JOB_INTERFACE: &str = "org.nethserver.ModuleUpdater.Job";
/// Job objects live below this path, as `<prefix>/<n>`.
pub const JOB_PATH_PREFIX: &str = "/org/nethserver/ModuleUpdater/job";
/// Prefix of every error name the service returns.
pub const ERROR_PREFIX: &str = "org.nethserver.ModuleUpdater.Error";

/// File names of the shipped bus configuration, relative to [`data_dir`].
pub const POLICY_FILE: &str = "org.nethserver.ModuleUpdater.conf";
pub const ACTIVATION_FILE: &str = "org.nethserver.ModuleUpdater.service";
/// The polkit actions the daemon checks, relative to [`data_dir`]; installed into
/// `/usr/share/polkit-1/actions/`.
pub const POLKIT_ACTIONS_FILE: &str = "org.nethserver.moduleupdater.policy";

/// polkit action checked for `UpdateModule` by a non-root caller. Its details `module_url` and
/// `instances` (ids separated by single spaces) are readable by polkit rules.
pub const ACTION_UPDATE_MODULE: &str = "org.nethserver.moduleupdater.update-module";
/// polkit action checked for `GetInstance` by a non-root caller (detail `instance`).
pub const ACTION_READ_INSTANCE: &str = "org.nethserver.moduleupdater.read-instance";
/// polkit action checked for a job's `Cancel` by a non-root caller who did not start the job
/// (details `job` and `instances`).
pub const ACTION_CANCEL: &str = "org.nethserver.moduleupdater.cancel";

/// How long the daemon waits for polkit's answer about a call (an authentication agent may be
/// asking for a password meanwhile); with no answer by then the call is refused. A client that
/// lets polkit ask waits longer than this for the reply, so the daemon always answers first.
pub const POLKIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The source directory holding the shipped bus policy and activation files.
pub fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}
