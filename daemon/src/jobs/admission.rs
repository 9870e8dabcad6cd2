//! Admission: a parsed request becomes a job only when the node agrees (every instance exists,
//! none is busy, none would get another module's image or an unwanted downgrade) and the
//! daemon's limits allow it; otherwise nothing is created and the caller gets NS8's array.
//! `PlanUpdate` (`jobs/plan.rs`) runs the same checks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Entry, JobEvent, JobRecord, JobStatus, Jobs, job_path, now_usec};
use crate::engine::imagename;
use crate::engine::instance::Instance;
use crate::engine::instance_cache::Found;
use crate::request::{self, ValidationError};
use crate::version;

/// At most this many jobs run at once; more are refused before any job exists. Running jobs are
/// already bounded by the instances on the node (an instance is in at most one running job);
/// this bounds them on a node with very many instances too.
pub const MAX_RUNNING_JOBS: usize = 64;
/// At most this many jobs are known at once, running or lingering after their end
/// (`--job-linger`); more are refused until some leave.
pub const MAX_KNOWN_JOBS: usize = 1024;

/// Why a request was not turned into a job.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{}", request::to_json(.0))]
    Invalid(Vec<ValidationError>),
    #[error("{}", request::to_json(.0))]
    Busy(Vec<ValidationError>),
    #[error("the daemon is shutting down and takes no new jobs; retry when it is back")]
    ShuttingDown,
    #[error(
        "too many jobs: {0} are running (the limit is {MAX_RUNNING_JOBS}); wait for some to finish"
    )]
    TooManyRunning(usize),
    #[error(
        "too many jobs: {0} are on the bus, running or lingering (the limit is {MAX_KNOWN_JOBS}); wait until finished ones leave (--job-linger)"
    )]
    TooManyKnown(usize),
    #[error("the plan could not be made: {0}")]
    Plan(String),
    #[error("cannot record the job in {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Jobs {
    /// Checks a parsed request against the node and starts a job for it; returns the job id.
    pub fn submit(
        self: &Arc<Self>,
        request: request::UpdateRequest,
        caller_uid: u32,
    ) -> Result<u64, SubmitError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let targets: Vec<Instance> = self
            .admit(&request)?
            .into_iter()
            .map(|found| found.instance.clone())
            .collect();

        let (id, cancel_rx) = {
            let mut state = self.lock();
            let busy: Vec<ValidationError> = request
                .instances
                .iter()
                .enumerate()
                .filter_map(|(index, id)| state.busy.get(id).map(|job| busy(index, id, *job)))
                .collect();
            if !busy.is_empty() {
                return Err(SubmitError::Busy(busy));
            }
            // Counted under the lock that adds the job, so concurrent calls cannot overshoot.
            let running = state
                .jobs
                .values()
                .filter(|e| !e.record.status.finished())
                .count();
            if running >= MAX_RUNNING_JOBS {
                return Err(SubmitError::TooManyRunning(running));
            }
            if state.jobs.len() >= MAX_KNOWN_JOBS {
                return Err(SubmitError::TooManyKnown(state.jobs.len()));
            }
            let id = state.next_id;
            self.store
                .write_counter(id + 1)
                .map_err(|source| SubmitError::Persist {
                    path: self.store.counter_path(),
                    source,
                })?;
            state.next_id = id + 1;
            let record = JobRecord {
                id,
                action: "update-module".into(),
                request: request.raw.clone(),
                instances: request.instances.clone(),
                status: JobStatus::Pending,
                progress: 0,
                exit_code: -1,
                caller_uid,
                started_usec: now_usec(),
                finished_usec: 0,
                steps: BTreeMap::new(),
                results: BTreeMap::new(),
                error: None,
            };
            self.store
                .write_now(&record)
                .map_err(|source| SubmitError::Persist {
                    path: self.store.record_path(id),
                    source,
                })?;
            let (cancel, cancel_rx) = watch::channel(false);
            for instance in &request.instances {
                state.busy.insert(instance.clone(), id);
            }
            state.jobs.insert(
                id,
                Entry {
                    record,
                    cancel,
                    progress: request.instances.iter().map(|i| (i.clone(), 0)).collect(),
                    messages: HashMap::new(),
                },
            );
            (id, cancel_rx)
        };
        log::info!(MODULE_UPDATER_JOB = id, MODULE_UPDATER_CALLER_UID = caller_uid; "job {id}: update-module {} on {}", request.module_url, request.instances.join(" "));
        self.send(JobEvent::InstancesChanged);
        let jobs = Arc::clone(self);
        tokio::spawn(async move { jobs.run(id, request, targets, cancel_rx).await });
        Ok(id)
    }
}

