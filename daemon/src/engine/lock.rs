//! The instance's update lock and the interrupted-update marker.
//!
//! The lock is `flock(LOCK_EX|LOCK_NB)` on `<state>/.update-module.lock`, the very file NS8's own
//! agent locks, so the two exclude each other. It is held by the worker for the whole update, and
//! the descriptor is close-on-exec so scripts and the daemons they start never inherit it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file NS8's agent uses, relative to the state dir.
pub const LOCK_FILE: &str = ".update-module.lock";
/// Present while an update runs; left behind by a killed, crashed or cancelled update.
pub const MARKER_FILE: &str = ".module-updater.in-progress";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("action_already_running: another update holds {0}")]
    Busy(PathBuf),
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held update lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct UpdateLock {
    _lock: Flock<File>,
}

impl UpdateLock {
    /// Takes the lock without waiting. Contention is [`LockError::Busy`]; anything else (read-only
    /// file system, permissions) is reported as what it is, unlike NS8 which calls it all "busy".
    pub fn acquire(state_dir: &Path) -> Result<UpdateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(UpdateLock { _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Busy(path)),
            Err((_, errno)) => Err(LockError::Io {
                path,
                source: std::io::Error::from(errno),
            }),
        }
    }
}

/// Whether an earlier update of this instance was interrupted.
pub fn interrupted(state_dir: &Path) -> bool {
    state_dir.join(MARKER_FILE).exists()
}

/// Writes the marker with who is updating to what (for a person reading the state dir).
/// Replaced by rename, so a stale marker of any owner in the instance's own dir is no obstacle.
pub fn mark_started(state_dir: &Path, job: u64, module_url: &str) -> std::io::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(state_dir)?;
    let pid = std::process::id();
    writeln!(file, "job={job}\nmodule_url={module_url}\npid={pid}")?;
    file.as_file().sync_all()?;
    file.persist(state_dir.join(MARKER_FILE))
        .map_err(|e| e.error)?;
    Ok(())
}

/// Removes the marker: the update ended and left the instance consistent.
pub fn mark_finished(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(state_dir.join(MARKER_FILE)) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_busy_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = UpdateLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            UpdateLock::acquire(dir.path()),
            Err(LockError::Busy(_))
        ));
        drop(first);
        UpdateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_state_dir_is_an_io_error_not_busy() {
        let dir = tempfile::tempdir().unwrap();
        let err = UpdateLock::acquire(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
    }

    #[test]
    fn marker_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!interrupted(dir.path()));
        mark_started(dir.path(), 7, "x/y:1").unwrap();
        assert!(interrupted(dir.path()));
        mark_finished(dir.path()).unwrap();
        assert!(!interrupted(dir.path()));
        mark_finished(dir.path()).unwrap();
    }
}
