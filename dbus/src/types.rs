//! Wire types that travel as JSON: the per-instance result (`GetResult`), the job result, and the
//! step names of `Progress` signals. Plain serde types, shared by the engine, the daemon and the client.

use serde::{Deserialize, Serialize};

/// The steps of an update, as named in `Progress` signals and in failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Lock the instance, read its environment, decide whether there is work.
    Prepare,
    PullImage,
    PullExtraImages,
    Extract,
    Reload,
    UpdateEnvironment,
    RunScripts,
    /// An executable the module ships in `actions/update-module/`.
    ModuleStep,
    /// The health gate after the scripts and module steps (`HealthReport`).
    HealthGate,
    /// A rollback puts the kept previous files and environment back.
    Restore,
    CleanupImages,
}

impl Step {
    /// The wire name (`pull-image`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::PullImage => "pull-image",
            Step::PullExtraImages => "pull-extra-images",
            Step::Extract => "extract",
            Step::Reload => "reload",
            Step::UpdateEnvironment => "update-environment",
            Step::RunScripts => "run-scripts",
            Step::ModuleStep => "module-step",
            Step::HealthGate => "health-gate",
            Step::Restore => "restore",
            Step::CleanupImages => "cleanup-images",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one instance's update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceStatus {
    Completed,
    AlreadyInstalled,
    Failed,
    Cancelled,
    /// The update ran to its end but the instance failed the health gate (`health` says why).
    Unhealthy,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Completed => "completed",
            InstanceStatus::AlreadyInstalled => "already-installed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
            InstanceStatus::Unhealthy => "unhealthy",
        }
    }

    /// The exit code NS8 would report for this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            InstanceStatus::Completed | InstanceStatus::AlreadyInstalled => 0,
            InstanceStatus::Failed | InstanceStatus::Unhealthy => 1,
            InstanceStatus::Cancelled => -1,
        }
    }
}

/// How one script (or module step) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScriptStatus {
    /// Exit code 0.
    Ok,
    /// Non-zero exit, or killed by a signal (exit code -1).
    Failed,
    /// Killed after the per-script timeout.
    Timeout,
    /// Killed because the job was cancelled.
    Cancelled,
}

/// The outcome of one `update-module.d` script or module step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptOutcome {
    /// File name, e.g. `80restart`.
    pub name: String,
    pub status: ScriptStatus,
    /// The exit code; `None` after a timeout or cancel, -1 when killed by a signal.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
}

/// Why an instance's update failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub step: Step,
    pub reason: String,
}

/// The result of updating one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceResult {
    pub status: InstanceStatus,
    pub exit_code: i32,
    pub old_image_url: Option<String>,
    pub new_image_url: Option<String>,
    pub old_image_digest: Option<String>,
    pub new_image_digest: Option<String>,
    pub scripts: Vec<ScriptOutcome>,
    /// How many imageroot entries were installed.
    pub files_installed: usize,
    /// Entries of the previous imageroot that the new one no longer ships, removed.
    pub files_removed: Vec<String>,
    pub images_removed: Vec<String>,
    pub warnings: Vec<String>,
    pub error: Option<Failure>,
    /// The health gate's report; `None` when the gate did not run (nothing was installed, or
    /// the update failed before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// The update failed and the instance was rolled back to the kept previous version
    /// (`rollback_on_failure`); `rollback_reason` says why.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<String>,
}

/// What the health gate found, part by part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Whether every part passed.
    pub passed: bool,
    /// The `health_timeout` the gate ran within, in seconds.
    pub timeout_secs: u64,
    /// How long the gate took.
    pub duration_ms: u64,
    /// Part 1: each unit that was active before the update or that the instance has enabled,
    /// as the instance's systemd manager last reported it.
    pub units: Vec<UnitHealth>,
    /// Part 2: the running containers of the instance that still use an image the update
    /// replaced (empty when the part passed).
    pub stale_containers: Vec<StaleContainer>,
    /// Part 3: the readiness checks of `health.d/`, if the module ships any.
    pub readiness: Option<ReadinessReport>,
    /// What failed, one sentence each (empty when the gate passed).
    #[serde(default)]
    pub problems: Vec<String>,
}

