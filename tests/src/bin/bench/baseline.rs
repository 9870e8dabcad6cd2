//! Part (b), NS8's pipeline (`ns8-baseline`) on N instances at once, and the podman floor: the
//! podman commands the daemon runs for one instance, timed alone.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use module_updater_tests::{Instance, Sandbox, cmd};
use module_updaterd::engine::go_runtime;
use serde::Serialize;

use crate::BenchError;
use crate::measure;
use crate::module::Images;

/// What part (b) measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BaselineRun {
    /// From the first start to the last exit.
    pub wall_s: f64,
    /// CPU of every process of the N pipelines (our waited-for children).
    pub cpu_s: f64,
}

/// Runs `ns8-baseline URL` for every instance at once, each as its user, cwd its state dir.
pub fn run(
    sandbox: &Sandbox,
    instances: &[Instance],
    script: &Path,
    url: &str,
) -> Result<BaselineRun, BenchError> {
    let mut children = Vec::new();
    let cpu_before = measure::proc_cpu("self").map_err(|e| BenchError::proc("self", e))?;
    let started = Instant::now();
    for instance in instances {
        let log = sandbox
            .log_dir()
            .join(format!("ns8-baseline-{}.log", instance.id));
        let file = std::fs::File::create(&log).map_err(|e| BenchError::io("create", &log, e))?;
        let file_err = file
            .try_clone()
            .map_err(|e| BenchError::io("dup", &log, e))?;
        let argv = [
            "env".to_owned(),
            format!("AGENT_INSTALL_DIR={}", instance.install_dir.display()),
            "PODMAN_FLAGS=--tls-verify=false".to_owned(),
            script.display().to_string(),
            url.to_owned(),
        ];
        let mut command = sandbox.command_as(instance, &argv);
        command
            .current_dir(&instance.state_dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err);
        let child = command.spawn().map_err(|e| {
            BenchError::Check(format!("cannot start {}: {e}", cmd::describe(&command)))
        })?;
        children.push((instance, log, child));
    }
    let mut failures = Vec::new();
    for (instance, log, child) in &mut children {
        match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => failures.push(format!(
                "{} ({status}): {}",
                instance.id,
                cmd::tail(&std::fs::read(log.as_path()).unwrap_or_default())
            )),
            Err(e) => failures.push(format!("{}: cannot wait: {e}", instance.id)),
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_after = measure::proc_cpu("self").map_err(|e| BenchError::proc("self", e))?;
    if !failures.is_empty() {
        return Err(BenchError::Check(format!(
            "ns8-baseline failed for {} of {} instances: {}",
            failures.len(),
            instances.len(),
            failures.join("; ")
        )));
    }
    for instance in instances {
        let env = instance.read_env()?;
        if env.get("IMAGE_URL").map(String::as_str) != Some(url) {
            return Err(BenchError::Check(format!(
                "ns8-baseline exited 0 but {} has IMAGE_URL={:?}, not {url}",
                instance.id,
                env.get("IMAGE_URL")
            )));
        }
    }
    Ok(BaselineRun {
        wall_s,
        cpu_s: cpu_after.children_secs() - cpu_before.children_secs(),
    })
}

/// The podman commands of one instance's update, timed alone (and the update scripts).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Floor {
    /// The sum of the podman commands' wall times.
    pub podman_s: f64,
    /// The sum of the update-module.d scripts' wall times.
    pub scripts_s: f64,
    /// `Reload` of the instance's systemd manager (not podman, but work every update does).
    pub reload_s: f64,
    /// CPU of all of it.
    pub cpu_s: f64,
    /// Each command: label and seconds.
    pub steps: Vec<(String, f64)>,
}

