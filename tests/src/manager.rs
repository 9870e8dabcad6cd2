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
    /// Runs the manager in a mount namespace of its own whose `/run/systemd` is a 1 MiB tmpfs:
    /// systemd refuses `Reload` with less than 4 MiB free there (`org.freedesktop.systemd1.DiskFull`).
    pub short_of_run_space: bool,
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
        ensure_inaccessible_nodes()?;
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
        if spec.short_of_run_space {
            command.args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "mount -t tmpfs -o size=1m,mode=0755 module-updater-test /run/systemd \
                 && mkdir /run/systemd/system && exec \"$@\"",
                "sh",
            ]);
        }
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

/// Creates `/run/systemd/inaccessible/{reg,dir,fifo,sock,chr,blk}` (mode 0000) as systemd does
/// as PID 1 at boot. A manager bind-mounts them over paths a unit must not reach
/// (`ProtectKernelLogs=` hides `/dev/kmsg` behind `chr`); on a machine where systemd is not
/// PID 1 they are missing, and every such unit fails with 226/NAMESPACE. Harmless where they
/// exist: nothing is replaced.
pub fn ensure_inaccessible_nodes() -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let dir = Path::new("/run/systemd/inaccessible");
    match std::fs::create_dir(dir) {
        Ok(()) => crate::set_mode(dir, 0o755)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SandboxError::io("create", dir, e)),
    }
    let sub = dir.join("dir");
    match std::fs::create_dir(&sub) {
        Ok(()) => crate::set_mode(&sub, 0)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SandboxError::io("create", &sub, e)),
    }
    let nodes = [
        ("reg", SFlag::S_IFREG, true),
        ("fifo", SFlag::S_IFIFO, true),
        ("sock", SFlag::S_IFSOCK, true),
        // Device nodes need CAP_MKNOD; systemd falls back to `sock` without them.
        ("chr", SFlag::S_IFCHR, false),
        ("blk", SFlag::S_IFBLK, false),
    ];
    for (name, kind, required) in nodes {
        let path = dir.join(name);
        match mknod(&path, kind, Mode::empty(), makedev(0, 0)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(_) if !required => {}
            Err(errno) => {
                return Err(SandboxError::io(
                    "create the inaccessible node",
                    &path,
                    std::io::Error::from(errno),
                ));
            }
        }
    }
    Ok(())
}

/// An extra `systemd --user` manager running as root that a test configures itself: its
/// directories live under `<sandbox>/<name>/` (`rt` = `XDG_RUNTIME_DIR`, `home` = `HOME`,
/// `config` = `XDG_CONFIG_HOME`). Write unit files and drop-ins into [`ExtraManager::unit_dir`]
/// before [`crate::Sandbox::start_extra_manager`]: the manager loads them when it starts.
/// Its user bus is socket-activated at `rt/bus` by the `dbus.socket` of package
/// `dbus-user-session` (a drop-in for `dbus.service` may give that bus a configuration of the
/// test's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraManager {
    pub name: String,
    /// `<sandbox>/<name>`: the test may put its own files here too.
    pub dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub home: PathBuf,
    pub config_home: PathBuf,
    /// The manager's stdout and stderr.
    pub log: PathBuf,
}

impl ExtraManager {
    /// Makes the manager's user bus a bus-activation bus like the system bus of a node: its
    /// `dbus.service` runs dbus-daemon with `--systemd-activation` and a configuration whose
    /// service directory is `service_dir` and which includes `policy` after a permissive default
    /// (so root can talk, and the included policy decides about our name). dbus-daemon gets its
    /// socket from the manager's `dbus.socket` (`--address=systemd:`); the `<listen>` element is
    /// there only because dbus-daemon refuses a configuration without one. Call before starting
    /// the manager.
    pub fn configure_activation_bus(&self, service_dir: &Path, policy: &Path) -> Result<()> {
        let conf = self.dir.join("bus.conf");
        let text = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>systemd:</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{service_dir}</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
            service_dir = service_dir.display(),
            policy = policy.display(),
        );
        std::fs::write(&conf, text).map_err(|e| SandboxError::io("write", &conf, e))?;
        let drop_in = format!(
            "[Service]\nExecStart=\nExecStart=/usr/bin/dbus-daemon --config-file={} --nofork \
             --nopidfile --systemd-activation --address=systemd:\n",
            conf.display()
        );
        self.write_drop_in("dbus.service", "override.conf", &drop_in)
            .map(|_| ())
    }

    /// `$XDG_CONFIG_HOME/systemd/user`.
    pub fn unit_dir(&self) -> PathBuf {
        self.config_home.join("systemd/user")
    }

    /// Writes the unit file `name` (e.g. `hello.service`) into [`ExtraManager::unit_dir`].
    pub fn write_unit(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.unit_dir().join(name);
        std::fs::write(&path, text).map_err(|e| SandboxError::io("write the unit", &path, e))?;
        Ok(path)
    }

    /// Writes the drop-in `<unit>.d/<file>` (e.g. `dbus.service`, `override.conf`).
    pub fn write_drop_in(&self, unit: &str, file: &str, text: &str) -> Result<PathBuf> {
        let dir = self.unit_dir().join(format!("{unit}.d"));
        std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io("create", &dir, e))?;
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| SandboxError::io("write the drop-in", &path, e))?;
        Ok(path)
    }

    /// The manager's user bus: `unix:path=<rt>/bus`.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.runtime_dir.join("bus").display())
    }

    /// `systemctl --user ARGS` against this manager (as root, with its `XDG_RUNTIME_DIR`); the
    /// exit status is not checked.
    pub fn systemctl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<std::process::Output> {
        let mut command = cmd::clean("systemctl");
        command
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", &self.config_home)
            .arg("--user")
            .args(args);
        cmd::output_timeout(&mut command, Duration::from_secs(30))
    }

    /// Properties of a unit as `systemctl --user show -p A,B UNIT` prints them.
    pub fn show(
        &self,
        unit: &str,
        properties: &[&str],
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let list = properties.join(",");
        let args = ["show", "-p", list.as_str(), unit];
        let output = self.systemctl(&args)?;
        let mut command = cmd::clean("systemctl");
        command.arg("--user").args(args);
        let output = cmd::check(&command, output)?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// `systemctl --user status --full UNITS` as text, for failure messages (without a journal
    /// it carries the unit's state and its main process's exit code).
    pub fn status_text(&self, units: &[&str]) -> String {
        let mut args = vec!["status", "--no-pager", "--full", "--lines=50"];
        args.extend(units);
        match self.systemctl(&args) {
            Ok(output) => format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) => format!("(systemctl --user status failed: {err})"),
        }
    }
}

