//! Running update scripts and module steps the way NS8's agent does (reference §1.1, §1.5.2):
//! a clean environment plus `AGENT_COMFD=3`, the state dir as cwd, the request JSON on stdin, fd 3 as
//! the command channel, each script in its own process group; stdout and stderr become log lines.
//!
//! Unlike NS8, a script has a timeout, can be cancelled without leaving processes behind, and a
//! background process that keeps the output pipes open does not hang the update for ever.
//!
//! Runs in the worker, which already has the instance user's credentials: nothing here changes uid.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use module_updater_dbus::types::{ScriptOutcome, ScriptStatus};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{AccessFlags, Pid};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::events::priority;

/// The built-in steps of NS8's `update-module` action, in their order.
pub const BUILTIN_STEPS: [&str; 3] = ["05pullimages", "50run_scriptdir", "95cleanup_images"];

/// The fd number of the command channel in the child (NS8's `AGENT_COMFD`).
const AGENT_COMFD: RawFd = 3;

/// Longer output lines are split into pieces of this size, so a script printing without newlines
/// cannot make us buffer without limit.
const MAX_LINE: usize = 64 * 1024;

/// Journal priority of a line without a `<N>` prefix.
const DEFAULT_PRIORITY: u8 = priority::INFO;

/// The delays of [`run`]; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// How long the pipes may stay open after the script exited (a background process holding them).
    output_grace: Duration,
    /// How long a cancelled script's process group has after SIGTERM before SIGKILL.
    cancel_grace: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        output_grace: Duration::from_secs(2),
        cancel_grace: Duration::from_secs(10),
    };
}

/// Errors of listing and starting scripts. A script that runs and fails is not an error: it is a
/// [`ScriptOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot list the scripts in {}: {source} (check that the directory is readable by the instance user)", dir.display())]
    List {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The script could not be started (not executable after all, exec format error, vanished).
    /// NS8 skips such a step; the caller decides.
    #[error("cannot start {}: {source} (is it executable, and does a script start with a valid #! line?)", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the AGENT_COMFD pipe for {}: {source} (too many open files?)", path.display())]
    Pipe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for {}: {source}", path.display())]
    Wait {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The entries of a script directory, each list in byte order of file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Files we may execute (symlinks followed).
    pub runnable: Vec<PathBuf>,
    /// Everything else: non-executable files, directories, dangling symlinks. NS8 logs each as
    /// `<7>Skipping non-executable file PATH...`.
    pub skipped: Vec<PathBuf>,
}

impl Listing {
    /// All entries in byte order of file name, with `true` for runnable ones (to log the skipped
    /// ones where NS8's loop would).
    pub fn in_order(&self) -> Vec<(&Path, bool)> {
        let mut all: Vec<(&Path, bool)> = self
            .runnable
            .iter()
            .map(|p| (p.as_path(), true))
            .chain(self.skipped.iter().map(|p| (p.as_path(), false)))
            .collect();
        all.sort_by(|a, b| file_name_bytes(a.0).cmp(file_name_bytes(b.0)));
        all
    }
}

fn file_name_bytes(path: &Path) -> &[u8] {
    path.file_name().unwrap_or(OsStr::new("")).as_bytes()
}

/// The entries of `dir` like NS8's `for script in dir/*` with `[[ -x ]]`: dotfiles left out, byte
/// order of name, split into runnable and skipped. A missing directory (or a file in its place) is
/// an empty listing: a module without `update-module.d` is normal.
pub fn list_executables(dir: &Path) -> Result<Listing, ScriptError> {
    let list_error = |source| ScriptError::List {
        dir: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Listing::default());
        }
        Err(e) => return Err(list_error(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(list_error)?.file_name();
        // A shell glob does not match dotfiles.
        if name.as_bytes().first() != Some(&b'.') {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

    let mut listing = Listing::default();
    for name in names {
        let path = dir.join(name);
        if is_runnable(&path) {
            listing.runnable.push(path);
        } else {
            listing.skipped.push(path);
        }
    }
    Ok(listing)
}

/// A regular file (symlinks followed) that exec would accept for our effective ids. `eaccess`
/// rather than `access`: exec checks the effective ids, and so does bash's `-x`.
fn is_runnable(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => nix::unistd::eaccess(path, AccessFlags::X_OK).is_ok(),
        _ => false,
    }
}

/// One step of the merged `update-module` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedStep {
    /// One of [`BUILTIN_STEPS`], run by the engine itself.
    Builtin(String),
    /// An executable shipped by the module in `<install>/actions/update-module/`.
    Module(PathBuf),
}

impl PlannedStep {
    /// The step name (`05pullimages`, or the module file's name).
    pub fn name(&self) -> Cow<'_, str> {
        match self {
            PlannedStep::Builtin(name) => Cow::Borrowed(name),
            PlannedStep::Module(path) => path
                .file_name()
                .unwrap_or(path.as_os_str())
                .to_string_lossy(),
        }
    }
}

