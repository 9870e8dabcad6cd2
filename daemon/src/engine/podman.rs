//! The podman commands an update needs, each spawned as few times as the job allows (a podman
//! process costs tens of milliseconds of CPU): one listing tells which references are present,
//! one pull fetches all missing ones, one inspect reads every image, one `image rm` removes every
//! stale one. Every positional argument comes after `--`.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;

use serde::Deserialize;

use super::command::{CommandError, Runner};

/// Errors of podman commands.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("cannot parse the output of `podman {command}`: {source}")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "image {0} has no repository digest (RepoDigests is empty): it must come from a registry, not a local build"
    )]
    NoRepoDigest(String),
    #[error("podman returned no data for image {0}")]
    Missing(String),
    #[error("the archive path {0} has a ':', which podman's oci-archive transport cannot read")]
    NotAReference(String),
}

impl PodmanError {
    /// Whether podman said the image does not exist (`image not known`).
    pub fn is_unknown_image(&self) -> bool {
        matches!(
            self,
            PodmanError::Command(CommandError::Failed { stderr, .. }) if stderr.contains(IMAGE_UNKNOWN)
        )
    }
}

/// The name of the temporary container whose filesystem is extracted.
pub const EXTRACT_CONTAINER: &str = "module-updater-extract";

/// What `podman image inspect` tells about an image (only what the update uses). Serializable:
/// the daemon hands its own inspection of a shared image to the workers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ImageInfo {
    /// 64 hex digits, no prefix.
    pub id: String,
    /// `sha256:...`
    pub digest: String,
    /// `RepoDigests[0]`, `repo@sha256:...`
    pub repo_digest: String,
    pub labels: BTreeMap<String, String>,
    /// The diff ids of its layers (`RootFS.Layers`, `sha256:...`), bottom first.
    pub layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawInspect {
    id: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    repo_digests: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "RootFS")]
    root_fs: Option<RawRootFs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRootFs {
    #[serde(default)]
    layers: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawListed {
    #[serde(default)]
    id: String,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default)]
    repo_digests: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainer {
    #[serde(default)]
    id: String,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "ImageID")]
    image_id: String,
}

/// A running container, as `podman ps` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainer {
    pub id: String,
    pub name: String,
    /// The image as the container was created from it (a reference or an id).
    pub image: String,
    /// The image's id, 64 hex digits.
    pub image_id: String,
}

/// The podman CLI of the current user. Its global options come first (none on a real node;
/// kept for tests that point a rootful instance at a private storage).
#[derive(Debug, Clone)]
pub struct Podman {
    runner: Runner,
}

impl Podman {
    pub fn new(global: Vec<String>) -> Self {
        Podman {
            runner: Runner::new("podman", global),
        }
    }

    /// The same podman, its large temporary files (an archive unpacked by `load`, an image
    /// staged by `save`) in `dir`.
    pub fn with_tmpdir(self, dir: std::path::PathBuf) -> Self {
        Podman {
            runner: self.runner.with_tmpdir(dir),
        }
    }

    /// Runs `podman <global> <args>` and returns its stdout, or its failure with stderr's tail.
    pub async fn output(&self, args: &[&str]) -> Result<Vec<u8>, PodmanError> {
        Ok(self.runner.output(args).await?)
    }

    /// Every name (`repo:tag`) and repository digest (`repo@sha256:...`) of the local images, in
    /// one `podman image list`: a reference is present when it is one of them exactly
    /// (podman-pull-missing semantics).
    pub async fn local_names(&self) -> Result<HashSet<String>, PodmanError> {
        let args = ["image", "list", "--format", "json"];
        let stdout = self.output(&args).await?;
        parse_list(&args, &stdout)
    }

    /// Every local image's names and repository digests, by image id (64 hex digits), in one
    /// `podman image list`.
    pub async fn images_by_id(&self) -> Result<BTreeMap<String, Vec<String>>, PodmanError> {
        let args = ["image", "list", "--format", "json"];
        let stdout = self.output(&args).await?;
        let listed: Vec<RawListed> = parse_json(&args, &stdout)?;
        Ok(listed
            .into_iter()
            .map(|image| {
                let names = image.names.into_iter().flatten();
                let names = names.chain(image.repo_digests.into_iter().flatten());
                (image.id, names.collect())
            })
            .collect())
    }

