//! A module image's filesystem as one tar stream, for the extractor.
//!
//! An image of one layer (what `buildah commit` of a `FROM scratch` container gives: the usual
//! NS8 module build) is read from `podman image save`: its docker-archive starts with that
//! layer, uncompressed, and the layer of an image built on nothing is the image's whole
//! filesystem. One podman process then does what three did (`create`, `export`, `rm`), and vfs
//! storage no longer copies the image into a container first. An image of several layers needs
//! them applied in order, whiteouts included: podman does that, in a container's `export`.
//!
//! When the daemon downloaded the image once for the node, it wrote that layer to a file the
//! workers read instead (`engine/shared_images.rs`).
//!
//! Each stream ends well (EOF) only when podman succeeded; the extractor reads its stream to the
//! end before it installs anything, so a failed podman leaves the instance as it was.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::Child;

use super::command::{CommandError, tail};
use super::podman::{ImageInfo, Podman, PodmanError};

/// Where an image's filesystem is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The one layer of the image, from `podman image save`.
    SavedLayer { image: String },
    /// `podman export` of a container already created from the image.
    Export { container: String },
    /// The one layer of the image as a tar file the daemon wrote when it downloaded the image
    /// once for the node (`engine/shared_images.rs`).
    LayerFile { path: PathBuf },
}

impl Source {
    /// The layer of an image of one layer (`RootFS.Layers` of `podman image inspect`), or
    /// `None` when the image must go through a container.
    pub fn saved_layer(image: &str, info: &ImageInfo) -> Option<Source> {
        (info.layers.len() == 1).then(|| Source::SavedLayer {
            image: image.to_owned(),
        })
    }

    /// Starts the podman process (or opens the file) and returns its stream.
    pub fn open(&self, podman: &Podman) -> Result<Box<dyn Read + Send>, StreamError> {
        match self {
            Source::SavedLayer { image } => {
                let child = podman.save_blocking(image)?;
                let stream = Checked::of_child(child, "podman image save")?;
                Ok(Box::new(LayerOfArchive::new(stream)))
            }
            Source::Export { container } => {
                let child = podman.export_blocking(container)?;
                Ok(Box::new(Checked::of_child(child, "podman export")?))
            }
            Source::LayerFile { path } => {
                let file = File::open(path).map_err(|source| StreamError::Open {
                    path: path.clone(),
                    source,
                })?;
                Ok(Box::new(file))
            }
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Podman(#[from] PodmanError),
    #[error("cannot open the image layer {path} the daemon downloaded: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A stream that ends well (EOF) only when the podman process writing it exited with success.
pub struct Checked {
    stream: Box<dyn Read + Send>,
    child: Option<Child>,
    command: &'static str,
}

impl Checked {
    fn of_child(mut child: Child, command: &'static str) -> Result<Checked, PodmanError> {
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PodmanError::Command(CommandError::Spawn {
                program: "podman",
                source: io::Error::other(format!("{command} has no stdout")),
            }));
        };
        Ok(Checked {
            stream: Box::new(stdout),
            child: Some(child),
            command,
        })
    }
}

impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n == 0
            && !buf.is_empty()
            && let Some(child) = self.child.take()
        {
            let output = child.wait_with_output()?;
            if !output.status.success() {
                return Err(io::Error::other(format!(
                    "{} failed ({}): {}",
                    self.command,
                    output.status,
                    tail(&output.stderr)
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const BLOCK: u64 = 512;

/// The layer member of the docker-archive of an image of one layer, as a stream of its own.
/// When the member ends, the rest of the archive is read to its end first, so that whatever the
/// archive's own end reports (podman's exit status) is reported before the layer is
/// taken as whole.
///
/// The member is found by its form, not by the diff id the image's configuration gives: podman
/// names it by the digest of the layer as its storage gives it back, which differs when the
/// storage could not store the layer byte for byte (a path it cleaned, a device node rootless
/// storage cannot make). The archive comes from podman; the layer inside it is the image
/// author's, and the extractor checks it as it checks an export.
pub struct LayerOfArchive<R> {
    archive: R,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Searching,
    /// In the member: bytes of it not yet read.
    InLayer(u64),
    Done,
}

impl<R: Read> LayerOfArchive<R> {
    pub fn new(archive: R) -> Self {
        LayerOfArchive {
            archive,
            state: State::Searching,
        }
    }

    /// Reads member headers, skipping members, up to the layer's; returns its size.
    fn find_layer(&mut self) -> io::Result<u64> {
        let mut block = [0u8; BLOCK as usize];
        loop {
            self.archive.read_exact(&mut block).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    self.not_found("the archive ended")
                } else {
                    e
                }
            })?;
            if block.iter().all(|b| *b == 0) {
                // Read to the end first: a podman that failed says why there.
                io::copy(&mut self.archive, &mut io::sink())?;
                return Err(self.not_found("the archive has no such member"));
            }
            let header = tar::Header::from_byte_slice(&block);
            check_checksum(&block, header)?;
            let size = header.entry_size()?;
            let name = header.path_bytes();
            // containers/image names the layer `<sha256 hex>.tar` (the config is `<hex>.json`);
            // its legacy layout, `<id>/layer.tar`, is a symlink to it, or the file itself in
            // older writers. An image of one layer has one such file.
            let is_layer = header.entry_type().is_file() && is_layer_name(&name);
            if is_layer {
                return Ok(size);
            }
            let padded = size.div_ceil(BLOCK) * BLOCK;
            let skipped = io::copy(&mut (&mut self.archive).take(padded), &mut io::sink())?;
            if skipped < padded {
                return Err(self.not_found("the archive ended"));
            }
        }
    }

    fn not_found(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "podman image save gave no layer (a member <sha256>.tar or <id>/layer.tar): {why}"
            ),
        )
    }
}

/// `<64 hex digits>.tar` or `<dir>/layer.tar`.
fn is_layer_name(name: &[u8]) -> bool {
    let hex_tar =
        name.len() == 68 && name.ends_with(b".tar") && name[..64].iter().all(u8::is_ascii_hexdigit);
    hex_tar || name.ends_with(b"/layer.tar")
}

impl<R: Read> Read for LayerOfArchive<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.state == State::Searching {
            self.state = State::InLayer(self.find_layer()?);
        }
        match self.state {
            State::InLayer(0) => {
                // The padding of the member and the members after it: read to the end, where
                // the archive's reader reports how podman ended.
                io::copy(&mut self.archive, &mut io::sink())?;
                self.state = State::Done;
                Ok(0)
            }
            State::InLayer(left) => {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = self.archive.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the image archive of podman image save ended within its layer",
                    ));
                }
                self.state = State::InLayer(left - n as u64);
                Ok(n)
            }
            State::Searching | State::Done => Ok(0),
        }
    }
}

