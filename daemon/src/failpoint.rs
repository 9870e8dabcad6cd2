//! Failpoints for the fault tests: named points where the daemon or a worker stops dead, so that
//! a test can kill either at a chosen step without sleeps. Only builds with the cargo feature
//! `failpoints` (the end-to-end tests' build) read [`VARIABLE`]; other builds ignore it.
//!
//! `MODULE_UPDATER_FAILPOINTS` holds comma-separated `PROCESS:ACTION@STEP` items: PROCESS is
//! `daemon` or `worker`, ACTION is `kill` (SIGKILL on itself) or `stop` (SIGSTOP on itself: it
//! waits until the test sends SIGCONT or SIGKILL), STEP a step's wire name (`run-scripts`). With
//! `MODULE_UPDATER_FAILPOINT_DIR` set, each item fires once: it leaves a file of its name there.

use module_updater_dbus::types::Step;

/// The variable naming the failpoints.
pub const VARIABLE: &str = "MODULE_UPDATER_FAILPOINTS";
/// The directory of the fired-once marks.
pub const DIR_VARIABLE: &str = "MODULE_UPDATER_FAILPOINT_DIR";

/// Which process reached the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Daemon,
    Worker,
}

impl Process {
    #[cfg(feature = "failpoints")]
    fn as_str(self) -> &'static str {
        match self {
            Process::Daemon => "daemon",
            Process::Worker => "worker",
        }
    }
}

/// Fires the failpoint of `process` at the start of `step`, if one is set (test builds only).
pub fn step_started(process: Process, step: Step) {
    #[cfg(feature = "failpoints")]
    fire(process, step);
    #[cfg(not(feature = "failpoints"))]
    let _ = (process, step);
}

/// The variables a worker inherits from the daemon in a test build.
pub fn passed_to_workers() -> &'static [&'static str] {
    if cfg!(feature = "failpoints") {
        &[VARIABLE, DIR_VARIABLE]
    } else {
        &[]
    }
}

#[cfg(feature = "failpoints")]
fn fire(process: Process, step: Step) {
    use nix::sys::signal::{Signal, raise};
    let Ok(points) = std::env::var(VARIABLE) else {
        return;
    };
    for item in points.split(',').map(str::trim) {
        let Some((who, rest)) = item.split_once(':') else {
            continue;
        };
        let Some((action, at)) = rest.split_once('@') else {
            continue;
        };
        if who != process.as_str() || at != step.as_str() {
            continue;
        }
        if let Ok(dir) = std::env::var(DIR_VARIABLE) {
            let mark = std::path::Path::new(&dir).join(item.replace(['@', ':'], "-"));
            let fresh = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&mark)
                .is_ok();
            if !fresh {
                continue;
            }
        }
        eprintln!("failpoint {item}");
        let _ = match action {
            "kill" => raise(Signal::SIGKILL),
            "stop" => raise(Signal::SIGSTOP),
            _ => Ok(()),
        };
    }
}
