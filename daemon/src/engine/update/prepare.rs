//! The prepare step: the instance lock, podman's scratch directory, the environment as it is,
//! the already-installed check and the in-progress marker.

use std::path::Path;

use module_updater_dbus::types::Step;

use super::super::environment::Environment;
use super::super::events::priority;
use super::super::imagename;
use super::super::lock::{self, UpdateLock};
use super::super::podman::Podman;
use super::super::scratch;
use super::background::Background;
use super::context::{Ctx, StepResult, failed};

/// What the update starts from.
pub struct Prepared {
    /// NS8's update lock, held for the whole update.
    pub lock: UpdateLock,
    /// The environment file as it was when the update began.
    pub env: Environment,
    /// The instance user's podman, its temporary files in the update's scratch directory.
    pub podman: Podman,
    /// The module URL is installed already, and nothing asks for the update to run again.
    pub already_installed: bool,
}

pub fn prepare(ctx: &mut Ctx<'_>, background: &mut Background) -> StepResult<Prepared> {
    let fail = failed(Step::Prepare);
    let job = ctx.job;
    let state_dir = &job.instance.state_dir;
    imagename::validate_reference(&job.module_url).map_err(|e| fail(e.to_string()))?;
    let lock = UpdateLock::acquire(state_dir).map_err(|e| fail(e.to_string()))?;
    let mut podman = Podman::new(job.podman_args.clone());
    if let Some(dir) = make_scratch(ctx) {
        podman = podman.with_tmpdir(dir.path().to_owned());
        background.podman_tmp = Some(dir);
    }
    let env = Environment::load(&state_dir.join("environment"))
        .map_err(|e| fail(format!("cannot read the instance environment: {e}")))?;
    let interrupted = lock::interrupted(state_dir);
    let already_installed =
        env.get("IMAGE_URL") == Some(job.module_url.as_str()) && !job.force && !interrupted;
    if already_installed {
        ctx.message(
            priority::INFO,
            format!("The module URL {} is already installed", job.module_url),
        );
    } else {
        if interrupted {
            // What the interrupted update left is not the instance as it was: a failure of
            // this one keeps the marker too, so that the next update runs in full again.
            ctx.touched = true;
            ctx.message(
                priority::WARNING,
                "an earlier update of this instance was interrupted: running the whole update again".into(),
            );
        }
        lock::mark_started(state_dir, job.job_id, &job.module_url)
            .and_then(|()| sync_dir(state_dir))
            .map_err(|e| fail(format!("cannot write {}: {e}", lock::MARKER_FILE)))?;
    }
    Ok(Prepared {
        lock,
        env,
        podman,
        already_installed,
    })
}

/// Removes what a killed worker of this instance left in /var/tmp (this update holds the
/// instance lock: no other one runs), and makes a directory of this update's there for podman's
/// temporary files (`engine/scratch.rs`). Without one, podman uses its default place.
fn make_scratch(ctx: &mut Ctx<'_>) -> Option<tempfile::TempDir> {
    let parent = Path::new(scratch::PARENT);
    let id = &ctx.job.instance.id;
    scratch::remove_left_by(parent, id, nix::unistd::geteuid().as_raw());
    match scratch::make(parent, id) {
        Ok(dir) => Some(dir),
        Err(e) => {
            ctx.message(
                priority::DEBUG,
                format!(
                    "podman's temporary files go to its default place: cannot make a directory in {}: {e}",
                    parent.display()
                ),
            );
            None
        }
    }
}

/// fsyncs a directory, so that an entry just created or renamed in it is on disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
