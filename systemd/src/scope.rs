//! Transient scopes on a systemd manager, through its D-Bus API only (what `systemd-run --scope`
//! does): create one around running processes, stop it and wait until it is empty, and list the
//! scopes a name pattern matches. Every job the manager queues is followed to its `JobRemoved`
//! signal and its result checked.

use std::time::Duration;

use futures_util::StreamExt;
use zbus::Variant;

use crate::SystemdError;
use crate::manager::ManagerProxy;

/// How long the manager may take to run a start or stop job of ours.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// What a new scope holds and how it is limited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSpec {
    /// The unit name, ending in `.scope` ([`escape`] the parts that come from outside).
    pub name: String,
    pub description: String,
    /// The slice it goes in, e.g. `module-updater.slice`.
    pub slice: String,
    /// The processes moved into it (their children born later follow them).
    pub pids: Vec<u32>,
    pub cpu_weight: Option<u64>,
    pub io_weight: Option<u64>,
    /// `MemoryMax=` in bytes.
    pub memory_max: Option<u64>,
    pub tasks_max: Option<u64>,
    /// Between the stop's SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
}

impl ScopeSpec {
    fn properties(&self) -> Vec<(&'static str, Variant<'_>)> {
        let mut properties = vec![
            ("PIDs", Variant::from(self.pids.clone())),
            ("Slice", Variant::from(self.slice.as_str())),
            ("Description", Variant::from(self.description.as_str())),
            (
                "TimeoutStopUSec",
                Variant::from(self.stop_timeout.as_micros() as u64),
            ),
            // Gone from the manager once stopped, even when a process had to be killed.
            ("CollectMode", Variant::from("inactive-or-failed")),
        ];
        let limits = [
            ("CPUWeight", self.cpu_weight),
            ("IOWeight", self.io_weight),
            ("MemoryMax", self.memory_max),
            ("TasksMax", self.tasks_max),
        ];
        for (name, value) in limits {
            if let Some(value) = value {
                properties.push((name, Variant::from(value)));
            }
        }
        properties
    }
}

/// Escapes `text` for use inside a unit name as systemd does (`systemd-escape`): letters,
/// digits, `:`, `_` and `.` (not leading) stay; every other byte, `-` included, becomes `\xHH`.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for (index, byte) in text.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || byte == b':' || byte == b'_';
        if plain || (byte == b'.' && index > 0) {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("\\x{byte:02x}"));
        }
    }
    escaped
}

