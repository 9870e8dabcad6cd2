//! Part 3 of the health gate: the module's own readiness checks, every executable of
//! `${AGENT_INSTALL_DIR}/health.d/` run like the update scripts (instance user, cwd the state
//! dir, the environment file, the request on stdin). They pass when all exit 0 in one try; the
//! tries go on until then or until the gate's deadline.

use std::path::Path;
use std::time::Duration;

use module_updater_dbus::types::{ReadinessReport, ScriptStatus, Step};
use tokio::time::Instant;

use super::super::super::environment::Environment;
use super::super::super::scripts;
use super::super::context::{Ctx, StepResult};
use super::super::scripts::run_one;

/// The directory of the checks, below the install dir: not `update-module.d/`, so that no
/// check is ever taken for an update script.
pub const DIR: &str = "health.d";

/// The pause between two tries.
const RETRY: Duration = Duration::from_secs(1);

/// Runs the checks until they pass or `deadline`; with `once`, one try only. `None` when the
/// module ships no check.
pub async fn run(
    ctx: &mut Ctx<'_>,
    initial_env: &Environment,
    deadline: Instant,
    once: bool,
) -> StepResult<Option<ReadinessReport>> {
    let dir = ctx.job.instance.install_dir.join(DIR);
    let checks = match scripts::list_executables(&dir) {
        Ok(listing) if !listing.runnable.is_empty() => listing.runnable,
        _ => return Ok(None),
    };
    let mut report = ReadinessReport {
        passed: false,
        tries: 0,
        checks: Vec::new(),
    };
    loop {
        ctx.check_cancel()?;
        report.tries += 1;
        report.checks = try_all(ctx, initial_env, &checks, deadline).await?;
        report.passed = report.checks.iter().all(|c| c.status == ScriptStatus::Ok);
        if report.passed || once || Instant::now() + RETRY >= deadline {
            return Ok(Some(report));
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One try: every check, each within what is left of the gate (at most the script timeout).
async fn try_all(
    ctx: &mut Ctx<'_>,
    initial_env: &Environment,
    checks: &[impl AsRef<Path>],
    deadline: Instant,
) -> StepResult<Vec<module_updater_dbus::types::ScriptOutcome>> {
    let mut outcomes = Vec::with_capacity(checks.len());
    for (index, check) in checks.iter().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1))
            .min(Duration::from_secs(ctx.job.script_timeout_secs));
        let outcome = run_one(
            ctx,
            initial_env,
            Step::HealthGate,
            check.as_ref(),
            (index, checks.len()),
            left,
        )
        .await?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}
