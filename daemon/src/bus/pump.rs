//! Turns job events into D-Bus signals and property changes.
//!
//! `PropertiesChanged` for a job's Status, Progress and ExitCode are coalesced to at most one
//! per [`FLUSH_INTERVAL`] (5 per second); a job's final values are flushed before its `Finished`
//! signal so a client that reacts to `Finished` reads the final state.

use std::collections::BTreeSet;
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
    let mut dirty: BTreeSet<u64> = BTreeSet::new();
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                if let Err(err) = handle(&connection, &jobs, event, &mut dirty).await {
                    log::warn!("cannot emit a signal: {err}");
                }
            }
            _ = ticker.tick() => {
                for job in std::mem::take(&mut dirty) {
                    flush(&connection, job).await;
                }
            }
        }
    }
}

fn emitter(connection: &Connection, job: u64) -> zbus::Result<SignalEmitter<'static>> {
    SignalEmitter::new(connection, job_path(job)).map(|e| e.into_owned())
}

async fn handle(
    connection: &Connection,
    jobs: &crate::jobs::Jobs,
    event: JobEvent,
    dirty: &mut BTreeSet<u64>,
) -> zbus::Result<()> {
    match event {
        JobEvent::Changed { job } => {
            dirty.insert(job);
        }
        JobEvent::Progress {
            job,
            instance,
            step,
            percent,
        } => {
            JobObject::progress_signal(
                &emitter(connection, job)?,
                &instance,
                step.as_str(),
                u32::from(percent),
            )
            .await?;
        }
        JobEvent::Message {
            job,
            instance,
            priority,
            text,
        } => {
            JobObject::message(
                &emitter(connection, job)?,
                &instance,
                u32::from(priority),
                &text,
            )
            .await?;
        }
        JobEvent::InstanceFinished {
            job,
            instance,
            status,
            exit_code,
        } => {
            JobObject::instance_finished(
                &emitter(connection, job)?,
                &instance,
                status.as_str(),
                exit_code,
            )
            .await?;
        }
        JobEvent::Finished {
            job,
            status,
            exit_code,
        } => {
            dirty.remove(&job);
            flush(connection, job).await;
            JobObject::finished(&emitter(connection, job)?, status.as_str(), exit_code).await?;
            let path = job_path(job);
            let manager = SignalEmitter::new(connection, module_updater_dbus::OBJECT_PATH)?;
            Manager::job_finished(
                &manager,
                zbus::ObjectPath::try_from(path.as_str())?,
                status.as_str(),
                exit_code,
            )
            .await?;
            update_status(jobs);
        }
        JobEvent::Removed { job } => {
            dirty.remove(&job);
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
async fn flush(connection: &Connection, job: u64) {
    let Ok(iface) = connection
        .object_server()
        .interface::<_, JobObject>(job_path(job))
        .await
    else {
        return;
    };
    let emitter = iface.signal_emitter();
    let object = iface.get().await;
    let _ = object.status_changed(emitter).await;
    let _ = object.progress_changed(emitter).await;
    let _ = object.exit_code_changed(emitter).await;
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
