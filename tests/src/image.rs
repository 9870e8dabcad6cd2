//! Module images described declaratively, built `FROM scratch` with podman in storage private to
//! the sandbox, and pushed to the sandbox registry, as NS8's `build-images.sh` does with buildah.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Result, SandboxError, cmd};

/// One entry of an image's imageroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    File { contents: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// An entry at `path`, relative to the imageroot (e.g. `actions/create-module/10setup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub path: String,
    pub kind: FileKind,
}

/// A module image: `<registry>/<repository>:<tag>` holding `files` under `/<imageroot_dir>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The repository inside the sandbox registry, e.g. `demo`.
    pub repository: String,
    pub tag: String,
    pub files: Vec<FileSpec>,
    /// `LABEL`s in order, e.g. `org.nethserver.images`.
    pub labels: Vec<(String, String)>,
    /// Where the tree goes in the image (default `imageroot`, what NS8 extracts by default).
    pub imageroot_dir: String,
    /// Files of a second layer, on top of the first (empty: the image has one layer, as NS8's
    /// own builds give).
    pub second_layer: Vec<FileSpec>,
}

impl ImageSpec {
    /// An empty module image `repository:tag` with the default imageroot.
    pub fn module(repository: impl Into<String>, tag: impl Into<String>) -> ImageSpec {
        ImageSpec {
            repository: repository.into(),
            tag: tag.into(),
            files: Vec::new(),
            labels: Vec::new(),
            imageroot_dir: "imageroot".into(),
            second_layer: Vec::new(),
        }
    }

    /// A regular file with `mode` in a second layer of the image (a file of the same path in the
    /// first layer is replaced by it).
    pub fn second_layer_file(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        self.second_layer.push(FileSpec {
            path: path.into(),
            kind: FileKind::File {
                contents: contents.into(),
                mode,
            },
        });
        self
    }

    /// A regular file with `mode`.
    pub fn file(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        let kind = FileKind::File {
            contents: contents.into(),
            mode,
        };
        self.files.push(FileSpec {
            path: path.into(),
            kind,
        });
        self
    }

    /// An executable (mode 0755), e.g. a script of `update-module.d/`.
    pub fn executable(self, path: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.file(path, contents, 0o755)
    }

    /// A symbolic link to `target` (taken literally: relative or absolute).
    pub fn symlink(mut self, path: impl Into<String>, target: impl Into<String>) -> Self {
        let kind = FileKind::Symlink {
            target: target.into(),
        };
        self.files.push(FileSpec {
            path: path.into(),
            kind,
        });
        self
    }

    /// A directory with `mode` (parents of files are created 0755 without being listed).
    pub fn dir(mut self, path: impl Into<String>, mode: u32) -> Self {
        self.files.push(FileSpec {
            path: path.into(),
            kind: FileKind::Dir { mode },
        });
        self
    }

    /// A `LABEL key=value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Puts the tree at `/<dir>/` in the image (set the `org.nethserver.imageroot` label too if
    /// the module should be extracted from there).
    pub fn imageroot_dir(mut self, dir: impl Into<String>) -> Self {
        self.imageroot_dir = dir.into();
        self
    }

    /// The Containerfile that builds this image.
    pub fn containerfile(&self) -> Result<String> {
        let root = checked_relative(&self.imageroot_dir, "imageroot_dir")?;
        let mut text = String::from("FROM scratch\n");
        text.push_str(&format!("COPY {root}/ /{root}/\n"));
        if !self.second_layer.is_empty() {
            text.push_str(&format!("COPY {SECOND_LAYER}/{root}/ /{root}/\n"));
        }
        for (key, value) in &self.labels {
            text.push_str(&format!("LABEL {}={}\n", quote(key)?, quote(value)?));
        }
        text.push_str("ENTRYPOINT [\"/\"]\n");
        Ok(text)
    }

    /// Writes the build context (Containerfile and tree) into the empty directory `context`.
    pub fn write_context(&self, context: &Path) -> Result<()> {
        let root_rel = checked_relative(&self.imageroot_dir, "imageroot_dir")?;
        write_tree(&context.join(root_rel), &self.files)?;
        if !self.second_layer.is_empty() {
            write_tree(
                &context.join(SECOND_LAYER).join(root_rel),
                &self.second_layer,
            )?;
        }
        let containerfile = context.join("Containerfile");
        std::fs::write(&containerfile, self.containerfile()?)
            .map_err(|e| SandboxError::io("write", &containerfile, e))
    }
}

