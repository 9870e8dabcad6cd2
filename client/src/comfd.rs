//! NS8's action command channel. When NS8's agent runs the client as an action step it sets
//! `AGENT_COMFD` to a descriptor on which the step reports to the agent, one command a line:
//! `set-progress N` (the step's own percent; the agent weighs it into the task's) and
//! `set-status validation-failed`. The client then follows that protocol: whole numbers that
//! never go down, and the validation status before exit code 10.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The channel of this process, if the agent gave one.
pub fn channel() -> Option<&'static CommandChannel> {
    static CHANNEL: OnceLock<Option<CommandChannel>> = OnceLock::new();
    CHANNEL
        .get_or_init(|| CommandChannel::from_fd_text(&std::env::var("AGENT_COMFD").ok()?))
        .as_ref()
}

pub struct CommandChannel {
    inner: Mutex<Inner>,
}

struct Inner {
    file: std::fs::File,
    /// The last percent sent.
    sent: Option<u32>,
}

impl CommandChannel {
    /// Opens the descriptor the agent named (`3`) through `/proc/self/fd`, a second handle on
    /// the same pipe, so nothing of the process's own descriptor is taken over.
    fn from_fd_text(fd: &str) -> Option<CommandChannel> {
        let fd: u32 = fd.trim().parse().ok()?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .ok()?;
        Some(CommandChannel::new(file))
    }

    fn new(file: std::fs::File) -> CommandChannel {
        CommandChannel {
            inner: Mutex::new(Inner { file, sent: None }),
        }
    }

    /// `set-progress N` when `percent` is above what was sent (capped at 100).
    pub fn progress(&self, percent: u32) {
        let percent = percent.min(100);
        let mut inner = self.lock();
        if inner.sent.is_some_and(|sent| sent >= percent) {
            return;
        }
        inner.sent = Some(percent);
        let _ = writeln!(inner.file, "set-progress {percent}");
    }

    /// `set-status validation-failed`: the request was refused by its validation.
    pub fn validation_failed(&self) {
        let _ = writeln!(self.lock().file, "set-status validation-failed");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_whole_and_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("comfd");
        let channel = CommandChannel::new(std::fs::File::create(&path).unwrap());
        for percent in [0, 5, 5, 3, 40, 120, 99] {
            channel.progress(percent);
        }
        channel.validation_failed();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "set-progress 0\nset-progress 5\nset-progress 40\nset-progress 100\n\
             set-status validation-failed\n"
        );
    }

    #[test]
    fn a_descriptor_that_is_not_open_gives_no_channel() {
        assert!(CommandChannel::from_fd_text("987654").is_none());
        assert!(CommandChannel::from_fd_text("three").is_none());
    }
}
