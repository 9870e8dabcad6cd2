//! The environment step: the image keys and their `PREV_*` written in one atomic rewrite.

use module_updater_dbus::types::Step;

use super::super::environment::{self, Environment};
use super::super::events::priority;
use super::super::podman::ImageInfo;
use super::context::{Ctx, StepResult, failed};
use super::pull::ExtraImage;

/// Sets `IMAGE_*` from `main` and each extra image's key, each with its previous value from
/// `old` as `PREV_*`. A missing previous value removes the `PREV_` key (NS8 writes the string
/// `None`).
pub fn rewrite(
    ctx: &mut Ctx<'_>,
    old: &Environment,
    main: &ImageInfo,
    extras: &[ExtraImage],
) -> StepResult<()> {
    ctx.begin(Step::UpdateEnvironment);
    let job = ctx.job;
    let mut patch: Vec<(String, Option<String>)> = Vec::new();
    let mut set = |key: &str, value: &str| {
        patch.push((format!("PREV_{key}"), old.get(key).map(str::to_owned)));
        patch.push((key.to_owned(), Some(value.to_owned())));
    };
    set("IMAGE_ID", &main.id);
    set("IMAGE_URL", &job.module_url);
    set("IMAGE_DIGEST", &main.digest);
    set("IMAGE_REOPODIGEST", &main.repo_digest);
    for extra in extras {
        set(&extra.var, &extra.url);
    }
    environment::update_file(&job.instance.state_dir, &patch)
        .map_err(|e| failed(Step::UpdateEnvironment)(e.to_string()))?;
    for (key, value) in &patch {
        if let Some(value) = value {
            ctx.message(
                priority::DEBUG,
                format!(
                    "Update module/{} environment {key}={value}",
                    job.instance.id
                ),
            );
        }
    }
    ctx.end(Step::UpdateEnvironment);
    Ok(())
}