/// Where the files of the second layer go in the build context.
const SECOND_LAYER: &str = "second-layer";

/// Writes `files` below `root`.
fn write_tree(root: &Path, files: &[FileSpec]) -> Result<()> {
    create_dirs(root)?;
    for spec in files {
        let relative = checked_relative(&spec.path, "file path")?;
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            create_dirs(parent)?;
        }
        match &spec.kind {
            FileKind::File { contents, mode } => {
                std::fs::write(&path, contents).map_err(|e| SandboxError::io("write", &path, e))?;
                set_mode(&path, *mode)?;
            }
            FileKind::Dir { mode } => {
                create_dirs(&path)?;
                set_mode(&path, *mode)?;
            }
            FileKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path)
                    .map_err(|e| SandboxError::io("create the symlink", &path, e))?;
            }
        }
    }
    Ok(())
}

/// `path` must stay inside the tree: relative, without `..`.
fn checked_relative<'a>(path: &'a str, what: &str) -> Result<&'a str> {
    let trimmed = path.trim_end_matches('/');
    let fine = !trimmed.is_empty()
        && Path::new(trimmed)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if fine {
        Ok(trimmed)
    } else {
        Err(SandboxError::InvalidSpec {
            detail: format!(
                "{what} {path:?} must be a relative path without `..` (podman cannot build \
                 anything else from a context directory)"
            ),
        })
    }
}

/// A Containerfile string literal; `$` is escaped because buildah expands variables in LABEL.
fn quote(text: &str) -> Result<String> {
    if text.contains('\n') {
        return Err(SandboxError::InvalidSpec {
            detail: format!("label {text:?} contains a newline, which a LABEL cannot hold"),
        });
    }
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "\\$");
    Ok(format!("\"{escaped}\""))
}

fn create_dirs(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| SandboxError::io("create", path, e))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SandboxError::io("chmod", path, e))
}

/// The sandbox's image builder: podman with storage of its own under the sandbox directory (the
/// machine's root storage is never touched), pushing to the sandbox registry.
pub struct Builder {
    pub dir: PathBuf,
    pub registry: String,
    counter: AtomicUsize,
}

impl Builder {
    pub fn new(dir: PathBuf, registry: String) -> Builder {
        Builder {
            dir,
            registry,
            counter: AtomicUsize::new(0),
        }
    }

    /// `podman` with the builder's private storage.
    pub fn podman(&self) -> Command {
        let mut command = cmd::clean("podman");
        command.args(storage_args(&self.dir.join("storage")));
        command.env("HOME", self.dir.join("home"));
        command.env("TMPDIR", self.dir.join("tmp"));
        command
    }

