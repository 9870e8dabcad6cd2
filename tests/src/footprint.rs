//! What a sandbox created on the machine (users, processes, cgroups, files), recorded on disk as
//! it goes. Three uses: teardown, the check that teardown left nothing behind, and cleaning up
//! after a test process that died without unwinding (SIGKILL, a timeout of the test runner).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Uid, User};
use serde::{Deserialize, Serialize};

use crate::process::{self, ProcessRecord};
use crate::{Result, SandboxError, cgroup, cmd};

/// Machine-wide state of the test sandboxes (locks and the records of live sandboxes).
pub const STATE_DIR: &str = "/run/module-updater-tests";

/// A rootless instance's Unix user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
}

/// Everything a sandbox created. See [`crate::Sandbox::footprint`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// The test process that owns the sandbox.
    pub owner: ProcessRecord,
    /// The temporary directory.
    pub root: PathBuf,
    /// The `registries.conf.d` file.
    pub registry_conf: Option<PathBuf>,
    /// The `registries.conf.d` file of the uplink in front of the registry, if any.
    #[serde(default)]
    pub uplink_conf: Option<PathBuf>,
    pub processes: Vec<ProcessRecord>,
    pub users: Vec<UserRecord>,
    pub cgroups: Vec<PathBuf>,
    /// Where this record is kept while the sandbox lives.
    pub record_file: PathBuf,
}

/// What is still there after teardown; empty when teardown was complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub items: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.items.is_empty() {
            write!(f, "nothing left behind")
        } else {
            write!(f, "left behind: {}", self.items.join("; "))
        }
    }
}

fn records_dir() -> PathBuf {
    Path::new(STATE_DIR).join("sandboxes")
}

/// An exclusive lock on `STATE_DIR/<name>`, held until the value is dropped. A lock file works
/// across processes (nextest runs each test in a process of its own).
pub(crate) fn lock(name: &str) -> Result<Flock<File>> {
    let dir = Path::new(STATE_DIR);
    std::fs::create_dir_all(dir).map_err(|e| SandboxError::io("create", dir, e))?;
    let path = dir.join(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| SandboxError::io("open the lock file", &path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| SandboxError::io("lock", &path, std::io::Error::from(errno)))
}

impl Footprint {
    pub(crate) fn new(root: &Path) -> Footprint {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Footprint {
            owner: ProcessRecord::new("test process", std::process::id()),
            root: root.to_path_buf(),
            registry_conf: None,
            uplink_conf: None,
            processes: Vec::new(),
            users: Vec::new(),
            cgroups: Vec::new(),
            record_file: records_dir().join(format!("{name}.json")),
        }
    }

    /// Writes the record atomically.
    pub(crate) fn save(&self) -> Result<()> {
        let dir = records_dir();
        std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io("create", &dir, e))?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| SandboxError::Parse {
            command: "serialise the sandbox record".into(),
            detail: e.to_string(),
        })?;
        let temporary = self.record_file.with_extension("json.tmp");
        std::fs::write(&temporary, text).map_err(|e| SandboxError::io("write", &temporary, e))?;
        std::fs::rename(&temporary, &self.record_file)
            .map_err(|e| SandboxError::io("rename into", &self.record_file, e))
    }

    /// Removes everything recorded that still exists; returns what could not be removed.
    pub(crate) fn teardown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for record in self.processes.iter().rev() {
            process::terminate_foreign(record, Duration::from_secs(2));
            if record.alive() {
                problems.push(format!(
                    "process {} ({}) survives SIGKILL",
                    record.pid, record.what
                ));
            }
        }
        for user in self.users.iter().rev() {
            problems.extend(remove_user(user, false));
        }
        for conf in self.registry_conf.iter().chain(&self.uplink_conf) {
            if let Err(err) = std::fs::remove_file(conf)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                problems.push(format!("{}: {err}", conf.display()));
            }
        }
        problems.extend(
            cgroup::remove(&self.cgroups)
                .into_iter()
                .map(|d| format!("cgroup {}", d.display())),
        );
        if self.root.exists() {
            let mut rm = cmd::clean("rm");
            rm.arg("-rf").arg(&self.root);
            if let Err(err) = cmd::run(&mut rm) {
                problems.push(err.to_string());
            }
        }
        let _ = std::fs::remove_file(&self.record_file);
        problems
    }

    /// What of this footprint still exists (call it after the sandbox was dropped).
    pub fn leftovers(&self) -> Leftovers {
        let mut items = Vec::new();
        if self.root.exists() {
            items.push(format!("temporary directory {}", self.root.display()));
        }
        for conf in self.registry_conf.iter().chain(&self.uplink_conf) {
            if conf.exists() {
                items.push(format!("registry configuration {}", conf.display()));
            }
        }
        if self.record_file.exists() {
            items.push(format!("sandbox record {}", self.record_file.display()));
        }
        for record in &self.processes {
            if record.alive() {
                items.push(format!("process {} ({})", record.pid, record.what));
            }
        }
        for user in &self.users {
            if let Ok(Some(_)) = User::from_name(&user.name) {
                items.push(format!("user {}", user.name));
            }
            for file in ["/etc/subuid", "/etc/subgid"] {
                let prefix = format!("{}:", user.name);
                if std::fs::read_to_string(file)
                    .is_ok_and(|t| t.lines().any(|l| l.starts_with(&prefix)))
                {
                    items.push(format!("{file} entry of {}", user.name));
                }
            }
            // A uid handed to another user since (by a parallel test) is not ours to judge.
            let reused = matches!(User::from_uid(Uid::from_raw(user.uid)), Ok(Some(u)) if u.name != user.name);
            if !reused {
                let pids = process::pids_of_uid(user.uid);
                if !pids.is_empty() {
                    items.push(format!(
                        "processes {pids:?} of uid {} ({})",
                        user.uid, user.name
                    ));
                }
            }
            for dir in [&user.runtime_dir, &user.home] {
                if dir.exists() {
                    items.push(format!("directory {}", dir.display()));
                }
            }
            if !reused {
                for entry in owned_in(Path::new(SHARED_TMP), user.uid) {
                    items.push(format!("{} of uid {}", entry.display(), user.uid));
                }
            }
        }
        for dir in &self.cgroups {
            if dir.exists() {
                items.push(format!("cgroup {}", dir.display()));
            }
        }
        Leftovers { items }
    }
}

