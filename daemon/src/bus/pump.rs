//! Turns job events into D-Bus signals and property changes.
//!
//! `PropertiesChanged` for a job's Status, Progress, ExitCode, FinishedUsec and InstanceStates are coalesced to at most one
//! per [`FLUSH_INTERVAL`] (5 per second), and a job's final values go out before its `Finished`,
//! so a client that reacts to it reads the final state.
//!
//! `Progress` signals share one budget per job, whatever the number of instances: at most
//! [`PROGRESS_PER_SECOND`] in any second (the latest value of each instance wins, the instance
//! that waited longest goes first). One of them is kept for the instances that finish: an
//! instance's last progress goes out before its `InstanceFinished` when the budget allows, and
//! is dropped otherwise (the `InstanceFinished` says the rest).
//!
//! `Message` signals have a budget per instance: at most [`MESSAGES_PER_SECOND`] in any second.
//! A script that prints faster loses the excess on the bus, not in the journal (every message
//! is journalled with `MODULE_UPDATER_JOB` and `MODULE_UPDATER_INSTANCE`, `jobs.rs`); the next message that goes out, or
//! the instance's end, is preceded by a warning that tells how many were left out and where to
//! read them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use module_updater_dbus::types::Step;
use std::time::Duration;
use tokio::time::Instant;

use module_updater_systemd::notify;
use tokio::sync::mpsc;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use super::instance::{Instances, REFRESH_INTERVAL};
use super::job::{InstanceStateTuple, JobObject, state_tuple};
use super::manager::Manager;
use crate::engine::events::priority;
use crate::jobs::{JobEvent, Jobs, job_path};

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Most `Progress` signals of one job in any one second.
pub const PROGRESS_PER_SECOND: usize = 5;

/// Most `Message` signals of one instance in any one second.
pub const MESSAGES_PER_SECOND: usize = 50;

/// When recent signals went out, to keep them within a budget per second.
#[derive(Default)]
struct Budget {
    sent: VecDeque<Instant>,
}

impl Budget {
    /// Whether one more signal fits in `per_second`, leaving `reserve` slots of the current
    /// second unused.
    fn allows(&mut self, now: Instant, per_second: usize, reserve: usize) -> bool {
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.sent.pop_front();
        }
        self.sent.len() + reserve < per_second
    }

    fn spend(&mut self, now: Instant) {
        self.sent.push_back(now);
    }
}

