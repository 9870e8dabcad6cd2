//! One download per node: when a job updates several rootless instances, the daemon pulls the
//! module image and its extra images once, into a storage of its own, and saves each as an OCI
//! archive the instances' workers load into their own storages (`podman load`), instead of
//! every instance pulling the same blobs from the registry. The workers that load the module
//! image from its archive also take the daemon's inspection of it instead of their own, and,
//! for an image of one layer, read its filesystem from the layer file the daemon wrote
//! (`module-layer.tar`) instead of running `podman image save` each.
//!
//! Isolation stays as it was: each instance's storage is written only by its own user; the
//! archives are written by root into a root-owned directory and are only readable (0644, in a
//! 0711 directory under a random name that only the job's workers are told).
//!
//! An archive must give the instance exactly what a pull would: the same name, image id, digest
//! and repository digest. An OCI archive keeps the manifest bytes, hence the digest, only for
//! an image whose registry manifest is an OCI manifest and that was not picked from a manifest
//! list (a list's digest would be lost); any other image is left for the instances to pull, as
//! is everything when the shared download fails (the workers then report their own errors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use super::image_stream::Source;
use super::podman::{ImageInfo, Podman, PodmanError};
use super::skopeo::IMAGES_LABEL;

/// Where a job's shared images live: `<state dir>/shared-images/<job>-<random>/`.
pub const DIR_NAME: &str = "shared-images";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

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

/// Pulls `module_url` and the extra images its `org.nethserver.images` label names, once, and
/// saves each one that an archive can carry faithfully. Extra images in `present` (named in
/// every instance's environment, hence in every storage) are not fetched.
pub async fn download(
    state_dir: &Path,
    job_id: u64,
    module_url: &str,
    present: &std::collections::HashSet<String>,
) -> Result<SharedImages, SharedImagesError> {
    let dir = make_job_dir(state_dir, job_id)?;
    let runroot = make_runroot(job_id);
    let mut shared = SharedImages {
        dir: Some(dir.clone()),
        runroot: runroot.as_ref().ok().cloned(),
        ..SharedImages::default()
    };
    let filled = match runroot {
        Ok(runroot) => fill(&mut shared, &dir, &runroot, module_url, present).await,
        Err(err) => Err(err),
    };
    match filled {
        Ok(()) => Ok(shared),
        Err(err) => {
            let cleanup = SharedImages {
                archives: BTreeMap::new(),
                skipped: Vec::new(),
                module: None,
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
    present: &std::collections::HashSet<String>,
) -> Result<(), SharedImagesError> {
    // A storage of the daemon's own, vfs so that removing the directory removes everything.
    // 0700: the layers (which may hold device nodes a hostile image ships) are root's alone.
    let storage = dir.join("storage");
    std::fs::create_dir(&storage).map_err(|source| SharedImagesError::Io {
        path: storage.clone(),
        source,
    })?;
    set_mode(&storage, 0o700)?;
    let global: Vec<String> = vec![
        "--root".into(),
        dir.join("storage").display().to_string(),
        "--runroot".into(),
        runroot.display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ];
    let podman = Podman::new(global.clone());
    podman.pull(&[module_url]).await?;
    let main = podman
        .inspect(&[module_url])
        .await?
        .pop()
        .ok_or_else(|| PodmanError::Missing(module_url.to_owned()))?;
    // Not read ahead from the registry as a worker does (`update.rs`: pull_main_image): that
    // read fetches the image's configuration blob, which the pull then fetches again, and this
    // download is what makes each blob be served once per job.
    let extras: Vec<&str> = main
        .labels
        .get(IMAGES_LABEL)
        .map(|label| label.split_whitespace().collect())
        .unwrap_or_default();
    // A malformed reference is the instances' error to report, at their own step.
    let extras: Vec<&str> = extras
        .into_iter()
        .filter(|r| super::imagename::validate_reference(r).is_ok() && !present.contains(*r))
        .collect();
    podman.pull(&extras).await?;

    let mut references = vec![module_url];
    references.extend(extras);
    for (reference, (manifest_type, repo_digests)) in references
        .iter()
        .zip(manifest_types(&global, &references).await?)
    {
        if manifest_type != OCI_MANIFEST {
            shared.skipped.push((
                (*reference).to_owned(),
                format!("its manifest is {manifest_type}, which an OCI archive would convert"),
            ));
            continue;
        }
        if repo_digests != 1 {
            shared.skipped.push((
                (*reference).to_owned(),
                "it comes from a manifest list, whose digest an archive would lose".to_owned(),
            ));
            continue;
        }
        let archive = dir.join(format!("{}.tar", shared.archives.len()));
        save(&global, reference, &archive).await?;
        set_mode(&archive, 0o644)?;
        shared.archives.insert((*reference).to_owned(), archive);
    }
    if shared.archives.contains_key(module_url) {
        let layer = write_layer(&podman, module_url, &main, dir).await;
        shared.module = Some(SharedModule { info: main, layer });
    }
    Ok(())
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
        let mut stream = source.open(&podman, None).map_err(|e| e.to_string())?;
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
fn make_job_dir(state_dir: &Path, job_id: u64) -> Result<PathBuf, SharedImagesError> {
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
fn make_runroot(job_id: u64) -> Result<PathBuf, SharedImagesError> {
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

fn set_mode(path: &Path, mode: u32) -> Result<(), SharedImagesError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SharedImagesError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// Each reference's manifest type and number of repository digests, in one podman process.
async fn manifest_types(
    global: &[String],
    references: &[&str],
) -> Result<Vec<(String, usize)>, SharedImagesError> {
    let mut args: Vec<&str> = vec![
        "image",
        "inspect",
        "--format",
        "{{.ManifestType}} {{len .RepoDigests}}",
        "--",
    ];
    args.extend_from_slice(references);
    let stdout = run(global, &args).await?;
    let text = String::from_utf8_lossy(&stdout);
    let parsed: Vec<(String, usize)> = text
        .lines()
        .filter_map(|line| {
            let (kind, count) = line.trim().rsplit_once(' ')?;
            Some((kind.to_owned(), count.parse().ok()?))
        })
        .collect();
    if parsed.len() != references.len() {
        return Err(PodmanError::Missing(references.join(" ")).into());
    }
    Ok(parsed)
}

async fn save(global: &[String], reference: &str, archive: &Path) -> Result<(), SharedImagesError> {
    let output = archive.display().to_string();
    run(
        global,
        &[
            "save",
            "--quiet",
            "--format",
            "oci-archive",
            "--output",
            &output,
            "--",
            reference,
        ],
    )
    .await
    .map(|_| ())
}

/// One podman command on the daemon's private storage, its stdout on success.
async fn run(global: &[String], args: &[&str]) -> Result<Vec<u8>, SharedImagesError> {
    Ok(Podman::new(global.to_vec()).output(args).await?)
}
