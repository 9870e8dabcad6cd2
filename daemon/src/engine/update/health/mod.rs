//! The health gate, after the scripts and module steps: within `health_timeout`, (1) the
//! instance's units that were active before the update, and those it has enabled, are active
//! again; (2) no running container of the instance uses an image the update replaced; (3) the
//! module's readiness checks (`health.d/`) pass. Each part is in the [`HealthReport`].

mod containers;
mod readiness;
mod units;

use std::time::Duration;

use module_updater_dbus::types::{HealthReport, Step};
use tokio::time::Instant;

use super::super::environment::Environment;
use super::super::events::priority;
use super::super::podman::Podman;
use super::cleanup;
use super::context::{Ctx, StepResult};
use super::reload;

/// How often the containers are listed again while one still runs a replaced image.
const CONTAINER_POLL: Duration = Duration::from_secs(2);

/// What the gate needs from before the update: the instance's units active then.
#[derive(Debug, Default)]
pub struct Before {
    pub active_units: Vec<String>,
    /// Whether the instance's manager answered. One that did not answer before the update
    /// either (as the reload, a warning) leaves the units unchecked, with a warning.
    pub manager_answered: bool,
}

/// Reads the units active before the update. A manager that cannot be asked is a warning: the
/// gate then checks only the units the instance has enabled.
pub async fn before(ctx: &mut Ctx<'_>) -> Before {
    let read = match reload::connect(ctx.job).await {
        Ok(connection) => units::active(&connection, ctx.instance()).await,
        Err(err) => Err(err),
    };
    match read {
        Ok(active_units) => Before {
            active_units,
            manager_answered: true,
        },
        Err(err) => {
            ctx.warning(format!(
                "the health gate cannot know which units were active before the update: {err}"
            ));
            Before::default()
        }
    }
}

/// Runs the gate; the report says whether it passed and why not.
pub async fn gate(
    ctx: &mut Ctx<'_>,
    before: &Before,
    podman: &Podman,
    initial_env: &Environment,
) -> StepResult<HealthReport> {
    ctx.begin(Step::HealthGate);
    let started = Instant::now();
    let timeout = Duration::from_secs(ctx.job.health_timeout_secs);
    let deadline = started + timeout;
    let mut report = HealthReport {
        passed: false,
        timeout_secs: timeout.as_secs(),
        duration_ms: 0,
        units: Vec::new(),
        stale_containers: Vec::new(),
        readiness: None,
        problems: Vec::new(),
    };
    let mut problems: Vec<String> = Vec::new();

    // 1. The units.
    match reload::connect(ctx.job).await {
        Ok(connection) => {
            let mut checked: Vec<(String, &'static str)> = before
                .active_units
                .iter()
                .map(|u| (u.clone(), units::WAS_ACTIVE))
                .collect();
            match units::enabled(&connection, ctx.instance()).await {
                Ok(enabled) => {
                    for unit in enabled {
                        if !checked.iter().any(|(u, _)| *u == unit) {
                            checked.push((unit, units::ENABLED));
                        }
                    }
                }
                Err(err) => problems.push(err),
            }
            report.units = units::wait(&connection, &checked, deadline, &ctx.cancel).await;
        }
        Err(err) if !before.manager_answered => ctx.warning(format!(
            "the health gate did not check the instance's units: its systemd manager does not answer: {err}"
        )),
        Err(err) => problems.push(format!("cannot reach the instance's systemd manager: {err}")),
    }
    ctx.check_cancel()?;
    for unit in report.units.iter().filter(|u| !u.healthy) {
        let result = if unit.result.is_empty() || unit.result == "success" {
            String::new()
        } else {
            format!(", result {}", unit.result)
        };
        problems.push(format!(
            "unit {} is {} ({}{result})",
            unit.unit, unit.active_state, unit.sub_state
        ));
    }

    // 2. The containers.
    match Environment::load(&ctx.instance().state_dir.join("environment")) {
        Ok(env) => {
            let replaced = cleanup::stale_images(&env);
            let current = cleanup::current_images(&env);
            // A listing that fails is tried again until the deadline, as one that finds a
            // container still on a replaced image.
            loop {
                let listed = containers::stale(podman, &replaced, &current).await;
                let done = matches!(&listed, Ok(stale) if stale.is_empty());
                let last = Instant::now() + CONTAINER_POLL >= deadline;
                match listed {
                    Ok(stale) => report.stale_containers = stale,
                    Err(err) if last => {
                        problems.push(format!("cannot list the running containers: {err}"));
                    }
                    Err(_) => {}
                }
                if done || last {
                    break;
                }
                ctx.check_cancel()?;
                tokio::time::sleep(CONTAINER_POLL).await;
            }
        }
        Err(err) => problems.push(format!("cannot read the instance environment: {err}")),
    }
    for stale in &report.stale_containers {
        problems.push(format!(
            "container {} still runs {}, which the update replaced",
            stale.name, stale.replaced
        ));
    }

    // 3. The readiness checks: retried while the other parts pass, tried once otherwise.
    let once = !problems.is_empty();
    report.readiness = readiness::run(ctx, initial_env, deadline, once).await?;
    if let Some(readiness) = report.readiness.as_ref().filter(|r| !r.passed) {
        let failing: Vec<&str> = readiness
            .checks
            .iter()
            .filter(|c| c.status != module_updater_dbus::types::ScriptStatus::Ok)
            .map(|c| c.name.as_str())
            .collect();
        problems.push(format!(
            "readiness check {} of {}/ did not pass after {} tries",
            failing.join(", "),
            readiness::DIR,
            readiness.tries
        ));
    }

    report.passed = problems.is_empty();
    report.problems = problems.clone();
    report.duration_ms = started.elapsed().as_millis() as u64;
    if report.passed {
        ctx.end(Step::HealthGate);
    } else {
        for problem in &problems {
            ctx.message(priority::ERR, format!("health gate: {problem}"));
        }
    }
    Ok(report)
}

/// One sentence of what failed, for the result's error.
pub fn summary(report: &HealthReport) -> String {
    format!(
        "the instance failed the health gate within {} s: {}",
        report.timeout_secs,
        report.problems.join("; ")
    )
}