/// Runs until the job manager drops its sender or the bus connection closes (there is nobody
/// to signal then; the running jobs go on without it). `instances` are the instance objects
/// already published; they are refreshed after the daemon's own changes (at the next tick) and
/// every [`REFRESH_INTERVAL`].
pub async fn run(
    connection: Connection,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    jobs: Arc<Jobs>,
    mut instances: Instances,
) {
    let mut pending = Pending::default();
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresher = tokio::time::interval(REFRESH_INTERVAL);
    refresher.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                if let Err(err) = handle(&connection, &jobs, event, &mut pending).await {
                    log::warn!("cannot emit a signal: {err}");
                }
            }
            _ = connection.closed() => break,
            _ = refresher.tick() => pending.instances = true,
            _ = ticker.tick() => {
                if std::mem::take(&mut pending.instances) {
                    instances.refresh(&connection, &jobs).await;
                }
                for (job, instance, step, percent) in pending.due_progress(Instant::now()) {
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
    /// Jobs whose changing properties (Status, Progress, ExitCode, ...) changed.
    properties: BTreeSet<u64>,
    /// Whether the instance objects are to be refreshed.
    instances: bool,
    /// The latest progress of each (job, instance) not yet signalled, and since when it waits.
    progress: BTreeMap<(u64, String), (Step, u8, Instant)>,
    /// Each running job's Progress budget.
    budgets: HashMap<u64, Budget>,
    /// What PropertiesChanged last said of each job.
    sent: HashMap<u64, Sent>,
    /// Each (job, instance)'s `Message` budget, and how many of its messages were left out
    /// since the last one that went out.
    messages: HashMap<(u64, String), (Budget, u64)>,
}

impl Pending {
    /// For each job whose budget allows it (keeping one slot for finishing instances), the
    /// pending progress that waited longest.
    fn due_progress(&mut self, now: Instant) -> Vec<(u64, String, Step, u8)> {
        let mut oldest: BTreeMap<u64, (Instant, String)> = BTreeMap::new();
        for ((job, instance), (_, _, since)) in &self.progress {
            if oldest.get(job).is_none_or(|(t, _)| since < t) {
                oldest.insert(*job, (*since, instance.clone()));
            }
        }
        let mut due = Vec::new();
        for (job, (_, instance)) in oldest {
            if !self
                .budgets
                .entry(job)
                .or_default()
                .allows(now, PROGRESS_PER_SECOND, 1)
            {
                continue;
            }
            if let Some((step, percent, _)) = self.progress.remove(&(job, instance.clone())) {
                self.budgets.entry(job).or_default().spend(now);
                due.push((job, instance, step, percent));
            }
        }
        due
    }

    /// The `Message` signals (priority, text) that go out for one message of an instance: none
    /// when its budget is spent (the message is counted as left out), else the message,
    /// preceded by the notice of those left out before it.
    fn admit_message(
        &mut self,
        job: u64,
        instance: &str,
        message: (u8, String),
        now: Instant,
    ) -> Vec<(u8, String)> {
        let (budget, left_out) = self.messages.entry((job, instance.to_owned())).or_default();
        let mut out = Vec::new();
        if *left_out > 0 && budget.allows(now, MESSAGES_PER_SECOND, 0) {
            budget.spend(now);
            out.push((priority::WARNING, left_out_notice(job, instance, *left_out)));
            *left_out = 0;
        }
        if budget.allows(now, MESSAGES_PER_SECOND, 0) {
            budget.spend(now);
            out.push(message);
        } else {
            *left_out += 1;
        }
        out
    }

    /// Forgets the `Message` budget of a finishing instance (`None`: of every instance of a
    /// finishing job), with the notice of what it left out, if anything (always sent).
    fn finish_messages(&mut self, job: u64, instance: Option<&str>) -> Vec<(String, String)> {
        let keys = keys_of(self.messages.keys(), job, instance);
        let mut notices = Vec::new();
        for key in keys {
            if let Some((_, left_out)) = self.messages.remove(&key)
                && left_out > 0
            {
                notices.push((key.1.clone(), left_out_notice(job, &key.1, left_out)));
            }
        }
        notices
    }

    /// Takes the pending progress of one finishing instance, or of every instance of a
    /// finishing job, as far as the job's budget allows; the rest is dropped.
    fn take_final(
        &mut self,
        job: u64,
        instance: Option<&str>,
        now: Instant,
    ) -> Vec<(String, Step, u8)> {
        let keys = keys_of(self.progress.keys(), job, instance);
        let mut out = Vec::new();
        for key in keys {
            let Some((step, percent, _)) = self.progress.remove(&key) else {
                continue;
            };
            let budget = self.budgets.entry(job).or_default();
            if budget.allows(now, PROGRESS_PER_SECOND, 0) {
                budget.spend(now);
                out.push((key.1, step, percent));
            }
        }
        out
    }
}

/// The (job, instance) keys of one instance of a job, or of all its instances (`None`).
fn keys_of<'a>(
    keys: impl Iterator<Item = &'a (u64, String)>,
    job: u64,
    instance: Option<&str>,
) -> Vec<(u64, String)> {
    keys.filter(|(j, i)| *j == job && instance.is_none_or(|wanted| wanted == i))
        .cloned()
        .collect()
}

