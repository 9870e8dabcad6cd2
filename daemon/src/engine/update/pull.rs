//! The pull step: the module image (pulled unless present, or loaded from the node's shared
//! download, with the extra images that download holds), its inspection and its extra images'
//! references; and the fetch of the missing extra images, which the extract step runs beside
//! the staging.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use module_updater_dbus::types::Step;
use tokio::task::JoinHandle;

use super::super::events::priority;
use super::super::imagename;
use super::super::podman::{ImageInfo, Podman};
use super::super::skopeo::IMAGES_LABEL;
use super::context::{Ctx, StepResult, failed};

/// An extra image of the label, with the environment variable NS8 names it by.
#[derive(Debug, Clone)]
pub struct ExtraImage {
    pub url: String,
    pub var: String,
}

/// The module image in the instance's storage.
pub struct Pulled {
    pub main: ImageInfo,
    /// Loaded from the node's shared download: the daemon's inspection and layer file of it are
    /// this image's.
    pub from_archive: bool,
}

/// The names of the local images, listed once per update (podman-pull-missing semantics: a
/// reference is present when a local image is named by it exactly).
#[derive(Default)]
pub struct LocalImages(Option<HashSet<String>>);

impl LocalImages {
    /// Counts `references` as present from now on (they were just loaded).
    fn add(&mut self, references: &[String]) {
        if let Some(names) = &mut self.0 {
            names.extend(references.iter().cloned());
        }
    }
}

/// Pulls the module image unless present (or loads it from the node's shared download) and
/// inspects it.
pub async fn pull(
    ctx: &mut Ctx<'_>,
    podman: &Podman,
    local: &mut LocalImages,
) -> StepResult<Pulled> {
    ctx.begin(Step::PullImage);
    let job = ctx.job;
    let url = job.module_url.as_str();
    let mut from_archive = false;
    if let Some(fetch) = missing(ctx, podman, local, Step::PullImage, &[url]).await? {
        let fetch = with_downloaded_extras(ctx, podman, local, fetch).await;
        let mut fetched = fetch.announce(ctx).run(podman.clone()).await;
        from_archive = fetched.loaded.iter().any(|r| r == url);
        local.add(&fetched.loaded);
        for note in std::mem::take(&mut fetched.notes) {
            ctx.message(priority::DEBUG, note);
        }
        report(ctx, Step::PullImage, fetched)?;
    }
    let main = match &job.shared_module {
        Some(shared) if from_archive => shared.info.clone(),
        _ => podman
            .inspect(&[url])
            .await
            .map_err(|e| failed(Step::PullImage)(e.to_string()))?
            .pop()
            .ok_or_else(|| failed(Step::PullImage)(format!("podman returned nothing for {url}")))?,
    };
    ctx.end(Step::PullImage);
    Ok(Pulled { main, from_archive })
}

/// Adds to a fetch that loads the module image from the node's shared download the missing
/// extra images that download holds too, so that one podman process loads them all at once.
/// The daemon inspected the module image, so its label is known before it is loaded. Not when
/// forced: then each step fetches its images again.
async fn with_downloaded_extras(
    ctx: &Ctx<'_>,
    podman: &Podman,
    local: &mut LocalImages,
    mut fetch: Fetch,
) -> Fetch {
    let job = ctx.job;
    let Some(shared) = &job.shared_module else {
        return fetch;
    };
    if job.force || fetch.loads.is_empty() {
        return fetch;
    }
    let Ok(extras) = extras_of(images_label(&shared.info.labels)) else {
        // A bad label fails the extra images' step, with its reason.
        return fetch;
    };
    let urls: Vec<&str> = extras.iter().map(|e| e.url.as_str()).collect();
    if let Ok(Some(more)) = missing(ctx, podman, local, Step::PullExtraImages, &urls).await {
        fetch.along = more.loads;
    }
    fetch
}

/// The extra images the module image's label names, validated before anything changes (NS8
/// finds a malformed one only after the files were replaced).
pub fn extra_images(main: &ImageInfo) -> StepResult<Vec<ExtraImage>> {
    extras_of(images_label(&main.labels))
}

/// Starts fetching the extra images that are missing, as a task of its own; `None` when none is.
pub async fn start_extras(
    ctx: &mut Ctx<'_>,
    podman: &Podman,
    local: &mut LocalImages,
    extras: &[ExtraImage],
) -> StepResult<Option<JoinHandle<Fetched>>> {
    let urls: Vec<&str> = extras.iter().map(|e| e.url.as_str()).collect();
    let fetch = missing(ctx, podman, local, Step::PullExtraImages, &urls).await?;
    Ok(fetch.map(|fetch| tokio::spawn(fetch.announce(ctx).run(podman.clone()))))
}