    fn context(&self, name: &str) -> Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let context = self.dir.join("contexts").join(format!("{n}-{name}"));
        create_dirs(&context)?;
        create_dirs(&self.dir.join("tmp"))?;
        create_dirs(&self.dir.join("home"))?;
        Ok(context)
    }

    fn build_and_push(&self, context: &Path, url: &str) -> Result<String> {
        let mut build = self.podman();
        build.args(["build", "--quiet", "--pull=never", "--tag", url, "--file"]);
        build.arg(context.join("Containerfile")).arg(context);
        cmd::run(&mut build)?;
        let mut push = self.podman();
        push.args(["push", "--quiet", "--tls-verify=false", url]);
        cmd::run(&mut push)?;
        Ok(url.to_owned())
    }

    /// Builds `spec` and pushes it; returns its URL `127.0.0.1:PORT/repo:tag`.
    pub fn build_image(&self, spec: &ImageSpec) -> Result<String> {
        let url = self.url(&spec.repository, &spec.tag)?;
        let context = self.context(&spec.repository)?;
        spec.write_context(&context)?;
        self.build_and_push(&context, &url)
    }

    /// Builds and pushes an image with a single file `/blob` of `size` incompressible bytes
    /// derived from `seed` (the same seed gives the same content, hence the same digest).
    pub fn build_blob_image(
        &self,
        repository: &str,
        tag: &str,
        size: u64,
        seed: u64,
    ) -> Result<String> {
        let url = self.url(repository, tag)?;
        let context = self.context(repository)?;
        let blob = context.join("blob");
        let file =
            std::fs::File::create(&blob).map_err(|e| SandboxError::io("create", &blob, e))?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut state = seed;
        let mut remaining = size;
        let mut chunk = Vec::with_capacity(1 << 16);
        while remaining > 0 {
            chunk.clear();
            while chunk.len() < (1 << 16) {
                chunk.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
            }
            let take = usize::try_from(remaining.min(chunk.len() as u64)).unwrap_or(chunk.len());
            writer
                .write_all(&chunk[..take])
                .map_err(|e| SandboxError::io("write", &blob, e))?;
            remaining -= take as u64;
        }
        writer
            .flush()
            .map_err(|e| SandboxError::io("write", &blob, e))?;
        let containerfile = context.join("Containerfile");
        std::fs::write(&containerfile, "FROM scratch\nCOPY blob /blob\n")
            .map_err(|e| SandboxError::io("write", &containerfile, e))?;
        self.build_and_push(&context, &url)
    }

    /// Pushes the image `source` (built here) again as `<repository>:<tag>`, its layers
    /// compressed by GNU gzip instead of podman's own gzip code: an image as another build tool
    /// makes it. Its layer digests, hence its manifest digest, are ones podman would not give
    /// if it compressed the layers again. Returns the new URL.
    pub fn push_gzipped_elsewhere(
        &self,
        source: &str,
        repository: &str,
        tag: &str,
    ) -> Result<String> {
        let url = self.url(repository, tag)?;
        let layout = self.context(repository)?.join("layout");
        let mut save = self.podman();
        save.args(["save", "--quiet", "--uncompressed", "--format", "oci-dir"]);
        save.arg("--output").arg(&layout).arg(source);
        cmd::run(&mut save)?;
        let blob = |digest: &str| {
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"))
        };
        let read_json = |path: &Path| -> Result<serde_json::Value> {
            let bytes = std::fs::read(path).map_err(|e| SandboxError::io("read", path, e))?;
            serde_json::from_slice(&bytes).map_err(|e| SandboxError::InvalidSpec {
                detail: format!("{} is not JSON: {e}", path.display()),
            })
        };
        let index_path = layout.join("index.json");
        let mut index = read_json(&index_path)?;
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut manifest = read_json(&blob(&manifest_digest))?;
        let layers =
            manifest["layers"]
                .as_array_mut()
                .ok_or_else(|| SandboxError::InvalidSpec {
                    detail: format!("the manifest of {source} has no layers"),
                })?;
        for layer in layers.iter_mut() {
            let digest = layer["digest"].as_str().unwrap_or_default().to_owned();
            let mut gzip = cmd::clean("gzip");
            gzip.args(["-9nc"]).arg(blob(&digest));
            let gzipped = cmd::run(&mut gzip)?.stdout;
            let new_digest = write_blob(&layout, &gzipped)?;
            layer["digest"] = new_digest.into();
            layer["size"] = gzipped.len().into();
            layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        }
        let manifest_bytes = manifest.to_string().into_bytes();
        index["manifests"][0]["digest"] = write_blob(&layout, &manifest_bytes)?.into();
        index["manifests"][0]["size"] = manifest_bytes.len().into();
        std::fs::write(&index_path, index.to_string())
            .map_err(|e| SandboxError::io("write", &index_path, e))?;
        // `--preserve-digests`: skopeo pushes the bytes as they are, or fails.
        let mut push = cmd::clean("skopeo");
        push.args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        push.arg(format!("oci:{}", layout.display()));
        push.arg(format!("docker://{url}"));
        cmd::run(&mut push)?;
        Ok(url)
    }

    fn url(&self, repository: &str, tag: &str) -> Result<String> {
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            });
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !repo_ok || !tag_ok {
            return Err(SandboxError::InvalidSpec {
                detail: format!(
                    "{repository:?}:{tag:?} is not a valid image name (repository: lowercase \
                     letters, digits, `._-` and `/`; tag: letters, digits and `._-`)"
                ),
            });
        }
        Ok(format!("{}/{repository}:{tag}", self.registry))
    }
}

/// podman's global options for storage private to `dir`: never the machine's storage, and with
/// vfs so that nothing is mounted.
pub fn storage_args(dir: &Path) -> Vec<String> {
    vec![
        format!("--root={}", dir.join("root").display()),
        format!("--runroot={}", dir.join("run").display()),
        format!("--tmpdir={}", dir.join("tmp").display()),
        "--storage-driver=vfs".to_owned(),
        "--events-backend=file".to_owned(),
        "--cgroup-manager=cgroupfs".to_owned(),
    ]
}

