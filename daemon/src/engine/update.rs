//! NS8's `update-module` for one instance, top to bottom. Runs in the worker process, with the
//! instance's credentials, and reports typed [`Event`]s.
//!
//! The order is NS8's: `05pullimages` (pull, inspect, pull extra images, extract, reload, write the
//! environment), `50run_scriptdir` (update-module.d), `95cleanup_images`, with the module's own
//! `actions/update-module/*` steps merged in by name. What differs is listed in docs/architecture.md:
//! one lock for the whole update, a staged extraction, no `None` values, a true no-op when already
//! installed, and timeouts on scripts.
//!
//! What does not depend on each other overlaps, without changing what is observed: the extra
//! images are fetched while the imageroot is read and staged (the install waits for them), the
//! temporary container of an image of several layers is removed in the background, and the one
//! flush that makes the installed files durable runs in the background from the end of the
//! extraction until the in-progress marker is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use module_updater_dbus::types::{InstanceResult, InstanceStatus, ScriptStatus, Step};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::environment::{self, Environment};
use super::events::{Event, priority};
use super::extract;
use super::image_stream::Source;
use super::imagename;
use super::instance::Instance;
use super::lock::{self, UpdateLock};
use super::podman::{ImageInfo, Podman, PodmanError};
use super::scratch;
use super::scripts::{self, PlannedStep, ScriptOutput, ScriptRun};
use super::shared_images::SharedModule;
use super::skopeo::IMAGES_LABEL;
use super::state_flush;

/// NS8's built-in step names, merged with the module's own steps by name.
pub const PULL_STEP: &str = "05pullimages";
pub const SCRIPTS_STEP: &str = "50run_scriptdir";
pub const CLEANUP_STEP: &str = "95cleanup_images";
const BUILTIN_STEPS: [&str; 3] = [PULL_STEP, SCRIPTS_STEP, CLEANUP_STEP];

/// Everything a worker needs to update one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateJob {
    pub job_id: u64,
    pub instance: Instance,
    pub module_url: String,
    pub force: bool,
    /// The request JSON as the caller sent it: the scripts' stdin.
    pub request_json: String,
    pub script_timeout_secs: u64,
    /// The worker's niceness (0: the daemon's priority), which its children inherit.
    #[serde(default)]
    pub nice: u8,
    /// Where the systemd manager of a rootful instance answers (None: the system bus).
    pub system_manager_address: Option<String>,
    /// Global podman options (empty on a real node).
    pub podman_args: Vec<String>,
    /// Reference → OCI archive of the image, when the daemon downloaded it once for the node
    /// (`engine/shared_images.rs`): a missing reference is loaded from it instead of pulled.
    #[serde(default)]
    pub shared_images: BTreeMap<String, std::path::PathBuf>,
    /// What the daemon knows of the module image it downloaded (with `shared_images`).
    #[serde(default)]
    pub shared_module: Option<SharedModule>,
}

/// The instance's progress (0–100) at the start of each step; the step fills the gap to the next.
fn progress_window(step: Step) -> (u8, u8) {
    match step {
        Step::Prepare => (0, 2),
        Step::PullImage => (2, 25),
        Step::PullExtraImages => (25, 50),
        Step::Extract => (50, 60),
        Step::Reload => (60, 62),
        Step::UpdateEnvironment => (62, 65),
        Step::RunScripts | Step::ModuleStep => (65, 90),
        Step::CleanupImages => (90, 100),
    }
}

/// A step failed: where and why.
#[derive(Debug)]
struct Failed {
    step: Step,
    reason: String,
}

fn failed(step: Step) -> impl Fn(String) -> Failed {
    move |reason| Failed { step, reason }
}

type StepResult<T> = Result<T, Failed>;

/// An extra image of the label, with the environment variable NS8 names it by.
#[derive(Debug, Clone)]
struct ExtraImage {
    url: String,
    var: String,
}

/// Runs the update and always returns a result (also for failures and cancellation).
pub async fn run(
    job: &UpdateJob,
    cancel: watch::Receiver<bool>,
    emit: &mut (dyn FnMut(Event) + Send),
) -> InstanceResult {
    let mut update = Update {
        job,
        podman: Podman::new(job.podman_args.clone()),
        cancel,
        emit,
        progress: 0,
        step: Step::Prepare,
        initial_env: Environment::new(),
        local_images: None,
        result: InstanceResult::new(InstanceStatus::Completed),
        main_from_archive: false,
        changed: false,
        started: std::time::SystemTime::now(),
        container_removal: None,
        flush: None,
        podman_tmp: None,
    };
    let outcome = update.pipeline().await;
    update.settle().await;
    update.finish(outcome)
}