/// One unit the gate checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitHealth {
    pub unit: String,
    /// `ActiveState`, `SubState` and `Result` (empty for a unit type without one).
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
    /// Why it was checked: `was-active` (active before the update) or `enabled`.
    pub reason: String,
    pub healthy: bool,
}

/// A running container whose image the update replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleContainer {
    /// The container's name and id.
    pub name: String,
    pub id: String,
    /// The image it runs, as podman names it, and the replaced reference it matched.
    pub image: String,
    pub replaced: String,
}

/// The readiness checks: every executable of `health.d/`, run until all exit 0 in one try.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessReport {
    pub passed: bool,
    /// How many times the checks ran.
    pub tries: u32,
    /// The outcomes of the last try.
    pub checks: Vec<ScriptOutcome>,
}

impl InstanceResult {
    /// A result with only a status (and its exit code) set.
    pub fn new(status: InstanceStatus) -> Self {
        InstanceResult {
            status,
            exit_code: status.exit_code(),
            old_image_url: None,
            new_image_url: None,
            old_image_digest: None,
            new_image_digest: None,
            scripts: Vec::new(),
            files_installed: 0,
            files_removed: Vec::new(),
            images_removed: Vec::new(),
            warnings: Vec::new(),
            error: None,
            health: None,
            rolled_back: false,
            rollback_reason: None,
        }
    }

    /// A failed result at `step`.
    pub fn failed(step: Step, reason: impl Into<String>) -> Self {
        let mut result = InstanceResult::new(InstanceStatus::Failed);
        result.error = Some(Failure {
            step,
            reason: reason.into(),
        });
        result
    }
}

/// What an instance is doing, as its object's `State` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// No job of this daemon holds it.
    Idle,
    /// A job of this daemon updates it (`Job` names the job).
    Updating,
    /// What a previous daemon started on it is still ending; an update waits for that.
    Recovering,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Idle => "idle",
            InstanceState::Updating => "updating",
            InstanceState::Recovering => "recovering",
        }
    }
}

/// Where one instance of a job stands, as the job's `InstanceStates` property says it: `pending`
/// until its worker starts, `running`, then the [`InstanceStatus`] it ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobInstanceStatus {
    Pending,
    Running,
    Ended(InstanceStatus),
}

impl JobInstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobInstanceStatus::Pending => "pending",
            JobInstanceStatus::Running => "running",
            JobInstanceStatus::Ended(status) => status.as_str(),
        }
    }
}

/// One entry of an instance's update history (`GetHistory`, the instance's `LastUpdate`): one
/// finished update of that instance, kept on disk across restarts and after its job is gone: the
/// job's facts and the instance's result, its fields at the same level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The job's number (its object was `/org/nethserver/ModuleUpdater/job/<job>`).
    pub job: u64,
    /// `update-module`.
    pub action: String,
    /// µs since the epoch.
    pub started_usec: u64,
    pub finished_usec: u64,
    /// Who started the job.
    pub caller_uid: u32,
    #[serde(flatten)]
    pub result: InstanceResult,
}

/// The repository and tag of an image URL: `ghcr.io/nethserver/mail:1.7.1@sha256:…` →
/// (`ghcr.io/nethserver/mail`, `1.7.1`). The tag is empty when the URL has none; a registry
/// port (`127.0.0.1:5000/mail`) is not a tag.
pub fn repository_and_tag(url: &str) -> (&str, &str) {
    let named = url.split_once('@').map_or(url, |(name, _)| name);
    let last_slash = named.rfind('/').map_or(0, |i| i + 1);
    match named[last_slash..].rfind(':') {
        Some(colon) => {
            let colon = last_slash + colon;
            (&named[..colon], &named[colon + 1..])
        }
        None => (named, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_and_tag_of_urls() {
        assert_eq!(
            repository_and_tag("ghcr.io/nethserver/mail:1.7.1"),
            ("ghcr.io/nethserver/mail", "1.7.1")
        );
        assert_eq!(
            repository_and_tag("127.0.0.1:5000/mail:2.0@sha256:ab"),
            ("127.0.0.1:5000/mail", "2.0")
        );
        assert_eq!(
            repository_and_tag("127.0.0.1:5000/mail"),
            ("127.0.0.1:5000/mail", "")
        );
        assert_eq!(repository_and_tag("mail@sha256:ab"), ("mail", ""));
        assert_eq!(repository_and_tag(""), ("", ""));
    }
}