/// A fast generator of well-mixed 64-bit words (SplitMix64): the output does not compress.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// NS8's `get_image_name_from_url` plus its variable rule: `ghcr.io/x/node-exporter:1` gives
/// `NODE_EXPORTER_IMAGE`, `.../2fauth:1` gives `I2FAUTH_IMAGE`. A URL without `/`, or whose last
/// component has neither `:` nor `@`, is refused as NS8 refuses it.
pub fn image_env_var(url: &str) -> Result<String> {
    let refuse = || SandboxError::InvalidSpec {
        detail: format!(
            "{url:?} is not an image URL NS8 accepts (it needs `/` and a tag or digest)"
        ),
    };
    let (_, last) = url.rsplit_once('/').ok_or_else(refuse)?;
    let last = last.replacen('@', ":", 1);
    let (name, _) = last.split_once(':').ok_or_else(refuse)?;
    let mut var: String = name
        .chars()
        .map(|c| {
            if matches!(c, '-' | '.' | '+' | ' ') {
                '_'
            } else {
                c
            }
        })
        .collect::<String>()
        .to_uppercase();
    var.push_str("_IMAGE");
    if var.starts_with(|c: char| c.is_ascii_digit()) {
        var.insert(0, 'I');
    }
    Ok(var)
}

/// Writes `data` as a blob of the OCI layout `layout`; returns its digest `sha256:…`.
fn write_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let scratch = layout.join("blob.tmp");
    std::fs::write(&scratch, data).map_err(|e| SandboxError::io("write", &scratch, e))?;
    let mut sum = cmd::clean("sha256sum");
    sum.arg(&scratch);
    let out = cmd::run(&mut sum)?.stdout;
    let hex = String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let path = layout.join("blobs/sha256").join(&hex);
    std::fs::rename(&scratch, &path).map_err(|e| SandboxError::io("rename into", &path, e))?;
    Ok(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_env_var_follows_ns8_naming() {
        // ns8-update-module.md §1.8.
        let cases = [
            ("ghcr.io/nethserver/samba:v1.0.0", "SAMBA_IMAGE"),
            ("ghcr.io/x/dokuwiki@sha256:0123", "DOKUWIKI_IMAGE"),
            ("ghcr.io/x/foo:1.0@sha256:0123", "FOO_IMAGE"),
            ("localhost:5000/foo:1", "FOO_IMAGE"),
            ("r.io/mysql:8", "MYSQL_IMAGE"),
            ("r.io/node-exporter:1", "NODE_EXPORTER_IMAGE"),
            ("r.io/2fauth:1", "I2FAUTH_IMAGE"),
            ("r.io/redis.io-x+y:1", "REDIS_IO_X_Y_IMAGE"),
            ("r.io/postgresql_ha:1", "POSTGRESQL_HA_IMAGE"),
        ];
        for (url, var) in cases {
            assert_eq!(image_env_var(url).expect(url), var, "{url}");
        }
        assert!(image_env_var("alpine:3").is_err());
        assert!(image_env_var("ghcr.io/x/foo").is_err());
    }

    #[test]
    fn containerfile_quotes_labels_and_refuses_escapes() {
        let spec = ImageSpec::module("demo", "1.0")
            .label("org.nethserver.images", "a:1 b:2")
            .label("x", "say \"$HOME\" \\ ok");
        let text = spec.containerfile().expect("containerfile");
        assert_eq!(
            text,
            "FROM scratch\nCOPY imageroot/ /imageroot/\n\
             LABEL \"org.nethserver.images\"=\"a:1 b:2\"\n\
             LABEL \"x\"=\"say \\\"\\$HOME\\\" \\\\ ok\"\n\
             ENTRYPOINT [\"/\"]\n"
        );
        assert!(
            ImageSpec::module("d", "1")
                .label("k", "a\nb")
                .containerfile()
                .is_err()
        );
        assert!(
            ImageSpec::module("d", "1")
                .imageroot_dir("../x")
                .containerfile()
                .is_err()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let escaping = ImageSpec::module("d", "1").file("../evil", "x", 0o644);
        assert!(escaping.write_context(dir.path()).is_err());
    }

    #[test]
    fn blob_data_does_not_repeat() {
        let mut state = 7;
        let words: std::collections::BTreeSet<u64> =
            (0..10_000).map(|_| splitmix64(&mut state)).collect();
        assert_eq!(words.len(), 10_000);
    }
}
