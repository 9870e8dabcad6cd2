//! The client's errors, their one-line messages (problem + what to do) and their exit codes.

use module_updater_dbus::Error as WireError;
use zbus::fdo;

/// Exit codes, the contract of issue 5 (plus 4 and 64 for what it leaves open).
pub mod exit {
    pub const SUCCESS: u8 = 0;
    /// The update failed (the job aborted), or any other error.
    pub const FAILED: u8 = 1;
    /// An instance is already being updated (`action_already_running`).
    pub const BUSY: u8 = 2;
    /// The service cannot be reached, or left the bus while a job was followed.
    pub const UNREACHABLE: u8 = 3;
    /// No such job or instance.
    pub const NOT_FOUND: u8 = 4;
    /// The request did not pass validation (NS8's exit code).
    pub const VALIDATION: u8 = 10;
    /// Bad command line or unreadable input (sysexits' EX_USAGE; 2 is taken by busy).
    pub const USAGE: u8 = 64;
    /// `check`: an update is available (as dnf check-update).
    pub const UPDATES_AVAILABLE: u8 = 100;
    /// Detached by a second Ctrl-C (128 + SIGINT).
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {bus}: {reason}; {hint}")]
    Connect {
        bus: String,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "module-updaterd cannot be reached on {bus}: {reason}; check `systemctl status module-updaterd` (or choose another bus with --system/--user/--address/-H)"
    )]
    Unreachable { bus: String, reason: String },
    #[error(
        "module-updaterd left {bus} while job {job} was followed; the job will be reported interrupted when the service returns (then: module-updater status {job})"
    )]
    ServiceLeft { bus: String, job: u64 },
    #[error(
        "the connection to {bus} was lost while job {job} was followed; re-attach with `module-updater wait {job}`"
    )]
    ConnectionLost { bus: String, job: u64 },
    /// The message is NS8's validation array; it is printed on stdout as well.
    #[error("the request was refused: {summary}; fix it and run again (details on stdout)")]
    Validation { array: String, summary: String },
    #[error("{summary}; wait for that job (module-updater wait JOB) or cancel it, then run again")]
    Busy { array: String, summary: String },
    #[error(
        "no job {job} on the service: {detail}; finished jobs are kept for a while only, see `module-updater jobs`"
    )]
    NoSuchJob { job: u64, detail: String },
    #[error("no instance {instance:?} on this node; see `module-updater list`")]
    NoSuchInstance { instance: String },
    #[error(
        "Module instance {instance:?} is of type {current:?}, cannot update it with an image of type {new:?} ({url})"
    )]
    TypeMismatch {
        instance: String,
        current: String,
        new: String,
        url: String,
    },
    #[error(
        "job {job} ended {status} (exit code {exit_code}); the result on stdout names the failed instances and steps"
    )]
    JobFailed {
        job: u64,
        status: String,
        exit_code: i32,
    },
    #[error("detached from job {job}, which goes on; re-attach with `module-updater wait {job}`")]
    Detached { job: u64 },
    #[error(
        "interrupted before the service answered; a job may have started: see `module-updater jobs`"
    )]
    InterruptedEarly,
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(#[from] crate::cli::DataError),
    #[error("access denied by {bus}: {reason}{hint}")]
    AccessDenied {
        bus: String,
        reason: String,
        /// What to do, when the service's message does not already say it (see `access_hint`).
        hint: String,
    },
    #[error("module-updaterd is shutting down: {reason}; try again once it has restarted")]
    ShuttingDown { reason: String },
    #[error("{what} failed: {reason}; see `journalctl -u module-updaterd` for details")]
    Service { what: String, reason: String },
    #[error("cannot {what}: {reason}")]
    Local { what: String, reason: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Connect { .. }
            | ClientError::Unreachable { .. }
            | ClientError::ServiceLeft { .. }
            | ClientError::ConnectionLost { .. }
            | ClientError::ShuttingDown { .. } => exit::UNREACHABLE,
            ClientError::Validation { .. } => exit::VALIDATION,
            ClientError::Busy { .. } => exit::BUSY,
            ClientError::NoSuchJob { .. } | ClientError::NoSuchInstance { .. } => exit::NOT_FOUND,
            ClientError::Usage(_) | ClientError::Input(_) => exit::USAGE,
            ClientError::Detached { .. } | ClientError::InterruptedEarly => exit::INTERRUPTED,
            ClientError::TypeMismatch { .. }
            | ClientError::JobFailed { .. }
            | ClientError::AccessDenied { .. }
            | ClientError::Service { .. }
            | ClientError::Local { .. } => exit::FAILED,
        }
    }

    /// What goes to stdout besides the stderr line: NS8's arrays, as api-cli prints them.
    pub fn stdout(&self) -> Option<&str> {
        match self {
            ClientError::Validation { array, .. } | ClientError::Busy { array, .. } => Some(array),
            _ => None,
        }
    }
}

