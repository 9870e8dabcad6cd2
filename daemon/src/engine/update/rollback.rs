//! Rollback: the instance back to the kept previous version (`engine/kept.rs`) without any
//! registry: its files and environment put back (the `PREV_*` keys then name what is being left),
//! its images checked to be in the instance's storage, the manager reloaded and the units that
//! were active restarted over D-Bus, then the health gate. Data the update's scripts changed
//! (migrations) is not undone.

use std::collections::BTreeSet;

use module_updater_dbus::types::{InstanceResult, InstanceStatus, Step};
use module_updater_systemd::manager::ManagerProxy;

use super::super::environment::{self, Environment};
use super::super::events::priority;
use super::super::kept;
use super::super::lock::{self, UpdateLock};
use super::super::podman::Podman;
use super::cleanup;
use super::context::{Ctx, StepResult, failed};
use super::{health, reload};

/// The warning every rollback's result carries.
pub const NOT_UNDONE: &str = "rolled back to the previous version's files, environment and images; data the update's scripts changed (migrations) is not undone";

/// The image keys of an environment, with their `PREV_` pair.
fn image_keys(env: &Environment) -> Vec<String> {
    env.iter()
        .map(|(k, _)| k)
        .filter(|k| !k.starts_with("PREV_"))
        .filter(|k| k.starts_with("IMAGE_") || k.ends_with("_IMAGE"))
        .map(str::to_owned)
        .collect()
}

/// Rolls the instance back; the status is that of the health gate after it.
pub async fn rollback(
    ctx: &mut Ctx<'_>,
    result: &mut InstanceResult,
) -> StepResult<InstanceStatus> {
    let fail = failed(Step::Prepare);
    ctx.begin(Step::Prepare);
    let instance = ctx.instance();
    let state_dir = &instance.state_dir;
    let _lock = UpdateLock::acquire(state_dir).map_err(|e| fail(e.to_string()))?;
    let now = Environment::load(&state_dir.join("environment"))
        .map_err(|e| fail(format!("cannot read the instance environment: {e}")))?;
    let kept = kept::load(instance).ok_or_else(|| {
        fail(format!(
            "nothing is kept of a previous version of {} (no update since keep_previous was on, or it was pruned or rolled back already)",
            instance.id
        ))
    })?;
    result.old_image_url = now.get("IMAGE_URL").map(str::to_owned);
    result.old_image_digest = now.get("IMAGE_DIGEST").map(str::to_owned);
    result.new_image_url = kept.environment.get("IMAGE_URL").map(str::to_owned);
    result.new_image_digest = kept.environment.get("IMAGE_DIGEST").map(str::to_owned);
    // No registry: every image the kept version names must be in the instance's storage.
    let podman = Podman::new(ctx.job.podman_args.clone());
    let present = podman
        .local_names()
        .await
        .map_err(|e| fail(format!("cannot list the instance's images: {e}")))?;
    let missing: Vec<String> = cleanup::current_images(&kept.environment)
        .into_iter()
        .filter(|image| !image.is_empty() && !present.contains(image))
        .collect();
    if !missing.is_empty() {
        return Err(fail(format!(
            "the previous version's images are not in the instance's storage any more: {}",
            missing.join(", ")
        )));
    }
    let before = health::before(ctx).await;
    ctx.end(Step::Prepare);

    // The files and the environment. A crash from here on leaves the marker: the same rollback
    // run again does the same (the kept version is only read), and an update runs in full.
    let url = result.new_image_url.clone().unwrap_or_default();
    lock::mark_started(state_dir, ctx.job.job_id, &url)
        .map_err(|e| failed(Step::Restore)(format!("cannot write {}: {e}", lock::MARKER_FILE)))?;
    ctx.touched = true;
    ctx.begin(Step::Restore);
    let owned = instance.clone();
    let restored = tokio::task::spawn_blocking(move || kept::restore_tree(&owned))
        .await
        .map_err(|e| failed(Step::Restore)(format!("the restore task failed: {e}")))?
        .map_err(|e| {
            failed(Step::Restore)(format!(
                "cannot put the previous files back into {}: {e}",
                instance.install_dir.display()
            ))
        })?;
    result.files_installed = restored.installed;
    result.files_removed = restored.removed;
    environment::update_file(state_dir, &environment_patch(&now, &kept.environment))
        .map_err(|e| failed(Step::Restore)(format!("cannot restore the environment: {e}")))?;
    ctx.end(Step::Restore);

    reload::reload(ctx).await;
    let mut units: BTreeSet<String> = kept.active_units.iter().cloned().collect();
    units.extend(before.active_units.iter().cloned());
    restart(ctx, &units).await;

    let gate_before = health::Before {
        active_units: units.into_iter().collect(),
        manager_answered: before.manager_answered,
    };
    let report = health::gate(ctx, &gate_before, &podman, &now).await?;
    let healthy = report.passed;
    if !healthy {
        result.error = Some(module_updater_dbus::types::Failure {
            step: Step::HealthGate,
            reason: health::summary(&report),
        });
    }
    result.health = Some(report);
    ctx.warning(NOT_UNDONE.to_owned());
    if healthy {
        // Used: a second rollback would have nothing to go back to.
        if let Err(err) = kept::remove(instance) {
            ctx.warning(format!(
                "cannot remove the kept version it came from: {err}"
            ));
        }
    }
    lock::mark_finished(state_dir).map_err(|e| {
        failed(Step::HealthGate)(format!("cannot remove {}: {e}", lock::MARKER_FILE))
    })?;
    Ok(if healthy {
        InstanceStatus::Completed
    } else {
        InstanceStatus::Unhealthy
    })
}

