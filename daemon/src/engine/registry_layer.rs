//! The module image copied from the registry while podman pulls the image, so that its labels
//! start the extra images' download beside that pull and its imageroot is staged while podman
//! is still writing images into the instance's storage.
//!
//! Without it the layer comes from `podman image save` after the pull, and that waits for every
//! pull under way into the same storage: podman holds the storage's lock while it commits a
//! layer, so a save (or an inspect) started while the extra images are pulled waits for them.
//! skopeo, run as the instance's user with podman's registries.conf and credentials, copies the
//! image (a small one: the imageroot) into a private directory of the update's in /var/tmp
//! instead (`engine/scratch.rs`).
//!
//! A copy is used only for the image podman pulled: its configuration's digest must be the id
//! `podman pull` printed, and the layer, decompressed, must hash to the diff id that
//! configuration names (checked as the extractor reads it, before anything is installed). Any
//! other outcome (no skopeo, a registry error, a tag that moved between the two reads, an image
//! of several layers, a compression we do not read) leaves the update to `podman image save`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::task::JoinHandle;

use super::{oci_archive, scratch, skopeo};

/// What the copy in the directory is: what the update needs before podman's inspection.
#[derive(Debug)]
pub struct RegistryImage {
    /// The directory of the copy, removed when this is dropped.
    _dir: tempfile::TempDir,
    /// The configuration's digest, hex: the image id podman gives the image.
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// `rootfs.diff_ids` of the configuration, `sha256:…`, bottom first.
    pub diff_ids: Vec<String>,
    /// The layer, when the image has one in a form the extractor reads.
    pub layer: Result<Layer, String>,
}

/// The one layer of the image, as the registry served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    pub gzip: bool,
    /// The digest of the uncompressed layer, `sha256:…`.
    pub diff_id: String,
}

#[derive(Deserialize)]
struct Manifest {
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
}

/// Reads the copy skopeo wrote in `dir` (its `dir:` transport).
fn read(dir: tempfile::TempDir) -> Result<RegistryImage, String> {
    let manifest: Manifest = serde_json::from_slice(&read_file(dir.path(), "manifest.json")?)
        .map_err(|e| format!("skopeo wrote a manifest that is not an image manifest: {e}"))?;
    let config = manifest
        .config
        .ok_or("the registry serves a manifest without a configuration (schema 1)")?;
    let id = sha256_hex(&config.digest)?.to_owned();
    let bytes = read_file(dir.path(), &id)?;
    // skopeo checked it as it copied; checked again because the labels steer the update
    // before podman's inspection confirms them (a few KiB).
    let hashed = oci_archive::sha256_of(&bytes);
    if hashed != id {
        return Err(format!(
            "the configuration skopeo wrote hashes to sha256:{hashed}, not {}",
            config.digest
        ));
    }
    let skopeo::ImageConfig { labels, diff_ids } =
        skopeo::parse_config(&config.digest, &bytes).map_err(|e| e.to_string())?;
    let layer = one_layer(dir.path(), &manifest.layers, &diff_ids);
    Ok(RegistryImage {
        _dir: dir,
        id,
        labels,
        diff_ids,
        layer,
    })
}

/// The layer of an image of one layer, gzip-compressed or not.
fn one_layer(dir: &Path, layers: &[Descriptor], diff_ids: &[String]) -> Result<Layer, String> {
    let ([layer], [diff_id]) = (layers, diff_ids) else {
        return Err(format!(
            "the image has {} layers: podman merges them",
            layers.len()
        ));
    };
    let gzip = match layer.media_type.as_str() {
        t if t.ends_with("tar+gzip") || t.ends_with(".tar.gzip") => true,
        t if t.ends_with(".tar") => false,
        other => {
            return Err(format!(
                "its layer is of type {other:?}, read by podman only"
            ));
        }
    };
    sha256_hex(diff_id)?;
    Ok(Layer {
        path: dir.join(sha256_hex(&layer.digest)?),
        gzip,
        diff_id: diff_id.clone(),
    })
}

/// The hex of a `sha256:` digest (`oci_archive::sha256_hex`), or why it is none.
fn sha256_hex(digest: &str) -> Result<&str, String> {
    oci_archive::sha256_hex(digest).ok_or_else(|| format!("{digest:?} is not a sha256 digest"))
}

fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    fs::read(dir.join(name)).map_err(|e| format!("skopeo wrote no readable {name}: {e}"))
}

/// A copy under way, in a task of its own; dropping it kills skopeo and removes the directory.
pub struct LayerAhead {
    /// The task, until it has ended.
    task: Option<JoinHandle<Result<RegistryImage, String>>>,
    /// What it gave, until [`LayerAhead::wait`] takes it.
    copied: Option<Result<RegistryImage, String>>,
}

impl LayerAhead {
    /// Starts copying `reference` into a new directory of `instance` in /var/tmp (0700, the
    /// instance user's).
    pub fn start(reference: &str, instance: &str) -> LayerAhead {
        let (reference, instance) = (reference.to_owned(), instance.to_owned());
        let task = tokio::spawn(async move {
            let parent = Path::new(scratch::PARENT);
            let dir = scratch::make(parent, &instance, scratch::Kind::Layer)
                .map_err(|e| format!("cannot make a directory in {}: {e}", parent.display()))?;
            skopeo::copy_to_dir(&reference, dir.path())
                .await
                .map_err(|e| e.to_string())?;
            tokio::task::spawn_blocking(move || read(dir))
                .await
                .map_err(|e| format!("the task reading the copy failed: {e}"))?
        });
        LayerAhead {
            task: Some(task),
            copied: None,
        }
    }

