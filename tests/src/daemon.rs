//! The project's binaries in the sandbox: `module-updaterd` on the private bus with the
//! sandbox's paths, and the `module-updater` client pointed at it.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{self, ProcessRecord};
use crate::{Result, Sandbox, SandboxError, cmd};

/// The daemon's binary name.
pub const DAEMON: &str = "module-updaterd";
/// The client's binary name.
pub const CLIENT: &str = "module-updater";
/// How long the daemon may take to own its name.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds a binary of the workspace: `$<ENV_VAR>` if set, else next to the running executable or
/// one directory up (integration tests run from `target/<profile>/deps`).
pub fn find_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(SandboxError::MissingBinary {
                name: name.to_owned(),
                searched: format!("{} (from {env_var})", path.display()),
                env_var: env_var.to_owned(),
            })
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| SandboxError::io("find", Path::new("/proc/self/exe"), e))?;
    let mut searched = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(current) = dir else { break };
        let candidate = current.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate.display().to_string());
        dir = current.parent();
    }
    Err(SandboxError::MissingBinary {
        name: name.to_owned(),
        searched: searched.join(", "),
        env_var: env_var.to_owned(),
    })
}

/// The daemon binary (`MODULE_UPDATERD_BIN` overrides).
pub fn daemon_binary() -> Result<PathBuf> {
    find_binary(DAEMON, "MODULE_UPDATERD_BIN")
}

/// The client binary (`MODULE_UPDATER_BIN` overrides).
pub fn client_binary() -> Result<PathBuf> {
    find_binary(CLIENT, "MODULE_UPDATER_BIN")
}

/// A running `module-updaterd`. Dropping it kills it (SIGKILL) and reaps it.
pub struct Daemon {
    child: Child,
    record: ProcessRecord,
    log: PathBuf,
    registry: Arc<Mutex<Vec<ProcessRecord>>>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        kill(Pid::from_raw(pid), signal)
            .map_err(|e| SandboxError::io("signal", Path::new(&format!("/proc/{pid}")), e.into()))
    }

    /// SIGTERM, then waits (at most 10 s, then SIGKILL) and returns how it ended.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        let status = self.wait(Duration::from_secs(10))?;
        match status {
            Some(status) => Ok(status),
            None => {
                let log = self.log();
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(SandboxError::Timeout {
                    what: "module-updaterd to exit after SIGTERM".into(),
                    secs: 10.0,
                    detail: format!("it was killed; its log:\n{log}"),
                })
            }
        }
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        cmd::wait_deadline(&mut self.child, timeout).map_err(|source| SandboxError::Spawn {
            command: DAEMON.into(),
            source,
        })
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        process::kill_child(&mut self.child);
        self.forget();
    }

    fn forget(&self) {
        if let Ok(mut daemons) = self.registry.lock() {
            daemons.retain(|r| *r != self.record);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        process::kill_child(&mut self.child);
        self.forget();
    }
}

/// A `NOTIFY_SOCKET` to listen on, as systemd does for `Type=notify` services.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<String>,
}

impl NotifySocket {
    /// Binds a datagram socket at `path`.
    pub fn bind(path: &Path) -> Result<NotifySocket> {
        let socket = UnixDatagram::bind(path).map_err(|e| SandboxError::io("bind", path, e))?;
        Ok(NotifySocket {
            socket,
            path: path.to_path_buf(),
            received: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every `KEY=VALUE` assignment received so far, in order.
    pub fn received(&self) -> &[String] {
        &self.received
    }

    /// Waits until an assignment equal to `line` (e.g. `READY=1`) arrives; returns all received.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        while !self.received.iter().any(|l| l == line) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SandboxError::Timeout {
                    what: format!("{line} on {}", self.path.display()),
                    secs: timeout.as_secs_f64(),
                    detail: format!("received so far: {:?}", self.received),
                });
            }
            self.socket
                .set_read_timeout(Some(left))
                .map_err(|e| SandboxError::io("set a timeout on", &self.path, e))?;
            match self.socket.recv(&mut buffer) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    self.received.extend(text.lines().map(str::to_owned));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(SandboxError::io("receive on", &self.path, e)),
            }
        }
        Ok(self.received.clone())
    }
}

impl Sandbox {
    /// The daemon command with the sandbox's bus and paths (`--address`, `--home-base`,
    /// `--rootful-base`, and `--system-manager-address` once a rootful instance exists), then
    /// `extra_args`; a clean environment. Spawn it with [`Sandbox::start_daemon_with`], or run it.
    pub fn daemon_command(&self, extra_args: &[&str]) -> Result<Command> {
        let mut command = cmd::clean(daemon_binary()?);
        command.arg("--config").arg(self.daemon_config()?);
        // Job records and the job counter stay in the sandbox, never in the machine's state dir.
        command.arg("--state-dir").arg(self.daemon_state_dir());
        command.arg("--address").arg(self.bus_address());
        command.arg("--home-base").arg(self.home_base());
        command.arg("--rootful-base").arg(self.rootful_base());
        if let Some(address) = self.root_manager_address() {
            command.arg("--system-manager-address").arg(address);
        }
        command.args(extra_args);
        command.env("RUST_BACKTRACE", "1");
        Ok(command)
    }

