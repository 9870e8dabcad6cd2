//! sd-notify messages to the service manager. Each is a no-op when `NOTIFY_SOCKET` is unset, so the
//! daemon runs the same way under systemd, in tests and by hand.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(state: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(state) {
        log::warn!("cannot notify the service manager: {err}");
    }
}

/// `READY=1`: start-up is complete (the bus name is owned).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=...`: one line a person reads in `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `WATCHDOG=1`: still alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), when the manager asked for it.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|usec| usec / 2)
}
