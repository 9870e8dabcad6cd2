//! module-updater: a busctl-style client of module-updaterd.
//!
//! The binary is a thin `main`; everything lives here so that `cargo xtask` can generate the
//! completions and the man page ([`generate`]) from the same clap definition ([`cli::Cli`]).

pub mod agent;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod comfd;
mod commands;
pub mod complete;
pub mod error;
pub mod follow;
pub mod generate;
pub mod ns8;
pub mod render;
pub mod summary;

pub use commands::run;
