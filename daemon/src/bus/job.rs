//! `org.nethserver.ModuleUpdater.Job` at `/org/nethserver/ModuleUpdater/job/<n>`.

use std::collections::HashMap;
use std::sync::Arc;

use module_updater_dbus::Error;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use super::CallError;
use super::authority::{self, Action};
use crate::jobs::{InstanceProgress, JobRecord, Jobs, job_path};

/// One instance's entry of `InstanceStates`: (status, step, percent, exit code).
pub type InstanceStateTuple = (String, String, u32, i32);

/// The wire form of an instance's progress in a job.
pub fn state_tuple(progress: &InstanceProgress) -> InstanceStateTuple {
    (
        progress.status.as_str().to_owned(),
        progress
            .step
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        u32::from(progress.percent),
        progress.exit_code,
    )
}

pub struct JobObject {
    id: u64,
    jobs: Arc<Jobs>,
}

impl JobObject {
    pub fn new(id: u64, jobs: Arc<Jobs>) -> Self {
        JobObject { id, jobs }
    }

    fn record(&self) -> Result<JobRecord, zbus::fdo::Error> {
        self.jobs
            .get(self.id)
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("job {} is gone", self.id)))
    }
}

#[zbus::interface(name = "org.nethserver.ModuleUpdater.Job")]
impl JobObject {
    /// Asks the job to stop: SIGTERM to its workers, SIGKILL 10 s later. The caller that started
    /// the job (and root) may; anyone else as polkit decides.
    async fn cancel(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), CallError> {
        let record = self
            .jobs
            .get(self.id)
            .ok_or_else(|| Error::NoSuchJob(format!("job {} is gone", self.id)))?;
        let caller = super::caller(connection, &header).await?;
        let path = job_path(self.id);
        let instances = record.instances.join(" ");
        authority::authorize(
            connection,
            &header,
            caller,
            Action::Cancel,
            &[("job", path.as_str()), ("instances", instances.as_str())],
            Some(record.caller_uid),
        )
        .await?;
        Ok(self.jobs.cancel(self.id)?)
    }

    /// `{"status", "exit_code", "instances": {id: result}}`.
    #[zbus(out_args("result"))]
    async fn get_result(&self) -> Result<String, Error> {
        self.jobs
            .get(self.id)
            .map(|r| r.result_json())
            .ok_or_else(|| Error::NoSuchJob(format!("job {} is gone", self.id)))
    }

    /// The last messages (time µs, priority, text) of one instance in this job, oldest first: a
    /// client that arrives late shows the log so far, then follows `Message` signals.
    #[zbus(out_args("messages"))]
    async fn get_messages(&self, instance: &str) -> Result<Vec<(u64, u32, String)>, Error> {
        let messages = self.jobs.messages(self.id, instance).ok_or_else(|| {
            if self.jobs.get(self.id).is_none() {
                Error::NoSuchJob(format!("job {} is gone", self.id))
            } else {
                Error::NoSuchInstance(format!(
                    "{instance:?} is not an instance of job {} (see its Instances property)",
                    self.id
                ))
            }
        })?;
        Ok(messages
            .into_iter()
            .map(|(usec, priority, text)| (usec, u32::from(priority), text))
            .collect())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(&self) -> u64 {
        self.id
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn action(&self) -> zbus::fdo::Result<String> {
        Ok(self.record()?.action)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn request(&self) -> zbus::fdo::Result<String> {
        Ok(self.record()?.request)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn instances(&self) -> zbus::fdo::Result<Vec<String>> {
        Ok(self.record()?.instances)
    }

    #[zbus(property)]
    async fn status(&self) -> zbus::fdo::Result<String> {
        Ok(self.record()?.status.as_str().to_owned())
    }

    #[zbus(property)]
    async fn progress(&self) -> zbus::fdo::Result<u32> {
        Ok(u32::from(self.record()?.progress))
    }

    #[zbus(property)]
    async fn exit_code(&self) -> zbus::fdo::Result<i32> {
        Ok(self.record()?.exit_code)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn caller_uid(&self) -> zbus::fdo::Result<u32> {
        Ok(self.record()?.caller_uid)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn started_usec(&self) -> zbus::fdo::Result<u64> {
        Ok(self.record()?.started_usec)
    }

    #[zbus(property)]
    async fn finished_usec(&self) -> zbus::fdo::Result<u64> {
        Ok(self.record()?.finished_usec)
    }

    /// Per instance: (status, step, percent, exit code); status `pending`, `running`, then how
    /// it ended; step empty before the start and after a success; exit code -1 until the end.
    #[zbus(property)]
    async fn instance_states(&self) -> zbus::fdo::Result<HashMap<String, InstanceStateTuple>> {
        let states = self
            .jobs
            .instance_states(self.id)
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("job {} is gone", self.id)))?;
        Ok(states
            .iter()
            .map(|(instance, progress)| (instance.clone(), state_tuple(progress)))
            .collect())
    }

    #[zbus(signal, name = "Progress")]
    pub async fn progress_signal(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        step: &str,
        percent: u32,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn message(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        priority: u32,
        text: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn instance_finished(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        status: &str,
        exit_code: i32,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn finished(
        emitter: &SignalEmitter<'_>,
        status: &str,
        exit_code: i32,
    ) -> zbus::Result<()>;
}