    /// The daemon's state dir (job records) inside the sandbox.
    pub fn daemon_state_dir(&self) -> PathBuf {
        self.root().join("daemon-state")
    }

    /// An empty configuration file of the sandbox's own: a daemon of the sandbox never reads the
    /// machine's `/etc/module-updater/config.toml` (which a packaging test may install).
    pub fn daemon_config(&self) -> Result<PathBuf> {
        let path = self.root().join("daemon-config.toml");
        if !path.exists() {
            std::fs::write(&path, "# module-updater test sandbox: defaults only\n")
                .map_err(|e| SandboxError::io("write", &path, e))?;
        }
        Ok(path)
    }

    /// Starts the daemon (see [`Sandbox::daemon_command`]) and waits until it owns
    /// `org.nethserver.ModuleUpdater` on the private bus.
    pub fn start_daemon(&self, extra_args: &[&str]) -> Result<Daemon> {
        let command = self.daemon_command(extra_args)?;
        self.start_daemon_with(command)
    }

    /// Starts a prepared daemon command (stderr goes to a log file in the sandbox) and waits
    /// until it owns its name; fails with its log if it exits first.
    pub fn start_daemon_with(&self, mut command: Command) -> Result<Daemon> {
        let n = self.daemons.lock().map(|d| d.len()).unwrap_or(0);
        let mut log = self.log_dir().join(format!("daemon-{n}.log"));
        let mut k = n;
        while log.exists() {
            k += 1;
            log = self.log_dir().join(format!("daemon-{k}.log"));
        }
        let file = std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;
        let file_out = file
            .try_clone()
            .map_err(|e| SandboxError::io("dup", &log, e))?;
        command.stdin(Stdio::null()).stdout(file_out).stderr(file);
        let child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let record = ProcessRecord::new(DAEMON, child.id());
        if let Ok(mut daemons) = self.daemons.lock() {
            daemons.push(record.clone());
        }
        let mut daemon = Daemon {
            child,
            record,
            log,
            registry: Arc::clone(&self.daemons),
        };

        let address = format!("--address={}", self.bus_address());
        let mut exited = None;
        let owned = cmd::poll(DAEMON_READY_TIMEOUT, || {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                exited = Some(status);
                return Ok(Some(false));
            }
            let mut busctl = cmd::clean("busctl");
            busctl.arg(&address);
            busctl.args([
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
            ]);
            busctl.args(["NameHasOwner", "s", module_updater_dbus::BUS_NAME]);
            let output = cmd::output_timeout(&mut busctl, Duration::from_secs(5))?;
            let owned = output.status.success()
                && String::from_utf8_lossy(&output.stdout).trim() == "b true";
            Ok(owned.then_some(true))
        })?;
        match (owned, exited) {
            (Some(true), _) => Ok(daemon),
            (_, Some(status)) => Err(SandboxError::Exited {
                what: cmd::describe(&command),
                status: status.to_string(),
                log: daemon.log(),
            }),
            _ => Err(SandboxError::Timeout {
                what: format!(
                    "{DAEMON} to own {} on {}",
                    module_updater_dbus::BUS_NAME,
                    self.bus_address()
                ),
                secs: DAEMON_READY_TIMEOUT.as_secs_f64(),
                detail: format!("its log:\n{}", daemon.log()),
            }),
        }
    }

    /// The `module-updater` client with `--address` of the private bus; add the subcommand.
    pub fn client(&self) -> Result<Command> {
        let mut command = cmd::clean(client_binary()?);
        command.arg("--address").arg(self.bus_address());
        Ok(command)
    }

    /// A copy of a binary that instance users can execute, for running it as them: the build
    /// directory may sit below a directory they cannot traverse (e.g. /root).
    pub fn user_executable(&self, binary: &Path) -> Result<PathBuf> {
        if traversable_by_others(binary) {
            return Ok(binary.to_path_buf());
        }
        let dir = self.root().join("bin");
        std::fs::create_dir_all(&dir).map_err(|e| SandboxError::io("create", &dir, e))?;
        let name = binary.file_name().unwrap_or(binary.as_os_str());
        let copy = dir.join(name);
        std::fs::copy(binary, &copy)
            .map_err(|e| SandboxError::io("copy into the sandbox", binary, e))?;
        crate::set_mode(&copy, 0o755)?;
        Ok(copy)
    }
}

/// Whether every ancestor of `path` is searchable and the file executable by others.
fn traversable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(path) & 0o001 != 0 && path.ancestors().skip(1).all(|dir| mode(dir) & 0o001 != 0)
}
