//! One download per node: when a job updates several rootless instances, the daemon downloads
//! the module image and its extra images once, each into an OCI archive the instances' workers
//! load into their own storages (`podman load`), instead of every instance pulling the same
//! blobs from the registry. The workers that load the module image from its archive also take
//! the daemon's inspection of it instead of their own, and, for an image of one layer, read its
//! filesystem from the layer file the daemon wrote (`module-layer.tar`) instead of running
//! `podman image save` each.
//!
//! Isolation stays as it was: each instance's storage is written only by its own user; the
//! archives are written by root into a root-owned directory and are only readable (0644, in a
//! 0711 directory under a random name that only the job's workers are told).
//!
//! An archive must give the instance exactly what a pull would: the same name, image id, digest
//! and repository digest, so the manifest must come through byte for byte (`oci_archive.rs`).
//! skopeo copies the registry's bytes; without skopeo the images are pulled into a private
//! storage and saved from there, which keeps the digest only when podman compresses the layers
//! again exactly as they were, and that is checked. Any image an archive cannot carry
//! unchanged is left for the instances to pull, as is everything when the shared download
//! fails (the workers then report their own errors).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use super::image_stream::Source;
use super::oci_archive::{self, ArchiveError, OCI_MANIFEST};
use super::podman::{ImageInfo, Podman, PodmanError};
use super::skopeo::{self, IMAGES_LABEL, SkopeoError};

/// Where a job's shared images live: `<state dir>/shared-images/<job>-<random>/`.
pub const DIR_NAME: &str = "shared-images";

/// Why the shared download was not done (the instances then pull for themselves).
#[derive(Debug, thiserror::Error)]
pub enum SharedImagesError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Podman(#[from] PodmanError),
    #[error("{0}")]
    Skopeo(#[from] SkopeoError),
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    #[error("it did not finish within {0} s (pull_timeout)")]
    TimedOut(u64),
}

/// podman's run root must be shorter than 50 characters: a state dir may be longer.
const RUNROOT_PARENT: &str = "/run/module-updater";

/// What the daemon learnt of the module image it downloaded, for workers that load it from its
/// archive: they skip their own `podman image inspect` (the loaded image is the same image:
/// same id, digest and repository digest) and, for an image of one layer, read its filesystem
/// from `layer` instead of their own `podman image save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedModule {
    pub info: ImageInfo,
    /// The image's one layer as a tar file (0644 in the job's 0711 directory).
    pub layer: Option<PathBuf>,
}

/// A job's downloaded images: reference → archive. Removed with [`SharedImages::remove`].
#[derive(Debug, Default)]
pub struct SharedImages {
    dir: Option<PathBuf>,
    runroot: Option<PathBuf>,
    pub archives: BTreeMap<String, PathBuf>,
    /// Set when the module image has an archive.
    pub module: Option<SharedModule>,
    /// References left for the instances to pull, and why.
    pub skipped: Vec<(String, String)>,
    /// The daemon's podman on the private storage the module image was loaded into (read by
    /// `PlanUpdate` for the image's filesystem and size).
    pub private: Option<Podman>,
    /// Downloaded by a plan: every instance of the job loads it, rootful ones too (which
    /// otherwise pull for themselves, the node's download being only for several users).
    pub from_plan: bool,
}

impl SharedImages {
    /// Deletes the archives and the private storage (blocking: run off the async threads).
    pub fn remove(&self) {
        for dir in self.dir.iter().chain(&self.runroot) {
            if let Err(err) = std::fs::remove_dir_all(dir) {
                log::warn!(
                    "cannot remove the shared images in {}: {err}",
                    dir.display()
                );
            }
        }
    }
}

/// Removes the directories of one job (a download cancelled half-way leaves one).
pub fn remove_job(state_dir: &Path, job_id: u64) {
    let Ok(entries) = std::fs::read_dir(state_dir.join(DIR_NAME)) else {
        return;
    };
    let prefix = format!("{job_id}-");
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix)
            && let Err(err) = std::fs::remove_dir_all(entry.path())
        {
            log::warn!("cannot remove {}: {err}", entry.path().display());
        }
    }
}

