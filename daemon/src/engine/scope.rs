//! Every instance update runs in a transient scope of the system manager,
//! `module-updater-job<N>-<instance>.scope` in `module-updater.slice`, so that nothing an update
//! starts (podman, skopeo, scripts and what they leave behind) outlives it: when the worker
//! ends, the daemon stops the scope and waits until it is empty.
//!
//! The worker is moved into its scope before it reads its job, hence before it runs anything of
//! the instance. Where no systemd manager answers (a machine without systemd, or a test sandbox
//! without one), updates run uncontained and the daemon logs a warning for each.

use std::time::Duration;

use module_updater_systemd::SystemdError;
use module_updater_systemd::scope::{self, ScopeSpec};

/// The slice every update's scope goes in (a child of `module.slice`, systemd's `-` rule).
pub const SLICE: &str = "module-updater.slice";
/// The beginning of every update scope's name.
pub const UNIT_PREFIX: &str = "module-updater-job";
/// The weights of an update: below systemd's default of 100, so the node's services and the
/// daemon come first when the CPU or the disks are busy.
pub const CPU_WEIGHT: u64 = 20;
pub const IO_WEIGHT: u64 = 20;
/// What remains in a scope after its worker ended gets SIGTERM, then SIGKILL this much later.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Resource limits of each update from the configuration (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub tasks_max: Option<u64>,
}

/// The scope's name of one instance's update in job `job`.
pub fn unit_name(job: u64, instance: &str) -> String {
    format!("{UNIT_PREFIX}{job}-{}.scope", scope::escape(instance))
}

/// The job and instance of a scope name made by [`unit_name`].
pub fn parse_unit_name(name: &str) -> Option<(u64, String)> {
    let rest = name.strip_prefix(UNIT_PREFIX)?.strip_suffix(".scope")?;
    let (job, instance) = rest.split_once('-')?;
    Some((job.parse().ok()?, scope::unescape(instance)?))
}

/// Why an update could not be put in its scope.
#[derive(Debug, thiserror::Error)]
#[error("cannot contain the update in the systemd scope {unit}: {source}")]
pub struct ScopeError {
    pub unit: String,
    #[source]
    pub source: SystemdError,
}

/// The daemon's way to the system manager, connected on first use and again after the bus
/// went away.
pub struct Scopes {
    address: Option<String>,
    limits: Limits,
    connection: tokio::sync::Mutex<Option<zbus::Connection>>,
}

/// Whether an error says that no manager is there at all (rather than that it refused): no bus,
/// nobody owns systemd's name, or the bus failed to activate it (a system bus without systemd
/// as PID 1, whose activation file runs /bin/false).
fn unreachable(error: &SystemdError) -> bool {
    match error {
        SystemdError::Connect { .. } => true,
        SystemdError::Call { source, .. } | SystemdError::Unit { source, .. } => {
            let name = match source {
                zbus::Error::MethodError(name, _, _) => name.to_string(),
                zbus::Error::FDO(error) => zbus::DBusError::name(error.as_ref()).to_string(),
                _ => return false,
            };
            no_manager(&name)
        }
        _ => false,
    }
}

/// Whether a D-Bus error name says that nobody serves systemd's name on the bus.
fn no_manager(error_name: &str) -> bool {
    error_name == "org.freedesktop.DBus.Error.ServiceUnknown"
        || error_name == "org.freedesktop.DBus.Error.NameHasNoOwner"
        || error_name.starts_with("org.freedesktop.DBus.Error.Spawn.")
}

/// Whether the connection itself failed (the bus restarted): worth one new connection.
fn connection_lost(error: &SystemdError) -> bool {
    match error {
        SystemdError::Call { source, .. } | SystemdError::Unit { source, .. } => {
            matches!(source, zbus::Error::InputOutput(_))
        }
        SystemdError::Job { result, .. } => result.starts_with("unknown"),
        _ => false,
    }
}

