//! Processes by pid: identity (pid plus start time, so a recycled pid is never mistaken for ours),
//! signals, and waiting for processes that are not our children.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cmd;

/// A process we started, identified so that it can be found again (also by a later test run that
/// cleans up after a crashed one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// What it is, for messages ("registry", "systemd --user of demoabcd1", ...).
    pub what: String,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessRecord {
    /// Records the running process `pid`.
    pub fn new(what: impl Into<String>, pid: u32) -> ProcessRecord {
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        ProcessRecord {
            what: what.into(),
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this very process still exists (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        match stat(self.pid) {
            Some(stat) => stat.start_time == self.start_time && stat.state != 'Z',
            None => false,
        }
    }

    /// Sends `signal` if the process is still this one.
    pub fn signal(&self, signal: Signal) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }
}

struct Stat {
    state: char,
    start_time: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state); start time is field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of `pid`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Pids of the live (non-zombie) processes whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| real_uid(*pid) == Some(uid) && !zombie(*pid))
        .collect()
}

/// The real uid of `pid`.
pub fn real_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|real| real.parse::<u32>().ok())
}

fn zombie(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// Pids in a cgroup directory and all its descendants.
pub fn pids_in_cgroup(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(pids_in_cgroup(&entry.path()));
            }
        }
    }
    pids
}

/// SIGKILLs every process of `uid` until none is left (at most 5 s); returns those still alive.
pub fn kill_uid(uid: u32) -> Vec<i32> {
    let remaining = cmd::poll(Duration::from_secs(5), || {
        let pids = pids_of_uid(uid);
        if pids.is_empty() {
            return Ok(Some(()));
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        Ok(None)
    });
    match remaining {
        Ok(Some(())) => Vec::new(),
        _ => pids_of_uid(uid),
    }
}

/// Stops a child of ours: SIGTERM, wait up to `grace`, then SIGKILL and reap it.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if let Ok(Some(status)) = cmd::wait_deadline(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// SIGKILLs a child of ours and reaps it.
pub fn kill_child(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Stops a process that is not our child: SIGTERM, wait up to `grace`, then SIGKILL.
pub fn terminate_foreign(record: &ProcessRecord, grace: Duration) {
    if !record.alive() {
        return;
    }
    record.signal(Signal::SIGTERM);
    let gone = cmd::poll(grace, || Ok((!record.alive()).then_some(())));
    if !matches!(gone, Ok(Some(()))) {
        record.signal(Signal::SIGKILL);
        let _ = cmd::poll(Duration::from_secs(5), || {
            Ok((!record.alive()).then_some(()))
        });
    }
}