struct Update<'a> {
    job: &'a UpdateJob,
    podman: Podman,
    cancel: watch::Receiver<bool>,
    emit: &'a mut (dyn FnMut(Event) + Send),
    progress: u8,
    /// The step under way (the last one begun).
    step: Step,
    result: InstanceResult,
    /// Names of the local images, listed once per update.
    local_images: Option<std::collections::HashSet<String>>,
    /// The environment file as it was when the update began.
    initial_env: Environment,
    /// Whether this update loaded the module image from the node's shared download (then the
    /// daemon's inspection and layer file of it are this instance's image's).
    main_from_archive: bool,
    /// Whether files or the environment were touched (a failure after that keeps the marker).
    changed: bool,
    /// When the update began: what the scripts changed in the state dir since is flushed.
    started: std::time::SystemTime,
    /// `podman rm` of the temporary container, running in the background after the export.
    container_removal: Option<JoinHandle<(String, Result<(), PodmanError>)>>,
    /// The flush of the installed files (`extract::sync_installed`), started when the
    /// extraction ends and awaited before the in-progress marker is removed.
    flush: Option<JoinHandle<Result<(), String>>>,
    /// podman's `TMPDIR`, a directory of this update's in /var/tmp (see [`Update::make_scratch`]).
    podman_tmp: Option<tempfile::TempDir>,
}