/// Removes what a previous daemon left (it stopped during a job).
pub fn remove_leftovers(state_dir: &Path) {
    let root = state_dir.join(DIR_NAME);
    if root.exists()
        && let Err(err) = std::fs::remove_dir_all(&root)
    {
        log::warn!("cannot remove {}: {err}", root.display());
    }
}

/// Downloads `module_url` and the extra images its `org.nethserver.images` label names, once,
/// into an archive each, for each one that an archive carries unchanged. Extra images in
/// `present` (named in every instance's environment, hence in every storage) are not fetched.
pub async fn download(
    state_dir: &Path,
    job_id: u64,
    module_url: &str,
    present: &HashSet<String>,
    timeout: Duration,
) -> Result<SharedImages, SharedImagesError> {
    download_as(state_dir, &job_id.to_string(), module_url, present, timeout).await
}

/// [`download`] for `PlanUpdate`, before any job exists: `<state dir>/shared-images/plan-<random>/`,
/// kept for the job that follows (and removed with the others when the daemon starts).
pub async fn download_for_plan(
    state_dir: &Path,
    module_url: &str,
    timeout: Duration,
) -> Result<SharedImages, SharedImagesError> {
    download_as(state_dir, PLAN_PREFIX, module_url, &HashSet::new(), timeout).await
}

/// The name prefix of a plan's download directory.
const PLAN_PREFIX: &str = "plan";

async fn download_as(
    state_dir: &Path,
    owner: &str,
    module_url: &str,
    present: &HashSet<String>,
    timeout: Duration,
) -> Result<SharedImages, SharedImagesError> {
    let dir = make_job_dir(state_dir, owner)?;
    let runroot = make_runroot(owner);
    let mut shared = SharedImages {
        dir: Some(dir.clone()),
        runroot: runroot.as_ref().ok().cloned(),
        ..SharedImages::default()
    };
    let filled = match runroot {
        // Past the timeout the download's future is dropped, which kills skopeo and podman;
        // what they wrote goes with the directory below.
        Ok(runroot) => tokio::time::timeout(
            timeout,
            fill(&mut shared, &dir, &runroot, module_url, present),
        )
        .await
        .unwrap_or(Err(SharedImagesError::TimedOut(timeout.as_secs()))),
        Err(err) => Err(err),
    };
    match filled {
        Ok(()) => Ok(shared),
        Err(err) => {
            let cleanup = SharedImages {
                archives: BTreeMap::new(),
                skipped: Vec::new(),
                module: None,
                private: None,
                ..shared
            };
            let _ = tokio::task::spawn_blocking(move || cleanup.remove()).await;
            Err(err)
        }
    }
}

async fn fill(
    shared: &mut SharedImages,
    dir: &Path,
    runroot: &Path,
    module_url: &str,
    present: &HashSet<String>,
) -> Result<(), SharedImagesError> {
    // A storage of the daemon's own, vfs so that removing the directory removes everything.
    // 0700: the layers (which may hold device nodes a hostile image ships) are root's alone.
    let storage = private_dir(dir.join("storage"))?;
    // Where skopeo and podman stage images: inside the job's directory, so that what a killed
    // copy leaves (a cancelled job, a stopped daemon) goes with it.
    let tmp = private_dir(dir.join("tmp"))?;
    let global: Vec<String> = vec![
        "--root".into(),
        storage.display().to_string(),
        "--runroot".into(),
        runroot.display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ];
    let podman = Podman::new(global).with_tmpdir(tmp.clone());
    shared.private = Some(podman.clone());
    let mut archives = Archives {
        shared,
        dir,
        tmp: &tmp,
        made: Vec::new(),
    };
    match copy_from_registry(&mut archives, &podman, module_url, present).await {
        // Not installed (it is only recommended), too old for `--preserve-digests`, or the
        // registry failed it (then podman's pull fails too, and says so).
        Err(SharedImagesError::Skopeo(err)) => {
            let level = match &err {
                SkopeoError::Command(e) if e.is_not_found() => log::Level::Info,
                _ => log::Level::Warn,
            };
            log::log!(
                level,
                "{err}: the shared images are pulled with podman, then saved"
            );
            archives.forget();
            pull_and_save(&mut archives, &podman, module_url, present).await
        }
        copied => copied,
    }
}

