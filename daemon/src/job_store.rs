//! Where job records live on disk (`<state dir>/jobs/<id>.json` and the `next-job-id` counter),
//! and the thread that writes them.
//!
//! A job's record changes at every step of every instance. Writing and fsyncing it each time on
//! the threads that serve the bus cost ~0.2 s per instance and delayed every D-Bus answer, so the
//! writes go to one thread, in order, coalesced (only the newest version of a record is written
//! when several wait), and only the moments that matter after a crash are made durable:
//! - the job's creation (written by the caller before the job id is returned),
//! - an instance's end and the job's end ([`Durability::Sync`], awaited before the signal that
//!   announces them);
//! - every other change (the step an instance is in) is written without fsync: it survives a
//!   daemon crash, and after a power loss the recovered job names an earlier step.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

use std::collections::BTreeMap;

use module_updater_dbus::types::{InstanceResult, Step};
use serde::{Deserialize, Serialize};

/// The life of a job, as the `Status` property shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Aborted,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Aborted => "aborted",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Aborted)
    }
}

/// A job as persisted in `<state dir>/jobs/<id>.json` and served on the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub action: String,
    pub request: String,
    pub instances: Vec<String>,
    pub status: JobStatus,
    pub progress: u8,
    pub exit_code: i32,
    pub caller_uid: u32,
    pub started_usec: u64,
    pub finished_usec: u64,
    /// The step each unfinished instance is in.
    #[serde(default)]
    pub steps: BTreeMap<String, Step>,
    /// Results of the finished instances.
    #[serde(default)]
    pub results: BTreeMap<String, InstanceResult>,
    /// Why the job as a whole ended abnormally (`interrupted` after a daemon crash).
    #[serde(default)]
    pub error: Option<String>,
}

impl JobRecord {
    /// `GetResult`: `{"status", "exit_code", "instances": {id: result}}` (plus `error` when set).
    pub fn result_json(&self) -> String {
        let mut value = serde_json::json!({
            "status": self.status.as_str(),
            "exit_code": self.exit_code,
            "instances": self.results,
        });
        if let (Some(error), Some(object)) = (&self.error, value.as_object_mut()) {
            object.insert("error".into(), serde_json::Value::from(error.as_str()));
        }
        value.to_string()
    }
}

const COUNTER_FILE: &str = "next-job-id";

/// How far a write must go before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written and renamed into place: survives a crash of the daemon.
    Lazy,
    /// Also fsynced with its directory: survives a power loss.
    Sync,
}

type Ack = oneshot::Sender<std::io::Result<()>>;

enum Op {
    Write {
        record: Box<JobRecord>,
        durability: Durability,
        /// Who waits for this write (several when coalesced writes were merged into it).
        done: Vec<Ack>,
    },
    Remove {
        id: u64,
    },
}

impl Op {
    fn id(&self) -> u64 {
        match self {
            Op::Write { record, .. } => record.id,
            Op::Remove { id } => *id,
        }
    }
}

/// The job records of one state dir.
pub struct JobStore {
    state_dir: PathBuf,
    writer: mpsc::Sender<Op>,
}

impl JobStore {
    /// Creates `<state dir>/jobs` and starts the writer thread (it ends with the store).
    pub fn open(state_dir: &Path) -> std::io::Result<JobStore> {
        let jobs_dir = jobs_dir(state_dir);
        std::fs::create_dir_all(&jobs_dir)?;
        let (writer, ops) = mpsc::channel();
        std::thread::Builder::new()
            .name("job-records".into())
            .spawn(move || write_loop(&jobs_dir, &ops))?;
        Ok(JobStore {
            state_dir: state_dir.to_owned(),
            writer,
        })
    }

    pub fn record_path(&self, id: u64) -> PathBuf {
        record_path(&jobs_dir(&self.state_dir), id)
    }

    pub fn counter_path(&self) -> PathBuf {
        self.state_dir.join(COUNTER_FILE)
    }

    /// Every readable record; unreadable ones are logged and skipped.
    pub fn load(&self) -> Vec<JobRecord> {
        load_records(&jobs_dir(&self.state_dir))
    }