/// The daemon's podman commands for an instance going from 1.0 to 2.0 with the extra image
/// `demo-db` changing (see daemon/src/engine/podman.rs and update.rs), in its order: one
/// listing, the pull of the module image, one inspect, `podman image save` of the module image
/// (its one layer is the filesystem the daemon reads: `engine/image_stream.rs`; to /dev/null
/// here, writing the files is the daemon's own work), the pull of the missing extra image, and
/// the removal of the two stale images in one command. Timed one after the other: the daemon
/// pulls the extra image while it reads the module image, so its wall time can be below this.
/// Then, apart from
/// the podman floor, the manager's `Reload` (busctl, as the user) and the update scripts as the
/// daemon runs them (cwd the state dir, the environment loaded). podman gets the Go
/// settings the daemon gives them (`engine/go_runtime.rs`), the rest does not. Each step is
/// timed inside one shell (`EPOCHREALTIME`), so no process start of ours is counted.
const FLOOR_SCRIPT: &str = r#"set -u
v2=$1 db2=$2 v1=$3 db1=$4
step() {
  local label=$1; shift
  local s=$EPOCHREALTIME
  "$@" >/dev/null 2>>"$HOME/floor.err" </dev/null
  local rc=$? e=$EPOCHREALTIME
  printf '%s %s %s %s\n' "$label" "$s" "$e" "$rc"
}
step podman-image-list podman image list --format json
step podman-pull-module podman pull --quiet -- "$v2"
step podman-image-inspect podman image inspect -- "$v2"
step podman-image-save podman image save --format docker-archive -- "$v2"
step podman-pull-extra podman pull --quiet -- "$db2"
step podman-image-rm podman image rm -- "$v1" "$db1"
unset GOGC GOMEMLIMIT
step reload busctl --user call org.freedesktop.systemd1 /org/freedesktop/systemd1 \
  org.freedesktop.systemd1.Manager Reload
while IFS= read -r line; do [[ $line == *=* ]] && export "${line%%=*}=${line#*=}"; done < ./environment
export IMAGE_URL=$v2 PREV_IMAGE_URL=$v1
for script in "$AGENT_INSTALL_DIR"/update-module.d/*; do
  step "script-${script##*/}" "$script"
done
"#;

/// Measures the floor on `instance` (installed at 1.0; it is at 2.0's images afterwards).
pub fn measure(
    sandbox: &Sandbox,
    instance: &Instance,
    images: &Images,
) -> Result<Floor, BenchError> {
    let mut argv = vec![
        "env".to_owned(),
        format!("AGENT_INSTALL_DIR={}", instance.install_dir.display()),
    ];
    argv.extend(go_settings());
    argv.extend([
        "bash".to_owned(),
        "-c".to_owned(),
        FLOOR_SCRIPT.to_owned(),
        "floor".to_owned(),
        images.v2.clone(),
        images.db2.clone(),
        images.v1.clone(),
        images.db1.clone(),
    ]);
    let mut command = sandbox.command_as(instance, &argv);
    command.current_dir(&instance.state_dir);
    let cpu_before = measure::proc_cpu("self").map_err(|e| BenchError::proc("self", e))?;
    let output = cmd::output(&mut command)?;
    let cpu_after = measure::proc_cpu("self").map_err(|e| BenchError::proc("self", e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut floor = Floor {
        cpu_s: cpu_after.children_secs() - cpu_before.children_secs(),
        ..Floor::default()
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = match fields.as_slice() {
            [label, start, end, rc] => start
                .parse::<f64>()
                .ok()
                .zip(end.parse::<f64>().ok())
                .map(|(s, e)| (*label, e - s, *rc)),
            _ => None,
        };
        let Some((label, secs, rc)) = parsed else {
            return Err(BenchError::Check(format!(
                "unexpected line from the floor script: {line:?}"
            )));
        };
        if rc != "0" {
            let errors = std::fs::read(instance.home.join("floor.err")).unwrap_or_default();
            return Err(BenchError::Check(format!(
                "floor step {label} failed (exit code {rc}) as {}: {}",
                instance.id,
                cmd::tail(&errors)
            )));
        }
        if label.starts_with("podman") || label.starts_with("skopeo") {
            floor.podman_s += secs;
        } else if label == "reload" {
            floor.reload_s += secs;
        } else {
            floor.scripts_s += secs;
        }
        floor.steps.push((label.to_owned(), secs));
    }
    // Every `step` line of the script, and at least one update script.
    let expected = FLOOR_SCRIPT
        .lines()
        .filter(|l| l.starts_with("step "))
        .count()
        + 1;
    if floor.steps.len() < expected {
        return Err(BenchError::Check(format!(
            "the floor script ended early ({}): {}",
            output.status,
            cmd::tail(&output.stderr)
        )));
    }
    Ok(floor)
}

/// `NAME=value` of the Go settings the daemon gives podman: the sandbox starts it with a clean
/// environment, so none of its own.
fn go_settings() -> Vec<String> {
    go_runtime::settings(|_| false)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}