/// The job's archives, `<dir>/<n>.tar`, and what they hold.
struct Archives<'a> {
    shared: &'a mut SharedImages,
    dir: &'a Path,
    /// Where skopeo stages what it copies.
    tmp: &'a Path,
    /// Every archive path handed out, kept or not (a failed copy may leave half of one).
    made: Vec<PathBuf>,
}

impl Archives<'_> {
    /// Where the next archive goes: a name not used before in the job.
    fn next(&mut self) -> PathBuf {
        let archive = self.dir.join(format!("{}.tar", self.made.len()));
        self.made.push(archive.clone());
        archive
    }

    /// Records an archive that gives exactly what a pull of `reference` would.
    fn keep(&mut self, reference: &str, archive: PathBuf) -> Result<(), SharedImagesError> {
        // The umask may have taken bits: the workers must be able to read it.
        set_mode(&archive, 0o644)?;
        self.shared.archives.insert(reference.to_owned(), archive);
        Ok(())
    }

    /// Leaves `reference` for each instance to pull, and says why.
    fn skip(&mut self, reference: &str, why: String) {
        self.shared.skipped.push((reference.to_owned(), why));
    }

    /// Records what [`fetch`] made of `reference` in `archive`: the archive and its manifest if
    /// kept.
    fn record(
        &mut self,
        reference: &str,
        archive: PathBuf,
        fetched: Fetched,
    ) -> Result<Option<(PathBuf, Vec<u8>)>, SharedImagesError> {
        match fetched {
            Fetched::Copied(manifest) => {
                self.keep(reference, archive.clone())?;
                Ok(Some((archive, manifest)))
            }
            Fetched::Skipped(why) => {
                self.skip(reference, why);
                Ok(None)
            }
        }
    }

    /// Removes every archive made so far, the module image's layer file, and what was recorded
    /// of them, to start again.
    fn forget(&mut self) {
        for archive in &self.made {
            if archive.exists() {
                remove_archive(archive);
            }
        }
        if let Some(layer) = self.shared.module.take().and_then(|m| m.layer) {
            remove_archive(&layer);
        }
        self.shared.archives.clear();
        self.shared.skipped.clear();
    }
}