/// Waits for a fetch started by [`start_extras`] and reports it as the extra images' step.
pub async fn await_extras(ctx: &mut Ctx<'_>, task: JoinHandle<Fetched>) -> StepResult<()> {
    let fetched = task.await.unwrap_or_else(|e| Fetched {
        loaded: Vec::new(),
        warnings: Vec::new(),
        notes: Vec::new(),
        result: Err(format!("the pull task failed: {e}")),
    });
    report(ctx, Step::PullExtraImages, fetched)
}

/// What must be fetched of `urls`: the references no local image is named by exactly (all of
/// them with force); none when nothing is missing.
async fn missing(
    ctx: &Ctx<'_>,
    podman: &Podman,
    local: &mut LocalImages,
    step: Step,
    urls: &[&str],
) -> StepResult<Option<Fetch>> {
    if urls.is_empty() {
        return Ok(None);
    }
    let job = ctx.job;
    let missing: Vec<&str> = if job.force {
        urls.to_vec()
    } else {
        // One listing serves the module image and the extra images.
        if local.0.is_none() {
            let names = podman
                .local_names()
                .await
                .map_err(|e| failed(step)(e.to_string()))?;
            local.0 = Some(names);
        }
        let names = local.0.as_ref();
        urls.iter()
            .copied()
            .filter(|u| !names.is_some_and(|names| names.contains(*u)))
            .collect()
    };
    if missing.is_empty() {
        return Ok(None);
    }
    // What the daemon downloaded once for the node is loaded; the rest is pulled.
    let mut fetch = Fetch {
        timeout: Duration::from_secs(job.pull_timeout_secs),
        ..Fetch::default()
    };
    for reference in missing {
        match job.shared_images.get(reference) {
            Some(archive) => fetch.loads.push((reference.to_owned(), archive.clone())),
            None => fetch.pulls.push(reference.to_owned()),
        }
    }
    Ok(Some(fetch))
}

/// Reports a finished fetch: its warnings, then its failure as `step`'s.
fn report(ctx: &mut Ctx<'_>, step: Step, fetched: Fetched) -> StepResult<()> {
    for warning in fetched.warnings {
        ctx.warning(warning);
    }
    fetched.result.map_err(failed(step))
}

/// Missing images to bring into the instance's storage.
#[derive(Debug, Default)]
struct Fetch {
    /// Reference → archive of the daemon's shared download (`engine/shared_images.rs`).
    loads: Vec<(String, PathBuf)>,
    /// Extra images of the shared download loaded with the module image by the same podman
    /// process; one that does not load so is left to the extra images' step.
    along: Vec<(String, PathBuf)>,
    pulls: Vec<String>,
    /// How long the pull may take (`pull_timeout`).
    timeout: Duration,
}

/// What a fetch did: the references loaded from the shared download, warnings (a failed load,
/// then pulled) and its outcome.
#[derive(Debug)]
pub struct Fetched {
    loaded: Vec<String>,
    warnings: Vec<String>,
    /// What only a debugging admin needs (a combined load that failed, then done one by one).
    notes: Vec<String>,
    result: Result<(), String>,
}

impl Fetch {
    /// Says what is about to be fetched.
    fn announce(self, ctx: &mut Ctx<'_>) -> Self {
        for (reference, _) in self.loads.iter().chain(&self.along) {
            ctx.message(
                priority::INFO,
                format!("Loading {reference} (downloaded once for the node)"),
            );
        }
        if !self.pulls.is_empty() {
            ctx.message(priority::INFO, format!("Pulling {}", self.pulls.join(" ")));
        }
        self
    }

    /// Loads what the daemon downloaded (several archives in one podman process), then pulls
    /// the rest and what failed to load, in one podman pull.
    async fn run(self, podman: Podman) -> Fetched {
        let Fetch {
            loads,
            along,
            mut pulls,
            timeout,
        } = self;
        let mut warnings = Vec::new();
        let mut notes = Vec::new();
        let mut loaded = Vec::new();
        if !along.is_empty() {
            let all: Vec<&(String, PathBuf)> = loads.iter().chain(&along).collect();
            let archives: Vec<&std::path::Path> = all.iter().map(|(_, a)| a.as_path()).collect();
            match podman.load_all(&archives).await {
                Ok(()) => loaded.extend(all.iter().map(|(r, _)| r.clone())),
                Err(err) => notes.push(format!(
                    "cannot load {} in one podman process: {err}; loading them one by one",
                    all.iter()
                        .map(|(r, _)| r.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
            }
        }
        let loads = if loaded.is_empty() { loads } else { Vec::new() };
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
        // Past the timeout the pull's future is dropped, which kills podman.
        let result = match tokio::time::timeout(timeout, podman.pull(&references)).await {
            Ok(pulled) => pulled.map(|_| ()).map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the pull of {} did not finish within {} s (pull_timeout)",
                references.join(" "),
                timeout.as_secs()
            )),
        };
        Fetched {
            loaded,
            warnings,
            notes,
            result,
        }
    }
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
