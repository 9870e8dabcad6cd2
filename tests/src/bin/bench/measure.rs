//! Measurements read from the kernel: CPU time and memory of processes from `/proc`, children of a
//! process, and the statistics the report uses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

/// `/proc/PID/stat` times are in USER_HZ, which Linux fixes at 100 for user space whatever the
/// kernel's own tick rate (`getconf CLK_TCK`).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU times of a process, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcCpu {
    pub utime: u64,
    pub stime: u64,
    /// Children that exited and were waited for (and, recursively, theirs): what
    /// `getrusage(RUSAGE_CHILDREN)` tells the process itself.
    pub cutime: u64,
    pub cstime: u64,
    /// Field 22: identifies the process together with the pid.
    pub start_time: u64,
}

impl ProcCpu {
    /// The process's own CPU seconds.
    pub fn own_secs(&self) -> f64 {
        (self.utime + self.stime) as f64 / TICKS_PER_SECOND
    }

    /// Waited-for children's CPU seconds.
    pub fn children_secs(&self) -> f64 {
        (self.cutime + self.cstime) as f64 / TICKS_PER_SECOND
    }

    /// Own and children's.
    pub fn total_secs(&self) -> f64 {
        self.own_secs() + self.children_secs()
    }
}

/// Parses `/proc/PID/stat` (the command name is in parentheses and may hold anything).
pub fn parse_stat(text: &str) -> Option<ProcCpu> {
    let rest = text.get(text.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcCpu {
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
        start_time: field(22)?,
    })
}

/// CPU times of `pid` (`self` for this process).
pub fn proc_cpu(pid: &str) -> std::io::Result<ProcCpu> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)?;
    parse_stat(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{path} is not in the format of proc(5)"),
        )
    })
}

/// A `kB` value of `/proc/PID/status`, e.g. `VmRSS` or `VmHWM`.
pub fn status_kib(pid: u32, key: &str) -> std::io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path} has no {key} line"),
            )
        })
}

/// Resets the peak RSS (`VmHWM`) of `pid` to its current RSS (proc(5): `clear_refs` value 5).
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// The children of `pid` now, from every thread's `children` list.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// What [`WorkerSampler`] saw.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WorkerSample {
    /// Workers seen.
    pub workers: usize,
    /// Their own CPU seconds (not their children's), as last seen alive.
    pub cpu_s: f64,
    /// The largest RSS one of them had when sampled.
    pub peak_rss_kib: u64,
}

/// Samples the children of a process that run its own executable (the daemon's workers, not
/// the podman processes of its shared download) every few milliseconds from a thread: their own
/// CPU time is lost when they are reaped (it goes into the parent's children times together with
/// podman's), so it is read while they live. What a worker spends after its last sample (at
/// most one period) is missed.
pub struct WorkerSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<WorkerSample>,
}

impl WorkerSampler {
    pub fn start(parent: u32, period: Duration) -> WorkerSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // (pid, start time) -> own ticks last seen
            let mut seen: BTreeMap<(u32, u64), u64> = BTreeMap::new();
            let mut peak_rss = 0;
            let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let own = exe(parent);
            loop {
                let last = flag.load(Ordering::Relaxed);
                for child in children(parent) {
                    if own.is_none() || exe(child) != own {
                        continue;
                    }
                    if let Ok(cpu) = proc_cpu(&child.to_string()) {
                        let ticks = cpu.utime + cpu.stime;
                        let entry = seen.entry((child, cpu.start_time)).or_default();
                        *entry = (*entry).max(ticks);
                    }
                    if let Ok(rss) = status_kib(child, "VmRSS") {
                        peak_rss = peak_rss.max(rss);
                    }
                }
                if last {
                    break;
                }
                std::thread::sleep(period);
            }
            WorkerSample {
                workers: seen.len(),
                cpu_s: seen.values().sum::<u64>() as f64 / TICKS_PER_SECOND,
                peak_rss_kib: peak_rss,
            }
        });
        WorkerSampler { stop, thread }
    }

    pub fn finish(self) -> WorkerSample {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// The `p`-th percentile (0–100) by nearest rank; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The most events in any half-open window `[t, t + window)`; `times` in seconds, any order.
pub fn max_in_window(times: &[f64], window: f64) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The machine the numbers were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub podman: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        / 1024;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let podman = std::process::Command::new("podman")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_total_mib,
        cpu_model,
        kernel,
        podman,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 11 5 20 0 1 0 12345 0 0";
        let cpu = parse_stat(text).expect("parse");
        assert_eq!(
            (cpu.utime, cpu.stime, cpu.cutime, cpu.cstime),
            (7, 3, 11, 5)
        );
        assert_eq!(cpu.start_time, 12345);
        assert!((cpu.total_secs() - 0.26).abs() < 1e-9);
        let own = proc_cpu("self").expect("own stat");
        assert!(own.start_time > 0);
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
        // Five events 0.2 s apart fit in one second; the sixth at 1.0 does not.
        assert_eq!(max_in_window(&[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 1.0), 5);
        assert_eq!(max_in_window(&[0.0, 0.1, 0.15, 3.0], 1.0), 3);
        assert_eq!(max_in_window(&[], 1.0), 0);
    }
}