    /// The running containers, in one `podman ps`.
    pub async fn running_containers(&self) -> Result<Vec<RunningContainer>, PodmanError> {
        let args = ["ps", "--format", "json"];
        let stdout = self.output(&args).await?;
        let listed: Vec<RawContainer> = parse_json(&args, &stdout)?;
        Ok(listed
            .into_iter()
            .map(|c| RunningContainer {
                id: c.id,
                name: c.names.into_iter().flatten().next().unwrap_or_default(),
                image: c.image,
                image_id: c.image_id,
            })
            .collect())
    }

    /// Pulls every reference in one podman process; the ids of the pulled images, one per line
    /// as `--quiet` prints them.
    pub async fn pull(&self, references: &[&str]) -> Result<Vec<String>, PodmanError> {
        if references.is_empty() {
            // NS8 runs `podman pull` with no argument when forced with no extra images and fails.
            return Ok(Vec::new());
        }
        let mut args = vec!["pull", "--quiet", "--"];
        args.extend_from_slice(references);
        let stdout = self.output(&args).await?;
        Ok(pulled_ids(&stdout))
    }

    /// Loads an image archive the daemon prepared (`engine/shared_images.rs`); the archive
    /// names the image, so it lands under the same name, id and digests as a pull would give.
    pub async fn load(&self, archive: &std::path::Path) -> Result<(), PodmanError> {
        let path = archive.display().to_string();
        self.output(&["load", "--quiet", "--input", &path])
            .await
            .map(|_| ())
    }

    /// Loads several archives of [`Podman::load`] in one podman process (`podman pull` of each
    /// `oci-archive:` path): a podman process costs tens of milliseconds, and every instance of
    /// a job pays it.
    pub async fn load_all(&self, archives: &[&std::path::Path]) -> Result<(), PodmanError> {
        let mut references = Vec::with_capacity(archives.len());
        for archive in archives {
            let path = archive.display().to_string();
            // The transport reads `path:reference`: a ':' in the path would cut it.
            if path.contains(':') {
                return Err(PodmanError::NotAReference(path));
            }
            references.push(format!("oci-archive:{path}"));
        }
        let mut args = vec!["pull", "--quiet", "--"];
        args.extend(references.iter().map(String::as_str));
        self.output(&args).await.map(|_| ())
    }

    /// Inspects every reference in one podman process, in the order given.
    pub async fn inspect(&self, references: &[&str]) -> Result<Vec<ImageInfo>, PodmanError> {
        let mut args = vec!["image", "inspect", "--"];
        args.extend_from_slice(references);
        let stdout = self.output(&args).await?;
        parse_inspect(&args, &stdout, references)
    }

    /// Creates a container of `image` (never started) to read its filesystem; returns its id.
    /// It has a fixed name and replaces one left by a killed update, so none accumulate (an
    /// instance runs one update at a time: the instance lock).
    pub async fn create(&self, image: &str) -> Result<String, PodmanError> {
        // A command is given so that an image without ENTRYPOINT or CMD can be read too; the
        // container is never started.
        let args = [
            "create",
            "--replace",
            "--name",
            EXTRACT_CONTAINER,
            "--",
            image,
            "/",
        ];
        // With --replace, podman also prints the name of a container it replaced: the id is the
        // last line.
        let stdout = self.output(&args).await?;
        let text = String::from_utf8_lossy(&stdout);
        Ok(text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(EXTRACT_CONTAINER)
            .trim()
            .to_owned())
    }

    /// Starts `podman export` of a container, its tar stream on the child's stdout. Blocking
    /// (std) process, because the tar reader that consumes it is synchronous.
    pub fn export_blocking(&self, container: &str) -> Result<std::process::Child, PodmanError> {
        self.spawn_blocking(&["export", "--", container])
    }

    /// Starts `podman image save` of an image as a docker-archive on the child's stdout (its
    /// layers uncompressed, the layers first). Blocking (std) process, like the export.
    pub fn save_blocking(&self, image: &str) -> Result<std::process::Child, PodmanError> {
        self.spawn_blocking(&["image", "save", "--format", "docker-archive", "--", image])
    }