/// Errors as JSON (`--json`): a D-Bus-style name, the message and the exit code.
pub mod json {
    use serde_json::{Value, json};

    use super::ClientError;

    /// Prefix of the names of errors the client itself finds (no service error behind them).
    pub const CLIENT_ERROR_PREFIX: &str = "org.nethserver.ModuleUpdater.Client.Error";

    /// The error's name: the service's D-Bus error name when the service refused, the bus's
    /// when the bus did, a client name otherwise.
    pub fn name(err: &ClientError) -> String {
        let service = |name: &str| format!("{}.{name}", module_updater_dbus::ERROR_PREFIX);
        let client = |name: &str| format!("{CLIENT_ERROR_PREFIX}.{name}");
        match err {
            ClientError::Validation { .. } => service("ValidationFailed"),
            ClientError::Busy { .. } => service("Busy"),
            ClientError::NoSuchJob { .. } => service("NoSuchJob"),
            ClientError::NoSuchInstance { .. } => service("NoSuchInstance"),
            ClientError::ShuttingDown { .. } => service("ShuttingDown"),
            ClientError::Service { .. } => service("Failed"),
            ClientError::AccessDenied { .. } => "org.freedesktop.DBus.Error.AccessDenied".into(),
            ClientError::Connect { .. } => client("Connect"),
            ClientError::Unreachable { .. } => client("Unreachable"),
            ClientError::ServiceLeft { .. } => client("ServiceLeft"),
            ClientError::ConnectionLost { .. } => client("ConnectionLost"),
            ClientError::TypeMismatch { .. } => client("TypeMismatch"),
            ClientError::JobFailed { .. } => client("JobFailed"),
            ClientError::Detached { .. } => client("Detached"),
            ClientError::InterruptedEarly => client("Interrupted"),
            ClientError::Usage(_) | ClientError::Input(_) => client("Usage"),
            ClientError::Local { .. } => client("Local"),
        }
    }

    /// `{"error": {"name", "message", "exit_code"}}`, with `details` holding NS8's array when
    /// the service refused the request with one.
    pub fn document(err: &ClientError) -> Value {
        let mut error = json!({
            "name": name(err),
            "message": err.to_string(),
            "exit_code": err.exit_code(),
        });
        if let Some(array) = err.stdout() {
            error["details"] =
                serde_json::from_str(array).unwrap_or_else(|_| Value::String(array.to_owned()));
        }
        json!({ "error": error })
    }

    /// A command-line error found by clap, before the command line is known.
    pub fn usage_document(message: &str) -> Value {
        json!({ "error": {
            "name": format!("{CLIENT_ERROR_PREFIX}.Usage"),
            "message": message.trim_end(),
            "exit_code": super::exit::USAGE,
        }})
    }
}