impl Scopes {
    /// `address`: the system manager's bus (`None`: the system bus).
    pub fn new(address: Option<String>, limits: Limits) -> Scopes {
        Scopes {
            address,
            limits,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    fn describe_bus(&self) -> String {
        self.address
            .clone()
            .unwrap_or_else(|| "the system bus".to_owned())
    }

    async fn connection(&self, fresh: bool) -> Result<zbus::Connection, SystemdError> {
        let mut cached = self.connection.lock().await;
        if fresh {
            *cached = None;
        }
        if let Some(connection) = cached.as_ref() {
            return Ok(connection.clone());
        }
        let connection =
            module_updater_systemd::manager::connect_system(self.address.as_deref()).await?;
        *cached = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `call` on the manager's connection, once more on a new connection if the first one
    /// was lost.
    async fn with_manager<T, F>(
        &self,
        call: impl Fn(zbus::Connection) -> F,
    ) -> Result<T, SystemdError>
    where
        F: std::future::Future<Output = Result<T, SystemdError>>,
    {
        let first = call(self.connection(false).await?).await;
        match first {
            Err(error) if connection_lost(&error) => call(self.connection(true).await?).await,
            other => other,
        }
    }

    /// Moves the process `pid` (a worker that has not started yet) into a new scope for
    /// `instance` of job `job`. `Ok(None)` when no systemd manager is there: the update runs
    /// uncontained (logged).
    pub async fn contain(
        &self,
        job: u64,
        instance: &str,
        pid: u32,
    ) -> Result<Option<String>, ScopeError> {
        let unit = unit_name(job, instance);
        let spec = ScopeSpec {
            name: unit.clone(),
            description: format!("module-updater job {job}: update of instance {instance}"),
            slice: SLICE.to_owned(),
            pids: vec![pid],
            cpu_weight: Some(CPU_WEIGHT),
            io_weight: Some(IO_WEIGHT),
            memory_max: self.limits.memory_max,
            tasks_max: self.limits.tasks_max,
            stop_timeout: STOP_TIMEOUT,
        };
        match self
            .with_manager(|connection| {
                let spec = spec.clone();
                async move { scope::start(&connection, &spec).await }
            })
            .await
        {
            Ok(()) => Ok(Some(unit)),
            Err(error) if unreachable(&error) => {
                log::warn!(
                    MODULE_UPDATER_JOB = job, MODULE_UPDATER_INSTANCE = instance;
                    "job {job}: {instance} runs without a systemd scope: no systemd manager answers on {}: {error}",
                    self.describe_bus()
                );
                Ok(None)
            }
            Err(source) => Err(ScopeError { unit, source }),
        }
    }

    /// Stops the scope and returns once nothing runs in it any more.
    pub async fn stop(&self, unit: &str) -> Result<(), ScopeError> {
        self.with_manager(|connection| async move { scope::stop(&connection, unit).await })
            .await
            .map_err(|source| ScopeError {
                unit: unit.to_owned(),
                source,
            })
    }

    /// The update scopes of the manager that are not stopped: (unit, job, instance). Empty when
    /// no manager answers.
    pub async fn leftovers(&self) -> Result<Vec<(String, u64, String)>, SystemdError> {
        let pattern = format!("{UNIT_PREFIX}*.scope");
        let listed = self
            .with_manager(|connection| {
                let pattern = pattern.clone();
                async move { scope::list(&connection, &pattern).await }
            })
            .await;
        match listed {
            Ok(units) => Ok(units
                .into_iter()
                .filter_map(|unit| {
                    let (job, instance) = parse_unit_name(&unit)?;
                    Some((unit, job, instance))
                })
                .collect()),
            Err(error) if unreachable(&error) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_carry_the_job_and_the_escaped_instance() {
        assert_eq!(unit_name(7, "mail1"), "module-updater-job7-mail1.scope");
        assert_eq!(
            unit_name(12, "odd-name"),
            "module-updater-job12-odd\\x2dname.scope"
        );
        assert_eq!(
            parse_unit_name("module-updater-job12-odd\\x2dname.scope"),
            Some((12, "odd-name".to_owned()))
        );
        assert_eq!(parse_unit_name("module-updater-jobx-a.scope"), None);
        assert_eq!(parse_unit_name("other.scope"), None);
    }

    #[test]
    fn only_a_missing_manager_degrades_to_an_uncontained_update() {
        for name in [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
            "org.freedesktop.DBus.Error.Spawn.ChildExited",
        ] {
            assert!(no_manager(name), "{name}");
        }
        for name in [
            "org.freedesktop.DBus.Error.AccessDenied",
            "org.freedesktop.systemd1.UnitExists",
            "org.freedesktop.DBus.Error.InvalidArgs",
        ] {
            assert!(!no_manager(name), "{name}");
        }
    }
}
