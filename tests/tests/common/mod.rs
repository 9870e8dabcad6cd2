//! Helpers shared by the end-to-end test files: a sandbox with the daemon running on its bus, and
//! running a job the way a careful client does (subscribe first, confirm the end by property).

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use module_updater_dbus::{BUS_NAME, JOB_INTERFACE, JobProxy, JobSignal, ModuleUpdaterProxy};
use module_updater_tests::{Daemon, ImageSpec, Instance, Sandbox};
use serde_json::Value;
use zbus::{MatchRule, MessageStream, OwnedObjectPath};

mod scenario;
pub use scenario::{DaemonOptions, INSTALL_THREADS, Images, Scenario, ScenarioBuilder, SetupTimes};

/// The steps of an update, in the order they run, by the names the bus and the client show.
/// `pull-extra-images` is reported between the pull and the extraction, even when no extra image
/// is missing.
pub const UPDATE_STEPS: [&str; 10] = [
    "prepare",
    "pull-image",
    "pull-extra-images",
    "extract",
    "reload",
    "update-environment",
    "run-scripts",
    "module-step",
    "health-gate",
    "cleanup-images",
];

/// How long any single job in these tests may take.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// The daemon options every test uses on top of the sandbox's (which has the bus, the bases, a
/// private state dir and config): for rootful instances, the sandbox's private root podman storage.
pub fn daemon_args(sandbox: &Sandbox) -> Vec<String> {
    let mut args = Vec::new();
    for arg in sandbox.rootful_podman_args() {
        args.push(format!("--rootful-podman-arg={arg}"));
    }
    args
}

/// Starts the daemon on the sandbox's bus with [`daemon_args`] and `extra`: for a test that
/// holds a daemon of its own besides its [`Scenario`]'s (a restart while it borrows the scenario).
pub fn start_daemon(sandbox: &Sandbox, extra: &[&str]) -> Daemon {
    start_daemon_with_options(sandbox, DaemonOptions::new().args(extra))
}

/// [`start_daemon`] with everything [`DaemonOptions`] says.
pub fn start_daemon_with_options(sandbox: &Sandbox, options: DaemonOptions) -> Daemon {
    let command = scenario::daemon_command(sandbox, &Images::default(), &[], &options);
    sandbox
        .start_daemon_with(command)
        .expect("start module-updaterd")
}

/// `busctl --address=<sandbox bus> ARGS`.
pub fn busctl(sandbox: &Sandbox, args: &[&str]) -> std::process::Output {
    std::process::Command::new("busctl")
        .arg(format!("--address={}", sandbox.bus_address()))
        .args(args)
        .output()
        .unwrap()
}

/// `gdbus call` of `method` (interface.Member) on the service's object at `path`, as root.
pub fn gdbus_call(
    sandbox: &Sandbox,
    path: &str,
    method: &str,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new("gdbus")
        .args([
            "call",
            "--address",
            &sandbox.bus_address(),
            "--dest",
            BUS_NAME,
        ])
        .args(["--object-path", path, "--method", method])
        .args(args)
        .output()
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub async fn connect(sandbox: &Sandbox) -> zbus::Connection {
    zbus::connection::Builder::address(sandbox.bus_address().as_str())
        .build()
        .await
        .expect("connect to the sandbox bus")
}

/// A finished job.
#[derive(Debug)]
pub struct JobRun {
    pub path: OwnedObjectPath,
    pub status: String,
    pub exit_code: i32,
    pub result: Value,
    pub seen: Vec<JobSignal>,
}

impl JobRun {
    pub fn instance(&self, id: &str) -> &Value {
        &self.result["instances"][id]
    }

    /// The Progress percents of one instance, in order. The job's signal budget may replace an
    /// instance's last Progress by its InstanceFinished, which stands for 100 whatever its status
    /// (the engine ends every instance's progress at 100, failed ones included).
    pub fn progress_of(&self, id: &str) -> Vec<u32> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                JobSignal::Progress {
                    instance, percent, ..
                } if instance == id => Some(*percent),
                JobSignal::InstanceFinished { instance, .. } if instance == id => Some(100),
                _ => None,
            })
            .collect()
    }

    pub fn messages_of(&self, id: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                JobSignal::Message { instance, text, .. } if instance == id => Some(text.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Subscribes to every job signal of the service; call before `UpdateModule`.
pub async fn subscribe(connection: &zbus::Connection) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .interface(JOB_INTERFACE)
        .build()
        .expect("a valid match rule");
    MessageStream::for_match_rule(rule, connection, std::num::NonZeroUsize::new(4096))
        .await
        .expect("subscribe to job signals")
}

/// Calls UpdateModule; the D-Bus error on refusal.
pub async fn submit(connection: &zbus::Connection, request: &str) -> zbus::Result<OwnedObjectPath> {
    ModuleUpdaterProxy::new(connection)
        .await?
        .update_module(request)
        .await
}

/// Follows a job to its end from a stream opened before it was submitted.
pub async fn follow(
    connection: &zbus::Connection,
    stream: &mut MessageStream,
    path: OwnedObjectPath,
) -> JobRun {
    let mut seen = Vec::new();
    let job = JobProxy::builder(connection)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(Some(Ok(message))) = next else {
            panic!(
                "job {} did not finish within {JOB_TIMEOUT:?}; seen: {seen:#?}",
                path.as_str()
            );
        };
        let header = message.header();
        if header.path().map(|p| p.as_str()) != Some(path.as_str()) {
            continue;
        }
        let Some(item) = JobSignal::decode(&message) else {
            continue;
        };
        let done = matches!(item, JobSignal::Finished { .. });
        seen.push(item);
        if done {
            break;
        }
    }
    // The end is confirmed by the properties and the result, not by the signal alone.
    let status = job.status().await.unwrap();
    let exit_code = job.exit_code().await.unwrap();
    let result: Value = serde_json::from_str(&job.get_result().await.unwrap()).unwrap();
    JobRun {
        path,
        status,
        exit_code,
        result,
        seen,
    }
}

