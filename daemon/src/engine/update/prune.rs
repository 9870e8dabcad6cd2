//! Prune: drops what is kept of an instance's previous version (`engine/kept.rs`) and the
//! previous images nothing names any more, as the instance user. A rollback is then impossible
//! until the next update.

use module_updater_dbus::types::{InstanceResult, InstanceStatus, Step};

use super::super::environment::Environment;
use super::super::events::priority;
use super::super::kept;
use super::super::lock::UpdateLock;
use super::super::podman::Podman;
use super::cleanup;
use super::context::{Ctx, StepResult, failed};

pub async fn prune(ctx: &mut Ctx<'_>, result: &mut InstanceResult) -> StepResult<InstanceStatus> {
    let fail = failed(Step::Prepare);
    ctx.begin(Step::Prepare);
    let instance = ctx.instance();
    let _lock = UpdateLock::acquire(&instance.state_dir).map_err(|e| fail(e.to_string()))?;
    let now = Environment::load(&instance.state_dir.join("environment"))
        .map_err(|e| fail(format!("cannot read the instance environment: {e}")))?;
    result.old_image_url = now.get("IMAGE_URL").map(str::to_owned);
    result.new_image_url = result.old_image_url.clone();
    let kept = kept::load(instance);
    ctx.end(Step::Prepare);
    ctx.begin(Step::CleanupImages);
    let existed = kept::remove(instance).map_err(|e| {
        failed(Step::CleanupImages)(format!(
            "cannot remove {}: {e}",
            kept::dir(instance).display()
        ))
    })?;
    if !existed {
        ctx.message(
            priority::INFO,
            format!("nothing is kept of a previous version of {}", instance.id),
        );
    }
    // The kept version's images, and the previous ones the environment still names as PREV_*.
    let mut stale = cleanup::stale_images(&now);
    if let Some(kept) = kept {
        let current = cleanup::current_images(&now);
        for image in cleanup::current_images(&kept.environment) {
            if !image.is_empty() && !current.contains(&image) && !stale.contains(&image) {
                stale.push(image);
            }
        }
    }
    let podman = Podman::new(ctx.job.podman_args.clone());
    let present = podman.local_names().await.unwrap_or_default();
    stale.retain(|image| present.contains(image));
    for (image, outcome) in podman.remove_images(&stale).await {
        match outcome {
            Ok(()) => result.images_removed.push(image),
            Err(err) => ctx.warning(format!("cannot remove image {image}: {err}")),
        }
    }
    ctx.end(Step::CleanupImages);
    Ok(InstanceStatus::Completed)
}
