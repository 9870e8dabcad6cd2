//! skopeo, for what podman cannot do: read an image in its registry without pulling it, and copy
//! it exactly as the registry serves it.
//!
//! skopeo shares podman's image library, so it reads the same registries.conf (mirrors,
//! insecure registries), the same credentials and picks the same platform from a manifest list.
//! Only the daemon's shared download (`engine/shared_images.rs`) uses it: the module image's
//! labels, and images copied into OCI archives the instances load.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::command::{CommandError, Runner};

/// The label that names a module's extra images.
pub const IMAGES_LABEL: &str = "org.nethserver.images";

/// How long skopeo may wait for the registry (its `--command-timeout`) where a read is small: it
/// bounds a read that nobody waits for any more.
const COMMAND_TIMEOUT: &str = "60s";

/// Why skopeo could not read or copy an image.
#[derive(Debug, thiserror::Error)]
pub enum SkopeoError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("cannot parse the configuration of {reference} that skopeo printed: {source}")]
    Parse {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawContainerConfig>,
    #[serde(default)]
    rootfs: Option<RawRootFs>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What the update uses of an image configuration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `config.Labels` (absent or null: none).
    pub labels: BTreeMap<String, String>,
    /// `rootfs.diff_ids`, `sha256:…`, bottom first.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawContainerConfig {
    #[serde(default, rename = "Labels")]
    labels: Option<BTreeMap<String, String>>,
}

/// The labels of the image `reference` names in its registry (`reference` is a validated
/// registry reference, `host/path:tag` or `host/path@digest`).
pub async fn labels(reference: &str) -> Result<BTreeMap<String, String>, SkopeoError> {
    let source = format!("docker://{reference}");
    let config = run(&[
        "--command-timeout",
        COMMAND_TIMEOUT,
        "inspect",
        "--config",
        "--raw",
        "--",
        &source,
    ])
    .await?;
    parse_labels(reference, &config)
}

/// The manifest `reference` names, as its registry serves it (a list stays a list).
pub async fn raw_manifest(reference: &str) -> Result<Vec<u8>, SkopeoError> {
    let source = format!("docker://{reference}");
    let args = [
        "--command-timeout",
        COMMAND_TIMEOUT,
        "inspect",
        "--raw",
        "--",
        &source,
    ];
    run(&args).await
}

/// Copies the image `reference` names into a new OCI archive at `archive`, named `reference`
/// there (the name `podman load` gives it), with the registry's own bytes: skopeo fails rather
/// than change a digest (`--preserve-digests`). skopeo stages the image in `tmpdir` before it
/// writes the archive. No timeout: a large image takes its time, and dropping the future kills
/// skopeo (what it staged stays in `tmpdir`).
pub async fn copy_to_archive(
    reference: &str,
    archive: &Path,
    tmpdir: &Path,
) -> Result<(), SkopeoError> {
    let tmpdir = tmpdir.display().to_string();
    let source = format!("docker://{reference}");
    let destination = format!("oci-archive:{}:{reference}", archive.display());
    let args = [
        "--tmpdir",
        &tmpdir,
        "copy",
        "--quiet",
        "--preserve-digests",
        "--",
        &source,
        &destination,
    ];
    run(&args).await.map(|_| ())
}

/// Runs skopeo with `args`; its standard output if it succeeded.
async fn run(args: &[&str]) -> Result<Vec<u8>, SkopeoError> {
    Ok(Runner::new("skopeo", Vec::new()).output(args).await?)
}

/// The labels and diff ids of an OCI or Docker image configuration of `reference`.
pub fn parse_config(reference: &str, config: &[u8]) -> Result<ImageConfig, SkopeoError> {
    let raw: RawConfig = serde_json::from_slice(config).map_err(|source| SkopeoError::Parse {
        reference: reference.to_owned(),
        source,
    })?;
    Ok(ImageConfig {
        labels: raw.config.and_then(|c| c.labels).unwrap_or_default(),
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

fn parse_labels(reference: &str, config: &[u8]) -> Result<BTreeMap<String, String>, SkopeoError> {
    parse_config(reference, config).map(|c| c.labels)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn labels_of_an_oci_configuration() {
        let config = br#"{"architecture":"amd64","config":{"Labels":{"org.nethserver.images":"ghcr.io/a/b:1 ghcr.io/a/c:1","x":"y"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let labels = parse_labels("r", config).unwrap();
        assert_eq!(
            labels.get(IMAGES_LABEL).map(String::as_str),
            Some("ghcr.io/a/b:1 ghcr.io/a/c:1")
        );
        assert_eq!(labels.len(), 2);
    }

    #[test]
    fn a_configuration_without_labels_has_none() {
        for config in [
            &br#"{"config":{"Labels":null}}"#[..],
            br#"{"config":{}}"#,
            br#"{"config":null}"#,
            br#"{"architecture":"amd64"}"#,
        ] {
            assert!(parse_labels("r", config).unwrap().is_empty());
        }
    }

    #[test]
    fn the_configuration_skopeo_1_9_prints_gives_labels_and_diff_ids() {
        let config = super::super::fixture("skopeo-1.9", "inspect-config-raw.json");
        let parsed = parse_config("127.0.0.1:5917/fixture:1", &config).unwrap();
        assert_eq!(
            parsed.labels.get(IMAGES_LABEL).map(String::as_str),
            Some("127.0.0.1:5917/fixture-db:1")
        );
        assert_eq!(
            parsed
                .labels
                .get("org.nethserver.imageroot")
                .map(String::as_str),
            Some("imageroot")
        );
        assert_eq!(parsed.diff_ids.len(), 1);
        assert!(parsed.diff_ids[0].starts_with("sha256:"), "{parsed:?}");
    }

    #[test]
    fn garbage_is_an_error_that_names_the_image() {
        let err = parse_labels("ghcr.io/a/b:1", b"<html>").unwrap_err();
        assert!(err.to_string().contains("ghcr.io/a/b:1"), "{err}");
    }
}
