//! The human summary of a finished job (or of one instance's past update): what went wrong first,
//! each instance's image change, status, warnings, failed scripts and what was removed, and how
//! to see more. `update`, `wait` and `status` print it; an instance's block is reusable for a
//! history entry ([`instance_block`]).

use std::collections::BTreeMap;
use unicode_width::UnicodeWidthStr;

use module_updater_dbus::types::{InstanceResult, InstanceStatus, ScriptOutcome, ScriptStatus};
use serde::Deserialize;

use crate::clock::{Clock, duration_text};

/// `GetResult` of a job, as the service sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct JobResult {
    pub status: String,
    pub exit_code: i32,
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceResult>,
    /// Why the job as a whole ended abnormally (`interrupted`).
    #[serde(default)]
    pub error: Option<String>,
}

impl JobResult {
    pub fn parse(text: &str) -> Option<JobResult> {
        serde_json::from_str(text).ok()
    }
}

/// What the summary says about the job besides its result.
#[derive(Debug, Clone, Copy)]
pub struct JobTimes {
    pub id: u64,
    pub started_usec: u64,
    pub finished_usec: u64,
}

/// The journal field the daemon tags a job's messages with.
pub const JOURNAL_JOB_FIELD: &str = "MODULE_UPDATER_JOB";

/// Where the rest is: the result JSON and the journal of the job.
pub fn more_lines(job: u64) -> String {
    format!(
        "More: module-updater status {job} --json\n      journalctl -u module-updaterd {JOURNAL_JOB_FIELD}={job}\n"
    )
}

/// The order of the blocks: failures first, then updates with warnings, then the rest.
fn rank(result: &InstanceResult) -> u8 {
    match result.status {
        InstanceStatus::Failed | InstanceStatus::Unhealthy => 0,
        InstanceStatus::Cancelled => 1,
        _ if !result.warnings.is_empty() => 2,
        InstanceStatus::Completed => 3,
        InstanceStatus::AlreadyInstalled => 4,
    }
}

/// The summary of a finished job. `order` is the job's instance order (ties keep it).
pub fn job_summary(job: &JobTimes, result: &JobResult, order: &[String], clock: &Clock) -> String {
    let mut out = format!(
        "Job {} {} (exit code {})",
        job.id, result.status, result.exit_code
    );
    if let Some(error) = &result.error {
        out.push_str(&format!(": {error}"));
    }
    out.push('\n');
    if job.started_usec != 0 {
        out.push_str(&format!("  started {}", clock.usec(job.started_usec)));
        if job.finished_usec >= job.started_usec {
            let secs = (job.finished_usec - job.started_usec) / 1_000_000;
            out.push_str(&format!(", took {}", duration_text(secs)));
        }
        out.push('\n');
    }
    out.push_str(&instances_and_more(job.id, result, order));
    out
}

