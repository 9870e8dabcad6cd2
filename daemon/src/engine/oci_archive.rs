//! The few things the shared download needs to know of an OCI archive (a tar of an OCI image
//! layout: `index.json`, `blobs/sha256/…`): which manifest it holds, and whether a registry
//! manifest is one that an archive, then `podman load`, gives back byte for byte. (An archive,
//! not a layout directory: podman names an image loaded from a directory after the directory,
//! and one loaded from an archive after the name the archive gives it.)
//!
//! Byte for byte matters: an image's digest is the hash of its manifest bytes, and an instance
//! must end with the digest its own pull would have given. An archive written by skopeo from
//! the registry keeps the registry's bytes; one saved by podman from its storage holds layers
//! that podman compressed again, whose digests match the registry's only if the image was
//! compressed by the same gzip code in the first place.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {member}")]
    Missing { path: PathBuf, member: String },
    #[error("the index.json of {path} is not an image index: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the index.json of {path} lists {count} manifests where one was written")]
    NotOne { path: PathBuf, count: usize },
    #[error("the index.json of {path} names the manifest {digest:?}, not a sha256 digest")]
    BadDigest { path: PathBuf, digest: String },
    #[error("the manifest in {path} names no configuration of a sha256 digest: {detail}")]
    NoConfig { path: PathBuf, detail: String },
    #[error("{member} in {path} does not hash to the digest it is named by")]
    Corrupt { path: PathBuf, member: String },
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

/// The one manifest of an archive: its digest (`sha256:…`) and its bytes.
pub fn manifest(archive: &Path) -> Result<(String, Vec<u8>), ArchiveError> {
    let index: Index =
        serde_json::from_slice(&member(archive, "index.json")?).map_err(|source| {
            ArchiveError::Parse {
                path: archive.to_owned(),
                source,
            }
        })?;
    let [only] = index.manifests.as_slice() else {
        return Err(ArchiveError::NotOne {
            path: archive.to_owned(),
            count: index.manifests.len(),
        });
    };
    let hex = sha256_hex(&only.digest).ok_or_else(|| ArchiveError::BadDigest {
        path: archive.to_owned(),
        digest: only.digest.clone(),
    })?;
    let bytes = member(archive, &format!("blobs/sha256/{hex}"))?;
    Ok((only.digest.clone(), bytes))
}

#[derive(Deserialize)]
struct ImageManifest {
    config: Descriptor,
}

/// The configuration blob `manifest` (a manifest of the archive, as [`manifest`] gave it)
/// names, checked against its digest: the labels the shared download acts on are then the
/// image's own.
pub fn config(archive: &Path, manifest: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    let no_config = |detail: String| ArchiveError::NoConfig {
        path: archive.to_owned(),
        detail,
    };
    let parsed: ImageManifest =
        serde_json::from_slice(manifest).map_err(|e| no_config(e.to_string()))?;
    let hex = sha256_hex(&parsed.config.digest)
        .ok_or_else(|| no_config(format!("{:?}", parsed.config.digest)))?;
    let name = format!("blobs/sha256/{hex}");
    let bytes = member(archive, &name)?;
    if sha256_of(&bytes) != hex {
        return Err(ArchiveError::Corrupt {
            path: archive.to_owned(),
            member: name,
        });
    }
    Ok(bytes)
}

/// The hex of a `sha256:` digest of 64 lowercase hex digits, the only form a content digest has
/// here; being that, it is also a safe file name (never a path).
pub fn sha256_hex(digest: &str) -> Option<&str> {
    digest.strip_prefix("sha256:").filter(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The SHA-256 of `bytes`, as lowercase hex (the form [`sha256_hex`] takes out of a digest).
pub fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    lowercase_hex(&sha2::Sha256::digest(bytes))
}

/// `bytes` as lowercase hex.
fn lowercase_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of the archive's member `name` (a manifest or an index: small). The layers are
/// skipped by seeking, not read.
fn member(archive: &Path, name: &str) -> Result<Vec<u8>, ArchiveError> {
    use std::io::Read;
    let io = |source| ArchiveError::Io {
        path: archive.to_owned(),
        source,
    };
    let file = std::fs::File::open(archive).map_err(io)?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries_with_seek().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let path = entry.path().map_err(io)?;
        if path.strip_prefix(".").unwrap_or(&path) == Path::new(name) {
            let mut bytes = Vec::new();
            // A manifest is a few KiB: an archive that says otherwise is not read whole.
            entry
                .by_ref()
                .take(MAX_MEMBER)
                .read_to_end(&mut bytes)
                .map_err(io)?;
            return Ok(bytes);
        }
    }
    Err(ArchiveError::Missing {
        path: archive.to_owned(),
        member: name.to_owned(),
    })
}

/// The most read of an index or a manifest (the registry's own limit for a manifest is 4 MiB).
const MAX_MEMBER: u64 = 4 << 20;

/// Why an image picked from a manifest list is not carried.
pub const FROM_A_LIST: &str = "it comes from a manifest list, whose digest an archive would lose";