/// A header whose checksum is wrong is no tar header: the stream is not what podman writes.
fn check_checksum(block: &[u8; BLOCK as usize], header: &tar::Header) -> io::Result<()> {
    let stored = header.cksum().ok();
    let computed: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    if stored == Some(computed) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "podman image save wrote no tar archive (a header checksum is wrong)",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o444);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, data).unwrap();
    }

    fn layer_tar() -> Vec<u8> {
        let mut layer = tar::Builder::new(Vec::new());
        member(&mut layer, "imageroot/bin/tool", b"2\n");
        layer.into_inner().unwrap()
    }

    const HEX: &str = "f30f360914bfaf2e1f1658a73c3b40985f18f0cd34874ba0681398033ac1d3f2";

    /// The docker-archive layout `podman image save` (4.3) writes: layer, config, the legacy
    /// symlink, manifest.
    fn archive(layer: &[u8], layer_name: &str) -> Vec<u8> {
        let mut outer = tar::Builder::new(Vec::new());
        member(&mut outer, layer_name, layer);
        member(&mut outer, "3bb3.json", b"{}");
        let mut link = tar::Header::new_ustar();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        outer
            .append_link(&mut link, "1c64/layer.tar", format!("../{HEX}.tar"))
            .unwrap();
        member(&mut outer, "manifest.json", b"[]");
        outer.into_inner().unwrap()
    }

    fn read_all(reader: &mut impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        reader.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn the_layer_member_is_the_stream_and_the_rest_is_read_to_the_end() {
        let layer = layer_tar();
        let outer = archive(&layer, &format!("{HEX}.tar"));
        let mut cursor = io::Cursor::new(outer.clone());
        let got = read_all(&mut LayerOfArchive::new(&mut cursor)).unwrap();
        assert_eq!(got, layer);
        assert_eq!(
            cursor.position(),
            outer.len() as u64,
            "archive read to its end"
        );
    }

    #[test]
    fn the_legacy_layer_name_is_found_too() {
        let layer = layer_tar();
        let outer = archive(&layer, "0123abcd/layer.tar");
        let got = read_all(&mut LayerOfArchive::new(io::Cursor::new(outer))).unwrap();
        assert_eq!(got, layer);
    }

    #[test]
    fn an_archive_without_the_layer_names_what_was_looked_for() {
        for name in ["other.tar", "abc.tar", &format!("{HEX}.json")] {
            let outer = archive(&layer_tar(), name);
            let err = read_all(&mut LayerOfArchive::new(io::Cursor::new(outer))).unwrap_err();
            assert!(err.to_string().contains("<sha256>.tar"), "{name}: {err}");
        }
    }

    #[test]
    fn a_cut_archive_is_an_error_not_a_short_layer() {
        let layer = layer_tar();
        let outer = archive(&layer, &format!("{HEX}.tar"));
        for cut in [100, 512, 700, 512 + layer.len() - 1] {
            let mut reader = LayerOfArchive::new(io::Cursor::new(outer[..cut].to_vec()));
            assert!(read_all(&mut reader).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn what_is_not_a_tar_archive_is_refused() {
        let err = read_all(&mut LayerOfArchive::new(io::Cursor::new(vec![7u8; 2048]))).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn an_error_at_the_archive_end_reaches_the_reader_of_the_layer() {
        struct FailsAtEnd(io::Cursor<Vec<u8>>);
        impl Read for FailsAtEnd {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.read(buf)? {
                    0 => Err(io::Error::other("podman image save failed (exit 125)")),
                    n => Ok(n),
                }
            }
        }
        let outer = archive(&layer_tar(), &format!("{HEX}.tar"));
        let err =
            read_all(&mut LayerOfArchive::new(FailsAtEnd(io::Cursor::new(outer)))).unwrap_err();
        assert!(err.to_string().contains("exit 125"), "{err}");
    }

    #[test]
    fn only_an_image_of_one_layer_is_read_from_its_save() {
        let info = |layers: &[&str]| ImageInfo {
            id: "ab".into(),
            digest: "sha256:1".into(),
            repo_digest: "r/m@sha256:1".into(),
            labels: Default::default(),
            layers: layers.iter().map(|l| (*l).to_owned()).collect(),
        };
        let one = format!("sha256:{HEX}");
        assert_eq!(
            Source::saved_layer("r/m:2", &info(&[&one])),
            Some(Source::SavedLayer {
                image: "r/m:2".into()
            })
        );
        assert_eq!(Source::saved_layer("r/m:2", &info(&[&one, &one])), None);
        assert_eq!(Source::saved_layer("r/m:2", &info(&[])), None);
    }
}
