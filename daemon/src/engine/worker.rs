//! One worker process per instance update.
//!
//! The daemon starts its own executable in worker mode, as root, with a clean environment and the
//! job on stdin. The worker drops to the instance's uid, gid and supplementary groups before it
//! reads or runs anything of the instance, asks to be killed with the daemon, runs the update and
//! writes one JSON [`Event`] per line on stdout. It starts as root and drops privileges itself so
//! that the daemon binary need not be reachable by the instance user.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use module_updater_dbus::types::{InstanceResult, InstanceStatus, Step};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::events::{Event, priority};
use super::scope::Scopes;
use super::scratch;
use super::update::{self, UpdateJob};

/// The first argument that starts the daemon binary in worker mode.
pub const WORKER_ARG: &str = "--worker";

/// How long a cancelled worker gets between SIGTERM and SIGKILL.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Environment variables passed through to rootful workers, so an administrator (or a test) can
/// point root podman at another storage or registry configuration.
const PODMAN_PASSTHROUGH: [&str; 3] = [
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_CONF",
    "CONTAINERS_REGISTRIES_CONF",
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The clean environment of a worker (and, with the environment file on top, of its scripts).
pub fn worker_environment(job: &UpdateJob) -> BTreeMap<String, String> {
    let instance = &job.instance;
    let mut env = BTreeMap::new();
    if let Some(file_env) = instance.environment() {
        env.extend(file_env.iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
    }
    let user = if instance.rootless {
        instance.id.as_str()
    } else {
        "root"
    };
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    let fixed = [
        ("PATH", path),
        ("HOME", instance.home.display().to_string()),
        ("USER", user.to_owned()),
        ("LOGNAME", user.to_owned()),
        ("LANG", "C.UTF-8".to_owned()),
        ("AGENT_ID", format!("module/{}", instance.id)),
        (
            "AGENT_INSTALL_DIR",
            instance.install_dir.display().to_string(),
        ),
        ("AGENT_STATE_DIR", instance.state_dir.display().to_string()),
    ];
    env.extend(fixed.into_iter().map(|(k, v)| (k.to_owned(), v)));
    if let Some(runtime_dir) = &instance.runtime_dir {
        env.insert("XDG_RUNTIME_DIR".into(), runtime_dir.display().to_string());
    }
    // An admin's choice for podman's garbage collector (`engine/go_runtime.rs`).
    pass_through(&mut env, &super::go_runtime::VARIABLES);
    pass_through(&mut env, crate::failpoint::passed_to_workers());
    if !instance.rootless {
        pass_through(&mut env, &PODMAN_PASSTHROUGH);
    }
    env
}

/// Copies the daemon's own value of each of `keys` that it has into `env`.
fn pass_through(env: &mut BTreeMap<String, String>, keys: &[&str]) {
    for key in keys {
        if let Ok(value) = std::env::var(key) {
            env.insert((*key).to_owned(), value);
        }
    }
}

/// Daemon side: updates one instance in a worker process and returns its result. `on_event` gets
/// every event as it arrives; the final `Finished` event's result is returned instead. The worker
/// runs in a systemd scope of its own ([`Scopes`]), created before it reads its job and stopped
/// (empty) before this returns.
pub async fn update_instance(
    worker_exe: &Path,
    scopes: &Scopes,
    job: &UpdateJob,
    cancel: watch::Receiver<bool>,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> InstanceResult {
    let spawned = Command::new(worker_exe)
        // Named as the daemon in `ps`, whatever path started it (e.g. /proc/self/exe).
        .arg0("module-updaterd")
        .arg(WORKER_ARG)
        .env_clear()
        .envs(worker_environment(job))
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            return InstanceResult::failed(
                Step::Prepare,
                format!("cannot start the worker {}: {err}", worker_exe.display()),
            );
        }
    };
    let Some(raw_pid) = child.id() else {
        return InstanceResult::failed(Step::Prepare, "the worker ended at once".to_owned());
    };
    let pid = Some(Pid::from_raw(raw_pid as i32));
    // The worker waits for its job on stdin: it is in its scope before it does anything.
    let scope = match scopes.contain(job.job_id, &job.instance.id, raw_pid).await {
        Ok(scope) => scope,
        Err(err) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return InstanceResult::failed(Step::Prepare, err.to_string());
        }
    };
    let result = run_contained(child, pid, job, cancel, on_event).await;
    finish_scope(scopes, scope.as_deref(), &job.instance.id, result).await
}

