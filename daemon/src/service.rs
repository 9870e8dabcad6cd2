//! Start-up and life of the daemon: owns the name, serves the manager and job objects, and runs
//! until SIGTERM (or the idle timeout). The decisions are the job manager's and the engine's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use module_updater_dbus as contract;
use module_updater_systemd::notify;
use tokio::signal::unix::{SignalKind, signal};
use zbus::fdo::RequestNameFlags;

use crate::Config;
use crate::bus::{instance::Instances, job::JobObject, manager::Manager, pump};
use crate::engine::instance::Bases;
use crate::jobs::{Jobs, Settings, job_path};
use crate::updates::{Timeouts, UpdateCache};

/// How long running jobs get to stop on SIGTERM before the daemon exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

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
    #[error(
        "cannot use the state dir {path}: {source} (set --state-dir or state_dir in the configuration file to a writable directory)"
    )]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "another module-updaterd already uses the state dir {path} (stop it first, or give this one its own --state-dir)"
    )]
    StateDirBusy { path: String },
    #[error("cannot publish {path}: {source}")]
    Publish { path: String, source: zbus::Error },
    #[error(
        "the connection to the bus closed (the bus restarted?); exiting so that the service starts again on it"
    )]
    BusClosed,
}

/// Connects, owns the name, notifies READY=1, and serves until SIGTERM, SIGINT or idle timeout.
pub async fn run(config: Config) -> Result<(), ServiceError> {
    let bus = config.bus.describe();
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServiceError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServiceError::Signals)?;

    let settings = Settings {
        // The running binary itself, even after a package upgrade replaced the file on disk:
        // a worker must speak the same job protocol as the daemon that starts it.
        worker_exe: PathBuf::from("/proc/self/exe"),
        bases: Bases {
            home: config.home_base.clone(),
            rootful: config.rootful_base.clone(),
        },
        system_manager_address: config.system_manager_address.clone(),
        script_timeout: Duration::from_secs(config.script_timeout),
        pull_timeout: Duration::from_secs(config.pull_timeout),
        health_timeout: Duration::from_secs(config.health_timeout),
        keep_previous: config.keep_previous,
        rollback_on_failure: config.rollback_on_failure,
        max_parallel: config.parallelism(),
        worker_nice: config.worker_nice,
        job_linger: Duration::from_secs(config.job_linger),
        state_dir: config.state_dir.clone(),
        rootful_podman_args: config.rootful_podman_args.clone(),
        ns8_agent_env: config.ns8_agent_env.clone(),
        scope_limits: config.scope_limits,
    };
    let state_error = |source| ServiceError::StateDir {
        path: config.state_dir.display().to_string(),
        source,
    };
    // Recovery rewrites job records: only the one daemon that owns the state dir may do it, and a
    // second daemon must fail before it touches anything.
    std::fs::create_dir_all(&config.state_dir).map_err(state_error)?;
    let _state_lock = match lock_state_dir(&config.state_dir) {
        Err(ServiceError::StateDirBusy { path }) => {
            // Most likely the daemon that owns the name: say that, it is what a person looks for.
            return Err(if name_owned(&config).await {
                ServiceError::NameTaken {
                    name: contract::BUS_NAME,
                    bus,
                }
            } else {
                ServiceError::StateDirBusy { path }
            });
        }
        other => other?,
    };
    let (jobs, events) = Jobs::new(settings).map_err(state_error)?;

    let connection = config
        .bus
        .builder()
        .serve_at(
            contract::OBJECT_PATH,
            Manager {
                jobs: Arc::clone(&jobs),
                updates: Arc::new(UpdateCache::new(Timeouts {
                    connect: Duration::from_secs(config.registry_connect_timeout),
                    overall: Duration::from_secs(config.registry_timeout),
                })),
            },
        )
        // Jobs and instances below the manager come and go with InterfacesAdded/Removed.
        .serve_at(contract::OBJECT_PATH, zbus::fdo::ObjectManager)
        .build()
        .await
        .map_err(|source| ServiceError::Connect {
            bus: bus.clone(),
            source,
        })?;
    // Jobs recovered from the state dir are served again for the rest of their linger time.
    for id in jobs.ids() {
        let path = job_path(id);
        connection
            .object_server()
            .at(path.as_str(), JobObject::new(id, Arc::clone(&jobs)))
            .await
            .map_err(|source| ServiceError::Publish { path, source })?;
    }
    // The instance objects are there before anyone can ask for them.
    let mut instances = Instances::default();
    instances.refresh(&connection, &jobs).await;
    let pump = tokio::spawn(pump::run(
        connection.clone(),
        events,
        Arc::clone(&jobs),
        instances,
    ));

    // What a previous daemon's updates left running is found before the first request (the
    // state dir's lock says no other daemon runs) and stopped; their instances wait meanwhile.
    jobs.recover_scopes().await;
    request_name(&connection, &bus).await?;
    log::info!("serving {} on {bus}", contract::BUS_NAME);
    notify::ready();
    pump::update_status(&jobs);

    let watchdog = notify::watchdog_interval();
    let mut ticker = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let idle_timeout = config.idle_timeout.map(Duration::from_secs);
    let mut bus_closed = false;
    loop {
        let activity = connection.monitor_activity();
        let idle = async {
            match idle_timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = connection.closed() => {
                bus_closed = true;
                break;
            }
            _ = ticker.tick() => if watchdog.is_some() { notify::watchdog() },
            _ = activity => {}
            _ = idle => if jobs.running().is_empty() {
                log::info!("idle for {} s: exiting", config.idle_timeout.unwrap_or_default());
                break;
            },
        }
    }
    let stopped = if bus_closed {
        // The updates do not need the bus: cancelling one would stop its scripts half-way.
        let running = jobs.running().len();
        log::error!(
            "the bus connection closed: {running} running job(s) go on to their end without the bus, then the daemon exits"
        );
        until_jobs_end(&jobs, &mut sigterm, &mut sigint, &mut ticker, watchdog).await
    } else {
        Stopped::Asked
    };
    notify::stopping();
    if !jobs.running().is_empty() {
        log::info!("stopping: cancelling running jobs");
    }
    jobs.shutdown(SHUTDOWN_GRACE).await;
    // Let the pump send the last signals, then leave the bus.
    tokio::time::sleep(pump::FLUSH_INTERVAL).await;
    pump.abort();
    drop(jobs);
    match stopped {
        Stopped::BusClosed => Err(ServiceError::BusClosed),
        Stopped::Asked => Ok(()),
    }
}

