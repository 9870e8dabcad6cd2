//! module-updaterd: the daemon library. `service` is the thin D-Bus layer; everything it calls
//! knows nothing about D-Bus.

pub mod bus;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod history;
pub mod job_store;
pub mod jobs;
pub mod plan;
pub mod request;
pub mod service;
pub mod updates;
pub mod version;

pub use config::Config;
