//! Running update scripts and module steps the way NS8's agent does (reference §1.1, §1.5.2):
//! a clean environment plus `AGENT_COMFD=3`, the state dir as cwd, the request JSON on stdin, fd 3 as
//! the command channel, each script in its own process group; stdout and stderr become log lines.
//!
//! Unlike NS8, a script has a timeout, can be cancelled without leaving processes behind, and a
//! background process that keeps the output pipes open does not hang the update for ever.
//!
//! Runs in the worker, which already has the instance user's credentials: nothing here changes uid.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use module_updater_dbus::types::ScriptOutcome;
use tokio::sync::watch;

use super::events::priority;

mod comfd;
mod lines;
mod plan;
mod process;
#[cfg(test)]
mod tests;

pub use plan::{
    BUILTIN_STEPS, CLEANUP_STEP, Listing, PULL_STEP, PlannedStep, SCRIPTS_STEP, list_executables,
    merge_module_steps,
};
use process::run_with;

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
