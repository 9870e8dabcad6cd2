//! A real `polkitd` on the sandbox's private bus, with the project's polkit actions installed and
//! rules of the test's own.
//!
//! polkit reads its actions and rules from machine-wide directories (`/usr/share/polkit-1/actions`,
//! `/etc/polkit-1/rules.d`), so a [`Polkit`] holds a machine-wide lock for its whole life (tests
//! that use polkit run one at a time, also across processes), records every file and group it
//! creates in `STATE_DIR/polkit.json` *before* creating it, and undoes all of it when dropped
//! (also on a panic): files it replaced get their old content back. A record left by a test
//! process that died without unwinding is undone by the next [`Sandbox::start_polkitd`] (or by
//! [`reap_stale_polkit`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::fcntl::Flock;
use nix::unistd::Group;
use serde::{Deserialize, Serialize};

use crate::footprint::{self, STATE_DIR};
use crate::process::{self, ProcessRecord};
use crate::{Instance, Result, Sandbox, SandboxError, cmd};

/// The polkit daemon (package `polkitd`).
pub const POLKITD: &str = "/usr/lib/polkit-1/polkitd";
/// Where polkitd reads action files.
pub const ACTIONS_DIR: &str = "/usr/share/polkit-1/actions";
/// Where polkitd reads administrator rules.
pub const RULES_DIR: &str = "/etc/polkit-1/rules.d";
/// polkit's text authentication agent (package `polkitd`).
pub const PKTTYAGENT: &str = "pkttyagent";
/// The setuid helper an agent runs to check a password with PAM (package `polkitd`).
pub const AGENT_HELPER: &str = "/usr/lib/polkit-1/polkit-agent-helper-1";
/// Where setuid programs built on GLib find the system bus, whatever the environment says.
const SYSTEM_BUS_DIR: &str = "/run/dbus";
/// How long polkitd may take to own its name and know our actions.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Name of the record of what is installed, in [`STATE_DIR`].
const RECORD: &str = "polkit.json";

/// A file polkit reads that the sandbox wrote: removed afterwards, or given back `previous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InstalledFile {
    path: PathBuf,
    previous: Option<Vec<u8>>,
}

/// Everything a [`Polkit`] changed on the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Installed {
    files: Vec<InstalledFile>,
    groups: Vec<String>,
    polkitd: Option<ProcessRecord>,
    /// Directories that did not exist (the mount point of [`Polkit::on_system_bus`]).
    #[serde(default)]
    dirs: Vec<PathBuf>,
}

impl Installed {
    fn path() -> PathBuf {
        Path::new(STATE_DIR).join(RECORD)
    }