/// A zbus error as one line (without the `org.freedesktop.DBus.Error.` noise where possible).
pub fn describe_zbus(err: &zbus::Error) -> String {
    match err {
        zbus::Error::MethodError(name, Some(desc), _) => format!("{desc} ({name})"),
        zbus::Error::MethodError(name, None, _) => name.to_string(),
        zbus::Error::InputOutput(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            "no reply in time (raise --timeout if the host is slow)".to_owned()
        }
        other => one_line(&other.to_string()),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The context of a failed call: which bus, what was being done, and for which job/instance.
pub struct Call<'a> {
    pub bus: &'a str,
    pub what: &'a str,
    pub job: Option<u64>,
    pub instance: Option<&'a str>,
}

impl Call<'_> {
    /// Maps an error of this call to what the user is told.
    pub fn error(&self, err: zbus::Error) -> ClientError {
        let reason = describe_zbus(&err);
        match WireError::from(err) {
            WireError::ValidationFailed(array) => ClientError::Validation {
                summary: summarize_array(&array),
                array,
            },
            WireError::Busy(array) => ClientError::Busy {
                summary: summarize_busy(&array),
                array,
            },
            WireError::NoSuchInstance(detail) => ClientError::NoSuchInstance {
                instance: self.instance.map_or(detail, str::to_owned),
            },
            WireError::NoSuchJob(detail) => ClientError::NoSuchJob {
                job: self.job.unwrap_or_default(),
                detail,
            },
            WireError::ShuttingDown(reason) => ClientError::ShuttingDown { reason },
            WireError::Failed(reason) | WireError::NothingKept(reason) => ClientError::Service {
                what: self.what.to_owned(),
                reason,
            },
            WireError::ZBus(err) => self.transport_error(err, reason),
        }
    }

    /// The polkit action the daemon checks for this call, if it checks one.
    fn action(&self) -> Option<&'static str> {
        match self.what {
            "UpdateModule" => Some(module_updater_dbus::ACTION_UPDATE_MODULE),
            "Cancel" => Some(module_updater_dbus::ACTION_CANCEL),
            _ => None,
        }
    }

    fn transport_error(&self, err: zbus::Error, reason: String) -> ClientError {
        let unreachable = || ClientError::Unreachable {
            bus: self.bus.to_owned(),
            reason: reason.clone(),
        };
        match &err {
            zbus::Error::FDO(fdo) => match fdo.as_ref() {
                fdo::Error::ServiceUnknown(_)
                | fdo::Error::NameHasNoOwner(_)
                | fdo::Error::NoReply(_)
                | fdo::Error::NoServer(_)
                | fdo::Error::Disconnected(_)
                | fdo::Error::Timeout(_)
                | fdo::Error::TimedOut(_)
                | fdo::Error::IOError(_)
                | fdo::Error::SpawnExecFailed(_)
                | fdo::Error::SpawnForkFailed(_)
                | fdo::Error::SpawnChildExited(_)
                | fdo::Error::SpawnChildSignaled(_)
                | fdo::Error::SpawnFailed(_)
                | fdo::Error::SpawnFailedToSetup(_)
                | fdo::Error::SpawnConfigInvalid(_)
                | fdo::Error::SpawnServiceNotValid(_)
                | fdo::Error::SpawnServiceNotFound(_)
                | fdo::Error::SpawnPermissionsInvalid(_)
                | fdo::Error::SpawnFileInvalid(_) => unreachable(),
                fdo::Error::AccessDenied(_) | fdo::Error::AuthFailed(_) => {
                    ClientError::AccessDenied {
                        bus: self.bus.to_owned(),
                        hint: access_hint(self.action(), &reason),
                        reason,
                    }
                }
                // A job object that is gone (its linger time passed) answers UnknownObject.
                fdo::Error::UnknownObject(_) | fdo::Error::UnknownInterface(_)
                    if self.job.is_some() =>
                {
                    ClientError::NoSuchJob {
                        job: self.job.unwrap_or_default(),
                        detail: reason,
                    }
                }
                _ => ClientError::Service {
                    what: self.what.to_owned(),
                    reason,
                },
            },
            zbus::Error::InputOutput(_)
            | zbus::Error::Connection(..)
            | zbus::Error::Handshake(_) => unreachable(),
            _ => ClientError::Service {
                what: self.what.to_owned(),
                reason,
            },
        }
    }
}

/// What to do about an AccessDenied: the daemon's own refusals name the polkit action and how to
/// grant it (then nothing is added); anything else (e.g. the bus policy's "Rejected send
/// message") gets the action to grant, or only root when the call checks none.
fn access_hint(action: Option<&str>, reason: &str) -> String {
    match action {
        Some(action) if reason.contains(action) && reason.contains("root") => String::new(),
        Some(action) => format!(
            "; grant the polkit action {action} to this user with a rule in /etc/polkit-1/rules.d/, authenticate as an administrator when asked (on a terminal, without --no-ask-password), or run as root"
        ),
        None => "; run as root (the bus policy lets only root make this call)".to_owned(),
    }
}

/// One entry of NS8's validation array.
#[derive(Debug, serde::Deserialize)]
struct ValidationItem {
    #[serde(default)]
    field: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    job: Option<String>,
}

fn parse_array(array: &str) -> Option<Vec<ValidationItem>> {
    serde_json::from_str(array).ok()
}

