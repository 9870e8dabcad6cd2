//! The D-Bus face of the daemon: owns the name, serves the manager object, and runs until SIGTERM.
//! It stays thin: every decision is made by the engine it calls.

use std::time::Duration;

use module_updater_dbus as contract;
use module_updater_systemd::notify;
use tokio::signal::unix::{SignalKind, signal};
use zbus::fdo::RequestNameFlags;

use crate::Config;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot connect to {bus}: {source}")]
    Connect { bus: String, source: zbus::Error },
    #[error(
        "the name {name} is already owned on {bus}: another module-updaterd is running (stop it first, e.g. `systemctl stop module-updaterd`)"
    )]
    NameTaken { name: &'static str, bus: String },
    #[error(
        "not allowed to own {name} on {bus}: the bus policy lets only root own it (run as root, and install {policy} into the bus's policy directory): {source}"
    )]
    NameDenied {
        name: &'static str,
        bus: String,
        policy: &'static str,
        source: zbus::Error,
    },
    #[error("cannot request the name {name} on {bus}: {source}")]
    RequestName {
        name: &'static str,
        bus: String,
        source: zbus::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The manager object at `/org/nethserver/ModuleUpdater`.
pub struct Manager;

#[zbus::interface(name = "org.nethserver.ModuleUpdater")]
impl Manager {
    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
}

/// Connects, owns the name, notifies READY=1, and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ServiceError> {
    let bus = config.bus.describe();
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;

    let connection = config
        .bus
        .builder()
        .serve_at(contract::OBJECT_PATH, Manager)
        .build()
        .await
        .map_err(|source| ServiceError::Connect { bus: bus.clone(), source })?;

    request_name(&connection, &bus).await?;
    log::info!("serving {} on {bus}", contract::BUS_NAME);
    notify::ready();
    notify::status("idle");

    let watchdog = notify::watchdog_interval();
    let mut ticker = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = ticker.tick() => if watchdog.is_some() { notify::watchdog() },
        }
    }
    notify::stopping();
    log::info!("stopping");
    Ok(())
}

async fn request_name(connection: &zbus::Connection, bus: &str) -> Result<(), ServiceError> {
    let name = contract::BUS_NAME;
    match connection
        .request_name_with_flags(name, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(_) => Ok(()),
        Err(zbus::Error::NameTaken) => Err(ServiceError::NameTaken { name, bus: bus.to_owned() }),
        Err(source @ zbus::Error::MethodError(..)) if is_access_denied(&source) => Err(ServiceError::NameDenied {
            name,
            bus: bus.to_owned(),
            policy: contract::POLICY_FILE,
            source,
        }),
        Err(source) => Err(ServiceError::RequestName { name, bus: bus.to_owned(), source }),
    }
}

fn is_access_denied(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied")
}
