//! `cargo xtask install` and `cargo xtask deb`: the files a node needs, where a node looks for
//! them.
//!
//! One table ([`entries`]) says what goes where and with which mode; `install` copies it under
//! `--destdir`/`--prefix`, and the cargo-deb metadata in `daemon/Cargo.toml` lists the same tree
//! for the Debian package (the packaging tests compare the two).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{root, run};

/// The daemon's path in the shipped unit and activation file, rewritten for another prefix.
const SHIPPED_DAEMON_PATH: &str = "/usr/libexec/module-updaterd";
/// The polkit actions file (`module_updater_dbus::POLKIT_ACTIONS_FILE`; xtask has no
/// dependencies, and the packaging tests check that the two agree).
const POLKIT_ACTIONS_FILE: &str = "org.nethserver.moduleupdater.policy";
/// Where the generated man pages and completions go, below `<target>/release/` (cargo-deb finds
/// them there through its `target/release/` asset prefix).
const GENERATED_DIR: &str = "packaging";

/// The client's subcommand pages `module-updater-NAME(1)`: (generated file, installed path).
/// `module-updater generate man --list` names the subcommands; [`generate`] refuses to package
/// when the two lists differ, so a new subcommand cannot ship without its page.
/// The Cockpit page (`cockpit/`, docs/cockpit.md), installed as Cockpit's package
/// `module-updater`: plain files, no build step. (source in the repository, destination)
const COCKPIT_FILES: &[(&str, &str)] = &[
    (
        "cockpit/manifest.json",
        "{prefix}/share/cockpit/module-updater/manifest.json",
    ),
    (
        "cockpit/index.html",
        "{prefix}/share/cockpit/module-updater/index.html",
    ),
    (
        "cockpit/app.js",
        "{prefix}/share/cockpit/module-updater/app.js",
    ),
    (
        "cockpit/dom.js",
        "{prefix}/share/cockpit/module-updater/dom.js",
    ),
    (
        "cockpit/jobs.js",
        "{prefix}/share/cockpit/module-updater/jobs.js",
    ),
    (
        "cockpit/plan.js",
        "{prefix}/share/cockpit/module-updater/plan.js",
    ),
    (
        "cockpit/service.js",
        "{prefix}/share/cockpit/module-updater/service.js",
    ),
    (
        "cockpit/module-updater.css",
        "{prefix}/share/cockpit/module-updater/module-updater.css",
    ),
];

const CLIENT_SUBCOMMAND_PAGES: &[(&str, &str, &str)] = &[
    (
        "run",
        "module-updater-run.1.gz",
        "{prefix}/share/man/man1/module-updater-run.1.gz",
    ),
    (
        "update",
        "module-updater-update.1.gz",
        "{prefix}/share/man/man1/module-updater-update.1.gz",
    ),
    (
        "rollback",
        "module-updater-rollback.1.gz",
        "{prefix}/share/man/man1/module-updater-rollback.1.gz",
    ),
    (
        "prune",
        "module-updater-prune.1.gz",
        "{prefix}/share/man/man1/module-updater-prune.1.gz",
    ),
    (
        "list",
        "module-updater-list.1.gz",
        "{prefix}/share/man/man1/module-updater-list.1.gz",
    ),
    (
        "show",
        "module-updater-show.1.gz",
        "{prefix}/share/man/man1/module-updater-show.1.gz",
    ),
    (
        "jobs",
        "module-updater-jobs.1.gz",
        "{prefix}/share/man/man1/module-updater-jobs.1.gz",
    ),
    (
        "check",
        "module-updater-check.1.gz",
        "{prefix}/share/man/man1/module-updater-check.1.gz",
    ),
    (
        "history",
        "module-updater-history.1.gz",
        "{prefix}/share/man/man1/module-updater-history.1.gz",
    ),
    (
        "status",
        "module-updater-status.1.gz",
        "{prefix}/share/man/man1/module-updater-status.1.gz",
    ),
    (
        "cancel",
        "module-updater-cancel.1.gz",
        "{prefix}/share/man/man1/module-updater-cancel.1.gz",
    ),
    (
        "wait",
        "module-updater-wait.1.gz",
        "{prefix}/share/man/man1/module-updater-wait.1.gz",
    ),
    (
        "ns8",
        "module-updater-ns8.1.gz",
        "{prefix}/share/man/man1/module-updater-ns8.1.gz",
    ),
    (
        "monitor",
        "module-updater-monitor.1.gz",
        "{prefix}/share/man/man1/module-updater-monitor.1.gz",
    ),
    (
        "version",
        "module-updater-version.1.gz",
        "{prefix}/share/man/man1/module-updater-version.1.gz",
    ),
];

