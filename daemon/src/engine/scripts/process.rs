//! One script's process: started in its own process group with NS8's file descriptors, its
//! output read as log lines, its timeout and cancel, and every process of its group reaped.

use super::super::events::priority;
use module_updater_dbus::types::{ScriptOutcome, ScriptStatus};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::comfd::read_commands;
use super::lines::LineReader;
use super::{AGENT_COMFD, DEFAULT_PRIORITY, Limits, ScriptError, ScriptOutput, ScriptRun};

/// How the main loop of [`run_with`] ended.
pub(super) enum Ending {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
}

pub(super) async fn run_with(
    script: &ScriptRun<'_>,
    cancel: &watch::Receiver<bool>,
    on_output: &mut (dyn FnMut(ScriptOutput) + Send),
    limits: Limits,
) -> Result<ScriptOutcome, ScriptError> {
    let started = Instant::now();
    let name = script
        .path
        .file_name()
        .unwrap_or(script.path.as_os_str())
        .to_string_lossy()
        .into_owned();
    let outcome = |status, exit_code| ScriptOutcome {
        name: name.clone(),
        status,
        exit_code,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if *cancel.borrow() {
        return Ok(outcome(ScriptStatus::Cancelled, None));
    }

    let path = script.path.to_path_buf();
    let pipe_error = |source| ScriptError::Pipe {
        path: path.clone(),
        source,
    };
    // Both ends CLOEXEC: the child gets the write end only through the dup2 onto fd 3 below, and no
    // other process we spawn meanwhile inherits either end.
    let (comfd_read, comfd_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| pipe_error(e.into()))?;
    let comfd_read =
        tokio::net::unix::pipe::Receiver::from_owned_fd(comfd_read).map_err(pipe_error)?;

    let spawn_error = |source| ScriptError::Spawn {
        path: path.clone(),
        source,
    };
    let exec = Exec::new(script).map_err(spawn_error)?;
    let mut command = Command::new(script.path);
    // `Exec` is what the child really executes; the same settings here keep `command` truthful.
    command
        .env_clear()
        .envs(script.env)
        .env("AGENT_COMFD", AGENT_COMFD.to_string())
        .current_dir(script.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // If this future is dropped mid-run, do not leave the script running unobserved
        // (the `GroupGuard` below kills the rest of its group).
        .kill_on_drop(true);
    let comfd_raw = comfd_write.as_raw_fd();
    let strays = inherited_fds();
    // SAFETY: `child_setup` runs in the forked child and only makes the calls listed there;
    // `comfd_raw` stays open in the parent until `spawn` returned (`comfd_write` is dropped after
    // it), so it is valid in the child.
    unsafe {
        command.pre_exec(move || child_setup(comfd_raw, &strays, &exec));
    }
    let spawned = spawn_retrying(&mut command).await;
    // Our copy of the write end must go, or fd 3 never reaches EOF.
    drop(comfd_write);
    drop(command);
    let mut child = spawned.map_err(spawn_error)?;
    let wait_error = |source| ScriptError::Wait {
        path: path.clone(),
        source,
    };
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| wait_error(io::Error::other("the started process has no pid")))?;
    let mut group = GroupGuard {
        pgid: Pid::from_raw(pid),
        leader_reaped: false,
    };

    let mut tasks = Tasks(Vec::new());
    let (tx, mut rx) = mpsc::channel::<ScriptOutput>(64);
    if let Some(stdout) = child.stdout.take() {
        tasks
            .0
            .push(tokio::spawn(read_output(stdout, "stdout", tx.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        tasks
            .0
            .push(tokio::spawn(read_output(stderr, "stderr", tx.clone())));
    }
    tasks.0.push(tokio::spawn(read_commands(comfd_read, tx)));
    if let Some(mut stdin) = child.stdin.take() {
        let data = script.stdin.to_vec();
        let shown = path.clone();
        // Without the channel sender: a script that never reads stdin must not keep `rx` open.
        tasks.0.push(tokio::spawn(async move {
            // A script that does not read its stdin closes the pipe: EPIPE is normal then.
            if let Err(e) = stdin.write_all(&data).await
                && e.kind() != io::ErrorKind::BrokenPipe
            {
                log::debug!("cannot write the stdin of {}: {e}", shown.display());
            }
        }));
    }

    let mut cancelled = cancel.clone();
    let cancelled = async move {
        let sender_gone = cancelled.wait_for(|cancel| *cancel).await.is_err();
        if sender_gone {
            // Nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(cancelled);
    let deadline = tokio::time::sleep(script.timeout);
    tokio::pin!(deadline);
    let mut open = true;
    let ending = loop {
        tokio::select! {
            status = child.wait() => break Ending::Exited(status.map_err(wait_error)?),
            () = &mut deadline => break Ending::TimedOut,
            () = &mut cancelled => break Ending::Cancelled,
            output = rx.recv(), if open => match output {
                Some(output) => on_output(output),
                None => open = false,
            },
        }
    };

    let (status, exit_code) = match ending {
        Ending::Exited(status) => {
            group.leader_reaped = true;
            match status.code() {
                Some(0) => (ScriptStatus::Ok, Some(0)),
                Some(code) => (ScriptStatus::Failed, Some(code)),
                // Killed by a signal: NS8 reports ProcessState.ExitCode() = -1.
                None => (ScriptStatus::Failed, Some(-1)),
            }
        }
        Ending::TimedOut => {
            group.signal(Signal::SIGKILL);
            reap(&mut child, &mut group, &mut rx, &mut open, on_output)
                .await
                .map_err(wait_error)?;
            (ScriptStatus::Timeout, None)
        }
        Ending::Cancelled => {
            group.signal(Signal::SIGTERM);
            let gone = wait_group_gone(
                &mut child,
                &mut group,
                limits.cancel_grace,
                &mut rx,
                &mut open,
                on_output,
            )
            .await
            .map_err(wait_error)?;
            if !gone {
                group.signal(Signal::SIGKILL);
                reap(&mut child, &mut group, &mut rx, &mut open, on_output)
                    .await
                    .map_err(wait_error)?;
            }
            (ScriptStatus::Cancelled, None)
        }
    };

    if open {
        let drained = tokio::time::timeout(limits.output_grace, async {
            while let Some(output) = rx.recv().await {
                on_output(output);
            }
        })
        .await
        .is_ok();
        if !drained {
            on_output(ScriptOutput::Line {
                priority: priority::WARNING,
                text: format!(
                    "{name} exited but a background process it started keeps its stdout, stderr or AGENT_COMFD open; not waiting for it (redirect the output of background processes)"
                ),
            });
        }
    }
    drop(tasks);
    Ok(outcome(status, exit_code))
}

/// Spawns, retrying briefly on ETXTBSY: a script this process has just written (extraction) can
/// still be open for writing in a child forked by another thread before its exec closed it.
pub(super) async fn spawn_retrying(command: &mut Command) -> io::Result<Child> {
    let mut delay = Duration::from_millis(10);
    for _ in 0..5 {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    command.spawn()
}

/// What the child executes, prepared in the parent so the child only has to call `execve`.
///
/// std's `Command` ends with glibc's `execvp`, which runs a file the kernel refuses (ENOEXEC: no
/// `#!`, a binary for another machine) through `/bin/sh` instead of failing. NS8's agent skips
/// such a step, so we exec ourselves and let `spawn` report the error.
pub(super) struct Exec {
    program: CString,
    argv: [CString; 1],
    envp: Vec<CString>,
}

impl Exec {
    fn new(script: &ScriptRun<'_>) -> io::Result<Exec> {
        // The child has already changed into `cwd` when it execs: a relative path must not move.
        let program = if script.path.is_absolute() {
            script.path.to_path_buf()
        } else {
            std::env::current_dir()?.join(script.path)
        };
        let c_string = |bytes: Vec<u8>| {
            CString::new(bytes).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in the path or the environment",
                )
            })
        };
        let program = c_string(program.into_os_string().into_vec())?;
        let argv = [c_string(script.path.as_os_str().as_bytes().to_vec())?];
        let mut envp = Vec::with_capacity(script.env.len() + 1);
        for (key, value) in script.env {
            if key != "AGENT_COMFD" {
                envp.push(c_string(format!("{key}={value}").into_bytes())?);
            }
        }
        envp.push(c_string(format!("AGENT_COMFD={AGENT_COMFD}").into_bytes())?);
        Ok(Exec {
            program,
            argv,
            envp,
        })
    }
}

/// In the forked child: the command channel onto fd 3 without CLOEXEC, no other inherited
/// descriptor, then exec. Returns only on failure, which `spawn` then reports.
///
/// Only dup2, fcntl, close and execve, which are async-signal-safe; nix's `execve` builds its
/// pointer arrays on the heap, which glibc keeps usable in a fork child (its malloc resets its
/// locks in the child of `fork`).
pub(super) fn child_setup(comfd: RawFd, strays: &[RawFd], exec: &Exec) -> io::Result<()> {
    // SAFETY (both blocks): `comfd` is open in the child (inherited from the parent, where it is open
    // during the fork); fd 3 is then owned by nobody in this process image.
    if comfd == AGENT_COMFD {
        // dup2 onto itself would keep CLOEXEC.
        fcntl(
            unsafe { BorrowedFd::borrow_raw(comfd) },
            FcntlArg::F_SETFD(FdFlag::empty()),
        )?;
    } else {
        let fd3: OwnedFd =
            unsafe { nix::unistd::dup2_raw(BorrowedFd::borrow_raw(comfd), AGENT_COMFD) }?;
        // Keep it open for the script.
        let _ = fd3.into_raw_fd();
    }
    for &fd in strays {
        if fd != AGENT_COMFD {
            // Failure (already closed) is fine: the point is that it is not open.
            let _ = nix::unistd::close(fd);
        }
    }
    let Err(errno) = nix::unistd::execve(&exec.program, &exec.argv, &exec.envp);
    Err(errno.into())
}

/// Descriptors above stderr that this process holds without CLOEXEC, i.e. inherited from whoever
/// started it (ours are all CLOEXEC): they would leak into the script, so the child closes them.
pub(super) fn inherited_fds() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        log::debug!("cannot read /proc/self/fd: scripts may inherit stray descriptors");
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| fd > 2)
        .filter(|&fd| {
            // SAFETY: only a flag query; an fd closed meanwhile gives EBADF and is left out.
            let flags = fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, FcntlArg::F_GETFD);
            matches!(flags, Ok(flags) if !FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC))
        })
        .collect()
}