impl Update<'_> {
    /// The whole update, in order. Returns the final status, or where and why it failed.
    async fn pipeline(&mut self) -> StepResult<InstanceStatus> {
        let state_dir = self.job.instance.state_dir.clone();
        self.begin(Step::Prepare);
        let _lock =
            UpdateLock::acquire(&state_dir).map_err(|e| failed(Step::Prepare)(e.to_string()))?;
        self.make_scratch();
        let env = Environment::load(&state_dir.join("environment")).map_err(|e| {
            failed(Step::Prepare)(format!("cannot read the instance environment: {e}"))
        })?;
        self.initial_env = env.clone();
        self.result.old_image_url = env.get("IMAGE_URL").map(str::to_owned);
        self.result.old_image_digest = env.get("IMAGE_DIGEST").map(str::to_owned);
        imagename::validate_reference(&self.job.module_url)
            .map_err(|e| failed(Step::Prepare)(e.to_string()))?;

        let interrupted = lock::interrupted(&state_dir);
        if self.result.old_image_url.as_deref() == Some(self.job.module_url.as_str())
            && !self.job.force
            && !interrupted
        {
            self.message(
                priority::INFO,
                format!(
                    "The module URL {} is already installed",
                    self.job.module_url
                ),
            );
            self.result.new_image_url = self.result.old_image_url.clone();
            self.result.new_image_digest = self.result.old_image_digest.clone();
            return Ok(InstanceStatus::AlreadyInstalled);
        }
        if interrupted {
            self.message(
                priority::WARNING,
                "an earlier update of this instance was interrupted: running the whole update again".into(),
            );
        }
        lock::mark_started(&state_dir, self.job.job_id, &self.job.module_url)
            .and_then(|()| sync_dir(&state_dir))
            .map_err(|e| {
                failed(Step::Prepare)(format!("cannot write {}: {e}", lock::MARKER_FILE))
            })?;
        self.end(Step::Prepare);

        // NS8 plans the steps once, before extraction; the steps that follow the pull are planned
        // again from the new tree, so a module's new or removed steps take effect in this update.
        let mut plan = self.plan(None);
        let mut index = 0;
        while index < plan.len() {
            self.check_cancel()?;
            let step = plan[index].clone();
            index += 1;
            match step {
                PlannedStep::Builtin(name) if name == PULL_STEP => {
                    self.pull_and_install(&env).await?;
                    plan = self.plan(Some(PULL_STEP));
                    index = 0;
                }
                PlannedStep::Builtin(name) if name == SCRIPTS_STEP => self.run_scripts().await?,
                PlannedStep::Builtin(name) if name == CLEANUP_STEP => self.cleanup_images().await,
                PlannedStep::Builtin(name) => {
                    return Err(failed(Step::Prepare)(format!(
                        "unknown built-in step {name}"
                    )));
                }
                PlannedStep::Module(path) => self.module_step(&path).await?,
            }
        }
        // What the extraction wrote must be on disk before the marker goes: the marker is what
        // makes an update that a crash interrupted run again (see `extract::sync_installed`).
        let flushed = match self.flush.take() {
            Some(flush) => flush
                .await
                .unwrap_or_else(|e| Err(format!("the flush task failed: {e}"))),
            None => Ok(()),
        };
        // So must what the scripts wrote in the state dir.
        let flushed = match flushed {
            Ok(()) => self.flush_state_dir().await,
            Err(err) => Err(err),
        };
        match flushed {
            Ok(()) => lock::mark_finished(&state_dir).map_err(|e| {
                failed(Step::CleanupImages)(format!("cannot remove {}: {e}", lock::MARKER_FILE))
            })?,
            Err(err) => self.warning(format!(
                "{err}; {} is kept, so the next update of this instance runs in full again",
                lock::MARKER_FILE
            )),
        }
        Ok(InstanceStatus::Completed)
    }

    /// Removes what a killed worker of this instance left in /var/tmp (this update holds the
    /// instance lock: no other one runs), and gives podman a directory of this update's there
    /// for its temporary files, removed when the update ends (`engine/scratch.rs`).
    fn make_scratch(&mut self) {
        let parent = Path::new(scratch::PARENT);
        let id = &self.job.instance.id;
        scratch::remove_left_by(parent, id, nix::unistd::geteuid().as_raw());
        match scratch::make(parent, id) {
            Ok(dir) => {
                self.podman = self.podman.clone().with_tmpdir(dir.path().to_owned());
                self.podman_tmp = Some(dir);
            }
            Err(e) => self.message(
                priority::DEBUG,
                format!(
                    "podman's temporary files go to its default place: cannot make a directory in {}: {e}",
                    parent.display()
                ),
            ),
        }
    }

    /// fsyncs what changed in the state dir since the update began (`engine/state_flush.rs`).
    async fn flush_state_dir(&self) -> Result<(), String> {
        let (dir, since) = (self.job.instance.state_dir.clone(), self.started);
        let shown = dir.display().to_string();
        tokio::task::spawn_blocking(move || state_flush::flush_changed(&dir, since))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map(|_| ())
            .map_err(|e| format!("cannot flush what changed in {shown}: {e}"))
    }

    /// `05pullimages`: pull, inspect, pull the extra images while extracting, reload, write the
    /// environment.
    async fn pull_and_install(&mut self, env: &Environment) -> StepResult<()> {
        let main = self.pull_main_image().await?;
        let extras = self.extra_images(&main)?;
        self.pull_extras_and_extract(&main, &extras).await?;
        self.reload().await;
        self.update_environment(env, &main, &extras)
    }

    /// Pulls the module image unless present (or loads it from the node's shared download), and
    /// inspects it.
    async fn pull_main_image(&mut self) -> StepResult<ImageInfo> {
        self.begin(Step::PullImage);
        let url = self.job.module_url.as_str();
        if let Some(fetch) = self.missing(Step::PullImage, &[url]).await? {
            let fetched = fetch.announce(self).run(self.podman.clone()).await;
            self.main_from_archive = fetched.loaded.iter().any(|r| r == url);
            self.fetched(Step::PullImage, fetched)?;
        }
        self.result.new_image_url = Some(url.to_owned());
        let main = match &self.job.shared_module {
            // The same image as the daemon's: its inspection is this one's.
            Some(shared) if self.main_from_archive => shared.info.clone(),
            _ => self
                .podman
                .inspect(&[url])
                .await
                .map_err(|e| failed(Step::PullImage)(e.to_string()))?
                .pop()
                .ok_or_else(|| {
                    failed(Step::PullImage)(format!("podman returned nothing for {url}"))
                })?,
        };
        self.result.new_image_digest = Some(main.digest.clone());
        self.end(Step::PullImage);
        Ok(main)
    }

    /// The extra images of `org.nethserver.images`, checked before anything changes (NS8 finds a
    /// malformed one only after the files were replaced).
    fn extra_images(&self, main: &ImageInfo) -> StepResult<Vec<ExtraImage>> {
        extras_of(images_label(&main.labels))
    }

    /// Stage → await the extra images → install. The extra images are fetched (pulled, or
    /// loaded from the node's shared download) in the background while the imageroot is read
    /// and staged; the install waits for them, so a failed fetch leaves the instance as it was
    /// and is reported as the earlier step's failure.
    async fn pull_extras_and_extract(
        &mut self,
        main: &ImageInfo,
        extras: &[ExtraImage],
    ) -> StepResult<()> {
        self.begin(Step::PullExtraImages);
        let urls: Vec<&str> = extras.iter().map(|e| e.url.as_str()).collect();
        let fetch = match self.missing(Step::PullExtraImages, &urls).await? {
            Some(fetch) => Some(tokio::spawn(fetch.announce(self).run(self.podman.clone()))),
            None => None,
        };
        self.begin(Step::Extract);
        let staged = self.stage(main).await;
        if let Some(fetch) = fetch {
            // Awaited even when the staging failed: the pull is not cut off mid-write, and its
            // failure, the earlier step, is the one reported.
            let fetched = fetch.await.unwrap_or_else(|e| Fetched {
                loaded: Vec::new(),
                warnings: Vec::new(),
                result: Err(format!("the pull task failed: {e}")),
            });
            self.fetched(Step::PullExtraImages, fetched)?;
        }
        let staged = staged.map_err(failed(Step::Extract))?;
        let installed = tokio::task::spawn_blocking(move || staged.install())
            .await
            .map_err(|e| failed(Step::Extract)(format!("the install task failed: {e}")))?;
        // A failure in the middle of the install has changed the tree; any other did not.
        if matches!(
            installed,
            Ok(_) | Err(extract::ExtractError::Install { .. })
        ) {
            self.changed = true;
        }
        let outcome = installed.map_err(|e| failed(Step::Extract)(e.to_string()))?;
        self.start_flush(&outcome);
        self.end(Step::PullExtraImages);
        self.result.files_installed = outcome.installed.len();
        self.result.files_removed = outcome.removed;
        self.end(Step::Extract);
        Ok(())
    }
    /// What must be fetched of `urls`: the references no local image is named by exactly (all of
    /// them with force); none when nothing is missing.
    async fn missing(&mut self, step: Step, urls: &[&str]) -> StepResult<Option<Fetch>> {
        if urls.is_empty() {
            return Ok(None);
        }
        let missing: Vec<&str> = if self.job.force {
            urls.to_vec()
        } else {
            // One listing serves the module image and the extra images.
            if self.local_images.is_none() {
                let names = self
                    .podman
                    .local_names()
                    .await
                    .map_err(|e| failed(step)(e.to_string()))?;
                self.local_images = Some(names);
            }
            let local = self.local_images.as_ref();
            urls.iter()
                .copied()
                .filter(|u| !local.is_some_and(|names| names.contains(*u)))
                .collect()
        };
        if missing.is_empty() {
            return Ok(None);
        }
        // What the daemon downloaded once for the node is loaded; the rest is pulled.
        let mut fetch = Fetch::default();
        for reference in missing {
            match self.job.shared_images.get(reference) {
                Some(archive) => fetch.loads.push((reference.to_owned(), archive.clone())),
                None => fetch.pulls.push(reference.to_owned()),
            }
        }
        Ok(Some(fetch))
    }

    /// Reports a finished fetch: its warnings, then its failure as `step`'s.
    fn fetched(&mut self, step: Step, fetched: Fetched) -> StepResult<()> {
        for warning in fetched.warnings {
            self.warning(warning);
        }
        fetched.result.map_err(failed(step))
    }

    /// Reads the image's filesystem into a staging dir of the install dir: the layer of a
    /// one-layer image from the node's shared download or `podman image save`, otherwise a
    /// temporary container's export (see `engine/image_stream.rs`).
    async fn stage(&mut self, main: &ImageInfo) -> Result<extract::Staged, String> {
        let label = main
            .labels
            .get("org.nethserver.imageroot")
            .map(String::as_str);
        let prefix = extract::imageroot_prefix(label).map_err(|e| e.to_string())?;
        let url = self.job.module_url.as_str();
        let shared_layer = self
            .job
            .shared_module
            .as_ref()
            .and_then(|shared| shared.layer.clone())
            .filter(|_| self.main_from_archive);
        let source = match (shared_layer, Source::saved_layer(url, main)) {
            (Some(path), Some(_)) => Source::LayerFile { path },
            (_, Some(layer)) => layer,
            (_, None) => Source::Export {
                container: self.podman.create(url).await.map_err(|e| e.to_string())?,
            },
        };
        let install_dir = self.job.instance.install_dir.clone();
        let podman = self.podman.clone();
        let staged = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || {
                let stream = source.open(&podman).map_err(|e| e.to_string())?;
                extract::stage(
                    stream,
                    &install_dir,
                    &prefix,
                    &extract::Limits::DEFAULT,
                    &mut |_| {},
                )
                .map_err(|e| e.to_string())
            })
            .await
        };
        if let Source::Export { container } = source {
            // The export has ended (the extractor waits for it or kills it): the container is
            // not needed any more. Its removal is awaited before the image cleanup and before
            // the worker ends, not here.
            let podman = self.podman.clone();
            self.container_removal = Some(tokio::spawn(async move {
                let removed = podman.remove_container(&container).await;
                (container, removed)
            }));
        }
        staged.map_err(|e| format!("the extraction task failed: {e}"))?
    }
    /// Reloads the instance's systemd manager over D-Bus. A failure is a warning, as in NS8.
    async fn reload(&mut self) {
        self.begin(Step::Reload);
        let instance = &self.job.instance;
        let connection = match (&instance.runtime_dir, instance.rootless) {
            (Some(runtime_dir), true) => {
                let address = module_updater_systemd::manager::user_bus_address(runtime_dir);
                module_updater_systemd::manager::connect(&address).await
            }
            _ => {
                module_updater_systemd::manager::connect_system(
                    self.job.system_manager_address.as_deref(),
                )
                .await
            }
        };
        let reloaded = match connection {
            Ok(connection) => {
                let reload = module_updater_systemd::manager::reload(&connection);
                match tokio::time::timeout(Duration::from_secs(90), reload).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => {
                        Err("the systemd manager did not answer Reload within 90 s".to_owned())
                    }
                }
            }
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = reloaded {
            self.warning(format!("systemd daemon-reload failed: {err}"));
        }
        self.end(Step::Reload);
    }

    /// Writes the image keys and their `PREV_*` in one atomic rewrite. A missing previous value
    /// removes the `PREV_` key (NS8 writes the string `None`).
    fn update_environment(
        &mut self,
        old: &Environment,
        main: &ImageInfo,
        extras: &[ExtraImage],
    ) -> StepResult<()> {
        self.begin(Step::UpdateEnvironment);
        let mut patch: Vec<(String, Option<String>)> = Vec::new();
        let mut set = |key: &str, value: &str| {
            patch.push((format!("PREV_{key}"), old.get(key).map(str::to_owned)));
            patch.push((key.to_owned(), Some(value.to_owned())));
        };
        set("IMAGE_ID", &main.id);
        set("IMAGE_URL", &self.job.module_url);
        set("IMAGE_DIGEST", &main.digest);
        set("IMAGE_REOPODIGEST", &main.repo_digest);
        for extra in extras {
            set(&extra.var, &extra.url);
        }
        environment::update_file(&self.job.instance.state_dir, &patch)
            .map_err(|e| failed(Step::UpdateEnvironment)(e.to_string()))?;
        for (key, value) in &patch {
            if let Some(value) = value {
                self.message(
                    priority::DEBUG,
                    format!(
                        "Update module/{} environment {key}={value}",
                        self.job.instance.id
                    ),
                );
            }
        }
        self.end(Step::UpdateEnvironment);
        Ok(())
    }

    /// `50run_scriptdir`: every executable of `update-module.d/` in byte order. A failing script
    /// is a warning (NS8 semantics), recorded with its exit code and duration.
    async fn run_scripts(&mut self) -> StepResult<()> {
        self.begin(Step::RunScripts);
        let dir = self.job.instance.install_dir.join("update-module.d");
        let listing =
            scripts::list_executables(&dir).map_err(|e| failed(Step::RunScripts)(e.to_string()))?;
        for skipped in &listing.skipped {
            self.message(
                priority::DEBUG,
                format!("Skipping non-executable file {}...", skipped.display()),
            );
        }
        let count = listing.runnable.len();
        for (index, path) in listing.runnable.iter().enumerate() {
            self.check_cancel()?;
            let outcome = self.run_one(Step::RunScripts, path, index, count).await?;
            if outcome.status != ScriptStatus::Ok {
                let how = match (outcome.status, outcome.exit_code) {
                    (ScriptStatus::Timeout, _) => {
                        format!("timed out after {} s", self.job.script_timeout_secs)
                    }
                    (_, Some(code)) => format!("exit code {code}"),
                    _ => "no exit code".to_owned(),
                };
                self.warning(format!("{} has failed ({how})", path.display()));
            }
            self.result.scripts.push(outcome);
            self.check_cancel()?;
        }
        self.end(Step::RunScripts);
        Ok(())
    }

    /// A module's own `actions/update-module/` step: a failure fails the update.
    async fn module_step(&mut self, path: &Path) -> StepResult<()> {
        self.begin(Step::ModuleStep);
        let outcome = self.run_one(Step::ModuleStep, path, 0, 1).await?;
        let name = outcome.name.clone();
        let status = (outcome.status, outcome.exit_code);
        self.result.scripts.push(outcome);
        self.check_cancel()?;
        match status {
            (ScriptStatus::Ok, _) => {
                self.end(Step::ModuleStep);
                Ok(())
            }
            (ScriptStatus::Timeout, _) => Err(failed(Step::ModuleStep)(format!(
                "module step {name} timed out after {} s",
                self.job.script_timeout_secs
            ))),
            (_, code) => Err(failed(Step::ModuleStep)(format!(
                "module step {name} failed with exit code {}",
                code.map_or("none".to_owned(), |c| c.to_string())
            ))),
        }
    }

    /// Runs one executable with NS8's contract: cwd = state dir, stdin = the request, the
    /// environment file on top of the worker's clean environment, fd 3 = AGENT_COMFD.
    async fn run_one(
        &mut self,
        step: Step,
        path: &Path,
        index: usize,
        count: usize,
    ) -> StepResult<module_updater_dbus::types::ScriptOutcome> {
        let fail = failed(step);
        let state_dir = self.job.instance.state_dir.clone();
        let file_env = Environment::load(&state_dir.join("environment"))
            .map_err(|e| fail(format!("cannot read the instance environment: {e}")))?;
        // The worker's own environment carries the file as it was when the update began; drop
        // those copies so a key the update removed (or changed) reaches the script as it is now.
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, v)| self.initial_env.get(k) != Some(v.as_str()))
            .collect();
        env.extend(file_env.iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
        env.insert("AGENT_TASK_ID".into(), self.job.job_id.to_string());
        env.insert("AGENT_TASK_ACTION".into(), "update-module".into());
        env.insert("AGENT_TASK_USER".into(), String::new());
        self.message(priority::INFO, format!("Running {}...", path.display()));
        let run = ScriptRun {
            path,
            env: &env,
            cwd: &state_dir,
            stdin: self.job.request_json.as_bytes(),
            timeout: Duration::from_secs(self.job.script_timeout_secs),
        };
        let (low, high) = progress_window(step);
        let span = u32::from(high - low);
        let share = |percent: u8| -> u8 {
            let count = count.max(1) as u32;
            let done = (index as u32) * 100 + u32::from(percent.min(100));
            low + (span * done / (count * 100)) as u8
        };
        let cancel = self.cancel.clone();
        let outcome = {
            // Disjoint borrows of the emitter and the progress, so output goes out live.
            let emit = &mut *self.emit;
            let progress = &mut self.progress;
            let mut on_output = |output: ScriptOutput| match output {
                ScriptOutput::Line { priority, text } => emit(Event::Message { priority, text }),
                ScriptOutput::Progress(percent) => {
                    let percent = share(percent);
                    if percent > *progress {
                        *progress = percent;
                        emit(Event::Progress { step, percent });
                    }
                }
            };
            scripts::run(&run, &cancel, &mut on_output).await
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err) => {
                // NS8 skips a step that cannot be started.
                self.warning(format!("skipped {}: {err}", path.display()));
                return Ok(module_updater_dbus::types::ScriptOutcome {
                    name: file_name(path),
                    status: ScriptStatus::Failed,
                    exit_code: None,
                    duration_ms: 0,
                });
            }
        };
        self.set_progress(step, share(100));
        Ok(outcome)
    }

    /// `95cleanup_images`: removes the previous images the new environment no longer names, in
    /// one podman process. An image still in use is a warning.
    async fn cleanup_images(&mut self) {
        self.await_container_removal().await;
        self.begin(Step::CleanupImages);
        let env = match Environment::load(&self.job.instance.state_dir.join("environment")) {
            Ok(env) => env,
            Err(err) => {
                self.warning(format!(
                    "cleanup skipped: cannot read the environment: {err}"
                ));
                return;
            }
        };
        let stale = stale_images(&env);
        for old in &stale {
            self.message(priority::INFO, format!("Removing {old}"));
        }
        for (old, outcome) in self.podman.remove_images(&stale).await {
            match outcome {
                Ok(()) => self.result.images_removed.push(old),
                Err(err) => self.warning(format!("cannot remove image {old}: {err}")),
            }
        }
        self.end(Step::CleanupImages);
    }

    /// Waits for the background removal of the temporary container; a failure is a warning.
    async fn await_container_removal(&mut self) {
        let Some(removal) = self.container_removal.take() else {
            return;
        };
        match removal.await {
            Ok((_, Ok(()))) => {}
            Ok((container, Err(err))) => self.warning(format!(
                "cannot remove the temporary container {container}: {err}"
            )),
            Err(err) => self.warning(format!(
                "cannot remove the temporary container: the removal task failed: {err}"
            )),
        }
    }

    /// Starts flushing what the extraction installed; it runs while the manager reloads, the
    /// scripts run and podman removes images.
    fn start_flush(&mut self, outcome: &extract::ExtractOutcome) {
        let install_dir = self.job.instance.install_dir.clone();
        let state_dir = self.job.instance.state_dir.clone();
        let outcome = outcome.clone();
        self.flush = Some(tokio::task::spawn_blocking(move || {
            extract::sync_installed(&install_dir, &outcome, &[&state_dir]).map_err(|e| {
                format!(
                    "cannot flush the files installed in {}: {e}",
                    install_dir.display()
                )
            })
        }));
    }

    /// Waits for what still runs in the background, whatever the outcome, so that nothing of the
    /// update outlives the worker's result.
    async fn settle(&mut self) {
        self.await_container_removal().await;
        if let Some(flush) = self.flush.take() {
            let _ = flush.await;
        }
        // Every podman process of the update has ended: its temporary files go.
        self.podman_tmp = None;
    }

    /// The modules' steps and the built-in ones, merged by name; with `after`, only those after it.
    fn plan(&self, after: Option<&str>) -> Vec<PlannedStep> {
        let dir = self.job.instance.install_dir.join("actions/update-module");
        let module_steps = scripts::list_executables(&dir)
            .map(|l| l.runnable)
            .unwrap_or_default();
        scripts::merge_module_steps(&BUILTIN_STEPS, module_steps)
            .into_iter()
            .filter(|step| after.is_none_or(|after| step.name().as_ref() > after))
            .collect()
    }

    fn check_cancel(&self) -> StepResult<()> {
        if *self.cancel.borrow() {
            Err(Failed {
                step: Step::Prepare,
                reason: CANCELLED.to_owned(),
            })
        } else {
            Ok(())
        }
    }

    fn begin(&mut self, step: Step) {
        self.step = step;
        (self.emit)(Event::StepStarted { step });
        let (low, _) = progress_window(step);
        self.set_progress(step, low);
    }

    fn end(&mut self, step: Step) {
        let (_, high) = progress_window(step);
        self.set_progress(step, high);
        (self.emit)(Event::StepFinished { step });
    }

    /// Reports progress; never decreasing.
    fn set_progress(&mut self, step: Step, percent: u8) {
        if percent > self.progress {
            self.progress = percent.min(100);
            (self.emit)(Event::Progress {
                step,
                percent: self.progress,
            });
        }
    }

    fn message(&mut self, priority: u8, text: String) {
        (self.emit)(Event::Message { priority, text });
    }

    fn warning(&mut self, text: String) {
        self.message(priority::WARNING, text.clone());
        self.result.warnings.push(text);
    }

    fn finish(mut self, outcome: StepResult<InstanceStatus>) -> InstanceResult {
        // Every instance's progress ends at 100, whatever the outcome: a UI closes its bar.
        self.set_progress(self.step, 100);
        match outcome {
            Ok(status) => {
                self.result.status = status;
            }
            // Cancelled between steps, or a step that failed once a cancel was asked for: the
            // cancel stopped it (a podman or script process killed by the cancel's SIGTERM).
            Err(Failed { step, reason }) if reason == CANCELLED || *self.cancel.borrow() => {
                self.result.status = InstanceStatus::Cancelled;
                if reason != CANCELLED {
                    self.warning(format!("cancelled during {step}: {reason}"));
                }
                self.message(priority::WARNING, "update cancelled".into());
                // Nothing changed yet: the instance is as before, no re-run is owed.
                if !self.changed {
                    let _ = lock::mark_finished(&self.job.instance.state_dir);
                }
            }
            Err(Failed { step, reason }) => {
                self.message(priority::ERR, format!("{step} failed: {reason}"));
                self.result.status = InstanceStatus::Failed;
                self.result.error = Some(module_updater_dbus::types::Failure { step, reason });
                // Nothing changed yet: the instance is as before, no re-run is owed.
                if !self.changed {
                    let _ = lock::mark_finished(&self.job.instance.state_dir);
                }
            }
        }
        self.result.exit_code = self.result.status.exit_code();
        self.result
    }
}

