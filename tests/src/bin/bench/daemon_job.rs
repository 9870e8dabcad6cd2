//! Part (a): the daemon updates N instances in one `UpdateModule` job, followed to its end over
//! D-Bus, while a second connection calls `ListInstances` in a loop and a thread samples the
//! daemon's workers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use module_updater_dbus::{BUS_NAME, JobProxy, JobSignal, ModuleUpdaterProxy};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use zbus::{MatchRule, Message, MessageStream};

use crate::BenchError;
use crate::measure::{self, WorkerSample, WorkerSampler};

/// How long a job may take before the benchmark gives up.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The pause between two `ListInstances` calls of the latency probe: a busy client (about ten
/// calls a second), not a flood. Each call costs the daemon about 5 ms of CPU with 101 instances
/// on the node (measured): with a 20 ms pause the probe alone took 5-8 CPU seconds of a 60 s
/// job on two cores, slowing (a) down.
pub const LIST_PAUSE: Duration = Duration::from_millis(100);
/// How often the workers are sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(20);

/// Latencies of `ListInstances` calls.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Signals of one kind on the job's path.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SignalRate {
    pub count: usize,
    /// count / job wall time
    pub per_s: f64,
    /// The most in any one-second window.
    pub max_per_1s: usize,
}

impl SignalRate {
    fn of(times: &[f64], wall: f64) -> SignalRate {
        SignalRate {
            count: times.len(),
            per_s: if wall > 0.0 {
                times.len() as f64 / wall
            } else {
                0.0
            },
            max_per_1s: measure::max_in_window(times, 1.0),
        }
    }
}

/// What part (a) measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonRun {
    /// From the `UpdateModule` call to the `Finished` signal.
    pub wall_s: f64,
    /// The daemon's own CPU.
    pub cpu_daemon_s: f64,
    /// The daemon and everything it ran and reaped: workers, podman, scripts.
    pub cpu_tree_s: f64,
    /// The workers' own CPU (sampled).
    pub workers: WorkerSample,
    /// `VmHWM` of the daemon during the job (reset just before it).
    pub rss_peak_kib: u64,
    pub list_instances: Latency,
    pub progress: SignalRate,
    pub properties_changed: SignalRate,
    pub messages: usize,
    /// The first instance's signals (seconds since the call, what): where its time went.
    pub timeline: Vec<(f64, String)>,
}