    fn save(&self) -> Result<()> {
        let path = Installed::path();
        let text = serde_json::to_vec_pretty(self).map_err(|e| SandboxError::Parse {
            command: "serialise the polkit record".into(),
            detail: e.to_string(),
        })?;
        let temporary = path.with_extension("json.tmp");
        std::fs::write(&temporary, text).map_err(|e| SandboxError::io("write", &temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| SandboxError::io("rename into", &path, e))
    }

    /// Undoes everything recorded, newest first; returns what could not be undone.
    fn undo(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(record) = self.polkitd.take() {
            process::terminate_foreign(&record, Duration::from_secs(2));
            if record.alive() {
                problems.push(format!("polkitd (pid {}) survives SIGKILL", record.pid));
            }
        }
        for file in self.files.drain(..).rev() {
            let result = match &file.previous {
                Some(bytes) => std::fs::write(&file.path, bytes),
                None => match std::fs::remove_file(&file.path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            };
            if let Err(err) = result {
                problems.push(format!("{}: {err}", file.path.display()));
            }
        }
        for group in self.groups.drain(..).rev() {
            if let Err(err) = groupdel(&group) {
                problems.push(err.to_string());
            }
        }
        for dir in self.dirs.drain(..).rev() {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    problems.push(format!("{}: {e}", dir.display()));
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            let _ = std::fs::remove_file(Installed::path());
        }
        problems
    }
}

/// Undoes what a polkit test process that died without unwinding left on the machine: its
/// polkitd, rules, actions file and groups. Waits for a running polkit test to end first.
/// Failures are reported on stderr only.
pub fn reap_stale_polkit() {
    match footprint::lock("polkit.lock") {
        Ok(_lock) => undo_stale(),
        Err(err) => eprintln!("module-updater-tests: cannot check for a stale polkit setup: {err}"),
    }
}

/// With the polkit lock held, any record is stale: its owner released the lock by dying.
fn undo_stale() {
    let Ok(bytes) = std::fs::read(Installed::path()) else {
        return;
    };
    let Ok(mut stale) = serde_json::from_slice::<Installed>(&bytes) else {
        let _ = std::fs::remove_file(Installed::path());
        return;
    };
    eprintln!("module-updater-tests: undoing the polkit setup of a test process that died");
    let problems = stale.undo();
    if !problems.is_empty() {
        eprintln!(
            "module-updater-tests: could not undo: {}",
            problems.join("; ")
        );
    }
}

/// polkit's answer for a process, as `pkcheck` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Exit code 0.
    Authorized,
    /// Exit code 1.
    NotAuthorized,
    /// Exit code 2: an administrator's authentication would be needed and no agent gave it.
    ChallengeRequired,
}

/// A running `polkitd` on the sandbox bus, and what was installed for it. Dropping it stops the
/// daemon and undoes every change (see the module documentation).
pub struct Polkit {
    child: Option<Child>,
    bus_address: String,
    log: PathBuf,
    installed: Installed,
    _lock: Flock<File>,
}

impl Sandbox {
    /// Installs the project's polkit actions
    /// (`dbus/data/org.nethserver.moduleupdater.policy`) and starts `polkitd` on the sandbox bus
    /// (it drops to the `polkitd` user itself); returns once polkitd owns
    /// `org.freedesktop.PolicyKit1` and knows the actions. Waits while another test uses polkit.
    pub fn start_polkitd(&mut self) -> Result<Polkit> {
        for (tool, package) in [
            (POLKITD, "polkitd"),
            ("pkcheck", "polkitd"),
            ("pkaction", "polkitd"),
        ] {
            if cmd::find_tool(tool).is_none() {
                return Err(SandboxError::MissingTools {
                    tools: tool.into(),
                    packages: package.into(),
                });
            }
        }
        let lock = footprint::lock("polkit.lock")?;
        undo_stale();
        let mut polkit = Polkit {
            child: None,
            bus_address: self.bus_address(),
            log: self.log_dir().join("polkitd.log"),
            installed: Installed::default(),
            _lock: lock,
        };

        let source = module_updater_dbus::data_dir().join(module_updater_dbus::POLKIT_ACTIONS_FILE);
        let actions = std::fs::read(&source)
            .map_err(|e| SandboxError::io("read the shipped polkit actions", &source, e))?;
        polkit.install(
            &Path::new(ACTIONS_DIR).join(module_updater_dbus::POLKIT_ACTIONS_FILE),
            &actions,
        )?;

        let log =
            File::create(&polkit.log).map_err(|e| SandboxError::io("create", &polkit.log, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| SandboxError::io("dup", &polkit.log, e))?;
        let mut command = cmd::clean(POLKITD);
        command
            .env("DBUS_SYSTEM_BUS_ADDRESS", &polkit.bus_address)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let record = ProcessRecord::new("polkitd", child.id());
        polkit.child = Some(child);
        polkit.installed.polkitd = Some(record.clone());
        polkit.installed.save()?;
        self.footprint.processes.push(record);
        self.save_footprint()?;

        // Ready when polkitd answers about our action over the bus.
        let ready = cmd::poll(READY_TIMEOUT, || {
            if let Some(Ok(Some(status))) = polkit.child.as_mut().map(Child::try_wait) {
                return Err(SandboxError::Exited {
                    what: cmd::describe(&command),
                    status: status.to_string(),
                    log: polkit.log_text(),
                });
            }
            let mut pkaction = polkit.tool("pkaction");
            pkaction.args(["--action-id", module_updater_dbus::ACTION_UPDATE_MODULE]);
            let output = cmd::output_timeout(&mut pkaction, Duration::from_secs(10))?;
            Ok(output.status.success().then_some(()))
        })?;
        if ready.is_none() {
            return Err(SandboxError::Timeout {
                what: format!("polkitd on {} to know our actions", polkit.bus_address),
                secs: READY_TIMEOUT.as_secs_f64(),
                detail: format!("its log:\n{}", polkit.log_text()),
            });
        }
        Ok(polkit)
    }
}

impl Polkit {
    /// What polkitd printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| cmd::tail(&b))
            .unwrap_or_default()
    }