/// The instance blocks, failures first, then where to see more: the part of the summary that
/// `status` prints below its own table.
pub fn instances_and_more(job: u64, result: &JobResult, order: &[String]) -> String {
    let mut out = String::new();
    let position = |id: &str| order.iter().position(|o| o == id).unwrap_or(usize::MAX);
    let mut instances: Vec<(&String, &InstanceResult)> = result.instances.iter().collect();
    instances.sort_by_key(|(id, r)| (rank(r), position(id)));
    let width = instances
        .iter()
        .map(|(id, _)| UnicodeWidthStr::width(id.as_str()))
        .max()
        .unwrap_or(0);
    for (id, r) in instances {
        out.push('\n');
        out.push_str(&instance_block(id, r, width));
    }
    let missing: Vec<&str> = order
        .iter()
        .filter(|id| !result.instances.contains_key(*id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        out.push_str(&format!("\nNo result for: {}\n", missing.join(" ")));
    }
    out.push('\n');
    out.push_str(&more_lines(job));
    out
}

/// One instance: `id  status` then indented lines (image change, error, warnings, failed
/// scripts, removals). `width` aligns the ids of a job.
pub fn instance_block(id: &str, result: &InstanceResult, width: usize) -> String {
    let pad = width.saturating_sub(UnicodeWidthStr::width(id));
    let indent = " ".repeat(width + 2);
    let mut out = format!("{id}{}  {}\n", " ".repeat(pad), headline(result));
    let mut detail = |text: String| {
        out.push_str(&indent);
        out.push_str(&text);
        out.push('\n');
    };
    detail(image_change(result));
    if let Some(error) = &result.error {
        detail(format!("error: {}", error.reason));
    }
    let failed: Vec<&ScriptOutcome> = result
        .scripts
        .iter()
        .filter(|s| s.status != ScriptStatus::Ok)
        .collect();
    for warning in &result.warnings {
        // A failed script's warning is said by the scripts line below.
        if failed
            .iter()
            .any(|s| warning.contains(&format!("/{} has failed", s.name)))
        {
            continue;
        }
        detail(format!("warning: {warning}"));
    }
    if !failed.is_empty() {
        let list: Vec<String> = failed.iter().map(|s| script_text(s)).collect();
        detail(format!(
            "scripts: {} of {} did not succeed: {}",
            failed.len(),
            result.scripts.len(),
            list.join(", ")
        ));
    }
    if let Some(removed) = removed_text(result) {
        detail(format!("removed: {removed}"));
    }
    for line in health_lines(result) {
        detail(line);
    }
    if result.rolled_back {
        detail(format!(
            "rolled back to {}: {}",
            result
                .old_image_url
                .as_deref()
                .unwrap_or("the previous version"),
            result.rollback_reason.as_deref().unwrap_or("")
        ));
    }
    out
}

/// What failed the health gate, part by part (nothing when it passed or did not run).
fn health_lines(result: &InstanceResult) -> Vec<String> {
    let Some(health) = result.health.as_ref().filter(|h| !h.passed) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for unit in health.units.iter().filter(|u| !u.healthy) {
        let why = if unit.result.is_empty() {
            String::new()
        } else {
            format!(", result {}", unit.result)
        };
        lines.push(format!(
            "health: unit {} {} ({}{why})",
            unit.unit, unit.active_state, unit.sub_state
        ));
    }
    for container in &health.stale_containers {
        lines.push(format!(
            "health: container {} still runs {}",
            container.name, container.replaced
        ));
    }
    if let Some(readiness) = health.readiness.as_ref().filter(|r| !r.passed) {
        let failing: Vec<String> = readiness
            .checks
            .iter()
            .filter(|c| c.status != ScriptStatus::Ok)
            .map(script_text)
            .collect();
        lines.push(format!(
            "health: readiness checks failing after {} tries: {}",
            readiness.tries,
            failing.join(", ")
        ));
    }
    lines
}

/// `completed`, `completed with 2 warnings`, `failed at extract`.
fn headline(result: &InstanceResult) -> String {
    let status = result.status.as_str();
    if let Some(error) = &result.error {
        return format!("{status} at {}", error.step);
    }
    match result.warnings.len() {
        0 => status.to_owned(),
        1 => format!("{status} with 1 warning"),
        n => format!("{status} with {n} warnings"),
    }
}

fn script_text(script: &ScriptOutcome) -> String {
    let name = &script.name;
    match (script.status, script.exit_code) {
        (ScriptStatus::Timeout, _) => format!("{name} (timed out)"),
        (ScriptStatus::Cancelled, _) => format!("{name} (cancelled)"),
        (_, Some(-1)) => format!("{name} (killed by a signal)"),
        (_, Some(code)) => format!("{name} (exit code {code})"),
        (_, None) => format!("{name} (not run)"),
    }
}

/// Splits `registry/path/name:tag` into the repository and the tag (`None` without a tag).
fn repository_and_tag(url: &str) -> (&str, Option<&str>) {
    let url = url.split_once('@').map_or(url, |(name, _)| name);
    let last_slash = url.rfind('/').map_or(0, |i| i + 1);
    match url[last_slash..].find(':') {
        Some(i) => (&url[..last_slash + i], Some(&url[last_slash + i + 1..])),
        None => (url, None),
    }
}

/// `sha256:0123456789ab`: enough of a digest to tell two apart.
fn short_digest(digest: &str) -> String {
    let (algo, hex) = digest.split_once(':').unwrap_or(("", digest));
    let hex: String = hex.chars().take(12).collect();
    if algo.is_empty() {
        hex
    } else {
        format!("{algo}:{hex}")
    }
}

/// `ghcr.io/nethserver/mail 1.7.0 → 1.7.1` when only the tag changes, the two URLs otherwise;
/// the digests when the URL stays but the image changed (a forced update, a moved tag).
fn image_change(result: &InstanceResult) -> String {
    let old = result.old_image_url.as_deref();
    let new = result.new_image_url.as_deref();
    match (old, new) {
        (Some(old), Some(new)) if old != new => {
            match (repository_and_tag(old), repository_and_tag(new)) {
                ((old_repo, Some(old_tag)), (new_repo, Some(new_tag))) if old_repo == new_repo => {
                    format!("{old_repo} {old_tag} → {new_tag}")
                }
                _ => format!("{old} → {new}"),
            }
        }
        (Some(url), Some(_)) | (None, Some(url)) | (Some(url), None) => {
            match (
                result.old_image_digest.as_deref(),
                result.new_image_digest.as_deref(),
            ) {
                (Some(old), Some(new)) if old != new => {
                    format!("{url} ({} → {})", short_digest(old), short_digest(new))
                }
                _ => url.to_owned(),
            }
        }
        (None, None) => "image unknown".to_owned(),
    }
}

/// `3 files (imageroot/a, imageroot/b, ...); image ghcr.io/x/mail:1.6.0`.
fn removed_text(result: &InstanceResult) -> Option<String> {
    let mut parts = Vec::new();
    let files = &result.files_removed;
    if !files.is_empty() {
        const SHOWN: usize = 3;
        let mut names: Vec<&str> = files.iter().take(SHOWN).map(String::as_str).collect();
        if files.len() > SHOWN {
            names.push("...");
        }
        let noun = if files.len() == 1 { "file" } else { "files" };
        parts.push(format!("{} {noun} ({})", files.len(), names.join(", ")));
    }
    let images = &result.images_removed;
    if !images.is_empty() {
        let noun = if images.len() == 1 { "image" } else { "images" };
        parts.push(format!("{noun} {}", images.join(" ")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RESULT: &str = r#"{"status":"aborted","exit_code":1,"instances":{
        "mail1":{"status":"completed","exit_code":0,
            "old_image_url":"ghcr.io/nethserver/mail:1.7.0","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
            "old_image_digest":"sha256:aaaa","new_image_digest":"sha256:bbbb",
            "scripts":[{"name":"10a","status":"ok","exit_code":0,"duration_ms":3},
                       {"name":"30c","status":"failed","exit_code":3,"duration_ms":5},
                       {"name":"40t","status":"timeout","exit_code":null,"duration_ms":5}],
            "files_installed":12,"files_removed":["imageroot/a","imageroot/b","imageroot/c","imageroot/d"],
            "images_removed":["ghcr.io/nethserver/mail:1.7.0"],
            "warnings":["/home/mail1/.config/update-module.d/30c has failed (exit code 3)",
                        "/home/mail1/.config/update-module.d/40t has failed (timed out)",
                        "systemd daemon-reload failed: boom"],
            "error":null},
        "mail2":{"status":"failed","exit_code":1,
            "old_image_url":"ghcr.io/nethserver/mail:1.7.0","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
            "old_image_digest":null,"new_image_digest":null,
            "scripts":[],"files_installed":0,"files_removed":[],"images_removed":[],"warnings":[],
            "error":{"step":"extract","reason":"no imageroot in the image"}},
        "mail3":{"status":"already-installed","exit_code":0,
            "old_image_url":"ghcr.io/nethserver/mail:1.7.1","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
            "old_image_digest":"sha256:cccc","new_image_digest":"sha256:cccc",
            "scripts":[],"files_installed":0,"files_removed":[],"images_removed":[],"warnings":[],"error":null}}}"#;

    fn utc() -> Clock {
        Clock::new(true)
    }

    #[test]
    fn failures_first_then_warnings_then_the_rest() {
        let result = JobResult::parse(RESULT).unwrap();
        let job = JobTimes {
            id: 12,
            started_usec: 1_796_058_000_000_000,
            finished_usec: 1_796_058_042_500_000,
        };
        let order = ["mail1".to_owned(), "mail3".to_owned(), "mail2".to_owned()];
        let text = job_summary(&job, &result, &order, &utc());
        let expected = "\
Job 12 aborted (exit code 1)
  started 2026-11-30 17:00:00 UTC, took 42 s

mail2  failed at extract
       ghcr.io/nethserver/mail 1.7.0 → 1.7.1
       error: no imageroot in the image

mail1  completed with 3 warnings
       ghcr.io/nethserver/mail 1.7.0 → 1.7.1
       warning: systemd daemon-reload failed: boom
       scripts: 2 of 3 did not succeed: 30c (exit code 3), 40t (timed out)
       removed: 4 files (imageroot/a, imageroot/b, imageroot/c, ...); image ghcr.io/nethserver/mail:1.7.0

mail3  already-installed
       ghcr.io/nethserver/mail:1.7.1

More: module-updater status 12 --json
      journalctl -u module-updaterd MODULE_UPDATER_JOB=12
";
        assert_eq!(text, expected);
    }

    #[test]
    fn job_level_error_and_missing_instances() {
        let result = JobResult::parse(
            r#"{"status":"aborted","exit_code":1,"instances":{},"error":"interrupted"}"#,
        )
        .unwrap();
        let job = JobTimes {
            id: 3,
            started_usec: 0,
            finished_usec: 0,
        };
        let text = job_summary(&job, &result, &["app1".to_owned()], &utc());
        assert!(
            text.starts_with("Job 3 aborted (exit code 1): interrupted\n\nNo result for: app1\n"),
            "{text}"
        );
    }

    #[test]
    fn image_changes() {
        let mut r = InstanceResult::new(InstanceStatus::Completed);
        r.old_image_url = Some("127.0.0.1:5000/app:1.0".into());
        r.new_image_url = Some("127.0.0.1:5000/app:2.0".into());
        assert_eq!(image_change(&r), "127.0.0.1:5000/app 1.0 → 2.0");
        r.new_image_url = Some("ghcr.io/x/app:2.0".into());
        assert_eq!(
            image_change(&r),
            "127.0.0.1:5000/app:1.0 → ghcr.io/x/app:2.0"
        );
        r.new_image_url = Some("127.0.0.1:5000/app:1.0".into());
        r.old_image_digest = Some(format!("sha256:{}", "1".repeat(64)));
        r.new_image_digest = Some(format!("sha256:{}", "2".repeat(64)));
        assert_eq!(
            image_change(&r),
            "127.0.0.1:5000/app:1.0 (sha256:111111111111 → sha256:222222222222)"
        );
        assert_eq!(
            repository_and_tag("h:5000/a/b:1@sha256:00"),
            ("h:5000/a/b", Some("1"))
        );
        assert_eq!(repository_and_tag("h:5000/a/b"), ("h:5000/a/b", None));
    }

    #[test]
    fn a_block_per_instance_for_history() {
        let mut r = InstanceResult::new(InstanceStatus::Cancelled);
        r.new_image_url = Some("ghcr.io/x/app:2.0".into());
        r.scripts.push(ScriptOutcome {
            name: "50slow".into(),
            status: ScriptStatus::Cancelled,
            exit_code: None,
            duration_ms: 1,
        });
        assert_eq!(
            instance_block("app1", &r, 6),
            "app1    cancelled\n        ghcr.io/x/app:2.0\n        scripts: 1 of 1 did not succeed: 50slow (cancelled)\n"
        );
    }
}
