//! Jobs: admission, parallel execution of instance updates in workers, progress, persistence and
//! crash recovery. Knows nothing about D-Bus: it reports [`JobEvent`]s on a channel that the D-Bus
//! layer turns into signals.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use module_updater_dbus::types::{
    InstanceResult, InstanceState, InstanceStatus, JobInstanceStatus, Step,
};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::cluster;
use crate::engine::events::{Event, priority};
use crate::engine::instance::{Bases, Instance};
use crate::engine::instance_cache::InstanceCache;
use crate::engine::scope::{self, Scopes};
use crate::engine::shared_images;
use crate::engine::update::UpdateJob;
use crate::engine::worker;
use crate::history::{self, History};
use crate::job_store::{Durability, JobStore};
mod admission;
mod plan;
mod recovery;
mod shared_download;

pub use crate::job_store::{JobRecord, JobStatus};
use crate::request;
pub use admission::{MAX_KNOWN_JOBS, MAX_RUNNING_JOBS, SubmitError};
use recovery::{interrupt, record_history};

/// What the job manager needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker_exe: PathBuf,
    pub bases: Bases,
    pub system_manager_address: Option<String>,
    pub script_timeout: Duration,
    /// How long a download of images may take (`pull_timeout`).
    pub pull_timeout: Duration,
    /// How long the health gate may wait (`health_timeout`), unless a request says otherwise.
    pub health_timeout: Duration,
    /// Keep each instance's previous version for a rollback (`keep_previous`).
    pub keep_previous: bool,
    /// Roll back an instance whose update fails, unless a request says otherwise.
    pub rollback_on_failure: bool,
    pub max_parallel: usize,
    /// The niceness of the workers (`worker_nice`).
    pub worker_nice: u8,
    pub job_linger: Duration,
    pub state_dir: PathBuf,
    /// Global podman options for rootful instances only.
    pub rootful_podman_args: Vec<String>,
    /// NS8's agent settings file (`ns8_agent_env`): on an NS8 node, the cluster's Redis.
    pub ns8_agent_env: PathBuf,
    /// Limits of each update's systemd scope.
    pub scope_limits: scope::Limits,
}

/// What happened to jobs, for the D-Bus layer.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A job's `Status`, `Progress` or `ExitCode` changed.
    Changed { job: u64 },
    Progress {
        job: u64,
        instance: String,
        step: Step,
        percent: u8,
    },
    Message {
        job: u64,
        instance: String,
        priority: u8,
        text: String,
    },
    InstanceFinished {
        job: u64,
        instance: String,
        status: InstanceStatus,
        exit_code: i32,
    },
    Finished {
        job: u64,
        status: JobStatus,
        exit_code: i32,
    },
    /// The job's linger time is over: it leaves the bus.
    Removed { job: u64 },
    /// A job's object was published ([`Jobs::announce`]).
    New { job: u64 },
    /// What the daemon knows of the node's instances may have changed (a job took or released
    /// some, an update changed an image, or a client asked for a fresh list).
    InstancesChanged,
}

/// How many messages of each instance a job keeps for `GetMessages`.
pub const MESSAGES_KEPT: usize = 200;

/// A message as `GetMessages` returns it: time (µs since the epoch), journal priority, text.
pub type KeptMessage = (u64, u8, String);

/// Where one instance of a job stands (the job's `InstanceStates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProgress {
    pub status: JobInstanceStatus,
    /// The step it is in, or failed at; `None` before it starts and after a success.
    pub step: Option<Step>,
    pub percent: u8,
    pub exit_code: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0}")]
    NoSuchJob(u64),
}

struct Entry {
    record: JobRecord,
    cancel: watch::Sender<bool>,
    /// Per-instance progress; the job's progress is their average.
    progress: HashMap<String, u8>,
    /// The last [`MESSAGES_KEPT`] messages of each instance.
    messages: HashMap<String, VecDeque<KeptMessage>>,
}

struct State {
    jobs: BTreeMap<u64, Entry>,
    /// Instances in a running job, and that job.
    busy: HashMap<String, u64>,
    /// Instances whose update scope a previous daemon left, and that scope, until it is stopped.
    recovering: HashMap<String, String>,
    next_id: u64,
}