/// The environment file as the kept version had it; each image key's `PREV_` names the value
/// being left (what a later update's cleanup removes), or goes when there was none. Applied to
/// an environment it already restored, it gives the same file.
fn environment_patch(now: &Environment, kept: &Environment) -> Vec<(String, Option<String>)> {
    let mut patch: Vec<(String, Option<String>)> = Vec::new();
    for (key, _) in now.iter() {
        if kept.get(key).is_none() {
            patch.push((key.to_owned(), None));
        }
    }
    for (key, value) in kept.iter() {
        patch.push((key.to_owned(), Some(value.to_owned())));
    }
    let mut keys = image_keys(kept);
    keys.extend(image_keys(now));
    // An image key a first run removed still has the PREV_ it wrote.
    keys.extend(
        now.iter()
            .filter_map(|(k, _)| k.strip_prefix("PREV_"))
            .filter(|k| k.starts_with("IMAGE_") || k.ends_with("_IMAGE"))
            .map(str::to_owned),
    );
    keys.sort();
    keys.dedup();
    for key in keys {
        let prev = format!("PREV_{key}");
        // A key that already has the kept value (a rollback run again after a crash) keeps the
        // PREV_ the first run wrote.
        let left = if now.get(&key) == kept.get(&key) {
            now.get(&prev)
        } else {
            now.get(&key)
        };
        patch.push((prev, left.map(str::to_owned)));
    }
    patch
}

/// Restarts each unit over D-Bus (`RestartUnit`, mode `replace`: a stopped or failed unit is
/// started); a failure is a warning, the gate then says how the unit is.
async fn restart(ctx: &mut Ctx<'_>, units: &BTreeSet<String>) {
    let connection = match reload::connect(ctx.job).await {
        Ok(connection) => connection,
        Err(err) => {
            ctx.warning(format!("cannot restart the instance's units: {err}"));
            return;
        }
    };
    let manager = match ManagerProxy::new(&connection).await {
        Ok(manager) => manager,
        Err(err) => {
            ctx.warning(format!("cannot restart the instance's units: {err}"));
            return;
        }
    };
    for unit in units {
        match manager.restart_unit(unit, "replace").await {
            Ok(_) => ctx.message(priority::INFO, format!("Restarted {unit}")),
            Err(err) => ctx.warning(format!("cannot restart {unit}: {err}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_restored_environment_names_what_it_leaves_as_prev() {
        let now = Environment::parse(
            "IMAGE_URL=r/d:2\nPREV_IMAGE_URL=r/d:1\nDB_IMAGE=r/db:2\nNEW_IMAGE=r/n:1\nMIGRATED=yes\nMODULE_ID=d1\n",
        );
        let kept = Environment::parse("IMAGE_URL=r/d:1\nDB_IMAGE=r/db:1\nMODULE_ID=d1\n");
        let mut env = now.clone();
        env.apply(&environment_patch(&now, &kept)).unwrap();
        assert_eq!(env.get("IMAGE_URL"), Some("r/d:1"));
        assert_eq!(env.get("PREV_IMAGE_URL"), Some("r/d:2"));
        assert_eq!(env.get("DB_IMAGE"), Some("r/db:1"));
        assert_eq!(env.get("PREV_DB_IMAGE"), Some("r/db:2"));
        assert_eq!(env.get("NEW_IMAGE"), None);
        assert_eq!(env.get("PREV_NEW_IMAGE"), Some("r/n:1"));
        assert_eq!(env.get("MIGRATED"), None);
        assert_eq!(env.get("MODULE_ID"), Some("d1"));
        // Run again on what it wrote: the same environment.
        let mut again = env.clone();
        again.apply(&environment_patch(&env, &kept)).unwrap();
        assert_eq!(again, env);
        // The next update's cleanup removes what the rollback left.
        assert_eq!(
            cleanup::stale_images(&env),
            vec!["r/db:2".to_owned(), "r/d:2".to_owned(), "r/n:1".to_owned()]
        );
    }
}