    /// polkitd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A polkit client (`pkcheck`, `pkaction`) pointed at the sandbox bus.
    pub fn tool(&self, name: &str) -> Command {
        let mut command = cmd::clean(name);
        command.env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address);
        command
    }

    /// Writes `contents` to `path` (a file polkitd reads), recording first how to undo it.
    fn install(&mut self, path: &Path, contents: &[u8]) -> Result<()> {
        let previous = match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(SandboxError::io("read", path, e)),
        };
        if !self.installed.files.iter().any(|f| f.path == path) {
            self.installed.files.push(InstalledFile {
                path: path.to_path_buf(),
                previous,
            });
            self.installed.save()?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SandboxError::io("create", dir, e))?;
        }
        std::fs::write(path, contents).map_err(|e| SandboxError::io("write", path, e))?;
        crate::set_mode(path, 0o644)
    }

    /// Installs a JavaScript rule as `/etc/polkit-1/rules.d/10-module-updater-test-NAME.rules`.
    /// polkitd notices it within a few seconds: wait for its effect with [`Polkit::wait_for`].
    pub fn add_rule(&mut self, name: &str, javascript: &str) -> Result<PathBuf> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(SandboxError::InvalidSpec {
                detail: format!("rule name {name:?} must be letters, digits and '-'"),
            });
        }
        let path = Path::new(RULES_DIR).join(format!("10-module-updater-test-{name}.rules"));
        let text = format!(
            "// Installed by a module-updater test; removed when the test ends.\n{javascript}\n"
        );
        self.install(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Creates a new Unix group named `PREFIX` + four random letters and returns its name; it is
    /// deleted when the polkit setup is dropped.
    pub fn add_group(&mut self, prefix: &str) -> Result<String> {
        let mut attempt = 0u32;
        loop {
            let name = format!("{prefix}{}", random_letters(4));
            if Group::from_name(&name).ok().flatten().is_some() {
                continue;
            }
            self.installed.groups.push(name.clone());
            self.installed.save()?;
            let mut command = cmd::clean("groupadd");
            command.arg(&name);
            let output = {
                let _lock = footprint::lock("passwd.lock")?;
                cmd::output(&mut command)?
            };
            if output.status.success() {
                return Ok(name);
            }
            self.installed.groups.retain(|g| g != &name);
            self.installed.save()?;
            attempt += 1;
            if !footprint::lock_contention(&output.stderr) || attempt >= 20 {
                return cmd::check(&command, output).map(|_| name);
            }
            std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
        }
    }

    /// `argv` (run as root; drop privileges inside it) where setuid programs find the sandbox
    /// bus as the system bus.
    ///
    /// An authentication agent checks a password by running `polkit-agent-helper-1`, which is
    /// setuid root and reports the outcome to polkitd over the system bus; GLib ignores
    /// `DBUS_SYSTEM_BUS_ADDRESS` in setuid programs and always connects to
    /// `/run/dbus/system_bus_socket` (outside this, the helper fails with "Error getting
    /// authority: ... Could not connect: No such file or directory" and every password is
    /// refused). So `argv` runs in a mount namespace of its own (`unshare --mount`) where a
    /// tmpfs over `/run/dbus` holds a `system_bus_socket` link to the sandbox bus; the
    /// machine's `/run/dbus` is untouched (created empty, and removed afterwards, only if it did
    /// not exist).
    pub fn on_system_bus<S: AsRef<std::ffi::OsStr>>(&mut self, argv: &[S]) -> Result<Command> {
        for (tool, package) in [
            (PKTTYAGENT, "polkitd"),
            (AGENT_HELPER, "polkitd"),
            ("unshare", "util-linux"),
            ("mount", "mount"),
        ] {
            if cmd::find_tool(tool).is_none() {
                return Err(SandboxError::MissingTools {
                    tools: tool.into(),
                    packages: package.into(),
                });
            }
        }
        let socket = self
            .bus_address
            .strip_prefix("unix:path=")
            .map(|rest| rest.split(',').next().unwrap_or(rest).to_owned())
            .ok_or_else(|| SandboxError::InvalidSpec {
                detail: format!("{} is not a unix:path= address", self.bus_address),
            })?;
        let mount_point = PathBuf::from(SYSTEM_BUS_DIR);
        if !mount_point.exists() {
            self.installed.dirs.push(mount_point.clone());
            self.installed.save()?;
            std::fs::create_dir_all(&mount_point)
                .map_err(|e| SandboxError::io("create", &mount_point, e))?;
        }
        let mut command = cmd::clean("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o mode=0755 module-updater-test {SYSTEM_BUS_DIR} && \
                 ln -s \"$1\" {SYSTEM_BUS_DIR}/system_bus_socket && shift && exec \"$@\""
            ))
            .arg("sh")
            .arg(socket)
            .args(argv);
        Ok(command)
    }

    /// Adds an instance's user to a group (`gpasswd -a`).
    pub fn add_member(&self, group: &str, instance: &Instance) -> Result<()> {
        let mut command = cmd::clean("gpasswd");
        command.args(["-a", &instance.id, group]);
        let _lock = footprint::lock("passwd.lock")?;
        cmd::run(&mut command).map(drop)
    }

    /// polkit's answer for the process `pid` (owned by `uid`) and `action` with `details`
    /// (`pkcheck` without user interaction).
    pub fn check(
        &self,
        action: &str,
        pid: u32,
        uid: u32,
        details: &[(&str, &str)],
    ) -> Result<Decision> {
        let start =
            process::start_time(i32::try_from(pid).unwrap_or(i32::MAX)).ok_or_else(|| {
                SandboxError::InvalidSpec {
                    detail: format!("process {pid} does not exist"),
                }
            })?;
        let mut pkcheck = self.tool("pkcheck");
        pkcheck
            .args(["--action-id", action, "--process"])
            .arg(format!("{pid},{start},{uid}"));
        for (key, value) in details {
            pkcheck.args(["--detail", key, value]);
        }
        let output = cmd::output_timeout(&mut pkcheck, Duration::from_secs(10))?;
        match output.status.code() {
            Some(0) => Ok(Decision::Authorized),
            Some(1) => Ok(Decision::NotAuthorized),
            Some(2) => Ok(Decision::ChallengeRequired),
            _ => Err(pkcheck_failed(&pkcheck, output)),
        }
    }

    /// Polls [`Polkit::check`] until polkit's answer is (`authorized`) or not; rule changes take
    /// polkitd a few seconds to notice.
    pub fn wait_for(
        &self,
        action: &str,
        subject: &SubjectProcess,
        details: &[(&str, &str)],
        authorized: bool,
    ) -> Result<()> {
        let mut last = None;
        let done = cmd::poll(Duration::from_secs(30), || {
            let decision = self.check(action, subject.pid(), subject.uid, details)?;
            last = Some(decision);
            Ok(((decision == Decision::Authorized) == authorized).then_some(()))
        })?;
        match done {
            Some(()) => Ok(()),
            None => Err(SandboxError::Timeout {
                what: format!(
                    "polkit to {} {action} for uid {}",
                    if authorized { "grant" } else { "refuse" },
                    subject.uid
                ),
                secs: 30.0,
                detail: format!("last answer {last:?}; polkitd log:\n{}", self.log_text()),
            }),
        }
    }

    /// A long-lived process running as the instance's user (uid, gid and groups), to ask polkit
    /// about with [`Polkit::check`]. Killed when dropped.
    pub fn subject_process(&self, instance: &Instance) -> Result<SubjectProcess> {
        // setpriv execs the command itself, so the child's pid is the user's process.
        let mut command = cmd::clean("setpriv");
        command
            .arg(format!("--reuid={}", instance.uid))
            .arg(format!("--regid={}", instance.gid))
            .arg("--init-groups")
            .args(["sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let subject = SubjectProcess {
            child,
            uid: instance.uid,
        };
        // Until exec, the process is still root's setpriv.
        let pid = i32::try_from(subject.pid()).unwrap_or(i32::MAX);
        let became = cmd::poll(Duration::from_secs(10), || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            Ok(
                (comm.trim() == "sleep" && process::real_uid(pid) == Some(instance.uid))
                    .then_some(()),
            )
        })?;
        match became {
            Some(()) => Ok(subject),
            None => Err(SandboxError::Timeout {
                what: format!("`{}` to run", cmd::describe(&command)),
                secs: 10.0,
                detail: String::new(),
            }),
        }
    }
}