/// NS8's step list of an action: the built-in steps and the module's executables, sorted together
/// by name in byte order (Go `sort.Strings`); a module file named like a built-in replaces it
/// (the later actions dir wins).
pub fn merge_module_steps(builtin: &[&str], module_steps: Vec<PathBuf>) -> Vec<PlannedStep> {
    let mut steps: BTreeMap<Vec<u8>, PlannedStep> = builtin
        .iter()
        .map(|name| {
            (
                name.as_bytes().to_vec(),
                PlannedStep::Builtin((*name).to_string()),
            )
        })
        .collect();
    for path in module_steps {
        let key = file_name_bytes(&path).to_vec();
        steps.insert(key, PlannedStep::Module(path));
    }
    steps.into_values().collect()
}

/// What to run and with what.
#[derive(Debug, Clone, Copy)]
pub struct ScriptRun<'a> {
    pub path: &'a Path,
    /// The complete environment of the script (`AGENT_COMFD=3` is added); nothing is inherited.
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a Path,
    /// Fed to the script's stdin, which is then closed (the request JSON).
    pub stdin: &'a [u8],
    /// After this the whole process group is killed and the outcome is `timeout`.
    pub timeout: Duration,
}

/// What a running script reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptOutput {
    /// A line of stdout or stderr (a `<N>` prefix became `priority`), or a note of ours.
    Line { priority: u8, text: String },
    /// `set-progress N` on `AGENT_COMFD`: the script's own progress, 0–100.
    Progress(u8),
}

/// Runs one script to its end (exit, timeout or cancel), passing its output to `on_output` as it
/// comes. `cancel` becoming `true` stops the script: SIGTERM to its process group, SIGKILL 10 s later.
///
/// Returns `Err(ScriptError::Spawn)` when the script cannot be started at all (NS8's agent skips
/// such a step): vanished, not executable, or refused by the kernel (ENOEXEC: no `#!` line, a binary
/// for another machine); such a file is not run through `/bin/sh` as glibc's `execvp` would.
pub async fn run(
    script: &ScriptRun<'_>,
    cancel: &watch::Receiver<bool>,
    on_output: &mut (dyn FnMut(ScriptOutput) + Send),
) -> Result<ScriptOutcome, ScriptError> {
    run_with(script, cancel, on_output, Limits::DEFAULT).await
}

/// How the main loop of [`run_with`] ended.
enum Ending {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
}

