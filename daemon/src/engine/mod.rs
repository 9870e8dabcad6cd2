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
pub mod lock;
pub mod oci_archive;
pub mod podman;
pub mod scratch;
pub mod scripts;
pub mod shared_images;
pub mod skopeo;
pub mod state_flush;
pub mod unchanged;
pub mod update;
pub mod worker;
