//! NS8's `.imageroot.lst` (and its backup `.imageroot.lst~`): the format, reading the previous
//! list and writing the new one atomically.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::stage::Node;
use super::{ExtractError, LIST_BACKUP, LIST_FILE};

/// The previous `.imageroot.lst`: its bytes (for the backup) and its lines.
pub(super) struct OldList {
    pub(super) raw: Vec<u8>,
    pub(super) lines: Vec<String>,
}

pub(super) fn read_old_list(install_dir: &Path) -> Result<Option<OldList>, ExtractError> {
    let path = install_dir.join(LIST_FILE);
    match fs::read(&path) {
        Ok(raw) => {
            let lines = raw
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .filter_map(|l| std::str::from_utf8(l).ok().map(str::to_owned))
                .collect();
            Ok(Some(OldList { raw, lines }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ExtractError::Inspect { path, source }),
    }
}

pub(super) fn list_line(path: &str, node: &Node) -> String {
    match node {
        Node::Dir { .. } => format!("./{path}/"),
        _ => format!("./{path}"),
    }
}

/// Saves the previous list as `.imageroot.lst~` and writes the new one, each atomically.
pub(super) fn write_lists(
    install_dir: &Path,
    old_raw: Option<&[u8]>,
    lines: &[String],
) -> Result<(), ExtractError> {
    if let Some(raw) = old_raw {
        write_atomically(install_dir, LIST_BACKUP, raw)?;
    }
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    write_atomically(install_dir, LIST_FILE, text.as_bytes())?;
    File::open(install_dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ExtractError::Install {
            path: install_dir.to_owned(),
            source,
        })
}

pub(super) fn write_atomically(
    dir: &Path,
    name: &str,
    contents: &[u8],
) -> Result<(), ExtractError> {
    let path = dir.join(name);
    let err = |source| ExtractError::Install {
        path: path.clone(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{name}.tmp-"))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    tmp.write_all(contents).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    Ok(())
}

/// A previous-list line turned into a path below the install dir, if it is well formed.
pub(super) fn parse_list_line(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("./")?;
    let (path, is_dir) = match rest.strip_suffix('/') {
        Some(p) => (p, true),
        None => (rest, false),
    };
    let well_formed = !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    well_formed.then_some((path, is_dir))
}
