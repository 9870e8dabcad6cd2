//! What runs beside the steps: the removal of the temporary container, the flush of the
//! installed files. Started by the steps, awaited where a later step needs it, and drained in
//! one place, [`Background::drain`], whatever the outcome, so that nothing of the update outlives
//! the worker's result.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::task::JoinHandle;

use super::super::extract::{self, ExtractOutcome};
use super::super::podman::{Podman, PodmanError};
use super::super::state_flush;
use super::context::Ctx;

#[derive(Default)]
pub struct Background {
    /// `podman rm` of the temporary container, once its export has been read.
    container_removal: Option<JoinHandle<(String, Result<(), PodmanError>)>>,
    /// The flush of the installed files (`extract::sync_installed`), from the end of the
    /// extraction until the in-progress marker is removed.
    flush: Option<JoinHandle<Result<(), String>>>,
    /// podman's `TMPDIR` (`engine/scratch.rs`): removed once every podman process has ended.
    pub podman_tmp: Option<tempfile::TempDir>,
}

impl Background {
    /// Removes the temporary container in the background.
    pub fn remove_container(&mut self, podman: &Podman, container: String) {
        let podman = podman.clone();
        self.container_removal = Some(tokio::spawn(async move {
            let removed = podman.remove_container(&container).await;
            (container, removed)
        }));
    }

    /// Waits for the container's removal (the images it used can go only then); a failure is a
    /// warning.
    pub async fn container_removed(&mut self, ctx: &mut Ctx<'_>) {
        let Some(removal) = self.container_removal.take() else {
            return;
        };
        match removal.await {
            Ok((_, Ok(()))) => {}
            Ok((container, Err(err))) => ctx.warning(format!(
                "cannot remove the temporary container {container}: {err}"
            )),
            Err(err) => ctx.warning(format!(
                "cannot remove the temporary container: the removal task failed: {err}"
            )),
        }
    }

    /// Starts flushing what the extraction installed (and the directories it touched in the
    /// state dir); it runs while the manager reloads, the scripts run and podman removes images.
    pub fn flush_installed(
        &mut self,
        install_dir: PathBuf,
        state_dir: PathBuf,
        outcome: ExtractOutcome,
    ) {
        self.flush = Some(tokio::task::spawn_blocking(move || {
            extract::sync_installed(&install_dir, &outcome, &[&state_dir]).map_err(|e| {
                format!(
                    "cannot flush the files installed in {}: {e}",
                    install_dir.display()
                )
            })
        }));
    }

    /// Waits for the flush of the installed files, if one was started.
    async fn installed_flushed(&mut self) -> Result<(), String> {
        match self.flush.take() {
            Some(flush) => flush
                .await
                .unwrap_or_else(|e| Err(format!("the flush task failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits for the flush of the installed files, then flushes what changed in the state dir
    /// since `since` (what the scripts wrote: `engine/state_flush.rs`).
    pub async fn everything_flushed(
        &mut self,
        state_dir: &Path,
        since: SystemTime,
    ) -> Result<(), String> {
        self.installed_flushed().await?;
        let dir = state_dir.to_owned();
        tokio::task::spawn_blocking(move || state_flush::flush_changed(&dir, since))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map(|_| ())
            .map_err(|e| format!("cannot flush what changed in {}: {e}", state_dir.display()))
    }

    /// Waits for everything still running, then removes podman's temporary files.
    pub async fn drain(mut self, ctx: &mut Ctx<'_>) {
        self.container_removed(ctx).await;
        let _ = self.installed_flushed().await;
        self.podman_tmp = None;
    }
}