/// Where a file of the tree comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A file of the repository, relative to its root.
    Repo(&'static str),
    /// A release binary.
    Binary(&'static str),
    /// A file generated into `<target>/release/packaging/`.
    Generated(&'static str),
}

/// One installed file.
#[derive(Debug, Clone)]
struct Entry {
    source: Source,
    /// The installed path; `{prefix}` stands for `--prefix`.
    dest: &'static str,
    mode: u32,
    /// Rewrite [`SHIPPED_DAEMON_PATH`] for the prefix (unit, activation file).
    rewrite: bool,
    /// A configuration file: an existing one is the administrator's and is kept.
    config: bool,
}

const fn file(source: Source, dest: &'static str, mode: u32) -> Entry {
    Entry {
        source,
        dest,
        mode,
        rewrite: false,
        config: false,
    }
}

/// Everything `install` installs and the package contains.
fn entries() -> Vec<Entry> {
    use Source::*;
    vec![
        file(
            Binary("module-updaterd"),
            "{prefix}/libexec/module-updaterd",
            0o755,
        ),
        file(
            Binary("module-updater"),
            "{prefix}/bin/module-updater",
            0o755,
        ),
        Entry {
            rewrite: true,
            ..file(
                Repo("systemd/units/module-updaterd.service"),
                "{prefix}/lib/systemd/system/module-updaterd.service",
                0o644,
            )
        },
        file(
            Repo("dbus/data/org.nethserver.ModuleUpdater.conf"),
            "{prefix}/share/dbus-1/system.d/org.nethserver.ModuleUpdater.conf",
            0o644,
        ),
        Entry {
            rewrite: true,
            ..file(
                Repo("dbus/data/org.nethserver.ModuleUpdater.service"),
                "{prefix}/share/dbus-1/system-services/org.nethserver.ModuleUpdater.service",
                0o644,
            )
        },
        file(
            Repo("dbus/data/org.nethserver.moduleupdater.policy"),
            "{prefix}/share/polkit-1/actions/org.nethserver.moduleupdater.policy",
            0o644,
        ),
        file(
            Generated("module-updater.1.gz"),
            "{prefix}/share/man/man1/module-updater.1.gz",
            0o644,
        ),
        file(
            Generated("module-updaterd.8.gz"),
            "{prefix}/share/man/man8/module-updaterd.8.gz",
            0o644,
        ),
        file(
            Generated("module-updater.bash"),
            "{prefix}/share/bash-completion/completions/module-updater",
            0o644,
        ),
        file(
            Generated("_module-updater"),
            "{prefix}/share/zsh/vendor-completions/_module-updater",
            0o644,
        ),
        file(
            Generated("module-updater.fish"),
            "{prefix}/share/fish/vendor_completions.d/module-updater.fish",
            0o644,
        ),
        // NS8's node action; the package's postinst puts it into the node agent's actions on
        // an NS8 node only (docs/ns8.md).
        file(
            Repo("client/ns8/update-module-instances/validate-input.json"),
            "{prefix}/share/module-updater/ns8/update-module-instances/validate-input.json",
            0o644,
        ),
        file(
            Repo("client/ns8/update-module-instances/50update"),
            "{prefix}/share/module-updater/ns8/update-module-instances/50update",
            0o755,
        ),
    ]
    .into_iter()
    .chain(
        CLIENT_SUBCOMMAND_PAGES
            .iter()
            .map(|(_, generated, dest)| file(Generated(generated), dest, 0o644)),
    )
    .chain(
        COCKPIT_FILES
            .iter()
            .map(|(source, dest)| file(Repo(source), dest, 0o644)),
    )
    .chain([Entry {
        config: true,
        ..file(
            Repo("daemon/data/config.toml"),
            "/etc/module-updater/config.toml",
            0o644,
        )
    }])
    .collect()
}

/// The cargo target directory (`cargo metadata` knows `CARGO_TARGET_DIR` and configs).
pub fn target_dir() -> Result<PathBuf, String> {
    let output = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed ({})", output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let key = "\"target_directory\":\"";
    let start = text
        .find(key)
        .map(|i| i + key.len())
        .ok_or("cargo metadata printed no target_directory")?;
    let end = text[start..]
        .find('"')
        .map(|i| start + i)
        .ok_or("cargo metadata: unterminated target_directory")?;
    Ok(PathBuf::from(text[start..end].replace("\\\\", "\\")))
}

/// Builds the release binaries of the daemon and the client.
fn build_release() -> Result<(), String> {
    run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "module-updaterd",
            "-p",
            "module-updater",
        ],
    )
}

