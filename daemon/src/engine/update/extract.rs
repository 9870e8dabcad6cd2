//! The extraction step, with the extra images' fetch beside it: stage → await extras → install.
//! The imageroot is read into a staging dir while the missing extra images are fetched; the
//! install waits for them, so a failed fetch leaves the instance as it was and is reported as
//! the earlier step's failure.

use module_updater_dbus::types::Step;

use super::super::extract::{self, ExtractError, ExtractOutcome, Staged};
use super::super::image_stream::Source;
use super::super::podman::Podman;
use super::background::Background;
use super::context::{Ctx, StepResult, failed};
use super::pull::{self, ExtraImage, LocalImages, Pulled};

/// Fetches the missing extra images and installs the module image's imageroot. Both steps are
/// reported: `pull-extra-images` begins, `extract` begins, and both end when both are done.
pub async fn extract(
    ctx: &mut Ctx<'_>,
    podman: &Podman,
    local: &mut LocalImages,
    pulled: &Pulled,
    extras: &[ExtraImage],
    background: &mut Background,
) -> StepResult<ExtractOutcome> {
    ctx.begin(Step::PullExtraImages);
    let fetch = pull::start_extras(ctx, podman, local, extras).await?;
    ctx.begin(Step::Extract);
    let staged = stage(ctx, podman, pulled, background).await;
    if let Some(fetch) = fetch {
        // Awaited even when the staging failed: the fetch is not cut off mid-write, and its
        // failure, the earlier step, is the one reported.
        pull::await_extras(ctx, fetch).await?;
    }
    let staged = staged.map_err(failed(Step::Extract))?;
    let installed = tokio::task::spawn_blocking(move || staged.install())
        .await
        .map_err(|e| failed(Step::Extract)(format!("the install task failed: {e}")))?;
    // A failure in the middle of the install has changed the tree; any other did not.
    if matches!(installed, Ok(_) | Err(ExtractError::Install { .. })) {
        ctx.touched = true;
    }
    let outcome = installed.map_err(|e| failed(Step::Extract)(e.to_string()))?;
    let instance = ctx.instance();
    background.flush_installed(
        instance.install_dir.clone(),
        instance.state_dir.clone(),
        outcome.clone(),
    );
    ctx.end(Step::PullExtraImages);
    ctx.end(Step::Extract);
    Ok(outcome)
}

/// Reads the image's filesystem into a staging dir of the install dir: the layer of a
/// one-layer image from the node's shared download or `podman image save`, otherwise a
/// temporary container's export (`engine/image_stream.rs`), removed in the background.
async fn stage(
    ctx: &Ctx<'_>,
    podman: &Podman,
    pulled: &Pulled,
    background: &mut Background,
) -> Result<Staged, String> {
    let main = &pulled.main;
    let label = main
        .labels
        .get("org.nethserver.imageroot")
        .map(String::as_str);
    let prefix = extract::imageroot_prefix(label).map_err(|e| e.to_string())?;
    let job = ctx.job;
    let url = job.module_url.as_str();
    let shared_layer = job
        .shared_module
        .as_ref()
        .and_then(|shared| shared.layer.clone())
        .filter(|_| pulled.from_archive);
    let source = match (shared_layer, Source::saved_layer(url, main)) {
        (Some(path), Some(_)) => Source::LayerFile { path },
        (_, Some(layer)) => layer,
        (_, None) => Source::Export {
            container: podman.create(url).await.map_err(|e| e.to_string())?,
        },
    };
    let install_dir = job.instance.install_dir.clone();
    let staged = {
        let (source, podman) = (source.clone(), podman.clone());
        tokio::task::spawn_blocking(move || {
            let stream = source.open(&podman).map_err(|e| e.to_string())?;
            let limits = &extract::Limits::DEFAULT;
            extract::stage(stream, &install_dir, &prefix, limits, &mut |_| {})
                .map_err(|e| e.to_string())
        })
        .await
    };
    if let Source::Export { container } = source {
        // The export has been read to its end or killed: the container is not needed any more.
        background.remove_container(podman, container);
    }
    staged.map_err(|e| format!("the extraction task failed: {e}"))?
}
