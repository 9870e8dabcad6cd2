//! Turns job events into D-Bus signals and property changes.
//!
//! `PropertiesChanged` for a job's Status, Progress and ExitCode are coalesced to at most one
//! per [`FLUSH_INTERVAL`] (5 per second), and so are each instance's `Progress` signals (the
//! latest value wins); an instance's last progress goes out before its `InstanceFinished`, and a
//! job's final values before its `Finished`, so a client that reacts to those reads the final state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use module_updater_dbus::types::Step;
use std::time::Duration;

use module_updater_systemd::notify;
use tokio::sync::mpsc;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use super::job::JobObject;
use super::manager::Manager;
use crate::jobs::{JobEvent, job_path};

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Runs until the job manager drops its sender.
pub async fn run(
    connection: Connection,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    jobs: std::sync::Arc<crate::jobs::Jobs>,
) {
    let mut pending = Pending::default();
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                if let Err(err) = handle(&connection, &jobs, event, &mut pending).await {
                    log::warn!("cannot emit a signal: {err}");
                }
            }
            _ = ticker.tick() => {
                for ((job, instance), (step, percent)) in std::mem::take(&mut pending.progress) {
                    if let Err(err) = progress(&connection, job, &instance, step, percent).await {
                        log::warn!("cannot emit a signal: {err}");
                    }
                }
                for job in std::mem::take(&mut pending.properties) {
                    flush(&connection, &jobs, &mut pending.sent, job).await;
                }
            }
        }
    }
}

/// What waits for the next tick.
#[derive(Default)]
struct Pending {
    /// Jobs whose Status, Progress or ExitCode changed.
    properties: BTreeSet<u64>,
    /// The latest progress of each (job, instance) not yet signalled.
    progress: BTreeMap<(u64, String), (Step, u8)>,
    /// What PropertiesChanged last said of each job.
    sent: HashMap<u64, Sent>,
}

impl Pending {
    /// Takes the pending progress of one instance, or of every instance of the job.
    fn take_progress(&mut self, job: u64, instance: Option<&str>) -> Vec<(String, Step, u8)> {
        let keys: Vec<(u64, String)> = self
            .progress
            .keys()
            .filter(|(j, i)| *j == job && instance.is_none_or(|wanted| wanted == i))
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                self.progress
                    .remove(&key)
                    .map(|(step, percent)| (key.1, step, percent))
            })
            .collect()
    }
}

async fn progress(
    connection: &Connection,
    job: u64,
    instance: &str,
    step: Step,
    percent: u8,
) -> zbus::Result<()> {
    JobObject::progress_signal(
        &emitter(connection, job)?,
        instance,
        step.as_str(),
        u32::from(percent),
    )
    .await
}

fn emitter(connection: &Connection, job: u64) -> zbus::Result<SignalEmitter<'static>> {
    SignalEmitter::new(connection, job_path(job)).map(|e| e.into_owned())
}

async fn handle(
    connection: &Connection,
    jobs: &crate::jobs::Jobs,
    event: JobEvent,
    pending: &mut Pending,
) -> zbus::Result<()> {
    match event {
        JobEvent::Changed { job } => {
            pending.properties.insert(job);
        }
        JobEvent::Progress {
            job,
            instance,
            step,
            percent,
        } => {
            pending.progress.insert((job, instance), (step, percent));
        }
        JobEvent::Message {
            job,
            instance,
            priority,
            text,
        } => {
            let emitter = emitter(connection, job)?;
            JobObject::message(&emitter, &instance, u32::from(priority), &text).await?;
        }
        JobEvent::InstanceFinished {
            job,
            instance,
            status,
            exit_code,
        } => {
            for (instance, step, percent) in pending.take_progress(job, Some(&instance)) {
                progress(connection, job, &instance, step, percent).await?;
            }
            let emitter = emitter(connection, job)?;
            JobObject::instance_finished(&emitter, &instance, status.as_str(), exit_code).await?;
        }
        JobEvent::Finished {
            job,
            status,
            exit_code,
        } => {
            for (instance, step, percent) in pending.take_progress(job, None) {
                progress(connection, job, &instance, step, percent).await?;
            }
            pending.properties.remove(&job);
            flush(connection, jobs, &mut pending.sent, job).await;
            JobObject::finished(&emitter(connection, job)?, status.as_str(), exit_code).await?;
            let path = job_path(job);
            let manager = SignalEmitter::new(connection, module_updater_dbus::OBJECT_PATH)?;
            let path = zbus::ObjectPath::try_from(path.as_str())?;
            Manager::job_finished(&manager, path, status.as_str(), exit_code).await?;
            update_status(jobs);
        }
        JobEvent::Removed { job } => {
            pending.properties.remove(&job);
            pending.sent.remove(&job);
            connection
                .object_server()
                .remove::<JobObject, _>(job_path(job))
                .await?;
            jobs_changed(connection).await;
        }
    }
    Ok(())
}

/// Sends PropertiesChanged for the job's changing properties.
async fn flush(
    connection: &Connection,
    jobs: &crate::jobs::Jobs,
    sent: &mut HashMap<u64, Sent>,
    job: u64,
) {
    let Some(record) = jobs.get(job) else { return };
    let now = Sent {
        status: record.status.as_str(),
        progress: u32::from(record.progress),
        exit_code: record.exit_code,
    };
    let before = sent.insert(job, now);
    // One signal per flush, with only what changed since the last one.
    let mut changed: HashMap<&str, zbus::Variant<'_>> = HashMap::new();
    if before.is_none_or(|b| b.status != now.status) {
        changed.insert("Status", zbus::Variant::from(now.status));
    }
    if before.is_none_or(|b| b.progress != now.progress) {
        changed.insert("Progress", zbus::Variant::from(now.progress));
    }
    if before.is_none_or(|b| b.exit_code != now.exit_code) {
        changed.insert("ExitCode", zbus::Variant::from(now.exit_code));
    }
    if changed.is_empty() {
        return;
    }
    let Ok(emitter) = emitter(connection, job) else {
        return;
    };
    let Ok(interface) = zbus::names::InterfaceName::try_from(module_updater_dbus::JOB_INTERFACE)
    else {
        return;
    };
    let invalidated: &[&str] = &[];
    if let Err(err) =
        zbus::fdo::Properties::properties_changed(&emitter, interface, changed, invalidated.into())
            .await
    {
        log::warn!("cannot emit PropertiesChanged for job {job}: {err}");
    }
}

/// The last values of a job's changing properties that went out in PropertiesChanged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    status: &'static str,
    progress: u32,
    exit_code: i32,
}

/// Sends PropertiesChanged for the manager's `Jobs`.
pub async fn jobs_changed(connection: &Connection) {
    if let Ok(iface) = connection
        .object_server()
        .interface::<_, Manager>(module_updater_dbus::OBJECT_PATH)
        .await
    {
        let _ = iface.get().await.jobs_changed(iface.signal_emitter()).await;
    }
}

/// `STATUS=` for `systemctl status`: idle, or what is being updated.
pub fn update_status(jobs: &crate::jobs::Jobs) {
    let running = jobs.running();
    let line = match running.as_slice() {
        [] => "idle".to_owned(),
        [(id, count)] => format!(
            "updating {count} instance{} (job {id})",
            if *count == 1 { "" } else { "s" }
        ),
        many => {
            let count: usize = many.iter().map(|(_, c)| c).sum();
            format!("updating {count} instances in {} jobs", many.len())
        }
    };
    notify::status(&line);
}