/// Runs `program args` and returns its stdout.
fn capture(program: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let output = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {} failed ({})",
            program.display(),
            args.join(" "),
            output.status
        ));
    }
    Ok(output.stdout)
}

/// `gzip -9n`: the most compression, no name or time stamp (the same bytes on every build).
fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gzip (apt-get install gzip): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(data)
            .map_err(|e| format!("cannot write to gzip: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("gzip failed: {e}"))?;
    if !output.status.success() {
        return Err(format!("gzip failed ({})", output.status));
    }
    Ok(output.stdout)
}

/// Generates the man pages and completions from the built binaries' clap definitions into
/// `<release>/packaging/`.
fn generate(release: &Path) -> Result<PathBuf, String> {
    let dir = release.join(GENERATED_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let client = release.join("module-updater");
    let daemon = release.join("module-updaterd");
    let listed = String::from_utf8_lossy(&capture(&client, &["generate", "man", "--list"])?)
        .split_whitespace()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    let known: Vec<&str> = CLIENT_SUBCOMMAND_PAGES.iter().map(|(n, _, _)| *n).collect();
    if listed != known {
        return Err(format!(
            "the client's subcommands are {listed:?} but xtask packages the pages of {known:?}: \
             update CLIENT_SUBCOMMAND_PAGES in xtask/src/packaging.rs and the assets in \
             daemon/Cargo.toml"
        ));
    }
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (
            "module-updater.1.gz",
            gzip(&capture(&client, &["generate", "man"])?)?,
        ),
        (
            "module-updaterd.8.gz",
            gzip(&capture(&daemon, &["--generate-man"])?)?,
        ),
        (
            "module-updater.bash",
            capture(&client, &["generate", "completions", "bash"])?,
        ),
        (
            "_module-updater",
            capture(&client, &["generate", "completions", "zsh"])?,
        ),
        (
            "module-updater.fish",
            capture(&client, &["generate", "completions", "fish"])?,
        ),
    ];
    for (name, generated, _) in CLIENT_SUBCOMMAND_PAGES {
        files.push((
            generated,
            gzip(&capture(&client, &["generate", "man", name])?)?,
        ));
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(dir)
}

/// Options of `cargo xtask install`.
#[derive(Debug)]
struct InstallArgs {
    prefix: PathBuf,
    destdir: Option<PathBuf>,
}

fn parse_install_args(args: &[String]) -> Result<InstallArgs, String> {
    let mut parsed = InstallArgs {
        prefix: PathBuf::from("/usr"),
        destdir: None,
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| iter.next().cloned())
                .ok_or(format!("{name} needs a directory"))
        };
        match name {
            "--prefix" => parsed.prefix = PathBuf::from(value()?),
            "--destdir" => parsed.destdir = Some(PathBuf::from(value()?)),
            other => {
                return Err(format!(
                    "unknown option {other}: usage: cargo xtask install [--prefix DIR] [--destdir DIR]"
                ));
            }
        }
    }
    if !parsed.prefix.is_absolute() {
        return Err(format!(
            "--prefix {} must be an absolute path (it is written into the unit and the activation file)",
            parsed.prefix.display()
        ));
    }
    // Trailing slashes would give "//" in rewritten paths.
    let trimmed = parsed
        .prefix
        .to_string_lossy()
        .trim_end_matches('/')
        .to_owned();
    parsed.prefix = PathBuf::from(if trimmed.is_empty() { "/" } else { &trimmed });
    Ok(parsed)
}