/// With skopeo: each image is copied from its registry into an archive byte for byte (manifest
/// and compressed layers as served). The module image is then loaded into the private storage,
/// for its inspection and its layer file, while the extra images its labels name are copied;
/// the extra images never go through the private storage.
async fn copy_from_registry(
    archives: &mut Archives<'_>,
    podman: &Podman,
    module_url: &str,
    present: &HashSet<String>,
) -> Result<(), SharedImagesError> {
    let main = copy(archives, module_url).await?;
    let labels = match &main {
        Some((archive, manifest)) => archive_labels(module_url, archive, manifest)?,
        // Left for the instances to pull, the module image still names the extra images.
        None => skopeo::labels(module_url).await?,
    };
    let extras = extras_to_share(&labels, present);
    // podman's load is CPU-bound, skopeo's copies mostly wait for the registry and the disk:
    // side by side they take about the time of the longer, and the workers start that much
    // earlier.
    let dir = archives.dir;
    let load = async {
        match &main {
            Some((archive, _)) => load_module(podman, module_url, archive, dir)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let (module, copied) = tokio::join!(load, copy_extras(archives, &extras));
    // Recorded even if a copy failed: what it wrote goes with the rest (`forget`) if the
    // download starts again without skopeo.
    archives.shared.module = module?;
    copied
}

/// How many extra images are copied at once: downloads overlap their waits on the registry;
/// more only share the same bandwidth among more skopeo processes.
const COPIES_AT_ONCE: usize = 3;

/// Copies the extra images, [`COPIES_AT_ONCE`] at a time; each is recorded as kept or left to
/// the instances, in the order given.
async fn copy_extras(
    archives: &mut Archives<'_>,
    extras: &[&str],
) -> Result<(), SharedImagesError> {
    use futures_util::StreamExt;
    let tmp = archives.tmp;
    let mut copies = Vec::with_capacity(extras.len());
    for reference in extras {
        copies.push(fetch_into(reference, archives.next(), tmp));
    }
    let fetched: Vec<_> = futures_util::stream::iter(copies)
        .buffered(COPIES_AT_ONCE)
        .collect()
        .await;
    for (reference, archive, outcome) in fetched {
        archives.record(reference, archive, outcome?)?;
    }
    Ok(())
}

/// [`fetch`], with what it was given back.
async fn fetch_into<'r>(
    reference: &'r str,
    archive: PathBuf,
    tmp: &Path,
) -> (&'r str, PathBuf, Result<Fetched, SharedImagesError>) {
    let outcome = fetch(reference, &archive, tmp).await;
    (reference, archive, outcome)
}

/// Copies `reference` into a new archive if one can carry it unchanged: the archive and its
/// manifest; `None` when it is left for the instances to pull (and why is recorded).
async fn copy(
    archives: &mut Archives<'_>,
    reference: &str,
) -> Result<Option<(PathBuf, Vec<u8>)>, SharedImagesError> {
    let archive = archives.next();
    let fetched = fetch(reference, &archive, archives.tmp).await?;
    archives.record(reference, archive, fetched)
}

/// What became of one image's copy.
enum Fetched {
    /// The archive holds the image as its registry serves it: this manifest.
    Copied(Vec<u8>),
    /// Left for the instances to pull, and why.
    Skipped(String),
}

/// Copies `reference` into `archive` if an archive can carry it unchanged.
async fn fetch(reference: &str, archive: &Path, tmp: &Path) -> Result<Fetched, SharedImagesError> {
    let served = skopeo::raw_manifest(reference).await?;
    if let Err(why) = oci_archive::carried_unchanged(&served) {
        return Ok(Fetched::Skipped(why));
    }
    skopeo::copy_to_archive(reference, archive, tmp).await?;
    let (_, copied) = oci_archive::manifest(archive)?;
    if copied != served {
        // The tag moved between the two reads: the instances resolve it themselves.
        remove_archive(archive);
        return Ok(Fetched::Skipped(
            "its tag moved during the download".to_owned(),
        ));
    }
    Ok(Fetched::Copied(copied))
}

/// The labels of the image an archive of [`copy`] holds (`manifest` is its manifest), from its
/// configuration there.
fn archive_labels(
    reference: &str,
    archive: &Path,
    manifest: &[u8],
) -> Result<BTreeMap<String, String>, SharedImagesError> {
    let config = oci_archive::config(archive, manifest)?;
    Ok(skopeo::parse_config(reference, &config)?.labels)
}

/// Loads the module image's archive into the private storage, for what the workers that load
/// the same archive take from the daemon: its inspection and, for an image of one layer, the
/// layer file.
async fn load_module(
    podman: &Podman,
    module_url: &str,
    archive: &Path,
    dir: &Path,
) -> Result<SharedModule, SharedImagesError> {
    podman.load(archive).await?;
    let info = inspect(podman, module_url).await?;
    let layer = write_layer(podman, module_url, &info, dir).await;
    Ok(SharedModule { info, layer })
}

/// Without skopeo: the images are pulled into the private storage and saved from there. podman
/// compresses the layers again as it saves, so an archive is kept only when its manifest digest
/// is still the pulled one (the image was compressed by the same gzip code).
async fn pull_and_save(
    archives: &mut Archives<'_>,
    podman: &Podman,
    module_url: &str,
    present: &HashSet<String>,
) -> Result<(), SharedImagesError> {
    podman.pull(&[module_url]).await?;
    let main = inspect(podman, module_url).await?;
    let extras = extras_to_share(&main.labels, present);
    podman.pull(&extras).await?;

    let mut references = vec![module_url];
    references.extend(extras);
    for (reference, (manifest_type, repo_digests, digest)) in references
        .iter()
        .zip(manifest_types(podman, &references).await?)
    {
        if manifest_type != OCI_MANIFEST {
            archives.skip(reference, oci_archive::converted(&manifest_type));
            continue;
        }
        if repo_digests != 1 {
            archives.skip(reference, oci_archive::FROM_A_LIST.to_owned());
            continue;
        }
        let archive = archives.next();
        save(podman, reference, &archive).await?;
        let (saved, _) = oci_archive::manifest(&archive)?;
        if saved != digest {
            remove_archive(&archive);
            archives.skip(
                reference,
                "podman would save its layers compressed otherwise than the registry \
                 serves them, under another digest (skopeo copies them unchanged)"
                    .to_owned(),
            );
            continue;
        }
        archives.keep(reference, archive)?;
    }
    module_from_storage(archives, podman, module_url, main).await;
    Ok(())
}

/// The extra images the module image's labels name that the instances do not all have. A
/// malformed reference is the instances' error to report, at their own step.
fn extras_to_share<'a>(
    labels: &'a BTreeMap<String, String>,
    present: &HashSet<String>,
) -> Vec<&'a str> {
    labels
        .get(IMAGES_LABEL)
        .map(|label| label.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| super::imagename::validate_reference(r).is_ok() && !present.contains(*r))
        .collect()
}