    /// Waits for the copy to be written. Cancel-safe: dropped while waiting, it waits again
    /// the next time.
    async fn settle(&mut self) {
        if let Some(task) = self.task.as_mut() {
            let copied = match task.await {
                Ok(copied) => copied,
                Err(err) => Err(format!("the task copying the image failed: {err}")),
            };
            self.task = None;
            self.copied = Some(copied);
        }
    }

    /// The labels of the copied image's configuration, once it is written.
    pub async fn labels(&mut self) -> Result<BTreeMap<String, String>, String> {
        self.settle().await;
        match &self.copied {
            Some(Ok(image)) => Ok(image.labels.clone()),
            Some(Err(err)) => Err(err.clone()),
            None => Err(TAKEN.to_owned()),
        }
    }

    /// The copy, once written (the task's own failure is reported as a failed copy).
    pub async fn wait(&mut self) -> Result<RegistryImage, String> {
        self.settle().await;
        self.copied.take().unwrap_or_else(|| Err(TAKEN.to_owned()))
    }
}

const TAKEN: &str = "the registry's copy was already used";

impl Drop for LayerAhead {
    fn drop(&mut self) {
        // The task owns skopeo's process (kill_on_drop) and the directory: aborting the task
        // kills one and removes the other.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LAYER_HEX: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const DIFF_ID: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn copy(manifest: &str, config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("manifest.json"), manifest).unwrap();
        fs::write(dir.path().join(config_hex()), config).unwrap();
        dir
    }

    fn manifest(layer_type: &str, layers: usize) -> String {
        let layer = format!(r#"{{"mediaType":"{layer_type}","digest":"sha256:{LAYER_HEX}"}}"#);
        let layers = vec![layer; layers].join(",");
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"sha256:{}"}},"layers":[{layers}]}}"#,
            config_hex()
        )
    }

    const CONFIG: &str = r#"{"config":{"Labels":{"org.nethserver.images":"a/b:1"}},"rootfs":{"type":"layers","diff_ids":["sha256:3333333333333333333333333333333333333333333333333333333333333333"]}}"#;

    /// The digest `CONFIG` is named by.
    fn config_hex() -> String {
        oci_archive::sha256_of(CONFIG.as_bytes())
    }

    #[test]
    fn a_configuration_that_is_not_its_digest_is_refused() {
        let dir = copy(
            &manifest("application/vnd.oci.image.layer.v1.tar+gzip", 1),
            CONFIG,
        );
        let other = CONFIG.replace("a/b:1", "c/d:2");
        fs::write(dir.path().join(config_hex()), &other).unwrap();
        let err = read(dir).unwrap_err();
        assert!(
            err.contains(&format!("not sha256:{}", config_hex())),
            "{err}"
        );
    }

    #[test]
    fn an_image_of_one_gzip_layer_is_read() {
        for media_type in [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ] {
            let dir = copy(&manifest(media_type, 1), CONFIG);
            let path = dir.path().to_owned();
            let image = read(dir).unwrap();
            assert_eq!(image.id, config_hex());
            assert_eq!(image.labels["org.nethserver.images"], "a/b:1");
            assert_eq!(
                image.layer,
                Ok(Layer {
                    path: path.join(LAYER_HEX),
                    gzip: true,
                    diff_id: DIFF_ID.to_owned(),
                })
            );
        }
        let image = read(copy(
            &manifest("application/vnd.oci.image.layer.v1.tar", 1),
            CONFIG,
        ))
        .unwrap();
        assert!(!image.layer.unwrap().gzip);
    }

    #[test]
    fn other_images_are_left_to_podman() {
        let zstd = read(copy(
            &manifest("application/vnd.oci.image.layer.v1.tar+zstd", 1),
            CONFIG,
        ))
        .unwrap();
        assert!(zstd.layer.unwrap_err().contains("+zstd"));
        let two = read(copy(
            &manifest("application/vnd.oci.image.layer.v1.tar+gzip", 2),
            CONFIG,
        ))
        .unwrap();
        assert!(two.layer.unwrap_err().contains("2 layers"));
        let schema1 = read(copy(r#"{"schemaVersion":1,"fsLayers":[]}"#, CONFIG)).unwrap_err();
        assert!(schema1.contains("schema 1"), "{schema1}");
    }

    #[test]
    fn a_digest_is_never_a_path() {
        for digest in [
            "sha256:../../etc/passwd",
            "sha512:1111",
            "sha256:1111111111111111111111111111111111111111111111111111111111111111/x",
            "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(sha256_hex(digest).is_err(), "{digest}");
        }
        let bad_config = r#"{"config":{"digest":"sha256:../x"},"layers":[]}"#;
        assert!(
            read(copy(bad_config, CONFIG))
                .unwrap_err()
                .contains("not a sha256")
        );
    }
}