impl Polkit {
    /// Stops polkitd and undoes every change, then checks, still holding the machine-wide polkit
    /// lock (so no other test interferes), that the machine is as it was found: polkitd gone,
    /// every file polkit reads back to its old content (or absent), every group gone. Returns
    /// what is not; empty when all is well.
    pub fn stop(mut self) -> Vec<String> {
        if let Some(child) = self.child.as_mut() {
            process::terminate(child, Duration::from_secs(2));
        }
        let recorded = self.installed.clone();
        let mut problems = self.installed.undo();
        if let Some(record) = &recorded.polkitd
            && record.alive()
        {
            problems.push(format!("polkitd (pid {}) is still running", record.pid));
        }
        for file in &recorded.files {
            let now = std::fs::read(&file.path).ok();
            if now != file.previous {
                problems.push(match &file.previous {
                    None => format!("{} is left", file.path.display()),
                    Some(_) => format!("{} was not restored", file.path.display()),
                });
            }
        }
        for group in &recorded.groups {
            if Group::from_name(group).ok().flatten().is_some() {
                problems.push(format!("group {group} is left"));
            }
        }
        for dir in &recorded.dirs {
            if dir.exists() {
                problems.push(format!("{} is left", dir.display()));
            }
        }
        if Installed::path().exists() {
            problems.push(format!("{} is left", Installed::path().display()));
        }
        problems
    }
}