    fn spawn_blocking(&self, args: &[&str]) -> Result<std::process::Child, PodmanError> {
        self.runner
            .std_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.runner.spawn_error(e).into())
    }

    /// Removes a container, ignoring one that is already gone.
    pub async fn remove_container(&self, container: &str) -> Result<(), PodmanError> {
        self.output(&["rm", "--force", "--ignore", "--", container])
            .await
            .map(|_| ())
    }

    /// Removes one image by reference (an image in use fails, which the caller reports as a warning).
    pub async fn remove_image(&self, reference: &str) -> Result<(), PodmanError> {
        self.output(&["image", "rm", "--", reference])
            .await
            .map(|_| ())
    }

    /// Removes images by reference in one `podman image rm` and returns each one's outcome, in
    /// the order given, as [`Podman::remove_image`] one by one would (an image in use, or one
    /// that does not exist, is an error of that image only).
    ///
    /// `podman image rm A B` (4.3) removes what it can and then fails as a whole (exit 1: some
    /// did not exist; 2: some are in use), naming an unknown image (`A: image not known`) but an
    /// image in use only by its container. So only when the batch fails is each reference
    /// removed alone, which gives it its own error; one the batch did remove is then "not known"
    /// too, and is told apart from one that never existed by the batch's own error for it.
    pub async fn remove_images(
        &self,
        references: &[String],
    ) -> Vec<(String, Result<(), PodmanError>)> {
        if references.is_empty() {
            return Vec::new();
        }
        let mut args = vec!["image", "rm", "--"];
        args.extend(references.iter().map(String::as_str));
        let batch_stderr = match self.runner.run(&args).await {
            Ok(output) if output.status.success() => {
                return references.iter().map(|r| (r.clone(), Ok(()))).collect();
            }
            Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
            // Cannot even start: each reference gets the error of its own attempt below.
            Err(_) => String::new(),
        };
        let mut outcomes = Vec::with_capacity(references.len());
        for reference in references {
            let outcome = match self.remove_image(reference).await {
                Err(PodmanError::Command(CommandError::Failed { stderr, .. }))
                    if stderr.contains(IMAGE_UNKNOWN)
                        && !reported_unknown(&batch_stderr, reference) =>
                {
                    // Known to the batch, unknown now: the batch removed it.
                    Ok(())
                }
                outcome => outcome,
            };
            outcomes.push((reference.clone(), outcome));
        }
        outcomes
    }
}

/// How podman reports a reference no local image has (`<reference>: image not known`).
const IMAGE_UNKNOWN: &str = "image not known";

/// Whether podman's stderr says that `reference` is no local image: a line `Error: <ref>: image
/// not known`, or `\t* <ref>: image not known` in a list of errors.
fn reported_unknown(stderr: &str, reference: &str) -> bool {
    let suffix = format!(" {reference}: {IMAGE_UNKNOWN}");
    stderr
        .lines()
        .any(|line| line.trim_end().ends_with(&suffix))
}