/// Calls `ListInstances` until told to stop; returns each call's latency in ms.
async fn probe_list_instances(
    connection: zbus::Connection,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<f64>, BenchError> {
    let proxy = ModuleUpdaterProxy::new(&connection)
        .await
        .map_err(|e| BenchError::dbus("create a ModuleUpdater proxy", e))?;
    let mut latencies = Vec::new();
    while !*stop.borrow() {
        let started = Instant::now();
        proxy
            .list_instances()
            .await
            .map_err(|e| BenchError::dbus("call ListInstances during the job", e))?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::select! {
            _ = tokio::time::sleep(LIST_PAUSE) => {}
            _ = stop.changed() => {}
        }
    }
    Ok(latencies)
}

pub async fn connect(address: &str) -> Result<zbus::Connection, BenchError> {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .map_err(|e| BenchError::dbus(&format!("connect to {address}"), e))
}

/// Runs the job `request` for `instances` on the daemon `daemon_pid` at `address`.
pub async fn run(
    address: &str,
    daemon_pid: u32,
    request: &str,
    instances: &[String],
    list_probe: bool,
) -> Result<DaemonRun, BenchError> {
    let connection = connect(address).await?;
    let probe_connection = connect(address).await?;
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .build()
        .map_err(|e| BenchError::dbus("build a match rule", e))?;
    let mut stream =
        MessageStream::for_match_rule(rule, &connection, std::num::NonZeroUsize::new(1 << 16))
            .await
            .map_err(|e| BenchError::dbus("subscribe to the daemon's signals", e))?;
    // Signals are timestamped as they arrive, also those that come before the job path is known.
    let (signal_tx, mut signals) = mpsc::unbounded_channel::<(Instant, Message)>();
    let drain = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if signal_tx.send((Instant::now(), message)).is_err() {
                break;
            }
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let probe = tokio::spawn(async move {
        if list_probe {
            probe_list_instances(probe_connection, stop_rx).await
        } else {
            Ok(Vec::new())
        }
    });
    let manager = ModuleUpdaterProxy::new(&connection)
        .await
        .map_err(|e| BenchError::dbus("create a ModuleUpdater proxy", e))?;
    let daemon = daemon_pid.to_string();
    let cpu_before = measure::proc_cpu(&daemon).map_err(|e| BenchError::proc(&daemon, e))?;
    measure::reset_peak_rss(daemon_pid).map_err(|e| BenchError::proc(&daemon, e))?;
    let sampler = WorkerSampler::start(daemon_pid, SAMPLE_PERIOD);

    let started = Instant::now();
    let path = manager
        .update_module(request)
        .await
        .map_err(|e| BenchError::dbus("call UpdateModule", e))?;
    let mut progress = Vec::new();
    let mut changes = Vec::new();
    let mut messages = 0;
    let mut timeline = Vec::new();
    let first = instances.first().cloned().unwrap_or_default();
    let deadline = tokio::time::Instant::from_std(started + JOB_TIMEOUT);
    let finished_at = loop {
        let Ok(Some((at, message))) = tokio::time::timeout_at(deadline, signals.recv()).await
        else {
            return Err(BenchError::Check(format!(
                "job {} did not finish within {} s (or the signal stream ended)",
                path.as_str(),
                JOB_TIMEOUT.as_secs()
            )));
        };
        let header = message.header();
        if header.path().map(|p| p.as_str()) != Some(path.as_str()) {
            continue;
        }
        let secs = at.saturating_duration_since(started).as_secs_f64();
        let Some(signal) = JobSignal::decode(&message) else {
            if header
                .member()
                .is_some_and(|m| m.as_str() == "PropertiesChanged")
            {
                changes.push(secs);
            }
            continue;
        };
        let line = match &signal {
            JobSignal::Progress { step, percent, .. } => format!("Progress {step} {percent}"),
            JobSignal::Message { text, .. } => format!("Message {text}"),
            JobSignal::InstanceFinished {
                status, exit_code, ..
            } => format!("InstanceFinished {status} {exit_code}"),
            JobSignal::Finished { .. } => "Finished".to_owned(),
        };
        if signal.instance().is_none_or(|instance| instance == first) {
            timeline.push((secs, line));
        }
        match signal {
            JobSignal::Progress { .. } => progress.push(secs),
            JobSignal::Message { .. } => messages += 1,
            JobSignal::Finished { .. } => break at,
            JobSignal::InstanceFinished { .. } => {}
        }
    };
    let wall_s = finished_at.saturating_duration_since(started).as_secs_f64();
    let _ = stop_tx.send(true);
    let latencies = probe
        .await
        .map_err(|e| BenchError::Check(format!("the ListInstances probe panicked: {e}")))??;
    drain.abort();
    let rss_peak_kib =
        measure::status_kib(daemon_pid, "VmHWM").map_err(|e| BenchError::proc(&daemon, e))?;
    // Workers exit right after reporting; give the daemon a moment to reap the last ones so
    // that their CPU is in its children's times.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let workers = sampler.finish();
    let cpu_after = measure::proc_cpu(&daemon).map_err(|e| BenchError::proc(&daemon, e))?;

    check_result(&connection, &path, instances).await?;
    Ok(DaemonRun {
        wall_s,
        cpu_daemon_s: cpu_after.own_secs() - cpu_before.own_secs(),
        cpu_tree_s: cpu_after.total_secs() - cpu_before.total_secs(),
        workers,
        rss_peak_kib,
        list_instances: Latency {
            calls: latencies.len(),
            p50_ms: measure::percentile(&latencies, 50.0).unwrap_or(f64::NAN),
            p99_ms: measure::percentile(&latencies, 99.0).unwrap_or(f64::NAN),
            max_ms: latencies.iter().copied().fold(0.0, f64::max),
        },
        progress: SignalRate::of(&progress, wall_s),
        properties_changed: SignalRate::of(&changes, wall_s),
        messages,
        timeline,
    })
}

/// The job must have completed with every instance `completed`: numbers of a failed update
/// mean nothing.
async fn check_result(
    connection: &zbus::Connection,
    path: &zbus::OwnedObjectPath,
    instances: &[String],
) -> Result<(), BenchError> {
    let job = JobProxy::builder(connection)
        .path(path.clone())
        .build()
        .await
        .map_err(|e| BenchError::dbus("create a Job proxy", e))?;
    let result = job
        .get_result()
        .await
        .map_err(|e| BenchError::dbus("call GetResult", e))?;
    let value: serde_json::Value = serde_json::from_str(&result)
        .map_err(|e| BenchError::Check(format!("GetResult is not JSON ({e}): {result}")))?;
    let bad: Vec<String> = instances
        .iter()
        .filter(|id| value["instances"][id.as_str()]["status"] != "completed")
        .map(|id| format!("{id}: {}", value["instances"][id.as_str()]))
        .collect();
    if value["status"] != "completed" || !bad.is_empty() {
        return Err(BenchError::Check(format!(
            "the daemon's job {} did not complete: status {}; {}",
            path.as_str(),
            value["status"],
            bad.join("; ")
        )));
    }
    Ok(())
}
