//! A cgroup of its own, in every hierarchy systemd tracks, for each `systemd --user` manager.
//!
//! Why: a manager started in the root cgroup takes it over and moves every process of the machine
//! into its `init.scope`, and two managers sharing a cgroup kill each other's services on shutdown
//! (`../shared/sandbox.md` beside the workspace). A non-root manager also needs the directories
//! to be its own, and it must be moved there by root, before privileges are dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, chown};

use crate::{Result, SandboxError, cmd, process};

const ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies where a cgroup must be created: the unified one on a pure cgroup v2 machine;
/// the named v1 `systemd` one and the v2 `unified` one on a hybrid machine.
pub fn hierarchies() -> Result<Vec<PathBuf>> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.to_path_buf()]);
    }
    let found: Vec<PathBuf> = ["systemd", "unified"]
        .iter()
        .map(|name| root.join(name))
        .filter(|path| path.join("cgroup.procs").exists())
        .collect();
    if found.is_empty() {
        return Err(SandboxError::Cgroups {
            detail: format!(
                "neither {ROOT}/cgroup.controllers (cgroup v2) nor {ROOT}/systemd (hybrid) \
                 exists; mount the cgroup filesystem (systemd --user needs it)"
            ),
        });
    }
    Ok(found)
}

/// Creates the cgroup `name` in every hierarchy, owned (recursively, as the manager needs to
/// create its own sub-groups) by `owner` when given. Returns the directories.
pub fn create(name: &str, owner: Option<(u32, u32)>) -> Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    for hierarchy in hierarchies()? {
        let dir = hierarchy.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // A leftover of a crashed run with the same (random) name is reused.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                remove(&created);
                return Err(SandboxError::io("create the cgroup", &dir, source));
            }
        }
        created.push(dir.clone());
        if let Some((uid, gid)) = owner {
            let mut paths = vec![dir.clone()];
            if let Ok(entries) = std::fs::read_dir(&dir) {
                paths.extend(entries.flatten().map(|e| e.path()));
            }
            for path in paths {
                if let Err(source) =
                    chown(&path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                {
                    remove(&created);
                    return Err(SandboxError::io(
                        "chown the cgroup file",
                        &path,
                        std::io::Error::from(source),
                    ));
                }
            }
        }
    }
    Ok(created)
}

/// The `cgroup.procs` files through which a process enters the cgroup.
pub fn procs_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().map(|d| d.join("cgroup.procs")).collect()
}

/// Kills whatever still runs in the cgroups and removes them, deepest directories first.
/// Returns the directories that could not be removed.
pub fn remove(dirs: &[PathBuf]) -> Vec<PathBuf> {
    for dir in dirs {
        if !dir.exists() {
            continue;
        }
        let _ = cmd::poll(Duration::from_secs(5), || {
            let pids = process::pids_in_cgroup(dir);
            if pids.is_empty() {
                return Ok(Some(()));
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            Ok(None)
        });
    }
    let mut failed = Vec::new();
    for dir in dirs {
        if dir.exists() {
            // A cgroup is busy for a moment after its last process died: retry briefly.
            let removed = cmd::poll(Duration::from_secs(3), || Ok(rmdir_tree(dir).then_some(())));
            if !matches!(removed, Ok(Some(()))) {
                failed.push(dir.clone());
            }
        }
    }
    failed
}

/// Removes `dir` and its sub-directories depth-first (cgroup files vanish with their directory).
fn rmdir_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&entry.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}