/// The ids `podman pull --quiet` prints, one per line.
fn pulled_ids(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The names and repository digests of `podman image list --format json`.
fn parse_list(args: &[&str], stdout: &[u8]) -> Result<HashSet<String>, PodmanError> {
    let listed: Vec<RawListed> = parse_json(args, stdout)?;
    Ok(listed
        .into_iter()
        .flat_map(|image| {
            let names = image.names.into_iter().flatten();
            names.chain(image.repo_digests.into_iter().flatten())
        })
        .collect())
}

/// What the update uses of `podman image inspect` of `references`, in their order.
fn parse_inspect(
    args: &[&str],
    stdout: &[u8],
    references: &[&str],
) -> Result<Vec<ImageInfo>, PodmanError> {
    let raw: Vec<RawInspect> = parse_json(args, stdout)?;
    if raw.len() != references.len() {
        return Err(PodmanError::Missing(references.join(" ")));
    }
    raw.into_iter()
        .zip(references)
        .map(|(image, reference)| {
            let repo_digest = image
                .repo_digests
                .and_then(|d| d.into_iter().next())
                .ok_or_else(|| PodmanError::NoRepoDigest((*reference).to_owned()))?;
            Ok(ImageInfo {
                id: image.id,
                digest: image.digest.unwrap_or_default(),
                repo_digest,
                labels: image.labels.unwrap_or_default(),
                layers: image.root_fs.and_then(|r| r.layers).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_json<T: serde::de::DeserializeOwned>(
    args: &[&str],
    stdout: &[u8],
) -> Result<T, PodmanError> {
    serde_json::from_slice(stdout).map_err(|source| PodmanError::Parse {
        command: args.join(" "),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inspect_output_with_null_labels_and_no_digests_parses() {
        let raw: Vec<RawInspect> = serde_json::from_str(
            r#"[{"Id":"ab","Digest":"sha256:1","RepoDigests":[],"Labels":null}]"#,
        )
        .unwrap();
        assert!(raw[0].labels.is_none());
        assert!(raw[0].root_fs.is_none());
        assert_eq!(raw[0].repo_digests.as_deref(), Some(&[][..]));
    }

    #[test]
    fn inspect_output_gives_the_layers_bottom_first() {
        let raw: Vec<RawInspect> = serde_json::from_str(
            r#"[{"Id":"ab","RootFS":{"Type":"layers","Layers":["sha256:1","sha256:2"]}}]"#,
        )
        .unwrap();
        let layers = raw[0].root_fs.as_ref().and_then(|r| r.layers.clone());
        assert_eq!(layers, Some(vec!["sha256:1".into(), "sha256:2".into()]));
    }

    fn fixture(name: &str) -> Vec<u8> {
        super::super::fixture("podman-4.3", name)
    }

    const FIXTURE: &str = "127.0.0.1:5917/fixture:1";

    #[test]
    fn the_inspection_of_a_pulled_image_gives_what_the_environment_needs() {
        let info = parse_inspect(
            &["image", "inspect"],
            &fixture("image-inspect.json"),
            &[FIXTURE],
        )
        .unwrap();
        let [info] = &info[..] else {
            panic!("{info:?}")
        };
        // The id is the configuration's digest, as the registry names it.
        let manifest =
            String::from_utf8(super::super::fixture("skopeo-1.9", "inspect-raw.json")).unwrap();
        assert!(
            manifest.contains(&format!("\"sha256:{}\"", info.id)),
            "{manifest}"
        );
        assert!(info.digest.starts_with("sha256:"), "{info:?}");
        assert_eq!(
            info.repo_digest,
            format!("127.0.0.1:5917/fixture@{}", info.digest)
        );
        assert_eq!(
            info.labels.get("org.nethserver.images").map(String::as_str),
            Some("127.0.0.1:5917/fixture-db:1")
        );
        assert_eq!(info.layers.len(), 1, "{info:?}");
        // The layer's diff id is the one the registry's configuration names.
        let config = super::super::fixture("skopeo-1.9", "inspect-config-raw.json");
        let config = super::super::skopeo::parse_config(FIXTURE, &config).unwrap();
        assert_eq!(config.diff_ids, info.layers);
        assert_eq!(config.labels, info.labels);
        // And `podman pull --quiet` printed that id.
        assert_eq!(
            pulled_ids(&fixture("pull-quiet.txt")),
            vec![info.id.clone()]
        );
    }

    #[test]
    fn an_imported_image_has_no_labels_and_a_local_repo_digest() {
        let reference = "localhost/imported:1";
        let info =
            parse_inspect(&[], &fixture("image-inspect-imported.json"), &[reference]).unwrap();
        assert!(info[0].labels.is_empty());
        assert!(
            info[0]
                .repo_digest
                .starts_with("localhost/imported@sha256:")
        );
        let err = parse_inspect(
            &[],
            &fixture("image-inspect-imported.json"),
            &[reference, "x/y:1"],
        )
        .unwrap_err();
        assert!(matches!(err, PodmanError::Missing(_)), "{err}");
    }

    #[test]
    fn the_listing_names_each_image_by_tag_and_by_digest() {
        let names = parse_list(&[], &fixture("image-list.json")).unwrap();
        assert!(names.contains(FIXTURE), "{names:?}");
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("127.0.0.1:5917/fixture@sha256:")),
            "{names:?}"
        );
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn an_unknown_image_in_a_batch_removal_is_found_in_what_podman_wrote() {
        let stderr = String::from_utf8(fixture("image-rm-unknown.stderr")).unwrap();
        assert!(
            reported_unknown(&stderr, "127.0.0.1:5917/absent:9"),
            "{stderr}"
        );
        assert!(!reported_unknown(&stderr, FIXTURE), "{stderr}");
    }

    #[test]
    fn unknown_images_are_found_by_their_whole_reference() {
        // What podman 4.3.1 prints for `image rm r/a:1 r/z:9 r/b:1` (z unknown, b in use).
        let stderr = "Error: 2 errors occurred:\n\t* r/z:9: image not known\n\t* image used by \
                      f49051adf621: image is in use by a container: consider listing external \
                      containers and force-removing image\n";
        assert!(reported_unknown(stderr, "r/z:9"));
        assert!(!reported_unknown(stderr, "r/b:1"));
        assert!(
            !reported_unknown(stderr, "z:9"),
            "a suffix of another reference"
        );
        assert!(reported_unknown("Error: r/z:9: image not known\n", "r/z:9"));
    }
}