/// The installed path of `entry` for `prefix`.
fn dest_path(entry: &Entry, prefix: &Path) -> PathBuf {
    let prefix = prefix.to_string_lossy();
    let prefix = prefix.trim_end_matches('/');
    PathBuf::from(entry.dest.replace("{prefix}", prefix))
}

/// Creates `dir` and its missing parents with mode 0755 whatever the umask (a root umask of 077
/// would otherwise leave `/usr/share/...` unreadable to everyone else).
fn create_dirs(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// Writes `bytes` to `path` with `mode`: to a temporary file in the same directory, then renamed
/// over, so that a running daemon's binary is replaced rather than written into (ETXTBSY).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or(format!("{} has no parent", path.display()))?;
    create_dirs(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.xtask-new"));
    std::fs::write(&temporary, bytes)
        .map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!(
            "cannot rename {} to {}: {e}",
            temporary.display(),
            path.display()
        )
    })
}

/// `cargo xtask install [--prefix /usr] [--destdir DIR]`.
pub fn install(args: &[String]) -> Result<(), String> {
    let args = parse_install_args(args)?;
    build_release()?;
    let release = target_dir()?.join("release");
    let generated = generate(&release)?;
    let destdir = args.destdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut installed = Vec::new();
    for entry in entries() {
        let (source_path, mut bytes) = match &entry.source {
            Source::Repo(path) => {
                let path = root().join(path);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (path, bytes)
            }
            Source::Binary(name) => {
                let path = release.join(name);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (path, bytes)
            }
            Source::Generated(name) => {
                let path = generated.join(name);
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (path, bytes)
            }
        };
        if entry.rewrite {
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("{} is not UTF-8", source_path.display()))?;
            if !text.contains(SHIPPED_DAEMON_PATH) {
                return Err(format!(
                    "{} does not name {SHIPPED_DAEMON_PATH}: cannot point it at the prefix",
                    source_path.display()
                ));
            }
            let daemon = dest_path(&entries()[0], &args.prefix);
            bytes = text
                .replace(SHIPPED_DAEMON_PATH, &daemon.to_string_lossy())
                .into_bytes();
        }
        let dest = dest_path(&entry, &args.prefix);
        let target = destdir.join(dest.strip_prefix("/").unwrap_or(&dest));
        if entry.config && target.exists() {
            let current = std::fs::read(&target).unwrap_or_default();
            if current != bytes {
                eprintln!(
                    "xtask: keeping {} (changed by the administrator); the default is {}",
                    target.display(),
                    source_path.display()
                );
                continue;
            }
        }
        write_file(&target, &bytes, entry.mode)?;
        installed.push(format!("{:o} {}", entry.mode, target.display()));
    }
    for line in &installed {
        println!("{line}");
    }
    let prefix = args.prefix.to_string_lossy();
    if prefix != "/usr" {
        eprintln!(
            "xtask: note: dbus-daemon reads bus policies only from /usr/share/dbus-1/system.d and \
             /etc/dbus-1/system.d, and polkitd reads actions only from /usr/share/polkit-1/actions: \
             with --prefix {prefix}, link or copy {prefix}/share/dbus-1/system.d/org.nethserver.ModuleUpdater.conf \
             and {prefix}/share/polkit-1/actions/{POLKIT_ACTIONS_FILE} there (docs/install.md)"
        );
    }
    if args.destdir.is_none() {
        eprintln!(
            "xtask: installed. Next: `systemctl daemon-reload`, then `busctl introspect \
             org.nethserver.ModuleUpdater /org/nethserver/ModuleUpdater` starts it (docs/install.md)"
        );
    }
    Ok(())
}

