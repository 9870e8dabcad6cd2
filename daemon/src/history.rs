//! Each instance's update history: `<state dir>/history/<label>.json`, a JSON array of
//! [`HistoryEntry`], newest first, at most [`MAX_ENTRIES`] long. Kept across restarts and after
//! jobs leave the bus; read by `GetHistory` and the instances' `LastUpdate`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use module_updater_dbus::path_label;
use module_updater_dbus::types::{HistoryEntry, InstanceResult};

use crate::job_store::{Durability, JobRecord, write_atomic};

/// How many entries an instance's history keeps; older ones are dropped.
pub const MAX_ENTRIES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot write the history of {instance} to {path}: {source}")]
    Write {
        instance: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The histories of one state dir. Each instance's newest entry is kept in memory once read, so
/// `LastUpdate` costs no file read.
pub struct History {
    dir: PathBuf,
    /// The newest entry of each instance whose history was read or written (None: no history).
    latest: Mutex<HashMap<String, Option<HistoryEntry>>>,
    /// Serialises read-modify-write of the files.
    write: Mutex<()>,
}

impl History {
    pub fn open(state_dir: &Path) -> std::io::Result<History> {
        let dir = state_dir.join("history");
        std::fs::create_dir_all(&dir)?;
        Ok(History {
            dir,
            latest: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
        })
    }

    fn path(&self, instance: &str) -> PathBuf {
        self.dir.join(format!("{}.json", path_label(instance)))
    }

    /// The instance's entries, newest first (empty when it has none or the file is unreadable:
    /// a damaged history is logged and starts again, it never stops an update).
    pub fn read(&self, instance: &str) -> Vec<HistoryEntry> {
        let path = self.path(instance);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                log::warn!("ignoring the damaged history {}: {err}", path.display());
                Vec::new()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                log::warn!("cannot read the history {}: {err}", path.display());
                Vec::new()
            }
        }
    }

    /// Whether the instance has any history on disk.
    pub fn exists(&self, instance: &str) -> bool {
        self.path(instance).exists()
    }

    /// The newest entry of the instance, if any.
    pub fn latest(&self, instance: &str) -> Option<HistoryEntry> {
        if let Some(known) = lock(&self.latest).get(instance) {
            return known.clone();
        }
        let newest = self.read(instance).into_iter().next();
        lock(&self.latest).insert(instance.to_owned(), newest.clone());
        newest
    }

    /// Adds an entry in front of the instance's history, durably, dropping the oldest beyond
    /// [`MAX_ENTRIES`].
    pub fn append(&self, instance: &str, entry: HistoryEntry) -> Result<(), HistoryError> {
        let _guard = lock(&self.write);
        let mut entries = self.read(instance);
        entries.insert(0, entry.clone());
        entries.truncate(MAX_ENTRIES);
        let path = self.path(instance);
        let data = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        write_atomic(&path, &data, Durability::Sync).map_err(|source| HistoryError::Write {
            instance: instance.to_owned(),
            path,
            source,
        })?;
        lock(&self.latest).insert(instance.to_owned(), Some(entry));
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The history entry of one instance's result in a job.
pub fn entry(record: &JobRecord, result: &InstanceResult, finished_usec: u64) -> HistoryEntry {
    HistoryEntry {
        job: record.id,
        action: record.action.clone(),
        started_usec: record.started_usec,
        finished_usec,
        caller_uid: record.caller_uid,
        result: result.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use module_updater_dbus::types::InstanceStatus;

    use super::*;

    fn an_entry(job: u64) -> HistoryEntry {
        let mut result = InstanceResult::new(InstanceStatus::Completed);
        result.new_image_url = Some("r/x:2".into());
        HistoryEntry {
            job,
            action: "update-module".into(),
            started_usec: job,
            finished_usec: job + 1,
            caller_uid: 0,
            result,
        }
    }

    #[test]
    fn entries_come_newest_first_bounded_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        assert!(history.latest("mail-1").is_none());
        for job in 1..=(MAX_ENTRIES as u64 + 5) {
            history.append("mail-1", an_entry(job)).unwrap();
        }
        assert_eq!(
            history.latest("mail-1").unwrap().job,
            MAX_ENTRIES as u64 + 5
        );
        let again = History::open(dir.path()).unwrap();
        let entries = again.read("mail-1");
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries[0].job, MAX_ENTRIES as u64 + 5);
        assert_eq!(entries[MAX_ENTRIES - 1].job, 6);
        assert_eq!(again.latest("mail-1").unwrap().job, MAX_ENTRIES as u64 + 5);
        assert!(again.read("other1").is_empty());
    }

    #[test]
    fn a_damaged_history_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("history/x1.json"), b"not json").unwrap();
        assert!(history.read("x1").is_empty());
        history.append("x1", an_entry(3)).unwrap();
        assert_eq!(history.read("x1").len(), 1);
    }
}