/// Why an image whose manifest is of the media type `kind` (not OCI's) is not carried.
pub fn converted(kind: &str) -> String {
    format!("its manifest is {kind}, which an OCI archive would convert")
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

/// Whether a manifest, as its registry serves it, comes back unchanged through an OCI archive:
/// only an OCI image manifest does. A Docker manifest would be converted (another digest), and
/// for a manifest list podman records the list's digest too, which an archive of the one image
/// picked from it loses. `Err` says why not.
pub fn carried_unchanged(raw: &[u8]) -> Result<(), String> {
    let manifest: RawManifest = serde_json::from_slice(raw)
        .map_err(|e| format!("its manifest is not JSON that can be read ({e})"))?;
    match (
        manifest.media_type.as_deref(),
        manifest.manifests,
        manifest.config,
    ) {
        (Some(OCI_MANIFEST), None, Some(_)) => Ok(()),
        // The OCI specification lets an image manifest leave its mediaType out.
        (None, None, Some(_)) => Ok(()),
        (_, Some(_), _) => Err(FROM_A_LIST.to_owned()),
        (Some(other), _, _) => Err(converted(other)),
        (None, None, None) => Err("its manifest names no configuration".to_owned()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000abc";

    /// An archive of `index` and, if given, the blob of [`DIGEST`] after a large layer.
    fn archive_with(index: &str, blob: Option<&[u8]>) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut tar = tar::Builder::new(file.reopen().unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data).unwrap();
        };
        add("blobs/sha256/layer", &vec![7u8; 1 << 20]);
        if let Some(blob) = blob {
            add(
                &format!("./blobs/sha256/{}", DIGEST.trim_start_matches("sha256:")),
                blob,
            );
        }
        add("index.json", index.as_bytes());
        tar.finish().unwrap();
        file
    }

    #[test]
    fn the_manifest_skopeo_1_9_reads_from_the_registry_is_carried_unchanged() {
        let manifest = super::super::fixture("skopeo-1.9", "inspect-raw.json");
        assert_eq!(carried_unchanged(&manifest), Ok(()));
    }

    #[test]
    fn the_one_manifest_and_its_bytes() {
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{DIGEST}"}}]}}"#);
        let archive = archive_with(&index, Some(b"{\"manifest\":1}"));
        let (digest, bytes) = manifest(archive.path()).unwrap();
        assert_eq!(digest, DIGEST);
        assert_eq!(bytes, b"{\"manifest\":1}");
    }

    #[test]
    fn an_index_of_two_or_none_or_a_strange_digest_is_refused() {
        let two = format!(r#"{{"manifests":[{{"digest":"{DIGEST}"}},{{"digest":"{DIGEST}"}}]}}"#);
        let err = manifest(archive_with(&two, None).path()).unwrap_err();
        assert!(
            matches!(err, ArchiveError::NotOne { count: 2, .. }),
            "{err}"
        );
        let none = manifest(archive_with(r#"{"manifests":[]}"#, None).path()).unwrap_err();
        assert!(
            matches!(none, ArchiveError::NotOne { count: 0, .. }),
            "{none}"
        );
        let escape = r#"{"manifests":[{"digest":"sha256:../../../etc/passwd"}]}"#;
        let err = manifest(archive_with(escape, None).path()).unwrap_err();
        assert!(matches!(err, ArchiveError::BadDigest { .. }), "{err}");
        let missing = format!(r#"{{"manifests":[{{"digest":"{DIGEST}"}}]}}"#);
        let err = manifest(archive_with(&missing, None).path()).unwrap_err();
        assert!(matches!(err, ArchiveError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("blobs/sha256/"), "{err}");
    }

    #[test]
    fn only_an_oci_image_manifest_is_carried() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(carried_unchanged(oci), Ok(()));
        let untyped = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(carried_unchanged(untyped), Ok(()));
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#;
        let err = carried_unchanged(docker).unwrap_err();
        assert!(err.contains("vnd.docker.distribution.manifest.v2"), "{err}");
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(carried_unchanged(index).unwrap_err().contains("list"));
        let untyped_index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(
            carried_unchanged(untyped_index)
                .unwrap_err()
                .contains("list")
        );
        assert!(carried_unchanged(b"<html>").is_err());
    }

    #[test]
    fn the_configuration_is_read_only_under_its_own_digest() {
        let config = br#"{"config":{"Labels":{"org.nethserver.images":"x/y:1"}}}"#;
        let named = |digest: &str| format!(r#"{{"config":{{"digest":"{digest}"}},"layers":[]}}"#);
        let hex = sha256_of(config);
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut tar = tar::Builder::new(file.reopen().unwrap());
        for (name, data) in [
            (format!("blobs/sha256/{hex}"), &config[..]),
            (format!("blobs/sha256/{}", &DIGEST[7..]), &config[..]),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data).unwrap();
        }
        tar.finish().unwrap();

        let read = super::config(file.path(), named(&format!("sha256:{hex}")).as_bytes()).unwrap();
        assert_eq!(read, config);
        // A blob whose bytes are not what its name says is refused, as is a manifest that
        // names no configuration, or none of a sha256 digest.
        let err = super::config(file.path(), named(DIGEST).as_bytes()).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
        for manifest in [r#"{"layers":[]}"#.to_owned(), named("md5:abc")] {
            let err = super::config(file.path(), manifest.as_bytes()).unwrap_err();
            assert!(matches!(err, ArchiveError::NoConfig { .. }), "{err}");
        }
        let missing =
            named("sha256:1111111111111111111111111111111111111111111111111111111111111111");
        let err = super::config(file.path(), missing.as_bytes()).unwrap_err();
        assert!(matches!(err, ArchiveError::Missing { .. }), "{err}");
    }
}