/// The script's process group, killed with SIGKILL if [`run`] is dropped before the end.
pub(super) struct GroupGuard {
    pgid: Pid,
    /// Once the leader is reaped its pid (= the pgid) may be reused when the group is empty, so a
    /// late kill could hit a stranger.
    leader_reaped: bool,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        if let Err(e) = killpg(self.pgid, signal)
            && e != Errno::ESRCH
        {
            log::warn!("cannot send {signal} to process group {}: {e}", self.pgid);
        }
    }

    /// No process of the group is left (zombies count as present until reaped).
    fn is_empty(&self) -> bool {
        killpg(self.pgid, None) == Err(Errno::ESRCH)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if !self.leader_reaped {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// The reader and writer tasks of one script, stopped when [`run`] ends or is dropped.
pub(super) struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Waits for the leader to exit, passing output on (a script may print while it dies, and must
/// not block on a full pipe).
pub(super) async fn reap(
    child: &mut Child,
    group: &mut GroupGuard,
    rx: &mut mpsc::Receiver<ScriptOutput>,
    open: &mut bool,
    on_output: &mut (dyn FnMut(ScriptOutput) + Send),
) -> io::Result<()> {
    if group.leader_reaped {
        return Ok(());
    }
    loop {
        tokio::select! {
            status = child.wait() => {
                status?;
                group.leader_reaped = true;
                return Ok(());
            }
            output = rx.recv(), if *open => match output {
                Some(output) => on_output(output),
                None => *open = false,
            },
        }
    }
}

/// Waits up to `limit` for every process of the group to be gone, reaping the leader and passing
/// output on. `true` when the group is empty.
pub(super) async fn wait_group_gone(
    child: &mut Child,
    group: &mut GroupGuard,
    limit: Duration,
    rx: &mut mpsc::Receiver<ScriptOutput>,
    open: &mut bool,
    on_output: &mut (dyn FnMut(ScriptOutput) + Send),
) -> io::Result<bool> {
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            status = child.wait(), if !group.leader_reaped => {
                status?;
                group.leader_reaped = true;
            }
            _ = tick.tick() => {
                if group.leader_reaped && group.is_empty() {
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
            output = rx.recv(), if *open => match output {
                Some(output) => on_output(output),
                None => *open = false,
            },
        }
    }
}

/// Splits a systemd-style `<N>` priority prefix (N = 0–7) off a line.
pub(super) fn split_priority(line: &[u8]) -> (u8, &[u8]) {
    match line {
        [b'<', digit @ b'0'..=b'7', b'>', rest @ ..] => (digit - b'0', rest),
        _ => (DEFAULT_PRIORITY, line),
    }
}

/// Passes stdout or stderr on as lines.
pub(super) async fn read_output<R: AsyncRead + Unpin>(
    pipe: R,
    stream: &'static str,
    tx: mpsc::Sender<ScriptOutput>,
) {
    let mut lines = LineReader::new(pipe);
    let mut continuation = false;
    // The pieces of a split line keep the priority of its first piece.
    let mut line_priority = DEFAULT_PRIORITY;
    loop {
        let output = match lines.next(&mut continuation).await {
            Ok(None) => return,
            Ok(Some(chunk)) => {
                let (priority, text) = if chunk.continuation {
                    (line_priority, chunk.bytes)
                } else {
                    split_priority(chunk.bytes)
                };
                line_priority = priority;
                ScriptOutput::Line {
                    priority,
                    text: String::from_utf8_lossy(text).into_owned(),
                }
            }
            Err(e) => {
                let _ = tx
                    .send(ScriptOutput::Line {
                        priority: priority::WARNING,
                        text: format!("cannot read the script's {stream}: {e}"),
                    })
                    .await;
                return;
            }
        };
        if tx.send(output).await.is_err() {
            return;
        }
    }
}
