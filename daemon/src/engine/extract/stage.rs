//! Phase 1: the image's stream read, member by member, into a staging dir, and validated
//! (paths, entry types, links, limits); files the install dir already holds unchanged are kept.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, DirBuilder};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use tar::EntryType;

use super::super::unchanged::{self, InstalledTree, MAX_COMPARED};
use super::{ExtractError, LIST_BACKUP, LIST_FILE, LOCK_FILE, Limits, STAGING_PREFIX};

/// The tar crate wraps causes in errors whose message omits them ("failed to unpack `x`");
/// put the whole chain in the message so the user sees the real cause (ENOSPC, a failed export).
pub(super) fn flatten(e: io::Error) -> io::Error {
    use std::error::Error as _;
    let mut source = e.source();
    if source.is_none() {
        return e;
    }
    let mut msg = e.to_string();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    io::Error::new(e.kind(), msg)
}

/// One entry of the staged tree, keyed by its path below the imageroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    /// `explicit` is false for parents the stream never listed (created, but not listed,
    /// as GNU tar lists only members).
    Dir {
        mode: u32,
        explicit: bool,
    },
    /// Regular files and hard links.
    File,
    /// A regular file the install dir already holds as the image has it: not staged, only its
    /// mtime is set at install (`engine/unchanged.rs`).
    Kept {
        mtime: u64,
    },
    Symlink(String),
}

pub(super) type Tree = BTreeMap<String, Node>;

/// Reads a stream and remembers whether it ended with EOF, which tells a stream cut at a
/// header boundary (EOF) from a complete one (end-of-archive zero block).
pub(super) struct EofReader<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Where a member name falls relative to the imageroot.
pub(super) enum Selected {
    Outside,
    Root,
    /// Below the imageroot, but never installed: a `.gitignore`, or a whiteout.
    Skipped,
    Below(String, usize),
}

pub(super) struct Stager<'a> {
    staging: &'a Path,
    /// The install dir as it is, to keep files that would be rewritten unchanged.
    installed: Option<&'a InstalledTree>,
    prefix: &'a str,
    prefix_components: Vec<&'a str>,
    limits: &'a Limits,
    nodes: Tree,
    found: bool,
    kept: u64,
    bytes: u64,
}

impl<'a> Stager<'a> {
    pub(super) fn new(
        staging: &'a Path,
        prefix: &'a str,
        limits: &'a Limits,
        installed: Option<&'a InstalledTree>,
    ) -> Self {
        Stager {
            staging,
            installed,
            prefix,
            prefix_components: prefix.split('/').collect(),
            limits,
            nodes: Tree::new(),
            found: false,
            kept: 0,
            bytes: 0,
        }
    }