/// What the workers that load the module image take from the daemon: its inspection and, for
/// an image of one layer, the layer file. Nothing when the module image has no archive.
async fn module_from_storage(
    archives: &mut Archives<'_>,
    podman: &Podman,
    module_url: &str,
    main: ImageInfo,
) {
    if archives.shared.archives.contains_key(module_url) {
        let layer = write_layer(podman, module_url, &main, archives.dir).await;
        archives.shared.module = Some(SharedModule { info: main, layer });
    }
}

async fn inspect(podman: &Podman, reference: &str) -> Result<ImageInfo, SharedImagesError> {
    Ok(podman
        .inspect(&[reference])
        .await?
        .pop()
        .ok_or_else(|| PodmanError::Missing(reference.to_owned()))?)
}

/// Removes an archive that is not kept (logged: the job's directory goes at its end anyway).
fn remove_archive(archive: &Path) {
    if let Err(err) = std::fs::remove_file(archive) {
        log::warn!("cannot remove {}: {err}", archive.display());
    }
}

/// Writes the one layer of the module image to `<dir>/module-layer.tar` (0644), as a worker's
/// `podman image save` would give it. `None` for an image of several layers, or when it cannot
/// be written (logged: each worker then saves the image itself).
async fn write_layer(
    podman: &Podman,
    module_url: &str,
    main: &ImageInfo,
    dir: &Path,
) -> Option<PathBuf> {
    let source = Source::saved_layer(module_url, main)?;
    let path = dir.join("module-layer.tar");
    let podman = podman.clone();
    let target = path.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut stream = source.open(&podman).map_err(|e| e.to_string())?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        std::io::copy(&mut stream, &mut file).map_err(|e| e.to_string())?;
        // The umask may have taken bits: the workers must be able to read it.
        set_mode(&target, 0o644).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the task failed: {e}")));
    match written {
        Ok(()) => Some(path),
        Err(err) => {
            log::warn!("cannot write the layer of {module_url} for the workers: {err}");
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// `<state dir>/shared-images/<job>-<random>/`, root-owned, 0711 all the way down from the
/// state dir (so that instance users can reach the archives but list nothing).
fn make_job_dir(state_dir: &Path, job_id: &str) -> Result<PathBuf, SharedImagesError> {
    let root = state_dir.join(DIR_NAME);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SharedImagesError::Io { path, source }
    };
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    set_mode(&root, 0o711)?;
    ensure_traversable(state_dir)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{job_id}-"))
        .tempdir_in(&root)
        .map_err(io(&root))?
        .keep();
    set_mode(&dir, 0o711)?;
    Ok(dir)
}

/// `/run/module-updater/<job>-<random>`, 0700: podman's run root for the private storage.
fn make_runroot(job_id: &str) -> Result<PathBuf, SharedImagesError> {
    let parent = Path::new(RUNROOT_PARENT);
    let io = |source| SharedImagesError::Io {
        path: parent.to_owned(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(io)?;
    set_mode(parent, 0o700)?;
    Ok(tempfile::Builder::new()
        .prefix(&format!("{job_id}-"))
        .tempdir_in(parent)
        .map_err(io)?
        .keep())
}

/// Adds search permission for others to the state dir if it lacks it (never removes any).
fn ensure_traversable(dir: &Path) -> Result<(), SharedImagesError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(|source| SharedImagesError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o001 == 0 {
        set_mode(dir, mode | 0o001)?;
    }
    Ok(())
}

/// Creates `path`, mode 0700 (root's alone).
fn private_dir(path: PathBuf) -> Result<PathBuf, SharedImagesError> {
    std::fs::create_dir(&path).map_err(|source| SharedImagesError::Io {
        path: path.clone(),
        source,
    })?;
    set_mode(&path, 0o700)?;
    Ok(path)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SharedImagesError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SharedImagesError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// Each reference's manifest type, number of repository digests and digest, in one podman
/// process.
async fn manifest_types(
    podman: &Podman,
    references: &[&str],
) -> Result<Vec<(String, usize, String)>, SharedImagesError> {
    let mut args: Vec<&str> = vec![
        "image",
        "inspect",
        "--format",
        "{{.ManifestType}} {{len .RepoDigests}} {{.Digest}}",
        "--",
    ];
    args.extend_from_slice(references);
    let stdout = podman.output(&args).await?;
    let parsed = parse_manifest_types(&stdout);
    if parsed.len() != references.len() {
        return Err(PodmanError::Missing(references.join(" ")).into());
    }
    Ok(parsed)
}

/// The lines `<manifest type> <repository digests> <digest>` of [`manifest_types`]' format.
fn parse_manifest_types(stdout: &[u8]) -> Vec<(String, usize, String)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let kind = fields.next()?.to_owned();
            let count = fields.next()?.parse().ok()?;
            let digest = fields.next()?.to_owned();
            Some((kind, count, digest))
        })
        .collect()
}

/// Saves an image of the private storage as an OCI archive at `archive`.
async fn save(podman: &Podman, reference: &str, archive: &Path) -> Result<(), SharedImagesError> {
    let output = archive.display().to_string();
    podman
        .output(&[
            "save",
            "--quiet",
            "--format",
            "oci-archive",
            "--output",
            &output,
            "--",
            reference,
        ])
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_type_of_a_pulled_oci_image_lets_it_be_shared() {
        let captured = super::super::fixture("podman-4.3", "image-inspect-manifest-type.txt");
        let parsed = parse_manifest_types(&captured);
        let [(kind, repo_digests, digest)] = &parsed[..] else {
            panic!("{parsed:?}")
        };
        assert_eq!(kind, OCI_MANIFEST);
        assert_eq!(*repo_digests, 1);
        assert!(digest.starts_with("sha256:"), "{digest}");
    }

    #[test]
    fn the_extra_images_to_share_are_those_the_label_names_and_not_all_have() {
        let config = super::super::fixture("skopeo-1.9", "inspect-config-raw.json");
        let labels = skopeo::parse_config("r", &config).unwrap().labels;
        let none = HashSet::new();
        assert_eq!(
            extras_to_share(&labels, &none),
            vec!["127.0.0.1:5917/fixture-db:1"]
        );
        let present = HashSet::from(["127.0.0.1:5917/fixture-db:1".to_owned()]);
        assert!(extras_to_share(&labels, &present).is_empty());
    }
}