const CANCELLED: &str = "cancelled";

/// Missing images to bring into the instance's storage.
#[derive(Debug, Default)]
struct Fetch {
    /// Reference → archive of the daemon's shared download (`engine/shared_images.rs`).
    loads: Vec<(String, PathBuf)>,
    pulls: Vec<String>,
}

/// What a fetch did: the references loaded from the shared download, warnings (a failed load,
/// then pulled) and its outcome.
#[derive(Debug)]
struct Fetched {
    loaded: Vec<String>,
    warnings: Vec<String>,
    result: Result<(), String>,
}

/// The `org.nethserver.images` label of an image ("" when it has none).
fn images_label(labels: &BTreeMap<String, String>) -> &str {
    labels.get(IMAGES_LABEL).map_or("", String::as_str)
}

/// The extra images a `org.nethserver.images` label names, each validated.
fn extras_of(label: &str) -> StepResult<Vec<ExtraImage>> {
    label
        .split_whitespace()
        .map(|url| {
            let bad =
                |e: String| failed(Step::PullExtraImages)(format!("label {IMAGES_LABEL}: {e}"));
            imagename::validate_reference(url).map_err(|e| bad(e.to_string()))?;
            let name = imagename::image_name_from_url(url).map_err(|e| bad(e.to_string()))?;
            Ok(ExtraImage {
                url: url.to_owned(),
                var: imagename::image_env_var(name),
            })
        })
        .collect()
}

