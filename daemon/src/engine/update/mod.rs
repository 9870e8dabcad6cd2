//! NS8's `update-module` for one instance, as explicit steps. Runs in the worker process, with
//! the instance's credentials, and reports typed events through [`Ctx`].
//!
//! prepare → `05pullimages` (pull → extract, with the extra images fetched beside the staging →
//! reload → environment) → `50run_scriptdir` → `95cleanup_images`, the module's own
//! `actions/update-module/*` steps merged in by name. Each step is a function of its own file
//! that takes what it needs and returns what it made; what runs beside the steps is in
//! [`Background`], drained once at the end. What differs from NS8 is in docs/architecture.md.

mod background;
mod cleanup;
pub use cleanup::{Generations, older_images, stale_images};
mod context;
mod environment;
mod extract;
mod health;
mod prepare;
mod prune;
mod pull;
mod reload;
mod rollback;
mod scripts;

use module_updater_dbus::types::{InstanceResult, InstanceStatus, Step};
use tokio::sync::watch;

use super::environment::Environment;
use super::events::{Event, priority};
use super::kept;
use super::lock;
use super::scripts::{CLEANUP_STEP, PULL_STEP, PlannedStep, SCRIPTS_STEP};
use background::Background;
pub use context::{Action, UpdateJob};
use context::{CANCELLED, Ctx, Failed, StepResult, failed};

/// Runs the update and always returns a result (also for failures and cancellation).
pub async fn run(
    job: &UpdateJob,
    cancel: watch::Receiver<bool>,
    emit: &mut (dyn FnMut(Event) + Send),
) -> InstanceResult {
    let mut ctx = Ctx::new(job, cancel, emit);
    let mut result = InstanceResult::new(InstanceStatus::Completed);
    let outcome = match job.action {
        Action::Update => {
            let mut background = Background::default();
            let outcome = steps(&mut ctx, &mut result, &mut background).await;
            background.drain(&mut ctx).await;
            if job.rollback_on_failure {
                roll_back_on_failure(&mut ctx, &mut result, &outcome).await;
            }
            outcome
        }
        Action::Rollback => rollback::rollback(&mut ctx, &mut result).await,
        Action::Prune => prune::prune(&mut ctx, &mut result).await,
    };
    finish(ctx, result, outcome)
}

/// `rollback_on_failure`: an update that failed at a module step, or whose instance failed the
/// health gate, after it installed its tree, goes back to the kept previous version. The result
/// keeps the update's status and says `rolled_back` and why.
async fn roll_back_on_failure(
    ctx: &mut Ctx<'_>,
    result: &mut InstanceResult,
    outcome: &StepResult<InstanceStatus>,
) {
    let why = match outcome {
        Ok(InstanceStatus::Unhealthy) => result.error.as_ref().map(|f| f.reason.clone()),
        Err(Failed { step, reason }) if *step == Step::ModuleStep && !ctx.cancelled() => {
            Some(format!("{step} failed: {reason}"))
        }
        _ => None,
    };
    let Some(why) = why else {
        return;
    };
    if !ctx.touched || !ctx.job.keep_previous {
        return;
    }
    ctx.message(
        priority::WARNING,
        format!("rolling back to the previous version: {why}"),
    );
    let mut rolled = InstanceResult::new(InstanceStatus::Completed);
    match rollback::rollback(ctx, &mut rolled).await {
        Ok(InstanceStatus::Completed) => {
            result.rolled_back = true;
            result.rollback_reason = Some(why);
            result.warnings.push(rollback::NOT_UNDONE.to_owned());
        }
        Ok(_) => ctx.warning(format!(
            "the automatic rollback ran but the instance failed the health gate after it: {}",
            rolled.error.map(|f| f.reason).unwrap_or_default()
        )),
        Err(Failed { step, reason }) => {
            ctx.warning(format!("the automatic rollback failed at {step}: {reason}"))
        }
    }
}