/// The job manager.
pub struct Jobs {
    settings: Settings,
    /// The node's instances, shared by submissions and the bus's instance queries.
    instances: InstanceCache,
    store: JobStore,
    history: History,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<JobEvent>,
    permits: Arc<Semaphore>,
    shutting_down: AtomicBool,
    idle: tokio::sync::Notify,
    /// Plans' downloads of new images, kept for the jobs that follow.
    planned: plan::PlannedDownloads,
    /// The system manager, where each instance update gets its scope.
    scopes: Scopes,
    /// Woken whenever a scope left by a previous daemon is gone.
    recovered: tokio::sync::Notify,
}

/// The log level of a journal priority (0–7) of the engine's messages.
fn journal_level(priority: u8) -> log::Level {
    match priority {
        0..=3 => log::Level::Error,
        4 => log::Level::Warn,
        5 | 6 => log::Level::Info,
        _ => log::Level::Debug,
    }
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Jobs {
    /// Creates the manager and recovers the jobs a previous daemon left: a job still within its
    /// linger time is served again, one found running is finished as aborted (`interrupted`).
    pub fn new(
        settings: Settings,
    ) -> std::io::Result<(Arc<Jobs>, mpsc::UnboundedReceiver<JobEvent>)> {
        let (events, receiver) = mpsc::unbounded_channel();
        let store = JobStore::open(&settings.state_dir)?;
        let history = History::open(&settings.state_dir)?;
        // Images a previous daemon downloaded for a job it did not finish.
        shared_images::remove_leftovers(&settings.state_dir);
        let mut next_id = store.read_counter();
        let mut recovered = BTreeMap::new();
        let now = now_usec();
        for record in store.load() {
            next_id = next_id.max(record.id + 1);
            let mut record = record;
            if !record.status.finished() {
                let unfinished = interrupt(&mut record, now);
                store.write_now(&record)?;
                for instance in unfinished {
                    if let Some(result) = record.results.get(&instance) {
                        record_history(&history, &record, &instance, result, now);
                    }
                }
            }
            let expires = record
                .finished_usec
                .saturating_add(settings.job_linger.as_micros() as u64);
            if expires <= now {
                store.remove(record.id);
                continue;
            }
            let (cancel, _) = watch::channel(false);
            recovered.insert(
                record.id,
                Entry {
                    record,
                    cancel,
                    progress: HashMap::new(),
                    messages: HashMap::new(),
                },
            );
        }
        let permits = Arc::new(Semaphore::new(settings.max_parallel.max(1)));
        let (settings_address, scope_limits) = (
            settings.system_manager_address.clone(),
            settings.scope_limits,
        );
        let jobs = Arc::new(Jobs {
            instances: InstanceCache::new(settings.bases.clone()),
            settings,
            store,
            history,
            state: Mutex::new(State {
                jobs: recovered,
                busy: HashMap::new(),
                recovering: HashMap::new(),
                next_id: next_id.max(1),
            }),
            events,
            permits,
            shutting_down: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            planned: plan::PlannedDownloads::default(),
            scopes: Scopes::new(settings_address, scope_limits),
            recovered: tokio::sync::Notify::new(),
        });
        // Recovered jobs leave the bus when their linger time is over.
        for (id, remaining) in jobs.linger_times(now) {
            jobs.schedule_removal(id, remaining);
        }
        Ok((jobs, receiver))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving with the data as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn linger_times(&self, now: u64) -> Vec<(u64, Duration)> {
        let linger = self.settings.job_linger.as_micros() as u64;
        self.lock()
            .jobs
            .values()
            .map(|e| {
                let left = e
                    .record
                    .finished_usec
                    .saturating_add(linger)
                    .saturating_sub(now);
                (e.record.id, Duration::from_micros(left))
            })
            .collect()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn instances(&self) -> &InstanceCache {
        &self.instances
    }

    async fn run(
        self: Arc<Self>,
        id: u64,
        request: request::UpdateRequest,
        targets: Vec<Instance>,
        cancel: watch::Receiver<bool>,
    ) {
        self.update(id, Durability::Lazy, |record| {
            record.status = JobStatus::Running;
        });
        // A rollback or a prune needs no image from anywhere.
        let shared = if request.action == request::Action::Update {
            Arc::clone(&self)
                .download_once(id, &request, &targets, &cancel)
                .await
        } else {
            shared_images::SharedImages::default()
        };
        let mut tasks = tokio::task::JoinSet::new();
        for instance in targets {
            let jobs = Arc::clone(&self);
            let cancel = cancel.clone();
            let instance_rootless = instance.rootless;
            let job = UpdateJob {
                job_id: id,
                action: request.action,
                keep_previous: self.settings.keep_previous,
                rollback_on_failure: request
                    .rollback_on_failure
                    .unwrap_or(self.settings.rollback_on_failure),
                podman_args: if instance.rootless {
                    Vec::new()
                } else {
                    self.settings.rootful_podman_args.clone()
                },
                instance,
                module_url: request.module_url.clone(),
                force: request.force,
                request_json: request.raw.clone(),
                script_timeout_secs: self.settings.script_timeout.as_secs(),
                pull_timeout_secs: self.settings.pull_timeout.as_secs(),
                health_timeout_secs: request
                    .health_timeout
                    .unwrap_or(self.settings.health_timeout.as_secs()),
                nice: self.settings.worker_nice,
                system_manager_address: self.settings.system_manager_address.clone(),
                // Rootful instances pull as root into their own storage: no archive needed,
                // unless a plan downloaded it already.
                shared_images: if instance_rootless || shared.from_plan {
                    shared.archives.clone()
                } else {
                    BTreeMap::new()
                },
                shared_module: shared
                    .module
                    .clone()
                    .filter(|_| instance_rootless || shared.from_plan),
            };
            tasks.spawn(async move { jobs.run_instance(id, job, cancel).await });
        }
        while tasks.join_next().await.is_some() {}
        let _ = tokio::task::spawn_blocking(move || shared.remove()).await;
        self.finish(id).await;
    }

    async fn run_instance(self: Arc<Self>, id: u64, job: UpdateJob, cancel: watch::Receiver<bool>) {
        let instance = job.instance.id.clone();
        let result = if *cancel.borrow() {
            InstanceResult::new(InstanceStatus::Cancelled)
        } else {
            // What a previous daemon left on the instance goes first (without taking a permit
            // from other instances meanwhile).
            let recovered = self.wait_recovered(&instance).await;
            // Bounded parallelism across all jobs; a closed semaphore cannot happen (never closed).
            let _permit = self.permits.acquire().await;
            if *cancel.borrow() {
                InstanceResult::new(InstanceStatus::Cancelled)
            } else if let Err(reason) = recovered {
                InstanceResult::failed(Step::Prepare, reason)
            } else {
                let mut on_event = |event: Event| self.instance_event(id, &instance, event);
                let mut result = worker::update_instance(
                    &self.settings.worker_exe,
                    &self.scopes,
                    &job,
                    cancel.clone(),
                    &mut on_event,
                )
                .await;
                // As NS8's agent at the end of any action, whatever its outcome.
                if let Some(warning) =
                    cluster::refresh_environment(&self.settings.ns8_agent_env, &job.instance).await
                {
                    on_event(Event::Message {
                        priority: priority::WARNING,
                        text: warning.clone(),
                    });
                    result.warnings.push(warning);
                }
                result
            }
        };
        log::log!(
            if result.status == InstanceStatus::Failed { log::Level::Warn } else { log::Level::Info },
            MODULE_UPDATER_JOB = id, MODULE_UPDATER_INSTANCE = instance.as_str(), MODULE_UPDATER_STEP = result.error.as_ref().map_or("", |f| f.step.as_str());
            "job {id}: {instance} {}{}",
            result.status.as_str(),
            result.error.as_ref().map(|f| format!(" at {}: {}", f.step, f.reason)).unwrap_or_default()
        );
        let (status, exit_code) = (result.status, result.exit_code);
        // The result is on disk, in the job's record and in the instance's history, before
        // anyone is told of it.
        let mut finished = None;
        self.update_and_wait(id, |record| {
            record.steps.remove(&instance);
            finished = Some(history::entry(record, &result, now_usec()));
            record.results.insert(instance.clone(), result);
        })
        .await;
        if let Some(entry) = finished {
            let jobs = Arc::clone(&self);
            let owned = instance.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(err) = jobs.history.append(&owned, entry) {
                    log::error!(MODULE_UPDATER_JOB = id, MODULE_UPDATER_INSTANCE = owned.as_str(); "job {id}: {err}");
                }
            })
            .await;
        }
        {
            let mut state = self.lock();
            if state.busy.get(&instance) == Some(&id) {
                state.busy.remove(&instance);
            }
            if let Some(entry) = state.jobs.get_mut(&id) {
                entry.progress.insert(instance.clone(), 100);
                let progress = average(&entry.progress);
                if progress > entry.record.progress {
                    entry.record.progress = progress;
                }
            }
        }
        self.send(JobEvent::Changed { job: id });
        self.send(JobEvent::InstanceFinished {
            job: id,
            instance,
            status,
            exit_code,
        });
        self.send(JobEvent::InstancesChanged);
    }

    fn instance_event(&self, id: u64, instance: &str, event: Event) {
        match event {
            Event::StepStarted { step } => {
                self.update(id, Durability::Lazy, |record| {
                    record.steps.insert(instance.to_owned(), step);
                });
                crate::failpoint::step_started(crate::failpoint::Process::Daemon, step);
            }
            Event::Progress { step, percent } => {
                if let Some(entry) = self.lock().jobs.get_mut(&id) {
                    entry.progress.insert(instance.to_owned(), percent);
                    let progress = average(&entry.progress);
                    if progress > entry.record.progress {
                        entry.record.progress = progress;
                    }
                }
                self.send(JobEvent::Progress {
                    job: id,
                    instance: instance.to_owned(),
                    step,
                    percent,
                });
                // The instance's percent is in InstanceStates even when the job's is not higher.
                self.send(JobEvent::Changed { job: id });
            }
            Event::Message { priority, text } => {
                // Every line is journalled and kept for `GetMessages`; the bus gets them within a
                // budget (`bus/pump.rs`).
                log::log!(
                    journal_level(priority),
                    MODULE_UPDATER_JOB = id, MODULE_UPDATER_INSTANCE = instance;
                    "job {id}: {instance}: {text}"
                );
                if let Some(entry) = self.lock().jobs.get_mut(&id) {
                    let kept = entry.messages.entry(instance.to_owned()).or_default();
                    if kept.len() == MESSAGES_KEPT {
                        kept.pop_front();
                    }
                    kept.push_back((now_usec(), priority, text.clone()));
                }
                self.send(JobEvent::Message {
                    job: id,
                    instance: instance.to_owned(),
                    priority,
                    text,
                })
            }
            Event::StepFinished { .. } | Event::Finished { .. } => {}
        }
    }

    async fn finish(self: &Arc<Self>, id: u64) {
        let mut outcome = (JobStatus::Aborted, 1);
        self.update_and_wait(id, |record| {
            let ok = record.instances.iter().all(|i| {
                record.results.get(i).is_some_and(|r| {
                    matches!(
                        r.status,
                        InstanceStatus::Completed | InstanceStatus::AlreadyInstalled
                    )
                })
            });
            record.status = if ok {
                JobStatus::Completed
            } else {
                JobStatus::Aborted
            };
            record.exit_code = if ok { 0 } else { 1 };
            record.progress = 100;
            record.finished_usec = now_usec();
            outcome = (record.status, record.exit_code);
        })
        .await;
        log::info!(MODULE_UPDATER_JOB = id; "job {id} {} (exit code {})", outcome.0.as_str(), outcome.1);
        self.send(JobEvent::Finished {
            job: id,
            status: outcome.0,
            exit_code: outcome.1,
        });
        self.idle.notify_waiters();
        self.schedule_removal(id, self.settings.job_linger);
    }

    fn schedule_removal(self: &Arc<Self>, id: u64, after: Duration) {
        let jobs = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let removed = jobs.lock().jobs.remove(&id).is_some();
            if removed {
                jobs.store.remove(id);
                jobs.send(JobEvent::Removed { job: id });
            }
        });
    }

    /// Changes a job's record, queues its write, and reports the change.
    fn update(&self, id: u64, durability: Durability, change: impl FnOnce(&mut JobRecord)) {
        if let Some(record) = self.change(id, change) {
            self.store.queue(record, durability);
            self.send(JobEvent::Changed { job: id });
        }
    }

    /// Changes a job's record and reports the change once the record is durably on disk (a
    /// failure to write is logged by the store; the job goes on).
    async fn update_and_wait(&self, id: u64, change: impl FnOnce(&mut JobRecord)) {
        if let Some(record) = self.change(id, change) {
            let _ = self.store.write(record, Durability::Sync).await;
            self.send(JobEvent::Changed { job: id });
        }
    }

    fn change(&self, id: u64, change: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
        let mut state = self.lock();
        let entry = state.jobs.get_mut(&id)?;
        change(&mut entry.record);
        Some(entry.record.clone())
    }

    fn send(&self, event: JobEvent) {
        // The receiver lives as long as the daemon; a send after it is gone is harmless.
        let _ = self.events.send(event);
    }

    /// Asks a job to stop: its workers get SIGTERM (SIGKILL 10 s later).
    pub fn cancel(&self, id: u64) -> Result<(), JobError> {
        let state = self.lock();
        let entry = state.jobs.get(&id).ok_or(JobError::NoSuchJob(id))?;
        if !entry.record.status.finished() {
            log::info!(MODULE_UPDATER_JOB = id; "job {id}: cancel requested");
            let _ = entry.cancel.send(true);
        }
        Ok(())
    }

    pub fn get(&self, id: u64) -> Option<JobRecord> {
        self.lock().jobs.get(&id).map(|e| e.record.clone())
    }

    /// Where each instance of a job stands, in the job's order of instances.
    pub fn instance_states(&self, id: u64) -> Option<Vec<(String, InstanceProgress)>> {
        let state = self.lock();
        let entry = state.jobs.get(&id)?;
        let record = &entry.record;
        let states = record
            .instances
            .iter()
            .map(|instance| {
                let progress = if let Some(result) = record.results.get(instance) {
                    InstanceProgress {
                        status: JobInstanceStatus::Ended(result.status),
                        step: result.error.as_ref().map(|f| f.step),
                        percent: 100,
                        exit_code: result.exit_code,
                    }
                } else if let Some(step) = record.steps.get(instance) {
                    InstanceProgress {
                        status: JobInstanceStatus::Running,
                        step: Some(*step),
                        percent: entry.progress.get(instance).copied().unwrap_or(0),
                        exit_code: -1,
                    }
                } else {
                    InstanceProgress {
                        status: JobInstanceStatus::Pending,
                        step: None,
                        percent: 0,
                        exit_code: -1,
                    }
                };
                (instance.clone(), progress)
            })
            .collect();
        Some(states)
    }

    /// The kept messages of one instance of a job, oldest first; `None` when the job is unknown
    /// or the instance is not one of it.
    pub fn messages(&self, id: u64, instance: &str) -> Option<Vec<KeptMessage>> {
        let state = self.lock();
        let entry = state.jobs.get(&id)?;
        if !entry.record.instances.iter().any(|i| i == instance) {
            return None;
        }
        Some(
            entry
                .messages
                .get(instance)
                .map(|kept| kept.iter().cloned().collect())
                .unwrap_or_default(),
        )
    }

    /// The instances' update histories.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Says that job `id`'s object is on the bus (`JobNew` follows).
    pub fn announce(&self, id: u64) {
        self.send(JobEvent::New { job: id });
    }

    /// Asks the D-Bus layer to look at the node's instances again.
    pub fn instances_touched(&self) {
        self.send(JobEvent::InstancesChanged);
    }

    pub fn ids(&self) -> Vec<u64> {
        self.lock().jobs.keys().copied().collect()
    }

    /// The job that holds an instance, if any.
    pub fn busy_with(&self, instance: &str) -> Option<u64> {
        self.lock().busy.get(instance).copied()
    }

    /// What holds an instance: a job of ours (`updating`, with the job), what a previous daemon
    /// started and that is still stopping (`recovering`), or nothing (`idle`).
    pub fn instance_state(&self, instance: &str) -> (InstanceState, Option<u64>) {
        let state = self.lock();
        match state.busy.get(instance) {
            Some(job) => (InstanceState::Updating, Some(*job)),
            None if state.recovering.contains_key(instance) => (InstanceState::Recovering, None),
            None => (InstanceState::Idle, None),
        }
    }

    /// Running jobs and how many instances they update.
    pub fn running(&self) -> Vec<(u64, usize)> {
        self.lock()
            .jobs
            .values()
            .filter(|e| !e.record.status.finished())
            .map(|e| (e.record.id, e.record.instances.len()))
            .collect()
    }

    /// Returns once no job runs.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a job that ends in between still wakes it.
            notified.as_mut().enable();
            if self.running().is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Refuses new jobs, cancels the running ones and waits (at most `grace`) until they end.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        for (id, _) in self.running() {
            let _ = self.cancel(id);
        }
        while !self.running().is_empty() {
            let notified = self.idle.notified();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }
}

/// The D-Bus object path of a job (the only place the path shape is built).
pub fn job_path(id: u64) -> String {
    format!("{}/{id}", module_updater_dbus::JOB_PATH_PREFIX)
}

fn average(progress: &HashMap<String, u8>) -> u8 {
    if progress.is_empty() {
        return 0;
    }
    let sum: u32 = progress.values().map(|p| u32::from(*p)).sum();
    (sum / progress.len() as u32) as u8
}
