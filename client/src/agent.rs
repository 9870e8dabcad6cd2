//! A text authentication agent for this process while a call that polkit gates is pending, as
//! systemctl runs one: `pkttyagent --notify-fd N [--fallback] --process PID,START`. polkit asks
//! it (on this terminal) for an administrator's password when a rule wants one.
//!
//! In a login session, the agent is registered with `--fallback`: an agent of the session (a
//! desktop's) is preferred. Outside any session (a service, a container, `setpriv`), polkit
//! never uses a fallback agent (it looks for the session's agent first and, finding no session,
//! gives up, `get_authentication_agent_for_subject` in polkitd), so there the agent registers
//! plainly for this process.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The agent program (package `polkitd` on Debian, `polkit` elsewhere).
pub const PKTTYAGENT: &str = "pkttyagent";

/// How long pkttyagent may take to register with polkit.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped agent may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no agent runs; the call goes ahead without one (polkit then says that nobody could ask).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create a pipe for {PKTTYAGENT}: {0}")]
    Pipe(nix::Error),
    #[error(
        "cannot start {PKTTYAGENT}: {0}; install it (Debian: package polkitd) or pass --no-ask-password"
    )]
    Spawn(std::io::Error),
    #[error("{PKTTYAGENT} did not register with polkit within {} s", REGISTER_TIMEOUT.as_secs())]
    Timeout,
    #[error("{PKTTYAGENT} exited ({0}) instead of registering with polkit")]
    Exited(std::process::ExitStatus),
}

/// A running pkttyagent, stopped by [`Agent::stop`] (or when dropped, e.g. when a second Ctrl-C
/// abandons the call).
pub struct Agent {
    child: Child,
}

/// `PID,START` of this process, as `--process` wants it (the start time guards against a
/// recycled pid); only the pid if `/proc` cannot tell.
fn own_process() -> String {
    let pid = std::process::id();
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| start_time(&stat));
    match start {
        Some(start) => format!("{pid},{start}"),
        None => pid.to_string(),
    }
}

/// Field 22 of a `/proc/PID/stat` line; the command name before it may hold spaces and `)`.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a `/proc/PID/cgroup` text puts the process in a systemd-logind session (below a
/// `session-ID.scope`), which is how polkit finds the session of a process.
fn in_session(cgroup: &str) -> bool {
    cgroup.lines().any(|line| {
        line.split('/')
            .any(|part| part.starts_with("session-") && part.ends_with(".scope"))
    })
}

impl Agent {
    /// Starts pkttyagent for this process and returns once it is registered with polkit.
    /// `system_bus` is the address of the bus polkit is on, when it is not the system bus.
    pub async fn start(system_bus: Option<&str>) -> Result<Agent, AgentError> {
        // pkttyagent closes its end of the pipe once registered (or exits): the read end then
        // sees end-of-file. Only the write end may pass to the child.
        let (notify_read, notify_write) = nix::unistd::pipe().map_err(AgentError::Pipe)?;
        fcntl(&notify_read, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(AgentError::Pipe)?;
        let mut command = Command::new(PKTTYAGENT);
        command
            .arg("--notify-fd")
            .arg(notify_write.as_raw_fd().to_string());
        if std::fs::read_to_string("/proc/self/cgroup").is_ok_and(|text| in_session(&text)) {
            command.arg("--fallback");
        }
        command.arg("--process").arg(own_process());
        if let Some(address) = system_bus {
            command.env("DBUS_SYSTEM_BUS_ADDRESS", address);
        }
        // SAFETY: the closure only makes the prctl system call, which is async-signal-safe.
        // It ends the agent if this process dies without stopping it (killed, or crashed), so
        // that no orphan agent is left prompting on the terminal.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let spawned = command.spawn();
        // Our copy of the write end must go, or the read end never sees end-of-file.
        drop(notify_write);
        let mut agent = Agent {
            child: spawned.map_err(AgentError::Spawn)?,
        };
        let registered = tokio::time::timeout(
            REGISTER_TIMEOUT,
            tokio::task::spawn_blocking(move || wait_for_eof(notify_read)),
        )
        .await;
        if registered.is_err() {
            agent.stop().await;
            return Err(AgentError::Timeout);
        }
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Err(AgentError::Exited(status));
        }
        Ok(agent)
    }

    /// Asks the agent to exit (SIGTERM, as systemctl does: it then puts the terminal back as it
    /// was, should it be prompting), then waits for it; SIGKILL if it lingers.
    pub async fn stop(mut self) {
        self.terminate();
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while self.running() {
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn terminate(&mut self) {
        if self.running()
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        self.terminate();
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while self.running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// Reads until end-of-file (pkttyagent closed the descriptor, or exited).
fn wait_for_eof(fd: OwnedFd) {
    let mut file = std::fs::File::from(fd);
    let mut buffer = [0u8; 64];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_login_session_is_read_from_the_cgroup() {
        assert!(in_session(
            "0::/user.slice/user-1000.slice/session-4.scope\n"
        ));
        assert!(in_session(
            "12:pids:/user.slice/user-0.slice/session-c2.scope\n0::/user.slice/user-0.slice/session-c2.scope\n"
        ));
        assert!(!in_session(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n"
        ));
        assert!(!in_session("0::/\n"));
        assert!(!in_session(""));
    }

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat =
            "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987_654));
        assert_eq!(start_time("garbage"), None);
        let own = own_process();
        assert!(
            own.starts_with(&format!("{},", std::process::id())),
            "{own}"
        );
    }
}
