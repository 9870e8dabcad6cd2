//! Recovery of a job a dead daemon left running, and the history entries of its instances.

use module_updater_dbus::types::{InstanceResult, Step};

use super::{JobRecord, JobStatus};
use crate::history::{self, History};

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