impl Drop for Polkit {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            process::terminate(child, Duration::from_secs(2));
        }
        let problems = self.installed.undo();
        if !problems.is_empty() {
            eprintln!(
                "module-updater-tests: the polkit setup left behind: {}",
                problems.join("; ")
            );
        }
    }
}

/// A process of an instance user, as a polkit subject.
pub struct SubjectProcess {
    child: Child,
    pub uid: u32,
}

impl SubjectProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SubjectProcess {
    fn drop(&mut self) {
        process::kill_child(&mut self.child);
    }
}

fn pkcheck_failed(command: &Command, output: Output) -> SandboxError {
    SandboxError::CommandFailed {
        command: cmd::describe(command),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

/// `groupdel NAME`, serialised with the other sandboxes; a group that is already gone is fine.
fn groupdel(name: &str) -> Result<()> {
    if Group::from_name(name).ok().flatten().is_none() {
        return Ok(());
    }
    let mut command = cmd::clean("groupdel");
    command.arg(name);
    let output = {
        let _lock = footprint::lock("passwd.lock")?;
        cmd::output(&mut command)?
    };
    if Group::from_name(name).ok().flatten().is_none() {
        return Ok(());
    }
    cmd::check(&command, output).map(drop)
}

/// Lowercase letters from the kernel's random source.
fn random_letters(n: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    bytes.iter().map(|b| char::from(b'a' + b % 26)).collect()
}