/// The inverse of [`escape`]; `None` for text that is not a valid escape.
pub fn unescape(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let raw = text.as_bytes();
    let mut index = 0;
    while index < raw.len() {
        if raw[index] == b'\\' {
            let hex = text.get(index + 2..index + 4)?;
            if raw.get(index + 1) != Some(&b'x') {
                return None;
            }
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            index += 4;
        } else {
            bytes.push(raw[index]);
            index += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The manager, subscribed to its job signals, and the stream of its `JobRemoved`.
async fn subscribed(
    connection: &zbus::Connection,
) -> Result<(ManagerProxy<'_>, crate::manager::JobRemovedStream), SystemdError> {
    let manager = manager(connection).await?;
    let removed = manager
        .receive_job_removed()
        .await
        .map_err(|source| SystemdError::Call {
            method: "Subscribe",
            source,
        })?;
    Ok((manager, removed))
}

async fn manager(connection: &zbus::Connection) -> Result<ManagerProxy<'_>, SystemdError> {
    let manager = ManagerProxy::new(connection)
        .await
        .map_err(|source| SystemdError::Call {
            method: "Subscribe",
            source,
        })?;
    // Per connection; a second call is refused as AlreadySubscribed, which is what we want.
    match manager.subscribe().await {
        Ok(()) => Ok(manager),
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" =>
        {
            Ok(manager)
        }
        Err(source) => Err(SystemdError::Call {
            method: "Subscribe",
            source,
        }),
    }
}

/// Creates the scope and returns once the manager's start job is done (the processes are in it).
pub async fn start(connection: &zbus::Connection, spec: &ScopeSpec) -> Result<(), SystemdError> {
    // Subscribed before the call: the job's end can beat the method's reply.
    let (manager, mut removed) = subscribed(connection).await?;
    let job = manager
        .start_transient_unit(&spec.name, "fail", &spec.properties(), &[])
        .await
        .map_err(|source| SystemdError::Unit {
            unit: spec.name.clone(),
            method: "StartTransientUnit",
            source,
        })?;
    let result = wait_job(&mut removed, job.as_str(), &spec.name, "start").await?;
    if result != "done" {
        return Err(SystemdError::Job {
            unit: spec.name.clone(),
            action: "start",
            result,
        });
    }
    Ok(())
}

/// Stops the scope (SIGTERM to every process, SIGKILL after its stop timeout) and returns once
/// the stop job is over, i.e. nothing runs in it any more. A scope that is already gone is fine.
pub async fn stop(connection: &zbus::Connection, name: &str) -> Result<(), SystemdError> {
    let (manager, mut removed) = subscribed(connection).await?;
    let job = match manager.stop_unit(name, "replace").await {
        Ok(job) => job,
        Err(zbus::Error::MethodError(error, _, _))
            if error.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            return Ok(());
        }
        Err(source) => {
            return Err(SystemdError::Unit {
                unit: name.to_owned(),
                method: "StopUnit",
                source,
            });
        }
    };
    let result = wait_job(&mut removed, job.as_str(), name, "stop").await?;
    // `done`, or `canceled` when another stop job of the same unit replaced ours: either way the
    // unit went down; anything else says it did not.
    if result != "done" && result != "canceled" {
        return Err(SystemdError::Job {
            unit: name.to_owned(),
            action: "stop",
            result,
        });
    }
    Ok(())
}

/// The names of the scopes of the manager that `pattern` (a shell glob) matches and that are
/// not inactive.
pub async fn list(
    connection: &zbus::Connection,
    pattern: &str,
) -> Result<Vec<String>, SystemdError> {
    let manager = ManagerProxy::new(connection)
        .await
        .map_err(|source| SystemdError::Call {
            method: "ListUnitsByPatterns",
            source,
        })?;
    let units = manager
        .list_units_by_patterns(&[], &[pattern])
        .await
        .map_err(|source| SystemdError::Call {
            method: "ListUnitsByPatterns",
            source,
        })?;
    Ok(units
        .into_iter()
        .filter(|unit| unit.0.ends_with(".scope") && unit.3 != "inactive")
        .map(|unit| unit.0)
        .collect())
}

/// Waits for the `JobRemoved` of `job` and returns its result.
async fn wait_job(
    removed: &mut crate::manager::JobRemovedStream,
    job: &str,
    unit: &str,
    action: &'static str,
) -> Result<String, SystemdError> {
    let wait = async {
        while let Some(signal) = removed.next().await {
            if let Ok(args) = signal.args()
                && args.job.as_str() == job
            {
                return Some(args.result.to_owned());
            }
        }
        None
    };
    match tokio::time::timeout(JOB_TIMEOUT, wait).await {
        Ok(Some(result)) => Ok(result),
        Ok(None) => Err(SystemdError::Job {
            unit: unit.to_owned(),
            action,
            result: "unknown: the connection to the manager closed".to_owned(),
        }),
        Err(_) => Err(SystemdError::Job {
            unit: unit.to_owned(),
            action,
            result: format!("no answer within {} s", JOB_TIMEOUT.as_secs()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_systemds() {
        assert_eq!(escape("mail1"), "mail1");
        assert_eq!(escape("a-b/c"), "a\\x2db\\x2fc");
        assert_eq!(escape(".x.y"), "\\x2ex.y");
        assert_eq!(escape("é"), "\\xc3\\xa9");
    }

    #[test]
    fn unescaping_reverses_escaping() {
        for text in ["mail1", "a-b/c", ".x.y", "é ü", ""] {
            assert_eq!(unescape(&escape(text)).as_deref(), Some(text));
        }
        assert_eq!(unescape("bad\\x2"), None);
        assert_eq!(unescape("bad\\y41"), None);
    }

    #[test]
    fn limits_are_set_only_when_given() {
        let mut spec = ScopeSpec {
            name: "x.scope".into(),
            description: "d".into(),
            slice: "s.slice".into(),
            pids: vec![7],
            cpu_weight: Some(20),
            io_weight: None,
            memory_max: None,
            tasks_max: Some(100),
            stop_timeout: Duration::from_secs(1),
        };
        let names: Vec<&str> = spec.properties().iter().map(|p| p.0).collect();
        assert!(names.contains(&"CPUWeight") && names.contains(&"TasksMax"));
        assert!(!names.contains(&"IOWeight") && !names.contains(&"MemoryMax"));
        spec.cpu_weight = None;
        let names: Vec<&str> = spec.properties().iter().map(|p| p.0).collect();
        assert!(!names.contains(&"CPUWeight"));
    }
}