fn short_value(value: &serde_json::Value) -> String {
    let text = match value {
        serde_json::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// `instances.0 = "mail": instances_pattern` for each entry, joined; the raw text if it is not an array.
pub fn summarize_array(array: &str) -> String {
    match parse_array(array) {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|item| {
                format!(
                    "{} = {}: {}",
                    item.field,
                    short_value(&item.value),
                    item.error
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => one_line(array),
    }
}

fn summarize_busy(array: &str) -> String {
    match parse_array(array) {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|item| {
                let job = item
                    .job
                    .as_deref()
                    .and_then(crate::cli::JobRef::from_path)
                    .map_or_else(String::new, |job| format!(" by job {job}"));
                format!(
                    "instance {} is already being updated{job}",
                    short_value(&item.value)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => format!("busy: {}", one_line(array)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn validation_array_summary() {
        let array = r#"[{"field":"instances.0","parameter":"instances","value":"mail","error":"instances_pattern"}]"#;
        assert_eq!(
            summarize_array(array),
            r#"instances.0 = "mail": instances_pattern"#
        );
        assert_eq!(summarize_array("not json\n x"), "not json x");
    }

    #[test]
    fn busy_summary_names_the_job() {
        let array = r#"[{"field":"instances.0","parameter":"instances","value":"mail1","error":"action_already_running","job":"/org/nethserver/ModuleUpdater/job/4"}]"#;
        assert_eq!(
            summarize_busy(array),
            r#"instance "mail1" is already being updated by job 4"#
        );
    }

    #[test]
    fn wire_errors_map_to_exit_codes() {
        let call = Call {
            bus: "the system bus",
            what: "UpdateModule",
            job: None,
            instance: None,
        };
        let method_error = |name: &str, desc: &str| {
            let name = zbus::names::OwnedErrorName::try_from(name.to_owned()).unwrap();
            let msg = zbus::Message::method_call("/", "X").build(&()).unwrap();
            zbus::Error::MethodError(name, Some(desc.to_owned()), msg)
        };
        let err = call.error(method_error(
            "org.nethserver.ModuleUpdater.Error.ValidationFailed",
            "[]",
        ));
        assert_eq!(err.exit_code(), exit::VALIDATION);
        assert_eq!(err.stdout(), Some("[]"));
        let err = call.error(method_error(
            "org.nethserver.ModuleUpdater.Error.Busy",
            "[]",
        ));
        assert_eq!(err.exit_code(), exit::BUSY);
        let err = call.error(zbus::Error::FDO(Box::new(fdo::Error::ServiceUnknown(
            "x".into(),
        ))));
        assert_eq!(err.exit_code(), exit::UNREACHABLE);
        // The bus policy's refusal: the client names the action to grant.
        let err = call.error(zbus::Error::FDO(Box::new(fdo::Error::AccessDenied(
            "Rejected send message".into(),
        ))));
        assert_eq!(err.exit_code(), exit::FAILED);
        let text = err.to_string();
        assert!(
            text.contains("org.nethserver.moduleupdater.update-module")
                && text.contains("rules.d")
                && text.contains("run as root"),
            "{text}"
        );
        // The daemon's refusal already says what to grant: not repeated.
        let daemon = "uid 1001 may not update module instances (org.nethserver.moduleupdater.update-module): polkit refused the action; to allow it, grant the polkit action org.nethserver.moduleupdater.update-module to this user with a rule in /etc/polkit-1/rules.d/ (see polkit(8)), or call as root";
        let err = call.error(zbus::Error::FDO(Box::new(fdo::Error::AccessDenied(
            daemon.into(),
        ))));
        assert_eq!(
            err.to_string()
                .matches("org.nethserver.moduleupdater.update-module")
                .count(),
            2,
            "{err}"
        );
        // A call polkit does not gate: only root.
        let list = Call {
            what: "ListInstances",
            ..call
        };
        let err = list.error(zbus::Error::FDO(Box::new(fdo::Error::AccessDenied(
            "Rejected send message".into(),
        ))));
        assert!(
            err.to_string()
                .ends_with("run as root (the bus policy lets only root make this call)"),
            "{err}"
        );
        let err = call.error(zbus::Error::InputOutput(std::sync::Arc::new(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
        )));
        assert_eq!(err.exit_code(), exit::UNREACHABLE);
        assert!(err.to_string().contains("--timeout"), "{err}");
    }

    #[test]
    fn errors_as_json() {
        let err = ClientError::Validation {
            array: r#"[{"field":"instances.0","error":"instances_pattern"}]"#.into(),
            summary: "x".into(),
        };
        let doc = json::document(&err);
        assert_eq!(
            doc["error"]["name"],
            "org.nethserver.ModuleUpdater.Error.ValidationFailed"
        );
        assert_eq!(doc["error"]["exit_code"], 10);
        assert_eq!(doc["error"]["details"][0]["error"], "instances_pattern");
        assert_eq!(doc["error"]["message"], err.to_string());
        let doc = json::document(&ClientError::NoSuchJob {
            job: 9,
            detail: "gone".into(),
        });
        assert_eq!(doc["error"]["exit_code"], 4);
        assert!(doc["error"].get("details").is_none());
        let doc = json::document(&ClientError::Detached { job: 9 });
        assert_eq!(
            doc["error"]["name"],
            "org.nethserver.ModuleUpdater.Client.Error.Detached"
        );
        assert_eq!(json::usage_document("bad\n")["error"]["message"], "bad");
    }

    #[test]
    fn type_mismatch_message_is_ns8s() {
        let err = ClientError::TypeMismatch {
            instance: "mail1".into(),
            current: "mail".into(),
            new: "webtop".into(),
            url: "ghcr.io/nethserver/webtop:1.0.0".into(),
        };
        assert_eq!(
            err.to_string(),
            r#"Module instance "mail1" is of type "mail", cannot update it with an image of type "webtop" (ghcr.io/nethserver/webtop:1.0.0)"#
        );
        assert_eq!(err.exit_code(), exit::FAILED);
    }
}