/// Stops the update's scope (if it has one) and returns once nothing of the update runs any
/// more; a scope the manager could not stop is a warning of the result.
async fn finish_scope(
    scopes: &Scopes,
    scope: Option<&str>,
    instance: &str,
    mut result: InstanceResult,
) -> InstanceResult {
    if let Some(unit) = scope
        && let Err(err) = scopes.stop(unit).await
    {
        log::error!(MODULE_ID = instance; "{err}");
        result.warnings.push(err.to_string());
    }
    result
}

/// Feeds the job to the started worker, follows its events until it ends, and cleans up after it.
async fn run_contained(
    mut child: tokio::process::Child,
    pid: Option<Pid>,
    job: &UpdateJob,
    mut cancel: watch::Receiver<bool>,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> InstanceResult {
    let job_json = match serde_json::to_vec(job) {
        Ok(json) => json,
        Err(err) => {
            return InstanceResult::failed(Step::Prepare, format!("cannot encode the job: {err}"));
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // The worker reads the whole job before it does anything; a failed write shows as its exit.
        let _ = stdin.write_all(&job_json).await;
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return InstanceResult::failed(Step::Prepare, "the worker has no output pipes".to_owned());
    };
    let id = job.instance.id.clone();
    let stderr_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            log::debug!(MODULE_ID = id.as_str(); "worker: {line}");
            tail.push(line);
            if tail.len() > super::command::TAIL_LINES {
                tail.remove(0);
            }
        }
        tail.join(" | ")
    });

    let mut lines = BufReader::new(stdout).lines();
    let mut result: Option<InstanceResult> = None;
    let mut last_step = Step::Prepare;
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = kill_at
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match serde_json::from_str::<Event>(&line) {
                    Ok(Event::Finished { result: finished }) => result = Some(*finished),
                    Ok(event) => {
                        if let Event::StepStarted { step } = &event {
                            last_step = *step;
                        }
                        on_event(event);
                    }
                    Err(_) => on_event(Event::Message { priority: priority::DEBUG, text: line }),
                },
                _ => break,
            },
            changed = cancel.changed(), if kill_at.is_none() => {
                if changed.is_ok() && *cancel.borrow() {
                    if let Some(pid) = pid {
                        let _ = killpg(pid, Signal::SIGTERM);
                    }
                    kill_at = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                }
            }
            _ = tokio::time::sleep_until(deadline), if kill_at.is_some() => {
                if let Some(pid) = pid {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
                kill_at = None;
            }
        }
    }
    let status = child.wait().await;
    // What the worker started in its own process group (podman) must not outlive it: a podman
    // export left behind by a killed worker would hold its container for ever.
    if let Some(pid) = pid {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    // Nothing of the update runs any more: what a killed worker left in /var/tmp goes now, not
    // at the instance's next update.
    let (id, uid) = (job.instance.id.clone(), job.instance.uid);
    let _ = tokio::task::spawn_blocking(move || {
        scratch::remove_left_by(Path::new(scratch::PARENT), &id, uid);
    })
    .await;
    let stderr_tail = stderr_task.await.unwrap_or_default();
    match result {
        // The cancel's SIGTERM may stop a podman or script process before the worker itself
        // notices the cancel: a step that failed after a cancel was asked for was cancelled.
        Some(mut result) if *cancel.borrow() && result.status == InstanceStatus::Failed => {
            if let Some(failure) = result.error.take() {
                result.warnings.push(format!(
                    "cancelled during {}: {}",
                    failure.step, failure.reason
                ));
            }
            result.status = InstanceStatus::Cancelled;
            result.exit_code = InstanceStatus::Cancelled.exit_code();
            result
        }
        Some(result) => result,
        None if *cancel.borrow() => InstanceResult::new(InstanceStatus::Cancelled),
        None => {
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            InstanceResult::failed(
                last_step,
                format!("the worker process ended without a result ({status}): {stderr_tail}"),
            )
        }
    }
}