async fn run_with(
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
async fn spawn_retrying(command: &mut Command) -> io::Result<Child> {
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
struct Exec {
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
fn child_setup(comfd: RawFd, strays: &[RawFd], exec: &Exec) -> io::Result<()> {
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
fn inherited_fds() -> Vec<RawFd> {
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
struct GroupGuard {
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
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Waits for the leader to exit, passing output on (a script may print while it dies, and must
/// not block on a full pipe).
async fn reap(
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
async fn wait_group_gone(
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

/// Reads a pipe in lines of at most [`MAX_LINE`] bytes.
struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

/// One line, or one piece of a longer line.
struct Chunk<'a> {
    bytes: &'a [u8],
    /// A later piece of a split line.
    continuation: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(pipe: R) -> Self {
        LineReader {
            reader: BufReader::with_capacity(MAX_LINE, pipe),
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at EOF.
    async fn next(&mut self, continuation: &mut bool) -> io::Result<Option<Chunk<'_>>> {
        loop {
            self.buf.clear();
            let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let complete = self.buf.last() == Some(&b'\n');
            if complete {
                self.buf.pop();
            }
            let this_continues = *continuation;
            *continuation = !complete;
            // The newline right after a piece of exactly MAX_LINE bytes is not an extra empty line.
            if this_continues && complete && self.buf.is_empty() {
                continue;
            }
            return Ok(Some(Chunk {
                bytes: &self.buf,
                continuation: this_continues,
            }));
        }
    }
}

/// Splits a systemd-style `<N>` priority prefix (N = 0–7) off a line.
fn split_priority(line: &[u8]) -> (u8, &[u8]) {
    match line {
        [b'<', digit @ b'0'..=b'7', b'>', rest @ ..] => (digit - b'0', rest),
        _ => (DEFAULT_PRIORITY, line),
    }
}

/// Passes stdout or stderr on as lines.
async fn read_output<R: AsyncRead + Unpin>(
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

/// Reads NS8 commands from the `AGENT_COMFD` pipe.
async fn read_commands(pipe: tokio::net::unix::pipe::Receiver, tx: mpsc::Sender<ScriptOutput>) {
    let mut lines = LineReader::new(pipe);
    let mut continuation = false;
    loop {
        let output = match lines.next(&mut continuation).await {
            Ok(None) => return,
            Ok(Some(chunk)) if chunk.continuation => Some(ignored(
                "AGENT_COMFD command line too long, rest ignored",
                chunk.bytes,
            )),
            Ok(Some(chunk)) => command_output(chunk.bytes),
            Err(e) => Some(ScriptOutput::Line {
                priority: priority::WARNING,
                text: format!("cannot read the script's AGENT_COMFD: {e}"),
            }),
        };
        if let Some(output) = output
            && tx.send(output).await.is_err()
        {
            return;
        }
    }
}

/// What one command line does: `set-progress N` reports progress; the other NS8 commands steer
/// NS8's own step weights and status, which this updater does not have, so they are logged.
fn command_output(line: &[u8]) -> Option<ScriptOutput> {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let Some(fields) = parse_command(text) else {
        return Some(ignored("malformed AGENT_COMFD command ignored", line));
    };
    match fields.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => None,
        ["set-progress", value] => match value.parse::<u8>() {
            Ok(percent) if percent <= 100 => Some(ScriptOutput::Progress(percent)),
            _ => Some(ignored(
                "AGENT_COMFD set-progress ignored: the value must be an integer 0..100",
                line,
            )),
        },
        ["set-weight", ..] | ["set-status", ..] => Some(ignored(
            "AGENT_COMFD command ignored (the updater has no NS8 step weights or task status)",
            line,
        )),
        _ => Some(ignored("unknown AGENT_COMFD command ignored", line)),
    }
}

fn ignored(what: &str, line: &[u8]) -> ScriptOutput {
    ScriptOutput::Line {
        priority: priority::DEBUG,
        text: format!("{what}: {}", String::from_utf8_lossy(line)),
    }
}

/// NS8's command syntax (Go `encoding/csv` with a space as separator): fields separated by spaces,
/// a field may be `"`-quoted with `""` for a quote. Empty unquoted fields (repeated spaces) are
/// dropped, which is more forgiving than Go. `None` when malformed.
fn parse_command(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Some(fields);
        };
        let mut field = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
            // A closing quote must end the field.
            if !matches!(chars.peek(), None | Some(' ')) {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                if c == '"' {
                    return None;
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::sync::{Arc, Mutex};

    fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn base_env() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("AGENT_ID".to_string(), "module/test1".to_string()),
            ("WITH SPACE".to_string(), "a b=c".to_string()),
        ])
    }

    struct Ran {
        result: Result<ScriptOutcome, ScriptError>,
        outputs: Vec<ScriptOutput>,
        elapsed: Duration,
    }

    impl Ran {
        fn outcome(&self) -> &ScriptOutcome {
            self.result.as_ref().unwrap()
        }

        fn lines(&self) -> Vec<(u8, String)> {
            self.outputs
                .iter()
                .filter_map(|o| match o {
                    ScriptOutput::Line { priority, text } => Some((*priority, text.clone())),
                    ScriptOutput::Progress(_) => None,
                })
                .collect()
        }

        fn texts(&self) -> Vec<String> {
            self.lines().into_iter().map(|(_, t)| t).collect()
        }
    }

    const FAST: Limits = Limits {
        output_grace: Duration::from_millis(300),
        cancel_grace: Duration::from_millis(300),
    };

    async fn run_script(
        path: &Path,
        cwd: &Path,
        stdin: &[u8],
        timeout: Duration,
        cancel: &watch::Receiver<bool>,
        limits: Limits,
    ) -> Ran {
        let env = base_env();
        let script = ScriptRun {
            path,
            env: &env,
            cwd,
            stdin,
            timeout,
        };
        let outputs = Arc::new(Mutex::new(Vec::new()));
        let sink = outputs.clone();
        let mut on_output = move |o: ScriptOutput| sink.lock().unwrap().push(o);
        let started = Instant::now();
        let result = run_with(&script, cancel, &mut on_output, limits).await;
        let elapsed = started.elapsed();
        let outputs = outputs.lock().unwrap().clone();
        Ran {
            result,
            outputs,
            elapsed,
        }
    }

    /// Runs `body` with the default limits, a 10 s timeout and no cancel.
    async fn run_body(dir: &Path, body: &str) -> Ran {
        let path = write_script(dir, "script", body);
        let (_tx, rx) = watch::channel(false);
        run_script(
            &path,
            dir,
            b"",
            Duration::from_secs(10),
            &rx,
            Limits::DEFAULT,
        )
        .await
    }

    fn pids_in(file: &Path) -> Vec<i32> {
        std::fs::read_to_string(file)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    /// Gone, or a zombie waiting for init: it no longer runs.
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    async fn assert_all_gone(pids: &[i32]) {
        assert!(!pids.is_empty());
        for _ in 0..100 {
            if pids.iter().all(|&p| is_gone(p)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let alive: Vec<_> = pids.iter().filter(|&&p| !is_gone(p)).collect();
        panic!("processes of the script's group still alive: {alive:?}");
    }

    #[test]
    fn listing_is_byte_ordered_skips_non_executables_and_dotfiles() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["50b", "10a", "B", "a", "_x", "Z9"] {
            write_script(d, name, "true");
        }
        write_script(d, ".hidden", "true");
        std::fs::write(d.join("20readme"), "not a script").unwrap();
        std::fs::create_dir(d.join("30dir")).unwrap();
        symlink(d.join("10a"), d.join("40link")).unwrap();
        symlink(d.join("20readme"), d.join("41link-to-plain")).unwrap();
        symlink(d.join("missing"), d.join("42dangling")).unwrap();

        let listing = list_executables(d).unwrap();
        let names = |paths: &[PathBuf]| -> Vec<String> {
            paths
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(&listing.runnable),
            ["10a", "40link", "50b", "B", "Z9", "_x", "a"]
        );
        assert_eq!(
            names(&listing.skipped),
            ["20readme", "30dir", "41link-to-plain", "42dangling"]
        );
        assert!(listing.runnable.iter().all(|p| p.starts_with(d)));
        let in_order: Vec<_> = listing
            .in_order()
            .into_iter()
            .map(|(p, run)| (p.file_name().unwrap().to_string_lossy().into_owned(), run))
            .collect();
        assert_eq!(in_order[0], ("10a".to_string(), true));
        assert_eq!(in_order[1], ("20readme".to_string(), false));
        assert_eq!(in_order.len(), 11);
    }

    #[test]
    fn missing_dir_is_an_empty_listing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            list_executables(&dir.path().join("update-module.d")).unwrap(),
            Listing::default()
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(list_executables(&file).unwrap(), Listing::default());
    }

    #[test]
    fn merge_interleaves_module_steps_by_name() {
        let steps = merge_module_steps(
            &BUILTIN_STEPS,
            vec![
                PathBuf::from("/i/actions/update-module/80restart"),
                PathBuf::from("/i/actions/update-module/10backup"),
                PathBuf::from("/i/actions/update-module/50run_scriptdir-x"),
            ],
        );
        let names: Vec<_> = steps.iter().map(|s| s.name().into_owned()).collect();
        assert_eq!(
            names,
            [
                "05pullimages",
                "10backup",
                "50run_scriptdir",
                "50run_scriptdir-x",
                "80restart",
                "95cleanup_images"
            ]
        );
        assert_eq!(steps[0], PlannedStep::Builtin("05pullimages".to_string()));
        assert_eq!(
            steps[1],
            PlannedStep::Module(PathBuf::from("/i/actions/update-module/10backup"))
        );
    }

    #[test]
    fn merge_module_file_replaces_builtin_of_same_name() {
        let steps = merge_module_steps(
            &BUILTIN_STEPS,
            vec![PathBuf::from("/i/actions/update-module/95cleanup_images")],
        );
        assert_eq!(
            steps,
            [
                PlannedStep::Builtin("05pullimages".to_string()),
                PlannedStep::Builtin("50run_scriptdir".to_string()),
                PlannedStep::Module(PathBuf::from("/i/actions/update-module/95cleanup_images")),
            ]
        );
        let only_builtin = merge_module_steps(&BUILTIN_STEPS, Vec::new());
        assert_eq!(only_builtin.len(), 3);
        // Byte order: uppercase before digits-after-letters, as Go's sort.Strings.
        let steps =
            merge_module_steps(&["05a"], vec![PathBuf::from("/x/A"), PathBuf::from("/x/0")]);
        let names: Vec<_> = steps.iter().map(|s| s.name().into_owned()).collect();
        assert_eq!(names, ["0", "05a", "A"]);
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            command_output(b"set-progress 40"),
            Some(ScriptOutput::Progress(40))
        );
        assert_eq!(
            command_output(b"\"set-progress\" \"100\"\r"),
            Some(ScriptOutput::Progress(100))
        );
        assert_eq!(command_output(b""), None);
        for bad in [
            &b"set-progress 101"[..],
            b"set-progress -1",
            b"set-progress x",
            b"set-weight 50run_scriptdir 3",
            b"set-status validation-failed",
            b"hello",
            b"set-progress \"4",
        ] {
            match command_output(bad) {
                Some(ScriptOutput::Line { priority, text }) => {
                    assert_eq!(priority, priority::DEBUG);
                    assert!(text.contains(&*String::from_utf8_lossy(bad)), "{text}");
                }
                other => panic!("{other:?} for {bad:?}"),
            }
        }
        assert_eq!(
            parse_command(r#"a "b c" "d""e""#),
            Some(vec!["a".into(), "b c".into(), "d\"e".into()])
        );
        assert_eq!(parse_command(r#"a"b"#), None);
        assert_eq!(parse_command(r#""a"b"#), None);
    }

    #[test]
    fn priority_prefix() {
        assert_eq!(split_priority(b"<4>warn"), (4, &b"warn"[..]));
        assert_eq!(split_priority(b"<0>"), (0, &b""[..]));
        assert_eq!(split_priority(b"<8>x"), (6, &b"<8>x"[..]));
        assert_eq!(split_priority(b" <3>x"), (6, &b" <3>x"[..]));
        assert_eq!(split_priority(b"<3x"), (6, &b"<3x"[..]));
    }

    #[tokio::test]
    async fn env_is_exactly_the_given_one_plus_agent_comfd() {
        let dir = tempfile::tempdir().unwrap();
        // /proc/$$/environ is what the shell received, before it adds PWD and the like.
        let ran = run_body(dir.path(), r#"tr '\0' '\n' < /proc/$$/environ"#).await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        let got: BTreeMap<String, String> = ran
            .texts()
            .iter()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let mut expected = base_env();
        expected.insert("AGENT_COMFD".into(), "3".into());
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn runs_in_cwd_and_receives_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().join("state");
        std::fs::create_dir(&cwd).unwrap();
        let path = write_script(dir.path(), "s", "pwd; cat > stdin.copy");
        let (_tx, rx) = watch::channel(false);
        let request = br#"{"force":false,"module_url":"ghcr.io/x/y:1.0"}"#;
        let ran = run_script(&path, &cwd, request, Duration::from_secs(10), &rx, FAST).await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        assert_eq!(
            ran.texts(),
            [cwd.canonicalize().unwrap().to_string_lossy().into_owned()]
        );
        assert_eq!(std::fs::read(cwd.join("stdin.copy")).unwrap(), request);
    }

    #[tokio::test]
    async fn symlinked_script_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = write_script(dir.path(), "real", "echo via $0");
        let d = dir.path().join("update-module.d");
        std::fs::create_dir(&d).unwrap();
        symlink(&target, d.join("10link")).unwrap();
        let listing = list_executables(&d).unwrap();
        assert_eq!(listing.runnable, [d.join("10link")]);
        let (_tx, rx) = watch::channel(false);
        let ran = run_script(
            &listing.runnable[0],
            dir.path(),
            b"",
            Duration::from_secs(10),
            &rx,
            FAST,
        )
        .await;
        assert_eq!(ran.outcome().name, "10link");
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        assert_eq!(ran.texts(), [format!("via {}", d.join("10link").display())]);
    }

    #[tokio::test]
    async fn output_lines_and_priorities() {
        let dir = tempfile::tempdir().unwrap();
        let ran = run_body(
            dir.path(),
            r#"echo '<4>warn'; echo plain; echo '<3>on stderr' >&2; printf '\377abc\n'; echo '<9>not a priority'; printf 'no newline'"#,
        )
        .await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        let mut lines = ran.lines();
        // stdout and stderr are read concurrently: only the order within a stream is fixed.
        let stderr_line = (3, "on stderr".to_string());
        assert!(lines.contains(&stderr_line), "{lines:?}");
        lines.retain(|l| *l != stderr_line);
        assert_eq!(
            lines,
            [
                (4, "warn".to_string()),
                (6, "plain".to_string()),
                (6, "\u{FFFD}abc".to_string()),
                (6, "<9>not a priority".to_string()),
                (6, "no newline".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn long_lines_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let ran = run_body(
            dir.path(),
            "printf '<5>'; head -c 70000 /dev/zero | tr '\\0' a; echo; echo next",
        )
        .await;
        let lines = ran.lines();
        assert_eq!(
            lines.len(),
            3,
            "{:?}",
            lines.iter().map(|l| l.1.len()).collect::<Vec<_>>()
        );
        assert_eq!(lines[0].0, 5);
        assert_eq!(lines[0].1.len(), MAX_LINE - 3);
        assert_eq!(lines[1], (5, "a".repeat(70000 - (MAX_LINE - 3))));
        assert_eq!(lines[2], (6, "next".to_string()));
    }

    #[tokio::test]
    async fn agent_comfd_progress_and_ignored_commands() {
        let dir = tempfile::tempdir().unwrap();
        let ran = run_body(
            dir.path(),
            "echo set-progress 40 >&3; echo 'frobnicate now' >&3; echo 'set-weight 50run_scriptdir 2' >&$AGENT_COMFD; echo set-progress 90 >&3",
        )
        .await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        let progress: Vec<_> = ran
            .outputs
            .iter()
            .filter_map(|o| match o {
                ScriptOutput::Progress(p) => Some(*p),
                _ => None,
            })
            .collect();
        assert_eq!(progress, [40, 90]);
        let lines = ran.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.iter().all(|(p, _)| *p == priority::DEBUG));
        assert!(lines[0].1.contains("unknown") && lines[0].1.contains("frobnicate now"));
        assert!(lines[1].1.contains("set-weight"));
    }

    #[tokio::test]
    async fn exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let failed = run_body(dir.path(), "echo before; exit 3").await;
        assert_eq!(failed.outcome().status, ScriptStatus::Failed);
        assert_eq!(failed.outcome().exit_code, Some(3));
        assert_eq!(failed.outcome().name, "script");
        assert_eq!(failed.texts(), ["before"]);

        let killed = run_body(dir.path(), "kill -9 $$").await;
        assert_eq!(killed.outcome().status, ScriptStatus::Failed);
        assert_eq!(killed.outcome().exit_code, Some(-1));

        let ok = run_body(dir.path(), "sleep 0.1").await;
        assert_eq!(ok.outcome().status, ScriptStatus::Ok);
        assert_eq!(ok.outcome().exit_code, Some(0));
        assert!(ok.outcome().duration_ms >= 100, "{:?}", ok.outcome());
    }

    #[tokio::test]
    async fn spawn_failures_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"\x00\x01\x02 not a program").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (_tx, rx) = watch::channel(false);
        let ran = run_script(&garbage, dir.path(), b"", Duration::from_secs(5), &rx, FAST).await;
        match ran.result {
            Err(ScriptError::Spawn { path, source }) => {
                assert_eq!(path, garbage);
                assert_eq!(source.raw_os_error(), Some(Errno::ENOEXEC as i32));
            }
            other => panic!("{other:?}"),
        }
        let vanished = dir.path().join("vanished");
        let ran = run_script(
            &vanished,
            dir.path(),
            b"",
            Duration::from_secs(5),
            &rx,
            FAST,
        )
        .await;
        assert!(
            matches!(&ran.result, Err(ScriptError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound),
            "{:?}",
            ran.result
        );
        assert!(ran.outputs.is_empty());
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(
            dir.path(),
            "hang",
            "sleep 1000 & echo $! > kids\n\
             sh -c 'sleep 1000 & echo $! >> kids; wait' & echo $! >> kids\n\
             while [ $(wc -l < kids) -lt 3 ]; do sleep 0.01; done\n\
             echo started\n\
             sleep 1000",
        );
        let (_tx, rx) = watch::channel(false);
        let ran = run_script(
            &path,
            dir.path(),
            b"",
            Duration::from_millis(800),
            &rx,
            FAST,
        )
        .await;
        let outcome = ran.outcome();
        assert_eq!(outcome.status, ScriptStatus::Timeout);
        assert_eq!(outcome.exit_code, None);
        assert!(outcome.duration_ms >= 800, "{outcome:?}");
        assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
        assert_eq!(ran.texts(), ["started"]);
        let pids = pids_in(&dir.path().join("kids"));
        assert_eq!(pids.len(), 3);
        assert_all_gone(&pids).await;
    }

    #[tokio::test]
    async fn cancel_terminates_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(
            dir.path(),
            "hang",
            "sleep 1000 & echo $! > kids\necho started\nsleep 1000",
        );
        let (tx, rx) = watch::channel(false);
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(true).unwrap();
            tx
        });
        let ran = run_script(
            &path,
            dir.path(),
            b"",
            Duration::from_secs(30),
            &rx,
            Limits::DEFAULT,
        )
        .await;
        let _tx = canceller.await.unwrap();
        assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
        assert_eq!(ran.outcome().exit_code, None);
        // SIGTERM was enough: no wait for the 10 s SIGKILL.
        assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
        assert_eq!(ran.texts(), ["started"]);
        assert_all_gone(&pids_in(&dir.path().join("kids"))).await;
    }

    #[tokio::test]
    async fn cancel_kills_a_group_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(
            dir.path(),
            "stubborn",
            "trap '' TERM\nsleep 1000 & echo $! > kids\necho started\nsleep 1000",
        );
        let (tx, rx) = watch::channel(false);
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(true).unwrap();
            tx
        });
        let ran = run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST).await;
        let _tx = canceller.await.unwrap();
        assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
        assert!(
            ran.elapsed >= Duration::from_millis(600),
            "{:?}",
            ran.elapsed
        );
        assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
        assert_all_gone(&pids_in(&dir.path().join("kids"))).await;
    }

    #[tokio::test]
    async fn cancelled_before_start_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(dir.path(), "s", "touch ran");
        let (_tx, rx) = watch::channel(true);
        let ran = run_script(&path, dir.path(), b"", Duration::from_secs(5), &rx, FAST).await;
        assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
        assert!(!dir.path().join("ran").exists());
    }

    #[tokio::test]
    async fn background_process_holding_stdout_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(
            dir.path(),
            "daemonize",
            "sleep 1000 & echo $! > bg\necho done",
        );
        let (_tx, rx) = watch::channel(false);
        let ran = run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST).await;
        let bg = pids_in(&dir.path().join("bg"));
        // The background process is not ours to kill after a normal exit (NS8 leaves it too).
        let still_running = !is_gone(bg[0]);
        for pid in &bg {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        assert!(still_running);
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        assert!(ran.elapsed < Duration::from_secs(2), "{:?}", ran.elapsed);
        let lines = ran.lines();
        assert_eq!(lines[0], (6, "done".to_string()));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[1].0, priority::WARNING);
        assert!(lines[1].1.contains("background process"), "{}", lines[1].1);
    }

    #[tokio::test]
    async fn large_stdin_not_read_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; 1024 * 1024];
        let (_tx, rx) = watch::channel(false);
        let ignore = write_script(dir.path(), "ignore", "echo ignored");
        let ran = run_script(&ignore, dir.path(), &big, Duration::from_secs(5), &rx, FAST).await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        assert_eq!(ran.texts(), ["ignored"]);
        assert!(ran.elapsed < Duration::from_secs(2), "{:?}", ran.elapsed);

        let read = write_script(dir.path(), "read", "cat > copy");
        let ran = run_script(&read, dir.path(), &big, Duration::from_secs(5), &rx, FAST).await;
        assert_eq!(ran.outcome().status, ScriptStatus::Ok);
        assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), big);
    }

    #[tokio::test]
    async fn only_stdio_and_agent_comfd_reach_the_script() {
        let dir = tempfile::tempdir().unwrap();
        // Descriptors of ours (CLOEXEC) and inherited strays (no CLOEXEC) both stay out.
        let _ours = std::fs::File::open("/dev/null").unwrap();
        let stray: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        fcntl(&stray, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        // `ls` itself opens one descriptor (4) for the listing.
        let ran = run_body(dir.path(), "exec ls /proc/self/fd").await;
        let mut fds: Vec<i32> = ran.texts().iter().map(|t| t.parse().unwrap()).collect();
        fds.sort();
        assert_eq!(fds, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_script(
            dir.path(),
            "hang",
            "sleep 1000 & echo $! > kids\necho $$ >> kids\nsleep 1000",
        );
        let (_tx, rx) = watch::channel(false);
        let kids = dir.path().join("kids");
        let dropped = tokio::time::timeout(
            Duration::from_millis(500),
            run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST),
        )
        .await;
        assert!(dropped.is_err());
        assert_all_gone(&pids_in(&kids)).await;
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let env = BTreeMap::new();
        let script = ScriptRun {
            path: Path::new("/bin/true"),
            env: &env,
            cwd: Path::new("/"),
            stdin: b"",
            timeout: Duration::from_secs(1),
        };
        let (_tx, rx) = watch::channel(false);
        let mut on_output = |_: ScriptOutput| {};
        let future = run(&script, &rx, &mut on_output);
        assert_send(&future);
    }
}