/// Sends the warnings that stand for messages left out of the bus, (instance, text) each.
async fn left_out_notices(
    connection: &Connection,
    job: u64,
    notices: Vec<(String, String)>,
) -> zbus::Result<()> {
    for (instance, notice) in notices {
        let warning = u32::from(priority::WARNING);
        JobObject::message(&emitter(connection, job)?, &instance, warning, &notice).await?;
    }
    Ok(())
}

/// The warning that stands for messages left out of the bus.
fn left_out_notice(job: u64, instance: &str, count: u64) -> String {
    format!(
        "{count} messages were not sent on the bus (more than {MESSAGES_PER_SECOND} a second); \
         the journal has them all: journalctl MODULE_UPDATER_JOB={job} MODULE_UPDATER_INSTANCE={instance}"
    )
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
        JobEvent::New { job } => {
            let manager = SignalEmitter::new(connection, module_updater_dbus::OBJECT_PATH)?;
            let path = job_path(job);
            Manager::job_new(&manager, zbus::ObjectPath::try_from(path.as_str())?).await?;
            jobs_changed(connection).await;
            update_status(jobs);
        }
        JobEvent::InstancesChanged => pending.instances = true,
        JobEvent::Progress {
            job,
            instance,
            step,
            percent,
        } => {
            let since = pending
                .progress
                .get(&(job, instance.clone()))
                .map_or_else(Instant::now, |(_, _, since)| *since);
            pending
                .progress
                .insert((job, instance), (step, percent, since));
        }
        JobEvent::Message {
            job,
            instance,
            priority,
            text,
        } => {
            let admitted = pending.admit_message(job, &instance, (priority, text), Instant::now());
            if !admitted.is_empty() {
                let emitter = emitter(connection, job)?;
                for (priority, text) in admitted {
                    JobObject::message(&emitter, &instance, u32::from(priority), &text).await?;
                }
            }
        }
        JobEvent::InstanceFinished {
            job,
            instance,
            status,
            exit_code,
        } => {
            let notices = pending.finish_messages(job, Some(&instance));
            left_out_notices(connection, job, notices).await?;
            for (instance, step, percent) in
                pending.take_final(job, Some(&instance), Instant::now())
            {
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
            for (instance, step, percent) in pending.take_final(job, None, Instant::now()) {
                progress(connection, job, &instance, step, percent).await?;
            }
            pending.budgets.remove(&job);
            // Messages of the daemon's own (the shared download) for instances that never ran.
            left_out_notices(connection, job, pending.finish_messages(job, None)).await?;
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
        finished_usec: record.finished_usec,
        instance_states: jobs
            .instance_states(job)
            .unwrap_or_default()
            .iter()
            .map(|(instance, progress)| (instance.clone(), state_tuple(progress)))
            .collect(),
    };
    let before = sent.insert(job, now.clone());
    let before = before.as_ref();
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
    if before.is_none_or(|b| b.finished_usec != now.finished_usec) {
        changed.insert("FinishedUsec", zbus::Variant::from(now.finished_usec));
    }
    if before.is_none_or(|b| b.instance_states != now.instance_states) {
        changed.insert(
            "InstanceStates",
            zbus::Variant::from(now.instance_states.clone()),
        );
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
#[derive(Debug, Clone)]
struct Sent {
    status: &'static str,
    progress: u32,
    exit_code: i32,
    finished_usec: u64,
    instance_states: HashMap<String, InstanceStateTuple>,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Most signals in any one-second window of `times`.
    fn busiest_second(times: &[Instant]) -> usize {
        times
            .iter()
            .map(|start| {
                times
                    .iter()
                    .filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn fifty_busy_instances_share_five_signals_per_second_and_each_gets_its_turn() {
        let start = Instant::now();
        let mut pending = Pending::default();
        let mut sent: Vec<Instant> = Vec::new();
        let mut who: BTreeSet<String> = BTreeSet::new();
        let mut finals = 0;
        // 50 instances report progress every 10 ms for 20 s; the pump ticks every 200 ms and
        // some instances finish along the way.
        for ms in (0..20_000u64).step_by(10) {
            let now = start + Duration::from_millis(ms);
            for i in 0..50 {
                let key = (7, format!("mod{i}"));
                let since = pending.progress.get(&key).map_or(now, |p| p.2);
                pending.progress.insert(key, (Step::Extract, 50, since));
            }
            if ms % 200 == 0 {
                for (_, instance, _, _) in pending.due_progress(now) {
                    sent.push(now);
                    who.insert(instance);
                }
            }
            if ms % 1000 == 500 {
                for (instance, _, _) in pending.take_final(7, Some("mod3"), now) {
                    sent.push(now);
                    who.insert(instance);
                    finals += 1;
                }
            }
        }
        assert!(
            busiest_second(&sent) <= PROGRESS_PER_SECOND,
            "{}",
            busiest_second(&sent)
        );
        // 20 s at 4 periodic signals a second reach every one of the 50 instances.
        assert_eq!(who.len(), 50, "{who:?}");
        // The slot kept for finishing instances was there every time.
        assert_eq!(finals, 20);
    }

    #[test]
    fn a_flood_of_messages_is_cut_to_the_budget_and_the_rest_is_counted() {
        let start = Instant::now();
        let mut pending = Pending::default();
        let mut sent: Vec<(Instant, String)> = Vec::new();
        // One instance prints 10 000 lines in 2 s (one every 0.2 ms); another prints 3.
        for n in 0..10_000u64 {
            let now = start + Duration::from_micros(n * 200);
            for (_, text) in pending.admit_message(1, "loud1", (6, format!("line {n}")), now) {
                sent.push((now, text));
            }
        }
        let quiet: Vec<_> = (0..3)
            .flat_map(|n| pending.admit_message(1, "quiet2", (6, format!("q{n}")), start))
            .collect();
        assert_eq!(quiet.len(), 3, "another instance has its own budget");
        let times: Vec<Instant> = sent.iter().map(|(t, _)| *t).collect();
        assert!(busiest_second(&times) <= MESSAGES_PER_SECOND);
        // The first second's budget, then a notice and lines in the next second.
        assert_eq!(sent[0].1, "line 0");
        let notice = &sent[MESSAGES_PER_SECOND].1;
        assert!(
            notice.starts_with("4950 messages were not sent on the bus")
                && notice
                    .ends_with("journalctl MODULE_UPDATER_JOB=1 MODULE_UPDATER_INSTANCE=loud1"),
            "{notice}"
        );
        // The instance ends: what it left out since is told once, then forgotten.
        let at_end = pending.finish_messages(1, Some("loud1"));
        assert_eq!(at_end.len(), 1);
        let texts: Vec<&str> = sent
            .iter()
            .map(|(_, text)| text.as_str())
            .chain(at_end.iter().map(|(_, notice)| notice.as_str()))
            .collect();
        let shown = texts.iter().filter(|t| t.starts_with("line ")).count() as u64;
        let counted: u64 = texts
            .iter()
            .filter_map(|t| t.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(shown + counted, 10_000, "every line is shown or counted");
        assert!(pending.finish_messages(1, Some("loud1")).is_empty());
    }

    #[test]
    fn a_finishing_instance_gets_its_last_progress_out_unless_the_second_is_spent() {
        let now = Instant::now();
        let mut pending = Pending::default();
        for i in 0..7 {
            pending
                .progress
                .insert((1, format!("m{i}")), (Step::CleanupImages, 100, now));
        }
        let finals: Vec<_> = (0..7)
            .flat_map(|i| pending.take_final(1, Some(&format!("m{i}")), now))
            .collect();
        assert_eq!(finals.len(), PROGRESS_PER_SECOND);
        assert!(
            pending.progress.is_empty(),
            "the rest is dropped, not delayed"
        );
        // Another job has its own budget.
        pending
            .progress
            .insert((2, "x1".into()), (Step::Extract, 10, now));
        assert_eq!(pending.due_progress(now).len(), 1);
    }
}
