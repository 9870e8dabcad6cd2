//! The scripts steps: `50run_scriptdir` (every executable of `update-module.d/`, a failure is a
//! warning) and the module's own `actions/update-module/` steps (a failure fails the update),
//! each run with NS8's contract, and the plan that merges the latter with the built-in steps.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use module_updater_dbus::types::{ScriptOutcome, ScriptStatus, Step};

use super::super::environment::Environment;
use super::super::events::priority;
use super::super::scripts::{self, BUILTIN_STEPS, PlannedStep, ScriptOutput, ScriptRun};
use super::context::{Ctx, StepResult, failed, progress_window};

/// The module's steps and the built-in ones, merged by name; with `after`, only those after it.
pub fn plan(install_dir: &Path, after: Option<&str>) -> Vec<PlannedStep> {
    let dir = install_dir.join("actions/update-module");
    let module_steps = scripts::list_executables(&dir)
        .map(|l| l.runnable)
        .unwrap_or_default();
    scripts::merge_module_steps(&BUILTIN_STEPS, module_steps)
        .into_iter()
        .filter(|step| after.is_none_or(|after| step.name().as_ref() > after))
        .collect()
}

/// `50run_scriptdir`: every executable of `update-module.d/` in byte order. A failing script is
/// a warning (NS8 semantics). Each outcome goes to `outcomes` as soon as it is known, so that a
/// cancel keeps those of the scripts that ran. `initial_env` is the environment file as the
/// update found it.
pub async fn run_scripts(
    ctx: &mut Ctx<'_>,
    initial_env: &Environment,
    outcomes: &mut Vec<ScriptOutcome>,
) -> StepResult<()> {
    ctx.begin(Step::RunScripts);
    let job = ctx.job;
    let dir = job.instance.install_dir.join("update-module.d");
    let listing =
        scripts::list_executables(&dir).map_err(|e| failed(Step::RunScripts)(e.to_string()))?;
    for skipped in &listing.skipped {
        ctx.message(
            priority::DEBUG,
            format!("Skipping non-executable file {}...", skipped.display()),
        );
    }
    let count = listing.runnable.len();
    for (index, path) in listing.runnable.iter().enumerate() {
        ctx.check_cancel()?;
        let timeout = Duration::from_secs(job.script_timeout_secs);
        let outcome = run_one(
            ctx,
            initial_env,
            Step::RunScripts,
            path,
            (index, count),
            timeout,
        )
        .await?;
        if outcome.status != ScriptStatus::Ok {
            let how = match (outcome.status, outcome.exit_code) {
                (ScriptStatus::Timeout, _) => {
                    format!("timed out after {} s", job.script_timeout_secs)
                }
                (_, Some(code)) => format!("exit code {code}"),
                _ => "no exit code".to_owned(),
            };
            ctx.warning(format!("{} has failed ({how})", path.display()));
        }
        outcomes.push(outcome);
        ctx.check_cancel()?;
    }
    ctx.end(Step::RunScripts);
    Ok(())
}

/// A module's own `actions/update-module/` step, its outcome added to `outcomes`: a failure
/// fails the update.
pub async fn module_step(
    ctx: &mut Ctx<'_>,
    initial_env: &Environment,
    path: &Path,
    outcomes: &mut Vec<ScriptOutcome>,
) -> StepResult<()> {
    ctx.begin(Step::ModuleStep);
    let timeout = ctx.job.script_timeout_secs;
    let outcome = run_one(
        ctx,
        initial_env,
        Step::ModuleStep,
        path,
        (0, 1),
        Duration::from_secs(timeout),
    )
    .await?;
    let (name, status) = (outcome.name.clone(), (outcome.status, outcome.exit_code));
    outcomes.push(outcome);
    ctx.check_cancel()?;
    match status {
        (ScriptStatus::Ok, _) => {
            ctx.end(Step::ModuleStep);
            Ok(())
        }
        (ScriptStatus::Timeout, _) => Err(failed(Step::ModuleStep)(format!(
            "module step {name} timed out after {timeout} s"
        ))),
        (_, code) => Err(failed(Step::ModuleStep)(format!(
            "module step {name} failed with exit code {}",
            code.map_or("none".to_owned(), |c| c.to_string())
        ))),
    }
}

/// Runs one executable with NS8's contract: cwd = state dir, stdin = the request, the
/// environment file on top of the worker's clean environment, fd 3 = AGENT_COMFD. It is the
/// `index`-th of `count` of the step, for the progress. It is killed after `timeout` (the
/// script timeout, unless the caller has less time).
pub async fn run_one(
    ctx: &mut Ctx<'_>,
    initial_env: &Environment,
    step: Step,
    path: &Path,
    (index, count): (usize, usize),
    timeout: Duration,
) -> StepResult<ScriptOutcome> {
    let job = ctx.job;
    let state_dir = &job.instance.state_dir;
    let file_env = Environment::load(&state_dir.join("environment"))
        .map_err(|e| failed(step)(format!("cannot read the instance environment: {e}")))?;
    // The worker's own environment carries the file as it was when the update began; drop
    // those copies so a key the update removed (or changed) reaches the script as it is now.
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, v)| initial_env.get(k) != Some(v.as_str()))
        .collect();
    env.extend(file_env.iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
    env.insert("AGENT_TASK_ID".into(), job.job_id.to_string());
    env.insert("AGENT_TASK_ACTION".into(), "update-module".into());
    env.insert("AGENT_TASK_USER".into(), String::new());
    ctx.message(priority::INFO, format!("Running {}...", path.display()));
    let run = ScriptRun {
        path,
        env: &env,
        cwd: state_dir,
        stdin: job.request_json.as_bytes(),
        timeout,
    };
    // The script's share of the step's progress window.
    let (low, high) = progress_window(step);
    let span = u32::from(high - low);
    let share = |percent: u8| -> u8 {
        let count = count.max(1) as u32;
        let done = (index as u32) * 100 + u32::from(percent.min(100));
        low + (span * done / (count * 100)) as u8
    };
    let cancel = ctx.cancel.clone();
    let outcome = {
        let mut on_output = |output: ScriptOutput| match output {
            ScriptOutput::Line { priority, text } => ctx.message(priority, text),
            ScriptOutput::Progress(percent) => ctx.set_progress(step, share(percent)),
        };
        scripts::run(&run, &cancel, &mut on_output).await
    };
    match outcome {
        Ok(outcome) => {
            ctx.set_progress(step, share(100));
            Ok(outcome)
        }
        Err(err) => {
            // NS8 skips a step that cannot be started.
            ctx.warning(format!("skipped {}: {err}", path.display()));
            Ok(skipped(path))
        }
    }
}

/// The outcome of an executable that could not be started.
fn skipped(path: &Path) -> ScriptOutcome {
    ScriptOutcome {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        status: ScriptStatus::Failed,
        exit_code: None,
        duration_ms: 0,
    }
}