impl Fetch {
    /// Says what is about to be fetched.
    fn announce(self, update: &mut Update<'_>) -> Self {
        for (reference, _) in &self.loads {
            update.message(
                priority::INFO,
                format!("Loading {reference} (downloaded once for the node)"),
            );
        }
        if !self.pulls.is_empty() {
            update.message(priority::INFO, format!("Pulling {}", self.pulls.join(" ")));
        }
        self
    }

    /// Loads what the daemon downloaded, then pulls the rest and what failed to load, in one
    /// podman pull.
    async fn run(self, podman: Podman) -> Fetched {
        let Fetch { loads, mut pulls } = self;
        let mut warnings = Vec::new();
        let mut loaded = Vec::new();
        for (reference, archive) in loads {
            match podman.load(&archive).await {
                Ok(()) => loaded.push(reference),
                Err(err) => {
                    warnings.push(format!(
                        "cannot load {reference} from the shared download: {err}; pulling it"
                    ));
                    pulls.push(reference);
                }
            }
        }
        let references: Vec<&str> = pulls.iter().map(String::as_str).collect();
        let result = podman.pull(&references).await.map(|_| ());
        Fetched {
            loaded,
            warnings,
            result: result.map_err(|e| e.to_string()),
        }
    }
}

/// fsyncs a directory, so that an entry just created or renamed in it is on disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Previous images the environment no longer names: `PREV_X_IMAGE` ≠ `X_IMAGE`, and
/// `PREV_IMAGE_URL` ≠ `IMAGE_URL`, never one that a current key still names.
pub fn stale_images(env: &Environment) -> Vec<String> {
    let current: Vec<&str> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("PREV_") && (k.ends_with("_IMAGE") || *k == "IMAGE_URL"))
        .map(|(_, v)| v)
        .collect();
    let mut stale: Vec<String> = Vec::new();
    for (key, old) in env.iter() {
        let Some(name) = key.strip_prefix("PREV_") else {
            continue;
        };
        if !(name.ends_with("_IMAGE") || name == "IMAGE_URL") || old.is_empty() {
            continue;
        }
        if env.get(name) != Some(old) && !current.contains(&old) && !stale.iter().any(|s| s == old)
        {
            stale.push(old.to_owned());
        }
    }
    stale
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stale_images_never_include_a_current_one() {
        let env = Environment::parse(
            "IMAGE_URL=r/demo:2\nPREV_IMAGE_URL=r/demo:1\nDB_IMAGE=r/db:2\nPREV_DB_IMAGE=r/db:1\n\
             CACHE_IMAGE=r/cache:1\nPREV_CACHE_IMAGE=r/cache:1\nOTHER_IMAGE=r/db:1b\nPREV_X_IMAGE=r/cache:1\n",
        );
        assert_eq!(
            stale_images(&env),
            vec!["r/db:1".to_owned(), "r/demo:1".to_owned()]
        );
    }

    #[test]
    fn progress_windows_are_ordered() {
        let steps = [
            Step::Prepare,
            Step::PullImage,
            Step::PullExtraImages,
            Step::Extract,
            Step::Reload,
            Step::UpdateEnvironment,
            Step::RunScripts,
            Step::CleanupImages,
        ];
        for pair in steps.windows(2) {
            assert_eq!(progress_window(pair[0]).1, progress_window(pair[1]).0);
        }
        assert_eq!(progress_window(Step::CleanupImages).1, 100);
    }
}
