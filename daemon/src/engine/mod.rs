//! The update engine: NS8's update-module for one instance, knowing nothing about D-Bus.
//!
//! The daemon (root) finds instances and starts one worker process per instance with the
//! instance's credentials; the worker runs [`update::run`] and reports [`events::Event`]s.

pub mod command;
pub mod environment;
pub mod events;
pub mod extract;
pub mod go_runtime;
pub mod image_stream;
pub mod imagename;
pub mod instance;
pub mod instance_cache;
pub mod kept;
pub mod lock;
pub mod oci_archive;
pub mod podman;
pub mod scope;
pub mod scratch;
pub mod scripts;
pub mod shared_images;
pub mod skopeo;
pub mod state_flush;
pub mod unchanged;
pub mod update;
pub mod worker;

/// Output of the podman 4.3 and skopeo 1.9 of Debian 12, captured as daemon/tests/fixtures/README.md
/// says: `tool` is `podman-4.3` or `skopeo-1.9`.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
fn fixture(tool: &str, name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(tool)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