impl Jobs {
    /// The node's checks of a parsed request, shared by `UpdateModule` and `PlanUpdate`: every
    /// instance exists, and none would get another module's image or an unwanted downgrade.
    /// The instances found, in the request's order.
    pub fn admit(&self, request: &request::UpdateRequest) -> Result<Vec<Arc<Found>>, SubmitError> {
        let targets = self.find_targets(request)?;
        let refused: Vec<ValidationError> = targets
            .iter()
            .flat_map(|found| node_refusals(request, found))
            .collect();
        if refused.is_empty() {
            Ok(targets)
        } else {
            Err(SubmitError::Invalid(refused))
        }
    }

    /// The request's instances as found on the node, in its order; `instance_not_found` for
    /// those that are not.
    pub fn find_targets(
        &self,
        request: &request::UpdateRequest,
    ) -> Result<Vec<Arc<Found>>, SubmitError> {
        let known = self.instances.list();
        let mut targets = Vec::new();
        let mut missing = Vec::new();
        for (index, id) in request.instances.iter().enumerate() {
            match known.iter().find(|f| &f.instance.id == id) {
                Some(found) => targets.push(Arc::clone(found)),
                None => missing.push(ValidationError::new(
                    &format!("instances.{index}"),
                    serde_json::Value::from(id.as_str()),
                    "instance_not_found",
                )),
            }
        }
        if missing.is_empty() {
            Ok(targets)
        } else {
            Err(SubmitError::Invalid(missing))
        }
    }

    /// The request's instances that a running job holds, as `action_already_running` items.
    pub fn busy_instances(&self, request: &request::UpdateRequest) -> Vec<ValidationError> {
        let state = self.lock();
        request
            .instances
            .iter()
            .enumerate()
            .filter_map(|(index, id)| state.busy.get(id).map(|job| busy(index, id, *job)))
            .collect()
    }
}

/// `action_already_running` for the instance at `index`, held by `job`.
fn busy(index: usize, id: &str, job: u64) -> ValidationError {
    ValidationError {
        error: "action_already_running".into(),
        job: Some(job_path(job)),
        ..ValidationError::new(
            &format!("instances.{index}"),
            serde_json::Value::from(id),
            "",
        )
    }
}

/// [`node_checks`] of a found instance.
pub fn node_refusals(request: &request::UpdateRequest, found: &Found) -> Vec<ValidationError> {
    let current = found.environment.get("IMAGE_URL").unwrap_or_default();
    node_checks(request, &found.instance.id, current)
}

/// What the node's state refuses for one instance of a request, as NS8's validation items: an
/// image of another module than the instance runs (`module_url_other_module`, NS8's image name
/// rule), an older version than it runs (`module_url_downgrade`, semantic versions; never for
/// tags that are not versions) unless the request says `"allow_downgrade": true`.
fn node_checks(
    request: &request::UpdateRequest,
    instance: &str,
    current: &str,
) -> Vec<ValidationError> {
    let refuse = |kind: &str| {
        let mut error = ValidationError::new(
            "module_url",
            serde_json::Value::from(request.module_url.as_str()),
            kind,
        );
        error.instance = Some(instance.to_owned());
        error.current = Some(current.to_owned());
        error
    };
    if current.is_empty() {
        return Vec::new();
    }
    let name = |url| imagename::image_name_from_url(url).ok();
    if let (Some(installed), Some(wanted)) = (name(current), name(&request.module_url))
        && installed != wanted
    {
        return vec![refuse("other_module")];
    }
    let tag = |url| module_updater_dbus::types::repository_and_tag(url).1;
    if !request.allow_downgrade && version::is_downgrade(tag(current), tag(&request.module_url)) {
        return vec![refuse("downgrade")];
    }
    Vec::new()
}
