//! The wire contract of `org.nethserver.ModuleUpdater`, shared by the daemon, the client and the tests.
//!
//! Everything a stock D-Bus tool sees (bus name, object paths, interface names, error names) is defined
//! here once. The bus configuration files the project ships live in `dbus/data/` and are exposed as
//! paths so that tests run against exactly what is installed.

pub mod error;
pub mod proxy;
pub mod signal;
pub mod types;

pub use error::Error;
pub use proxy::{InstanceProxy, JobProxy, ModuleUpdaterProxy};
pub use signal::JobSignal;

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
/// The interface of instance objects.
pub const INSTANCE_INTERFACE: &str = "org.nethserver.ModuleUpdater.Instance";
/// Instance objects live below this path, as `<prefix>/<escaped id>` ([`instance_path`]).
pub const INSTANCE_PATH_PREFIX: &str = "/org/nethserver/ModuleUpdater/instance";

/// What the manager's `Features` property names, so a client can test for a capability instead
/// of a version.
pub const FEATURES: &[&str] = &[
    "object-manager",
    "instance-objects",
    "instance-states",
    "job-messages",
    "history",
    "list-updates",
    "plan",
];
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
/// polkit action checked for a job's `Cancel` by a non-root caller who did not start the job
/// (details `job` and `instances`).
pub const ACTION_CANCEL: &str = "org.nethserver.moduleupdater.cancel";

/// The object path of instance `id`: `<prefix>/<label>`, where the label keeps ASCII letters and
/// digits and writes every other byte as `_` and two lowercase hex digits (`mail-1` → `mail_2d1`),
/// as systemd escapes unit names in its paths; an empty id is `_`.
pub fn instance_path(id: &str) -> String {
    format!("{INSTANCE_PATH_PREFIX}/{}", path_label(id))
}

/// The id of an instance from its object path, or `None` for a path that is not one.
pub fn instance_id(path: &str) -> Option<String> {
    let label = path.strip_prefix(INSTANCE_PATH_PREFIX)?.strip_prefix('/')?;
    unlabel(label)
}

/// `id` as one valid object path element (see [`instance_path`]).
pub fn path_label(id: &str) -> String {
    if id.is_empty() {
        return "_".to_owned();
    }
    let mut label = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() {
            label.push(char::from(byte));
        } else {
            label.push_str(&format!("_{byte:02x}"));
        }
    }
    label
}

/// The inverse of [`path_label`]; `None` when `label` is not one it makes.
pub fn unlabel(label: &str) -> Option<String> {
    if label == "_" {
        return Some(String::new());
    }
    let bytes = label.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                let hex = label.get(i + 1..i + 3)?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if byte.is_ascii_alphanumeric() || hex.chars().any(|c| c.is_ascii_uppercase()) {
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// How long the daemon waits for polkit's answer about a call (an authentication agent may be
/// asking for a password meanwhile); with no answer by then the call is refused. A client that
/// lets polkit ask waits longer than this for the reply, so the daemon always answers first.
pub const POLKIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The source directory holding the shipped bus policy and activation files.
pub fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn instance_paths_are_valid_and_give_the_id_back() {
        for id in ["mail1", "nextcloud3", "mail-1", "a.b_c1", "", "é1", "/x1"] {
            let path = instance_path(id);
            assert!(zbus::ObjectPath::try_from(path.as_str()).is_ok(), "{path}");
            assert_eq!(instance_id(&path).as_deref(), Some(id), "{path}");
        }
        assert_eq!(
            instance_path("mail1"),
            "/org/nethserver/ModuleUpdater/instance/mail1"
        );
        assert_eq!(
            instance_path("mail-1"),
            "/org/nethserver/ModuleUpdater/instance/mail_2d1"
        );
        assert_eq!(instance_id("/org/nethserver/ModuleUpdater/job/1"), None);
        assert_eq!(unlabel("a_2"), None);
        assert_eq!(unlabel("a_41"), None, "letters are never escaped");
    }
}
