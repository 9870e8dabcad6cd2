//! A hand-written proxy for `org.freedesktop.systemd1.Manager`, with only the members we use, and
//! the ways to reach a manager.
//!
//! A rootless instance's manager is reached through that user's bus at `$XDG_RUNTIME_DIR/bus`: the
//! user bus only accepts its own user, so this runs in a process that has the instance user's uid.
//! systemd's private socket (`$XDG_RUNTIME_DIR/systemd/private`) is not usable from zbus 6, because
//! systemd puts its well-known name in the sender field of peer-to-peer replies.

use std::path::Path;

use zbus::proxy;

use crate::SystemdError;

#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    /// `systemctl daemon-reload`: replies once the reload is complete.
    fn reload(&self) -> zbus::Result<()>;
    /// Loads a unit (if needed) and returns its object path.
    fn load_unit(&self, name: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    /// The loaded units: name, description, load, active and sub state, followed unit, object
    /// path, job id, job type, job path.
    #[allow(clippy::type_complexity)]
    fn list_units(&self) -> zbus::Result<Vec<ListedUnit>>;
    /// The unit files in the given states (e.g. `enabled`) and matching the patterns (all when
    /// empty): path and state.
    fn list_unit_files_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<(String, String)>>;
    /// `systemctl restart`: queues the job and returns its path.
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    /// Asks the manager to emit job and unit signals to this client (the API bus only sends
    /// them while a client is subscribed).
    fn subscribe(&self) -> zbus::Result<()>;
    /// Creates and starts a transient unit (a scope here); returns the start job's path.
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::Variant<'_>)],
        aux: &[(&str, &[(&str, zbus::Variant<'_>)])],
    ) -> zbus::Result<zbus::OwnedObjectPath>;
    /// Stops a unit; returns the stop job's path.
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    /// The loaded units whose names match one of `patterns` (and whose state is one of
    /// `states`, or any state when empty).
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<ListedUnit>>;
    /// A job left the manager's queue: `result` is `done`, `canceled`, `timeout`, `failed`,
    /// `dependency` or `skipped`.
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// One entry of `ListUnits`/`ListUnitsByPatterns`: name, description, load state, active state,
/// sub-state, followed unit, object path, job id, job type, job path.
pub type ListedUnit = (
    String,
    String,
    String,
    String,
    String,
    String,
    zbus::OwnedObjectPath,
    u32,
    String,
    zbus::OwnedObjectPath,
);

#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn need_daemon_reload(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    /// Whether the unit was made at run time (`systemd-run`, podman's health check timers).
    #[zbus(property)]
    fn transient(&self) -> zbus::Result<bool>;
}

/// The address of a user's bus for its runtime directory.
pub fn user_bus_address(runtime_dir: &Path) -> String {
    format!("unix:path={}", runtime_dir.join("bus").display())
}

/// Connects to a bus by address (used for a user's bus and for an explicit system bus address).
pub async fn connect(address: &str) -> Result<zbus::Connection, SystemdError> {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .map_err(|source| SystemdError::Connect {
            address: address.to_owned(),
            source,
        })
}

/// Connects to the system bus, or to `address` when given (tests and `--system-manager-address`).
pub async fn connect_system(address: Option<&str>) -> Result<zbus::Connection, SystemdError> {
    match address {
        Some(address) => connect(address).await,
        None => zbus::Connection::system()
            .await
            .map_err(|source| SystemdError::Connect {
                address: "the system bus".to_owned(),
                source,
            }),
    }
}

/// Asks the manager on `connection` to reload its unit files and waits until it has.
pub async fn reload(connection: &zbus::Connection) -> Result<(), SystemdError> {
    let manager = ManagerProxy::new(connection)
        .await
        .map_err(|source| SystemdError::Call {
            method: "Reload",
            source,
        })?;
    manager.reload().await.map_err(|source| SystemdError::Call {
        method: "Reload",
        source,
    })
}

/// A property of a unit's type-specific interface (`org.freedesktop.systemd1.Service` for
/// `x.service`, ...), e.g. `Result` or `Type`; `None` when the unit type has no such property.
pub async fn unit_type_property(
    connection: &zbus::Connection,
    path: &zbus::ObjectPath<'_>,
    unit: &str,
    property: &str,
) -> Option<String> {
    let kind = unit.rsplit_once('.')?.1;
    let mut chars = kind.chars();
    let first = chars.next()?.to_ascii_uppercase();
    let interface = format!("org.freedesktop.systemd1.{first}{}", chars.as_str());
    let interface = zbus::names::InterfaceName::try_from(interface).ok()?;
    let properties = zbus::fdo::PropertiesProxy::builder(connection)
        .destination("org.freedesktop.systemd1")
        .path(path.to_owned())
        .build()
        .await
        .ok()?;
    let value = properties.get(interface, property).await.ok()?;
    String::try_from(value).ok()
}
