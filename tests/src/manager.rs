//! Real `systemd --user` managers: one per rootless instance user, and one running as root that
//! stands in for the system manager of rootful instances.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::process::{self, ProcessRecord};
use crate::{Result, SandboxError, cgroup, cmd};

/// The manager binary (package `systemd`).
pub const SYSTEMD: &str = "/usr/lib/systemd/systemd";
/// How long a manager may take to answer on its bus.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The user a manager runs as (`None` in [`ManagerSpec`] means root).
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// What to start.
pub struct ManagerSpec {
    /// For messages: "systemd --user of demoabcd1".
    pub what: String,
    pub cgroup_name: String,
    pub user: Option<RunAs>,
    /// The manager's whole environment (HOME, XDG_RUNTIME_DIR, ...).
    pub env: Vec<(String, String)>,
    pub runtime_dir: PathBuf,
    pub log: PathBuf,
}

/// A running manager; stopped by [`UserManager::stop`] or on drop.
pub struct UserManager {
    child: Child,
    pub record: ProcessRecord,
    pub cgroups: Vec<PathBuf>,
    pub log: PathBuf,
    pub runtime_dir: PathBuf,
}

impl UserManager {
    /// Starts the manager in a cgroup of its own, then waits until `ready` says it answers.
    pub fn start(
        spec: ManagerSpec,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<UserManager> {
        // `systemd --user` refuses to start unless the machine looks booted with systemd.
        std::fs::create_dir_all("/run/systemd/system")
            .map_err(|e| SandboxError::io("create", Path::new("/run/systemd/system"), e))?;
        let owner = spec.user.as_ref().map(|u| (u.uid, u.gid));
        let cgroups = cgroup::create(&spec.cgroup_name, owner)?;
        let log = std::fs::File::create(&spec.log)
            .map_err(|e| SandboxError::io("create the log file", &spec.log, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| SandboxError::io("dup", &spec.log, e))?;

        // Root moves the shell into the cgroups (a non-root process may not move itself out of
        // the root cgroup), then the shell becomes the manager: same pid, so the manager is our
        // child and we can wait for it.
        let mut command = cmd::clean("sh");
        command.arg("-c").arg(
            r#"n=$1; shift
while [ "$n" -gt 0 ]; do
  echo $$ > "$1" || { echo "cannot enter the cgroup $1" >&2; exit 111; }
  shift; n=$((n - 1))
done
exec setsid "$@""#,
        );
        command.arg("sh").arg(cgroups.len().to_string());
        command.args(cgroup::procs_files(&cgroups));
        if let Some(user) = &spec.user {
            command.args([
                "setpriv".to_owned(),
                format!("--reuid={}", user.uid),
                format!("--regid={}", user.gid),
                "--init-groups".to_owned(),
                "--".to_owned(),
            ]);
        }
        command.args([SYSTEMD, "--user"]);
        command
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(source) => {
                cgroup::remove(&cgroups);
                return Err(SandboxError::Spawn {
                    command: cmd::describe(&command),
                    source,
                });
            }
        };
        let record = ProcessRecord::new(spec.what.clone(), child.id());
        let mut manager = UserManager {
            child,
            record,
            cgroups,
            log: spec.log,
            runtime_dir: spec.runtime_dir,
        };

        let bus = manager.runtime_dir.join("bus");
        let mut exited = None;
        let answered = cmd::poll(READY_TIMEOUT, || {
            if let Some(status) = manager.child.try_wait().map_err(|e| SandboxError::Spawn {
                command: spec.what.clone(),
                source: e,
            })? {
                exited = Some(status);
                return Ok(Some(false));
            }
            // The bus socket appears first; asking it costs a process, so wait for it.
            if !bus.exists() {
                return Ok(None);
            }
            Ok(ready()?.then_some(true))
        });
        let log_text = manager.log_text();
        match (answered, exited) {
            (Ok(Some(true)), _) => Ok(manager),
            (_, Some(status)) => Err(SandboxError::Exited {
                what: spec.what,
                status: status.to_string(),
                log: log_text,
            }),
            (Err(err), _) => Err(err),
            (Ok(_), None) => Err(SandboxError::Timeout {
                what: format!(
                    "{} to own org.freedesktop.systemd1 on {}",
                    spec.what,
                    bus.display()
                ),
                secs: READY_TIMEOUT.as_secs_f64(),
                detail: format!(
                    "is package dbus-user-session installed (it provides the user bus)? \
                     manager log:\n{log_text}"
                ),
            }),
        }
    }

    /// The manager's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| cmd::tail(&b))
            .unwrap_or_default()
    }

    /// The address of the bus the manager activates (`unix:path=$XDG_RUNTIME_DIR/bus`).
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.runtime_dir.join("bus").display())
    }

    /// SIGTERM, wait up to 10 s, SIGKILL; then empties and removes its cgroups. Returns the
    /// cgroup directories that could not be removed.
    pub fn stop(&mut self) -> Vec<PathBuf> {
        process::terminate(&mut self.child, Duration::from_secs(10));
        cgroup::remove(&self.cgroups)
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        self.stop();
    }
}