    pub(super) fn run<R: Read>(
        mut self,
        stream: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Tree, ExtractError> {
        let stream_err = |source| ExtractError::Stream {
            source: flatten(source),
        };
        let mut reader = EofReader {
            inner: stream,
            eof: false,
        };
        let mut archive = tar::Archive::new(&mut reader);
        let mut seen = 0u64;
        for entry in archive.entries().map_err(stream_err)? {
            let mut entry = entry.map_err(stream_err)?;
            seen += 1;
            progress(seen);
            self.member(&mut entry)?;
        }
        if reader.eof {
            return Err(ExtractError::Truncated);
        }
        // Read what follows the end marker (padding to the record size), so the producer is not
        // cut off with EPIPE and a reader that reports the producer's exit status at EOF can.
        let mut rest = (&mut reader).take(self.limits.max_trailing.saturating_add(1));
        let trailing = io::copy(&mut rest, &mut io::sink()).map_err(stream_err)?;
        if trailing > self.limits.max_trailing {
            return Err(ExtractError::Stream {
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "more than {} bytes after the end-of-archive marker",
                        self.limits.max_trailing
                    ),
                ),
            });
        }
        if !self.found {
            return Err(ExtractError::PrefixNotFound {
                prefix: self.prefix.to_owned(),
            });
        }
        self.check_symlinks()?;
        Ok(self.nodes)
    }

    /// Classifies a member name: outside the imageroot (skipped), the imageroot itself,
    /// a `.gitignore` (skipped), or a path below it, validated.
    fn select(&self, raw: &[u8]) -> Result<Selected, ExtractError> {
        let absolute = raw.first() == Some(&b'/');
        let components: Vec<&[u8]> = raw
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        let n = self.prefix_components.len();
        let under = components.len() >= n
            && components
                .iter()
                .zip(&self.prefix_components)
                .all(|(c, p)| *c == p.as_bytes());
        if !under {
            return Ok(Selected::Outside);
        }
        let refuse = |reason: &str| ExtractError::Refused {
            member: String::from_utf8_lossy(raw).into_owned(),
            reason: reason.to_owned(),
        };
        if absolute {
            return Err(refuse("absolute path"));
        }
        if components.iter().any(|c| *c == b"..") {
            return Err(refuse("'..' path component"));
        }
        if raw.contains(&b'\0') || raw.contains(&b'\n') {
            return Err(refuse("NUL or newline in the name"));
        }
        let below = &components[n..];
        if below.is_empty() {
            return Ok(Selected::Root);
        }
        // GNU tar's --exclude=.gitignore matches any component, and drops what is below it.
        if below.iter().any(|c| *c == b".gitignore") {
            return Ok(Selected::Skipped);
        }
        // `.wh.` names are reserved for whiteouts (OCI image layers): a layer read straight from
        // `podman image save` may carry them, an image's filesystem never has them (see
        // `engine/image_stream.rs`).
        if below.iter().any(|c| c.starts_with(b".wh.")) {
            return Ok(Selected::Skipped);
        }
        let mut path = String::new();
        for (i, c) in below.iter().enumerate() {
            let c = std::str::from_utf8(c).map_err(|_| refuse("the name is not valid UTF-8"))?;
            if i > 0 {
                path.push('/');
            }
            path.push_str(c);
        }
        Ok(Selected::Below(path, below.len()))
    }

    fn member<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Archive-wide metadata, no file.
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let member = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| ExtractError::Refused {
            member: member.clone(),
            reason: reason.to_owned(),
        };
        let (path, depth) = match self.select(&raw)? {
            Selected::Outside => return Ok(()),
            Selected::Skipped => {
                self.found = true;
                return Ok(());
            }
            Selected::Root => {
                self.found = true;
                return if kind.is_dir() {
                    Ok(())
                } else {
                    Err(refuse("the imageroot itself is not a directory"))
                };
            }
            Selected::Below(path, depth) => (path, depth),
        };
        self.found = true;
        self.kept += 1;
        if self.kept > self.limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        if depth > self.limits.max_depth {
            return Err(ExtractError::TooDeep {
                member,
                limit: self.limits.max_depth,
            });
        }
        if depth == 1
            && (matches!(path.as_str(), LIST_FILE | LIST_BACKUP | LOCK_FILE)
                || path.starts_with(STAGING_PREFIX))
        {
            return Err(refuse(
                "it would replace the extractor's own bookkeeping file",
            ));
        }
        // Old tar writers mark directories only with a trailing '/'.
        let is_dir = kind.is_dir() || (kind == EntryType::Regular && raw.ends_with(b"/"));
        match kind {
            _ if is_dir => {
                let mode = entry.header().mode().unwrap_or(0o755) & 0o777;
                self.stage_dir(&member, &path, mode)
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.stage_file(&member, &path, entry)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = String::from_utf8(target)
                    .map_err(|_| refuse("the symlink target is not valid UTF-8"))?;
                self.stage_symlink(&member, &path, target)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.stage_hardlink(&member, &path, &target)
            }
            EntryType::Char | EntryType::Block => Err(refuse("device nodes are not allowed")),
            EntryType::Fifo => Err(refuse("FIFOs are not allowed")),
            other => Err(refuse(&format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            ))),
        }
    }

    fn staging_error(&self, path: &str, source: io::Error) -> ExtractError {
        ExtractError::Staging {
            path: path.to_owned(),
            staging: self.staging.to_owned(),
            source: flatten(source),
        }
    }

    /// Makes sure every ancestor of `path` is a staged directory, creating missing ones;
    /// refuses a member that would be written through a symlink or below a file.
    fn prepare_parents(&mut self, member: &str, path: &str) -> Result<(), ExtractError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let ancestor = &path[..end + i];
            end += i + 1;
            match self.nodes.get(ancestor) {
                Some(Node::Dir { .. }) => {}
                Some(Node::Symlink(_)) => {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: format!("it would be written through the symlink {ancestor:?}"),
                    });
                }
                Some(Node::File | Node::Kept { .. }) => {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: format!("its parent {ancestor:?} is not a directory"),
                    });
                }
                None => {
                    self.mkdir(ancestor)?;
                    self.nodes.insert(
                        ancestor.to_owned(),
                        Node::Dir {
                            mode: 0o755,
                            explicit: false,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn mkdir(&self, path: &str) -> Result<(), ExtractError> {
        // 0700 while staging, so the extracting user can always fill it; the archive's mode is
        // applied when the directory is created in the install dir.
        DirBuilder::new()
            .mode(0o700)
            .create(self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))
    }

    /// Frees the staged slot of a duplicate member (the later member wins, as with tar).
    fn free_slot(&mut self, member: &str, path: &str) -> Result<(), ExtractError> {
        let staged = self.staging.join(path);
        match self.nodes.get(path) {
            None => Ok(()),
            Some(Node::Dir { .. }) => {
                let child = format!("{path}/");
                let has_children = self
                    .nodes
                    .range(child.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&child));
                if has_children {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: "it replaces a directory that has contents".to_owned(),
                    });
                }
                fs::remove_dir(&staged).map_err(|e| self.staging_error(path, e))?;
                self.nodes.remove(path);
                Ok(())
            }
            Some(Node::Kept { .. }) => {
                // Nothing was staged for it.
                self.nodes.remove(path);
                Ok(())
            }
            Some(_) => {
                fs::remove_file(&staged).map_err(|e| self.staging_error(path, e))?;
                self.nodes.remove(path);
                Ok(())
            }
        }
    }

    fn stage_dir(&mut self, member: &str, path: &str, mode: u32) -> Result<(), ExtractError> {
        self.prepare_parents(member, path)?;
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => {}
            Some(_) => {
                self.free_slot(member, path)?;
                self.mkdir(path)?;
            }
            None => self.mkdir(path)?,
        }
        self.nodes.insert(
            path.to_owned(),
            Node::Dir {
                mode,
                explicit: true,
            },
        );
        Ok(())
    }

    fn stage_file<R: Read>(
        &mut self,
        member: &str,
        path: &str,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ExtractError> {
        // The declared size (logical size for sparse files) counts before anything is written.
        self.bytes = self.bytes.saturating_add(entry.size());
        if self.bytes > self.limits.max_bytes {
            return Err(ExtractError::TooLarge {
                member: member.to_owned(),
                limit: self.limits.max_bytes,
            });
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        let plain = matches!(
            entry.header().entry_type(),
            EntryType::Regular | EntryType::Continuous
        );
        if let Some(installed) = self
            .installed
            .filter(|_| plain && entry.size() <= MAX_COMPARED)
        {
            return self.stage_or_keep(path, entry, installed);
        }
        // The tar crate writes the data (seeking over sparse holes) and applies mode & 0o777:
        // setuid, setgid and sticky bits are dropped, ownership is never set.
        entry.set_preserve_permissions(false);
        entry.set_preserve_mtime(true);
        entry.set_mask(0);
        entry
            .unpack(self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// A small regular file: read into memory, then kept when the install dir already holds it
    /// as is, else staged from memory as the tar crate would have staged it.
    fn stage_or_keep<R: Read>(
        &mut self,
        path: &str,
        entry: &mut tar::Entry<'_, R>,
        installed: &InstalledTree,
    ) -> Result<(), ExtractError> {
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header.mtime().unwrap_or(0);
        let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry
            .read_to_end(&mut data)
            .map_err(|source| ExtractError::Stream {
                source: flatten(source),
            })?;
        if installed.holds(path, &data, mode) {
            self.nodes.insert(path.to_owned(), Node::Kept { mtime });
            return Ok(());
        }
        unchanged::write_staged(&self.staging.join(path), &data, mode, mtime)
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    fn stage_symlink(
        &mut self,
        member: &str,
        path: &str,
        target: String,
    ) -> Result<(), ExtractError> {
        let refuse = |reason: &str| ExtractError::Refused {
            member: member.to_owned(),
            reason: reason.to_owned(),
        };
        if target.is_empty() {
            return Err(refuse("the symlink target is empty"));
        }
        if target.starts_with('/') {
            return Err(refuse(&format!(
                "the symlink target {target:?} is absolute"
            )));
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        std::os::unix::fs::symlink(&target, self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        // Where it points is checked once the whole tree is known (check_symlinks).
        self.nodes.insert(path.to_owned(), Node::Symlink(target));
        Ok(())
    }

    fn stage_hardlink(
        &mut self,
        member: &str,
        path: &str,
        target: &[u8],
    ) -> Result<(), ExtractError> {
        let shown = String::from_utf8_lossy(target).into_owned();
        let refuse = |reason: String| ExtractError::Refused {
            member: member.to_owned(),
            reason,
        };
        let target = match self.select(target) {
            Ok(Selected::Below(t, _)) => t,
            Ok(Selected::Skipped | Selected::Root) => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is not a regular file extracted before it"
                )));
            }
            Ok(Selected::Outside) | Err(_) => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is outside the imageroot"
                )));
            }
        };
        if target == path {
            return Err(refuse("the hard link points to itself".to_owned()));
        }
        match self.nodes.get(&target) {
            Some(Node::File) => {}
            Some(Node::Kept { mtime }) => {
                // A link needs its target staged: stage a copy of the kept file.
                let mtime = *mtime;
                self.unkeep(&target, mtime)?;
            }
            _ => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is not a regular file extracted before it"
                )));
            }
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        fs::hard_link(self.staging.join(&target), self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// Stages a copy of the file kept at `path` (which the image has with those bytes).
    fn unkeep(&mut self, path: &str, mtime: u64) -> Result<(), ExtractError> {
        let staged = self.staging.join(path);
        let copied = self
            .installed
            .ok_or_else(|| io::Error::other("the install dir is not open"))
            .and_then(|installed| installed.copy_to(path, &staged, mtime));
        copied.map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// Refuses symlinks that resolve outside the install dir, following the staged symlinks they
    /// pass through (a lexical check alone misses `s -> ..` followed by `t -> s/../..`).
    fn check_symlinks(&self) -> Result<(), ExtractError> {
        for (path, node) in &self.nodes {
            if let Node::Symlink(target) = node {
                resolve_inside(&self.nodes, path, target).map_err(|reason| {
                    ExtractError::Refused {
                        member: format!("{}/{path}", self.prefix),
                        reason: format!("the symlink target {target:?} {reason}"),
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// Resolves `target` of the symlink at `link` (paths relative to the install dir), following
/// symlinks of the staged tree; fails if the walk leaves the install dir.
pub(super) fn resolve_inside(nodes: &Tree, link: &str, target: &str) -> Result<(), &'static str> {
    const MAX_HOPS: usize = 40;
    let mut stack: Vec<&str> = link.split('/').collect();
    stack.pop();
    let mut queue: VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(component) = queue.pop_front() {
        match component {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err("resolves outside the install dir");
                }
            }
            name => {
                stack.push(name);
                if let Some(Node::Symlink(next)) = nodes.get(&stack.join("/")) {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err("has too many levels of symbolic links");
                    }
                    if next.starts_with('/') {
                        return Err("passes through an absolute symlink");
                    }
                    stack.pop();
                    for c in next.split('/').rev() {
                        queue.push_front(c);
                    }
                }
            }
        }
    }
    Ok(())
}