impl crate::Sandbox {
    /// The directories of an extra root-run manager `name` (created, not started yet).
    pub fn prepare_extra_manager(&self, name: &str) -> Result<ExtraManager> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(SandboxError::InvalidSpec {
                detail: format!("extra manager name {name:?}: use letters, digits and `-`"),
            });
        }
        let dir = self.root().join(name);
        let manager = ExtraManager {
            name: name.to_owned(),
            runtime_dir: dir.join("rt"),
            home: dir.join("home"),
            config_home: dir.join("config"),
            log: self.log_dir().join(format!("manager-{name}.log")),
            dir,
        };
        for path in [
            &manager.dir,
            &manager.runtime_dir,
            &manager.home,
            &manager.unit_dir(),
        ] {
            std::fs::create_dir_all(path).map_err(|e| SandboxError::io("create", path, e))?;
        }
        crate::set_mode(&manager.runtime_dir, 0o700)?;
        Ok(manager)
    }

    /// Starts the manager prepared by [`crate::Sandbox::prepare_extra_manager`] in a cgroup of
    /// its own, and returns once `org.freedesktop.systemd1` answers on its user bus (which
    /// proves that bus works, with whatever configuration a drop-in gave it). Stopped with
    /// the sandbox, its units and cgroups with it.
    pub fn start_extra_manager(&mut self, manager: &ExtraManager) -> Result<()> {
        let sandbox = self
            .root()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup_name = format!("module-updater-test-{sandbox}-{}", manager.name);
        self.footprint
            .cgroups
            .extend(cgroup::hierarchies()?.iter().map(|h| h.join(&cgroup_name)));
        self.save_footprint()?;
        let spec = ManagerSpec {
            what: format!("root-run systemd --user {:?}", manager.name),
            cgroup_name,
            user: None,
            env: vec![
                ("PATH".into(), cmd::PATH.into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("HOME".into(), manager.home.display().to_string()),
                ("USER".into(), "root".into()),
                ("LOGNAME".into(), "root".into()),
                (
                    "XDG_CONFIG_HOME".into(),
                    manager.config_home.display().to_string(),
                ),
                (
                    "XDG_RUNTIME_DIR".into(),
                    manager.runtime_dir.display().to_string(),
                ),
            ],
            runtime_dir: manager.runtime_dir.clone(),
            log: manager.log.clone(),
            short_of_run_space: false,
        };
        let address = format!("--address={}", manager.bus_address());
        let mut probes = 0u32;
        let started = UserManager::start(spec, || {
            let mut busctl = cmd::clean("busctl");
            busctl.arg(&address).args([
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                "s",
                "org.freedesktop.systemd1",
            ]);
            let output = cmd::output_timeout(&mut busctl, Duration::from_secs(5))?;
            if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "b true"
            {
                return Ok(true);
            }
            // A bus that cannot start (a broken configuration) fails fast, with its status.
            probes += 1;
            if probes.is_multiple_of(20) {
                let state = manager.show("dbus.service", &["ActiveState"])?;
                if state.get("ActiveState").map(String::as_str) == Some("failed") {
                    return Err(SandboxError::Exited {
                        what: format!("dbus.service of the extra manager {:?}", manager.name),
                        status: "failed".into(),
                        log: manager.status_text(&["dbus.socket", "dbus.service"]),
                    });
                }
            }
            Ok(false)
        })?;
        self.footprint.processes.push(started.record.clone());
        self.extra_managers.push(started);
        self.save_footprint()
    }
}
