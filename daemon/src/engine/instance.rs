//! Finding module instances on the node.
//!
//! A rootless instance is a Unix user `<id>` whose `~/.config/state/environment` says
//! `MODULE_ID=<id>`; a rootful one is `<rootful base>/<id>/state/environment` with the same line.
//! An id from a request is only ever compared with what discovery found, never joined into a path.

use std::path::PathBuf;

use super::environment::{self, Environment};

/// Where instances are looked for.
#[derive(Debug, Clone)]
pub struct Bases {
    pub home: PathBuf,
    pub rootful: PathBuf,
}

/// A module instance and the identity its work runs under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    pub id: String,
    pub rootless: bool,
    pub uid: u32,
    pub gid: u32,
    /// `~` of the user, or the rootful dir.
    pub home: PathBuf,
    /// `AGENT_INSTALL_DIR`: where the imageroot is extracted.
    pub install_dir: PathBuf,
    /// `AGENT_STATE_DIR`: holds `environment`.
    pub state_dir: PathBuf,
    /// `XDG_RUNTIME_DIR` of the user (rootless only).
    pub runtime_dir: Option<PathBuf>,
}

impl Instance {
    /// Reads the instance's environment file (refusing a file not owned by the instance's user).
    pub fn environment(&self) -> Option<Environment> {
        environment::read_owned(&self.state_dir.join("environment"), self.uid)
            .and_then(|read| read.environment)
    }

    /// Reads the instance agent's own settings, `state/agent.env` on an NS8 node (its Redis
    /// credentials), with the same ownership check.
    pub fn agent_env(&self) -> Option<Environment> {
        environment::read_owned(&self.state_dir.join("agent.env"), self.uid)
            .and_then(|read| read.environment)
    }
}

/// Whether `id` has the shape of an instance id (`^[a-z][a-z0-9_-]*[0-9]+$`-like and no path tricks).
pub fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && id.as_bytes().last().is_some_and(u8::is_ascii_digit)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_look_like_paths_are_not_plausible() {
        for id in [
            "../x1", "/etc1", "a/b1", ".1", "", "mail", "Mail1", "1mail1", "mail1\n",
        ] {
            assert!(!plausible_id(id), "{id:?}");
        }
        for id in ["mail1", "nextcloud3", "my-app12", "a_b1"] {
            assert!(plausible_id(id), "{id:?}");
        }
    }
}