/// Worker side: the whole life of a worker process. Returns the process exit code.
pub fn worker_main() -> i32 {
    let mut input = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("<3>worker: cannot read the job: {err}");
        return 1;
    }
    let job: UpdateJob = match serde_json::from_slice(&input) {
        Ok(job) => job,
        Err(err) => {
            eprintln!("<3>worker: invalid job: {err}");
            return 1;
        }
    };
    let finished = |result: InstanceResult| {
        emit_line(&Event::Finished {
            result: Box::new(result),
        });
        0
    };
    if let Err(err) = lower_priority(job.nice) {
        emit_line(&Event::Message {
            priority: priority::WARNING,
            text: format!(
                "cannot lower the update's CPU priority to nice {}: {err}",
                job.nice
            ),
        });
    }
    if let Err(reason) = become_instance_user(&job) {
        return finished(InstanceResult::failed(Step::Prepare, reason));
    }
    if let Err(err) = std::env::set_current_dir(&job.instance.state_dir) {
        return finished(InstanceResult::failed(
            Step::Prepare,
            format!(
                "cannot enter the state dir {}: {err}",
                job.instance.state_dir.display()
            ),
        ));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return finished(InstanceResult::failed(
                Step::Prepare,
                format!("no async runtime: {err}"),
            ));
        }
    };
    let result = runtime.block_on(async {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        // SIGTERM (a cancel, or the daemon's death) stops the update at the next safe point and
        // kills the running script's process group.
        if let Ok(mut sigterm) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::spawn(async move {
                sigterm.recv().await;
                let _ = cancel_tx.send(true);
            });
        }
        let mut emit = |event: Event| {
            emit_line(&event);
            if let Event::StepStarted { step } = &event {
                crate::failpoint::step_started(crate::failpoint::Process::Worker, *step);
            }
        };
        update::run(&job, cancel_rx, &mut emit).await
    });
    finished(result)
}

/// Sets this process's niceness (inherited by podman and the scripts): an update is background
/// work, and the daemon must go on answering the bus while workers keep the CPUs busy.
fn lower_priority(nice: u8) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours.
    let rc =
        unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, nix::libc::c_int::from(nice)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn emit_line(event: &Event) {
    if let Ok(mut line) = serde_json::to_vec(event) {
        line.push(b'\n');
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&line);
        let _ = stdout.flush();
    }
}

/// Drops to the instance's credentials (rootless) and asks for SIGTERM when the daemon dies.
fn become_instance_user(job: &UpdateJob) -> Result<(), String> {
    let instance = &job.instance;
    if instance.rootless {
        if instance.uid == 0 {
            return Err("refusing to run a rootless instance as root".to_owned());
        }
        let name = CString::new(instance.id.as_str()).map_err(|e| e.to_string())?;
        let gid = Gid::from_raw(instance.gid);
        let groups = nix::unistd::getgrouplist(&name, gid)
            .map_err(|e| format!("cannot read the groups of {}: {e}", instance.id))?;
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setgid(gid).map_err(|e| format!("setgid {gid}: {e}"))?;
        nix::unistd::setuid(Uid::from_raw(instance.uid))
            .map_err(|e| format!("setuid {}: {e}", instance.uid))?;
        if nix::unistd::geteuid().is_root() || nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err("could not drop root privileges".to_owned());
        }
    }
    // Set after the uid change, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| format!("prctl: {e}"))?;
    if nix::unistd::getppid() == Pid::from_raw(1) {
        return Err("the daemon is gone".to_owned());
    }
    Ok(())
}