    /// The next job id a previous daemon left (1 when there is none).
    pub fn read_counter(&self) -> u64 {
        read_counter(&self.state_dir)
    }

    /// Durably records the next job id, on the calling thread (before an id is handed out).
    pub fn write_counter(&self, next: u64) -> std::io::Result<()> {
        write_counter(&self.state_dir, next)
    }

    /// Durably writes a record on the calling thread: for a job's creation, whose id is
    /// returned only once its record exists, and for recovery at start-up.
    pub fn write_now(&self, record: &JobRecord) -> std::io::Result<()> {
        write_record(&jobs_dir(&self.state_dir), record, Durability::Sync)
    }

    /// Queues a write and returns at once; failures are logged by the writer.
    pub fn queue(&self, record: JobRecord, durability: Durability) {
        self.send(Op::Write {
            record: Box::new(record),
            durability,
            done: Vec::new(),
        });
    }

    /// Queues a write and waits until it is done.
    pub async fn write(&self, record: JobRecord, durability: Durability) -> std::io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(Op::Write {
            record: Box::new(record),
            durability,
            done: vec![done],
        });
        wait.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the job record writer has stopped")))
    }

    /// Queues the removal of a record (after any write of it queued before).
    pub fn remove(&self, id: u64) {
        self.send(Op::Remove { id });
    }

    fn send(&self, op: Op) {
        if let Err(mpsc::SendError(op)) = self.writer.send(op) {
            // Only if the writer thread panicked: write here rather than lose the record.
            log::error!(
                "the job record writer has stopped; writing job {} directly",
                op.id()
            );
            apply(&jobs_dir(&self.state_dir), op);
        }
    }
}

fn write_loop(jobs_dir: &Path, ops: &mpsc::Receiver<Op>) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        batch.extend(ops.try_iter());
        for op in coalesce(batch) {
            apply(jobs_dir, op);
        }
    }
}

/// Keeps, per job, only the last operation of the batch; a skipped write's durability and
/// waiters pass to the write that replaces it (a removal answers them at once).
fn coalesce(batch: Vec<Op>) -> Vec<Op> {
    let last: HashMap<u64, usize> = batch
        .iter()
        .enumerate()
        .map(|(index, op)| (op.id(), index))
        .collect();
    let mut carried: HashMap<u64, (bool, Vec<Ack>)> = HashMap::new();
    let mut kept = Vec::new();
    for (index, op) in batch.into_iter().enumerate() {
        let id = op.id();
        let is_last = last.get(&id) == Some(&index);
        match op {
            Op::Write {
                record,
                durability,
                mut done,
            } => {
                if !is_last {
                    let entry = carried.entry(id).or_default();
                    entry.0 |= durability == Durability::Sync;
                    entry.1.append(&mut done);
                    continue;
                }
                let (sync, mut waiting) = carried.remove(&id).unwrap_or_default();
                done.append(&mut waiting);
                let durability = if sync { Durability::Sync } else { durability };
                kept.push(Op::Write {
                    record,
                    durability,
                    done,
                });
            }
            Op::Remove { id } => {
                for ack in carried
                    .remove(&id)
                    .map(|(_, acks)| acks)
                    .unwrap_or_default()
                {
                    let _ = ack.send(Ok(()));
                }
                kept.push(Op::Remove { id });
            }
        }
    }
    kept
}

fn apply(jobs_dir: &Path, op: Op) {
    match op {
        Op::Write {
            record,
            durability,
            done,
        } => {
            let result = write_record(jobs_dir, &record, durability);
            if let Err(err) = &result {
                log::error!(MODULE_UPDATER_JOB = record.id; "cannot record job {} in {}: {err}", record.id, jobs_dir.display());
            }
            for ack in done {
                let _ = ack.send(match &result {
                    Ok(()) => Ok(()),
                    Err(err) => Err(std::io::Error::new(err.kind(), err.to_string())),
                });
            }
        }
        Op::Remove { id } => match std::fs::remove_file(record_path(jobs_dir, id)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                log::warn!(MODULE_UPDATER_JOB = id; "cannot remove the record of job {id}: {err}");
            }
            _ => {}
        },
    }
}