/// Why the daemon stops.
enum Stopped {
    /// SIGTERM, SIGINT or the idle timeout.
    Asked,
    /// The bus connection closed (and the running jobs, if any, have ended).
    BusClosed,
}

/// After the bus closed: waits until no job runs (the watchdog still fed), or a signal.
async fn until_jobs_end(
    jobs: &Jobs,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
    ticker: &mut tokio::time::Interval,
    watchdog: Option<Duration>,
) -> Stopped {
    loop {
        tokio::select! {
            _ = jobs.until_idle() => return Stopped::BusClosed,
            _ = sigterm.recv() => return Stopped::Asked,
            _ = sigint.recv() => return Stopped::Asked,
            _ = ticker.tick() => if watchdog.is_some() { notify::watchdog() },
        }
    }
}

/// Whether someone owns our name on the configured bus (false when the bus cannot be asked).
async fn name_owned(config: &Config) -> bool {
    let Ok(connection) = config.bus.builder().build().await else {
        return false;
    };
    let Ok(dbus) = zbus::fdo::DBusProxy::new(&connection).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(contract::BUS_NAME) else {
        return false;
    };
    dbus.name_has_owner(name).await.unwrap_or(false)
}

/// Holds `flock` on `<state dir>/daemon.lock` for the daemon's life.
fn lock_state_dir(
    state_dir: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, ServiceError> {
    let path = state_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| ServiceError::StateDir {
            path: path.display().to_string(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                ServiceError::StateDirBusy {
                    path: state_dir.display().to_string(),
                }
            } else {
                ServiceError::StateDir {
                    path: path.display().to_string(),
                    source: errno.into(),
                }
            }
        },
    )
}

async fn request_name(connection: &zbus::Connection, bus: &str) -> Result<(), ServiceError> {
    let name = contract::BUS_NAME;
    match connection
        .request_name_with_flags(name, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(_) => Ok(()),
        Err(zbus::Error::NameTaken) => Err(ServiceError::NameTaken {
            name,
            bus: bus.to_owned(),
        }),
        Err(source) if is_access_denied(&source) => Err(ServiceError::NameDenied {
            name,
            bus: bus.to_owned(),
            policy: contract::POLICY_FILE,
            source,
        }),
        Err(source) => Err(ServiceError::RequestName {
            name,
            bus: bus.to_owned(),
            source,
        }),
    }
}

fn is_access_denied(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied")
        || matches!(error, zbus::Error::FDO(e) if matches!(**e, zbus::fdo::Error::AccessDenied(_)))
}