/// Whether `cargo deb` runs.
fn has_cargo_deb() -> bool {
    Command::new("cargo")
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs cargo-deb from crates.io when it is missing, saying so.
pub fn ensure_cargo_deb() -> Result<(), String> {
    if has_cargo_deb() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-deb (`cargo install cargo-deb --locked`): it builds the Debian \
         package (`cargo xtask deb`, and the packaging tests)"
    );
    run("cargo", &["install", "cargo-deb", "--locked"])?;
    if has_cargo_deb() {
        Ok(())
    } else {
        Err("cargo-deb was installed but `cargo deb` does not run: is ~/.cargo/bin on PATH?".into())
    }
}

/// `cargo xtask deb [--output DIR]`: builds the release binaries, generates the man pages and
/// completions, and packages everything with cargo-deb. Prints the package's path on stdout.
pub fn deb(args: &[String]) -> Result<(), String> {
    let mut output: Option<String> = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.split_once('=') {
            Some(("--output", value)) => output = Some(value.to_owned()),
            None if arg == "--output" => {
                output = Some(iter.next().cloned().ok_or("--output needs a directory")?);
            }
            _ => {
                return Err(format!(
                    "unknown option {arg}: usage: cargo xtask deb [--output DIR]"
                ));
            }
        }
    }
    ensure_cargo_deb()?;
    build_release()?;
    let target = target_dir()?;
    let release = target.join("release");
    generate(&release)?;
    let output = output.unwrap_or_else(|| target.join("debian").display().to_string());
    std::fs::create_dir_all(&output).map_err(|e| format!("cannot create {output}: {e}"))?;
    // --no-build: package exactly the binaries built above (cargo-deb would build with
    // `--workspace`, which unifies features differently and rebuilds them).
    eprintln!("xtask: running cargo deb -p module-updaterd --no-build --output {output}");
    let result = Command::new("cargo")
        .args([
            "deb",
            "-p",
            "module-updaterd",
            "--no-build",
            "--output",
            &output,
        ])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    if !result.status.success() {
        return Err(format!("cargo deb failed ({})", result.status));
    }
    // cargo-deb prints the package's path as its last line.
    let printed = String::from_utf8_lossy(&result.stdout);
    let path = printed
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| l.trim().to_owned())
        .ok_or(format!("cargo deb printed no package path: {printed}"))?;
    println!("{path}");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn install_options() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let parsed = parse_install_args(&args(&[])).unwrap();
        assert_eq!(parsed.prefix, Path::new("/usr"));
        assert_eq!(parsed.destdir, None);
        let parsed =
            parse_install_args(&args(&["--prefix=/usr/local/", "--destdir", "/tmp/x"])).unwrap();
        assert_eq!(parsed.prefix, Path::new("/usr/local"));
        assert_eq!(parsed.destdir.as_deref(), Some(Path::new("/tmp/x")));
        assert!(parse_install_args(&args(&["--prefix", "usr"])).is_err());
        assert!(parse_install_args(&args(&["--prefix"])).is_err());
        assert!(parse_install_args(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn every_repository_source_exists_and_the_rewritten_ones_name_the_daemon() {
        for entry in entries() {
            if let Source::Repo(path) = entry.source {
                let text = std::fs::read_to_string(root().join(path)).unwrap();
                if entry.rewrite {
                    assert!(text.contains(SHIPPED_DAEMON_PATH), "{path}");
                }
            }
        }
        assert!(
            entries()
                .iter()
                .any(|e| e.dest.ends_with(POLKIT_ACTIONS_FILE))
        );
    }

    #[test]
    fn the_cargo_deb_assets_are_the_install_tree() {
        let manifest = std::fs::read_to_string(root().join("daemon/Cargo.toml")).unwrap();
        for entry in entries() {
            let dest = dest_path(&entry, Path::new("/usr"));
            let dest = dest.to_string_lossy();
            let line = format!(
                "\"{}\", \"{:o}\"]",
                dest.trim_start_matches('/'),
                entry.mode
            );
            assert!(
                manifest.contains(&line),
                "daemon/Cargo.toml [package.metadata.deb] assets lack {line}"
            );
        }
    }
}