fn jobs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jobs")
}

fn record_path(jobs_dir: &Path, id: u64) -> PathBuf {
    jobs_dir.join(format!("{id}.json"))
}

fn read_counter(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join(COUNTER_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1)
}

fn write_counter(state_dir: &Path, next: u64) -> std::io::Result<()> {
    write_atomic(
        &state_dir.join(COUNTER_FILE),
        format!("{next}\n").as_bytes(),
        Durability::Sync,
    )
}

fn write_record(
    jobs_dir: &Path,
    record: &JobRecord,
    durability: Durability,
) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    write_atomic(&record_path(jobs_dir, record.id), &json, durability)
}

fn load_records(jobs_dir: &Path) -> Vec<JobRecord> {
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = std::fs::read(e.path()).ok()?;
            match serde_json::from_slice::<JobRecord>(&text) {
                Ok(record) => Some(record),
                Err(err) => {
                    log::warn!(
                        "ignoring unreadable job record {}: {err}",
                        e.path().display()
                    );
                    None
                }
            }
        })
        .collect()
}

/// Temp file in the same directory, renamed over the old one: a reader sees the old or the new
/// record, never a mix. With [`Durability::Sync`], the file and the directory are fsynced too.
pub(crate) fn write_atomic(
    path: &Path,
    data: &[u8],
    durability: Durability,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    if durability == Durability::Sync {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durability == Durability::Sync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(id: u64, progress: u8) -> JobRecord {
        JobRecord {
            id,
            action: "update-module".into(),
            request: "{}".into(),
            instances: vec!["a1".into()],
            status: JobStatus::Running,
            progress,
            exit_code: -1,
            caller_uid: 0,
            started_usec: 1,
            finished_usec: 0,
            steps: BTreeMap::new(),
            results: BTreeMap::new(),
            error: None,
        }
    }

    #[test]
    fn the_counter_survives_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        assert_eq!(store.read_counter(), 1);
        store.write_counter(8).unwrap();
        assert_eq!(JobStore::open(dir.path()).unwrap().read_counter(), 8);
    }

    #[tokio::test]
    async fn queued_writes_land_in_order_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        for progress in 0..50 {
            store.queue(record(3, progress), Durability::Lazy);
        }
        store.queue(record(4, 1), Durability::Lazy);
        store.write(record(3, 77), Durability::Sync).await.unwrap();
        let loaded: BTreeMap<u64, u8> = store.load().iter().map(|r| (r.id, r.progress)).collect();
        assert_eq!(loaded, BTreeMap::from([(3, 77), (4, 1)]));
        store.remove(4);
        store.write(record(3, 78), Durability::Sync).await.unwrap();
        let ids: Vec<u64> = store.load().iter().map(|r| r.id).collect();
        assert_eq!(ids, [3]);
        // No temporary files are left beside the records.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["3.json"]);
    }

    #[test]
    fn coalescing_keeps_the_last_write_with_the_strongest_durability_and_every_waiter() {
        let (first, first_done) = oneshot::channel();
        let (second, second_done) = oneshot::channel();
        let write = |progress, durability, done: Vec<Ack>| Op::Write {
            record: Box::new(record(1, progress)),
            durability,
            done,
        };
        let kept = coalesce(vec![
            write(1, Durability::Sync, vec![first]),
            write(2, Durability::Lazy, Vec::new()),
            Op::Remove { id: 9 },
            write(3, Durability::Lazy, vec![second]),
        ]);
        assert_eq!(kept.len(), 2);
        let Op::Write {
            record,
            durability,
            done,
        } = &kept[1]
        else {
            panic!("the write of job 1 was dropped");
        };
        assert_eq!(
            (record.progress, *durability, done.len()),
            (3, Durability::Sync, 2)
        );
        drop(kept);
        // Dropped without an answer: the waiters see the writer's absence, not a hang.
        assert!(first_done.blocking_recv().is_err());
        assert!(second_done.blocking_recv().is_err());
    }
}