/// Where the instance users' processes write large temporary files (podman's default, and the
/// daemon's workers' directories).
const SHARED_TMP: &str = "/var/tmp";

/// The entries of `dir` that `uid` owns.
fn owned_in(dir: &Path, uid: u32) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
        .map(|e| e.path())
        .collect()
}

/// Stops everything of a rootless instance's user and deletes it (home included). `ours` says
/// the user was created by this process, so it certainly is ours; otherwise (a stale record)
/// the user must still have the recorded uid. Returns what could not be removed.
pub(crate) fn remove_user(user: &UserRecord, ours: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let current = User::from_name(&user.name).ok().flatten();
    let same = current.as_ref().is_some_and(|u| u.uid.as_raw() == user.uid);
    if same || (ours && current.is_none()) {
        // Rootless podman's pause process keeps the user namespace alive and blocks userdel.
        let pause = user.runtime_dir.join("libpod/tmp/pause.pid");
        if let Ok(text) = std::fs::read_to_string(&pause)
            && let Ok(pid) = text.trim().parse::<i32>()
            && process::real_uid(pid) == Some(user.uid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let survivors = process::kill_uid(user.uid);
        if !survivors.is_empty() {
            problems.push(format!("processes {survivors:?} of {}", user.name));
        }
        // What its processes left in /var/tmp (podman's or a worker's temporary files, when a
        // test killed the daemon in the middle of a job): userdel removes the home only.
        for entry in owned_in(Path::new(SHARED_TMP), user.uid) {
            let mut rm = cmd::clean("rm");
            rm.arg("-rf").arg(&entry);
            if let Err(err) = cmd::run(&mut rm) {
                problems.push(err.to_string());
            }
        }
    }
    if same && let Err(err) = userdel(&user.name) {
        problems.push(err.to_string());
    }
    for dir in [&user.runtime_dir, &user.home] {
        if dir.exists() {
            let mut rm = cmd::clean("rm");
            rm.arg("-rf").arg(dir);
            if let Err(err) = cmd::run(&mut rm) {
                problems.push(err.to_string());
            }
        }
    }
    problems
}

/// Whether a `useradd`/`userdel` failure is the transient "cannot lock /etc/passwd" kind.
pub(crate) fn lock_contention(stderr: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stderr);
    text.contains("cannot lock") || text.contains("try again later")
}

/// `userdel -r -f NAME`, serialised with the other sandboxes and retried on lock contention.
pub(crate) fn userdel(name: &str) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        let mut command = cmd::clean("userdel");
        command.args(["-r", "-f", name]);
        let output = {
            let _lock = lock("passwd.lock")?;
            cmd::output(&mut command)?
        };
        if User::from_name(name).ok().flatten().is_none() {
            // userdel exits non-zero for mere warnings (no mail spool): the user is gone.
            return Ok(());
        }
        attempt += 1;
        if !lock_contention(&output.stderr) || attempt >= 20 {
            return cmd::check(&command, output).map(drop);
        }
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
    }
}

/// Cleans up the sandboxes of test processes that died without tearing down. Failures are
/// reported on stderr only: they must not fail an unrelated test.
pub fn reap_stale() {
    let Ok(_lock) = lock("reap.lock") else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(records_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let record = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Footprint>(&bytes).ok());
        let Some(footprint) = record else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if footprint.owner.alive() {
            continue;
        }
        eprintln!(
            "module-updater-tests: cleaning up the sandbox {} of dead test process {}",
            footprint.root.display(),
            footprint.owner.pid
        );
        let problems = footprint.teardown();
        if !problems.is_empty() {
            eprintln!(
                "module-updater-tests: could not remove: {}",
                problems.join("; ")
            );
        }
    }
}