/// The steps in order; what each returns goes into `result`. The final status, or where and
/// why the update failed.
async fn steps(
    ctx: &mut Ctx<'_>,
    result: &mut InstanceResult,
    background: &mut Background,
) -> StepResult<InstanceStatus> {
    let started = std::time::SystemTime::now();
    ctx.begin(Step::Prepare);
    let prepared = prepare::prepare(ctx, background)?;
    let (env, podman) = (&prepared.env, &prepared.podman);
    result.old_image_url = env.get("IMAGE_URL").map(str::to_owned);
    result.old_image_digest = env.get("IMAGE_DIGEST").map(str::to_owned);
    if prepared.already_installed {
        result.new_image_url = result.old_image_url.clone();
        result.new_image_digest = result.old_image_digest.clone();
        return Ok(InstanceStatus::AlreadyInstalled);
    }
    let before = health::before(ctx).await;
    ctx.end(Step::Prepare);

    // NS8 plans the steps once, before extraction; the steps that follow the pull are planned
    // again from the new tree, so a module's new or removed steps take effect in this update.
    let install_dir = &ctx.job.instance.install_dir;
    let mut plan = scripts::plan(install_dir, None);
    let mut index = 0;
    // The stale-image cleanup waits for the health gate: an unhealthy instance keeps the
    // images it ran before.
    let mut cleanup_due = false;
    // The environment of the version the kept one replaced (`Some(None)`: none was kept),
    // once this update kept the previous version.
    let mut kept_older: Option<Option<Environment>> = None;
    while index < plan.len() {
        ctx.check_cancel()?;
        let step = plan[index].clone();
        index += 1;
        match step {
            PlannedStep::Builtin(name) if name == PULL_STEP => {
                let mut local = pull::LocalImages::default();
                let pulled = pull::pull(ctx, podman, &mut local).await?;
                result.new_image_url = Some(ctx.job.module_url.clone());
                result.new_image_digest = Some(pulled.main.digest.clone());
                let extras = pull::extra_images(&pulled.main)?;
                // The re-run of an interrupted update finds a half-installed tree: the version
                // kept before it is the one to go back to, and stays.
                let rerun = ctx.touched;
                if ctx.job.keep_previous && rerun && kept::exists(ctx.instance()) {
                    kept_older = Some(None);
                }
                let saved = ctx.job.keep_previous && !rerun && keep_previous(ctx, &before);
                let extracted =
                    extract::extract(ctx, podman, &mut local, &pulled, &extras, background).await;
                let instance = ctx.instance();
                match (&extracted, saved) {
                    (Ok(_), true) => match kept::promote(instance) {
                        Ok(older) => kept_older = Some(older),
                        Err(err) => ctx.warning(format!(
                            "the previous version is not kept: cannot move it into {}: {err}",
                            kept::dir(instance).display()
                        )),
                    },
                    (Err(_), true) => {
                        let _ = kept::discard_pending(instance);
                    }
                    _ => {}
                }
                let extracted = extracted?;
                result.files_installed = extracted.installed.len();
                result.files_removed = extracted.removed;
                reload::reload(ctx).await;
                environment::rewrite(ctx, env, &pulled.main, &extras)?;
                plan = scripts::plan(install_dir, Some(PULL_STEP));
                index = 0;
            }
            PlannedStep::Builtin(name) if name == SCRIPTS_STEP => {
                scripts::run_scripts(ctx, env, &mut result.scripts).await?;
            }
            PlannedStep::Builtin(name) if name == CLEANUP_STEP => cleanup_due = true,
            PlannedStep::Builtin(name) => {
                return Err(failed(Step::Prepare)(format!(
                    "unknown built-in step {name}"
                )));
            }
            PlannedStep::Module(path) => {
                scripts::module_step(ctx, env, &path, &mut result.scripts).await?;
            }
        }
    }
    let report = health::gate(ctx, &before, podman, env).await?;
    let healthy = report.passed;
    if !healthy {
        result.error = Some(module_updater_dbus::types::Failure {
            step: Step::HealthGate,
            reason: health::summary(&report),
        });
    }
    result.health = Some(report);
    if healthy && cleanup_due {
        // The temporary container uses the image it was created from.
        background.container_removed(ctx).await;
        let generations = kept_older.as_ref().map(|older| cleanup::Generations {
            kept: env,
            older: older.as_ref(),
        });
        result.images_removed = cleanup::cleanup(ctx, podman, generations).await;
    }
    if !ctx.job.keep_previous {
        // keep_previous = false: nothing of an earlier version stays either.
        if let Err(err) = kept::remove(ctx.instance()) {
            ctx.warning(format!("cannot remove the kept previous version: {err}"));
        }
    }
    // The marker makes an update that a crash interrupted run again: it goes only once what the
    // extraction installed and what the scripts wrote in the state dir are on disk.
    let state_dir = &ctx.job.instance.state_dir;
    let flushed = background.everything_flushed(state_dir, started).await;
    match flushed {
        Ok(()) => lock::mark_finished(state_dir).map_err(|e| {
            failed(Step::CleanupImages)(format!("cannot remove {}: {e}", lock::MARKER_FILE))
        })?,
        Err(err) => ctx.warning(format!(
            "{err}; {} is kept, so the next update of this instance runs in full again",
            lock::MARKER_FILE
        )),
    }
    drop(prepared.lock);
    Ok(if healthy {
        InstanceStatus::Completed
    } else {
        InstanceStatus::Unhealthy
    })
}

