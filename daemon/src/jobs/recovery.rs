//! Recovery of a job a dead daemon left running, the history entries of its instances, and the
//! update scopes it left in the system manager.

use std::sync::Arc;
use std::time::Duration;

use module_updater_dbus::types::{InstanceResult, Step};

use super::{JobEvent, JobRecord, JobStatus, Jobs};
use crate::history::{self, History};

/// How long an update waits for what a previous daemon left on its instance to stop.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(60);

impl Jobs {
    /// Finds the update scopes a previous daemon left, serves their instances as `recovering`,
    /// and starts stopping them; each instance is free again once its scope is empty. Call while
    /// holding the state dir's lock (a second daemon must not stop the first one's updates).
    pub async fn recover_scopes(self: &Arc<Self>) {
        let leftovers = match self.scopes.leftovers().await {
            Ok(leftovers) => leftovers,
            Err(err) => {
                log::error!("cannot list the update scopes a previous daemon may have left: {err}");
                return;
            }
        };
        if leftovers.is_empty() {
            return;
        }
        {
            let mut state = self.lock();
            for (unit, _, instance) in &leftovers {
                state.recovering.insert(instance.clone(), unit.clone());
            }
        }
        self.send(JobEvent::InstancesChanged);
        for (unit, job, instance) in leftovers {
            log::warn!(
                MODULE_UPDATER_JOB = job, MODULE_UPDATER_INSTANCE = instance.as_str();
                "job {job}: {instance}: stopping {unit}, left by a previous daemon"
            );
            let jobs = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(err) = jobs.scopes.stop(&unit).await {
                    log::error!(MODULE_UPDATER_INSTANCE = instance.as_str(); "{err}");
                }
                let mut state = jobs.lock();
                if state.recovering.get(&instance) == Some(&unit) {
                    state.recovering.remove(&instance);
                }
                drop(state);
                jobs.recovered.notify_waiters();
                jobs.send(JobEvent::InstancesChanged);
            });
        }
    }

    /// Waits (at most [`RECOVERY_WAIT`]) until nothing a previous daemon started runs on
    /// `instance`; the error says what is still there.
    pub(super) async fn wait_recovered(&self, instance: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
        loop {
            let notified = self.recovered.notified();
            let Some(unit) = self.lock().recovering.get(instance).cloned() else {
                return Ok(());
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "the update a previous daemon left on {instance} ({unit}) did not stop within {} s",
                    RECOVERY_WAIT.as_secs()
                ));
            }
        }
    }
}

/// Finishes a job a dead daemon left running: aborted, `interrupted`, its unfinished instances
/// failed at the step they were in. Returns those instances.
pub(super) fn interrupt(record: &mut JobRecord, now: u64) -> Vec<String> {
    let mut unfinished = Vec::new();
    for instance in &record.instances {
        if !record.results.contains_key(instance) {
            unfinished.push(instance.clone());
            let step = record.steps.get(instance).copied().unwrap_or(Step::Prepare);
            let mut result =
                InstanceResult::failed(step, "interrupted: the daemon stopped during the update");
            result
                .warnings
                .push("run the same request again to complete the update".into());
            record.results.insert(instance.clone(), result);
        }
    }
    record.steps.clear();
    record.status = JobStatus::Aborted;
    record.exit_code = 1;
    record.error = Some("interrupted".into());
    record.finished_usec = now;
    unfinished
}

/// Appends one instance's result of a job to its history, logging a failure (the history never
/// stops an update).
pub(super) fn record_history(
    history: &History,
    record: &JobRecord,
    instance: &str,
    result: &InstanceResult,
    finished_usec: u64,
) {
    if let Err(err) = history.append(instance, history::entry(record, result, finished_usec)) {
        log::error!(MODULE_UPDATER_JOB = record.id, MODULE_UPDATER_INSTANCE = instance; "job {}: {err}", record.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use module_updater_dbus::types::InstanceStatus;

    use super::*;

    #[test]
    fn an_interrupted_job_is_aborted_with_its_instances_failed_at_their_step() {
        let mut record = JobRecord {
            id: 4,
            action: "update-module".into(),
            request: "{}".into(),
            instances: vec!["a1".into(), "b2".into()],
            status: JobStatus::Running,
            progress: 40,
            exit_code: -1,
            caller_uid: 0,
            started_usec: 1,
            finished_usec: 0,
            steps: BTreeMap::from([("b2".to_owned(), Step::Extract)]),
            results: BTreeMap::from([(
                "a1".to_owned(),
                InstanceResult::new(InstanceStatus::Completed),
            )]),
            error: None,
        };
        assert_eq!(interrupt(&mut record, 99), vec!["b2".to_owned()]);
        assert_eq!(record.status, JobStatus::Aborted);
        assert_eq!(record.error.as_deref(), Some("interrupted"));
        assert_eq!(record.results["a1"].status, InstanceStatus::Completed);
        let b2 = &record.results["b2"];
        assert_eq!(b2.status, InstanceStatus::Failed);
        assert_eq!(b2.error.as_ref().map(|f| f.step), Some(Step::Extract));
        let json: serde_json::Value = serde_json::from_str(&record.result_json()).unwrap();
        assert_eq!(json["status"], "aborted");
        assert_eq!(json["error"], "interrupted");
        assert_eq!(json["instances"]["b2"]["status"], "failed");
    }
}