/// Submits `request` and follows the job to its end.
pub async fn run_job(connection: &zbus::Connection, request: &str) -> JobRun {
    let mut stream = subscribe(connection).await;
    let path = submit(connection, request).await.expect("UpdateModule");
    follow(connection, &mut stream, path).await
}

pub fn request(url: &str, instances: &[&str], force: bool) -> String {
    serde_json::json!({"module_url": url, "instances": instances, "force": force}).to_string()
}

/// A listing of a tree: relative path → (mode, contents or link target), for before/after checks.
pub fn snapshot(root: &std::path::Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            // An entry that vanished between readdir and stat (a lock or temporary file of
            // a process running beside the test) was never part of the tree.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let content = if meta.file_type().is_symlink() {
                let Ok(target) = std::fs::read_link(&path) else {
                    continue;
                };
                target.display().to_string().into_bytes()
            } else if meta.is_file() {
                std::fs::read(&path).unwrap_or_default()
            } else {
                Vec::new()
            };
            if meta.is_dir() && !meta.file_type().is_symlink() {
                stack.push(path.clone());
            }
            out.insert(rel, (meta.mode(), content));
        }
    }
    out
}

/// A demo module image: an imageroot with a unit file and an update script, labels for extras.
pub fn module_image(repo: &str, tag: &str, extras: &[String]) -> ImageSpec {
    ImageSpec::module(repo, tag)
        .file(
            "systemd/user/demo.service",
            format!(
                "[Unit]\nDescription=demo {tag}\n[Service]\nType=oneshot\nExecStart=/bin/true\n"
            ),
            0o644,
        )
        .file("bin/version", format!("{tag}\n"), 0o755)
        .label("org.nethserver.images", extras.join(" "))
}

/// Runs a command as the instance user and returns its stdout (panics with stderr on failure).
pub fn as_user(sandbox: &Sandbox, instance: &Instance, argv: &[&str]) -> String {
    let output = sandbox
        .run_as(instance, argv)
        .expect("run as the instance user");
    assert!(
        output.status.success(),
        "{argv:?} as {} failed: {}",
        instance.id,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether the instance's storage has an image named `reference` (`podman image exists`).
pub fn has_image(sandbox: &Sandbox, instance: &Instance, reference: &str) -> bool {
    sandbox
        .run_as(instance, &["podman", "image", "exists", reference])
        .unwrap()
        .status
        .success()
}

/// What a user checks to tell two copies of images apart: id, digest, repository digests and
/// tags of each of `references` in the instance's storage.
pub fn image_identity(sandbox: &Sandbox, instance: &Instance, references: &[&str]) -> String {
    let format = "{{.Id}} {{.Digest}} {{.RepoDigests}} {{.RepoTags}}";
    let mut argv = vec!["podman", "image", "inspect", "--format", format];
    argv.extend_from_slice(references);
    as_user(sandbox, instance, &argv)
}