/// Saves the instance as it is before the install as the pending kept version; a failure is a
/// warning (the update goes on without keeping it).
fn keep_previous(ctx: &mut Ctx<'_>, before: &health::Before) -> bool {
    match kept::save(ctx.instance(), &before.active_units) {
        Ok(()) => true,
        Err(err) => {
            let _ = kept::discard_pending(ctx.instance());
            ctx.warning(format!(
                "the previous version is not kept (no rollback possible): {err}"
            ));
            false
        }
    }
}

/// The result: the status, the failure and the warnings. A failure or cancel before anything
/// was touched removes the in-progress marker: the instance is as before, no re-run is owed.
fn finish(
    mut ctx: Ctx<'_>,
    mut result: InstanceResult,
    outcome: StepResult<InstanceStatus>,
) -> InstanceResult {
    // Every instance's progress ends at 100, whatever the outcome: a UI closes its bar.
    ctx.set_progress(ctx.step(), 100);
    match outcome {
        Ok(status) => {
            if status == InstanceStatus::Unhealthy {
                ctx.message(
                    priority::ERR,
                    "the instance is unhealthy after the update".into(),
                );
            }
            result.status = status;
        }
        // Cancelled between steps, or a step that failed once a cancel was asked for: the cancel
        // stopped it (a podman or script process killed by the cancel's SIGTERM).
        Err(Failed { step, reason }) if reason == CANCELLED || ctx.cancelled() => {
            result.status = InstanceStatus::Cancelled;
            if reason != CANCELLED {
                ctx.warning(format!("cancelled during {step}: {reason}"));
            }
            ctx.message(priority::WARNING, "update cancelled".into());
        }
        Err(Failed { step, reason }) => {
            ctx.message(priority::ERR, format!("{step} failed: {reason}"));
            result.status = InstanceStatus::Failed;
            result.error = Some(module_updater_dbus::types::Failure { step, reason });
        }
    }
    if result.status != InstanceStatus::Completed
        && result.status != InstanceStatus::AlreadyInstalled
        && !ctx.touched
    {
        let _ = lock::mark_finished(&ctx.job.instance.state_dir);
    }
    result.warnings = ctx.take_warnings();
    result.exit_code = result.status.exit_code();
    result
}
