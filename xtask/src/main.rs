//! Project tasks, run as `cargo xtask <task>`:
//! - `test`: install what the suite needs, check formatting and lints, build, run every test;
//! - `demo`: install what is missing, build, and stand up the sandbox demo;
//! - `install`: build release binaries and install them with the unit, bus files, man pages,
//!   completions and default configuration (`--prefix`, `--destdir`);
//! - `deb`: the same tree as a Debian package, built with cargo-deb;
//! - `bench`: install what is missing, build release binaries, and run the benchmark against
//!   NS8's pipeline (`--quick` for the short regression check, `--profile node` for what a node
//!   sees);
//! - `bench-compare REV`: the same bench run in turn with the daemon of git revision REV and this
//!   one, alternating, and a table of both side by side.
//!
//! Everything the tests need is installed here, so a fresh Debian 12 machine with only the Rust
//! toolchain runs the suite with this one command (CI calls exactly `cargo xtask test`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod packaging;

/// Debian packages the sandbox needs, with why.
const PACKAGES: &[(&str, &str)] = &[
    (
        "podman",
        "rootless podman for instance users, and building test module images",
    ),
    ("uidmap", "newuidmap/newgidmap for rootless podman"),
    (
        "skopeo",
        "reads a module image's labels in the registry while podman pulls it",
    ),
    (
        "docker-registry",
        "a real OCI registry on loopback for test images",
    ),
    ("dbus", "dbus-daemon for the private test bus"),
    (
        "dbus-user-session",
        "the user bus each instance's systemd --user manager activates",
    ),
    ("systemd", "systemd --user managers for instances, busctl"),
    ("libglib2.0-bin", "gdbus, a D-Bus client we did not write"),
    (
        "polkitd",
        "real polkit authorisation on the test bus: polkitd, pkcheck, and pkttyagent with its PAM password helper for the password-prompt test",
    ),
    ("pkexec", "polkit's pkcheck and actions"),
    (
        "redis-server",
        "a real Redis on loopback, as an NS8 cluster's leader Redis",
    ),
    (
        "python3-jeepney",
        "a pure-Python D-Bus library, to run the Python example of docs/dbus-api.md",
    ),
    (
        "dpkg-dev",
        "dpkg-shlibdeps, with which cargo-deb computes the package's library dependencies",
    ),
    (
        "busybox-static",
        "a static busybox for tiny test images whose rootless containers really run (the health gate's stale-container check)",
    ),
    (
        "runc",
        "the OCI runtime of those test containers: crun refuses a machine with hybrid cgroups",
    ),
    (
        "cockpit-ws",
        "serves the Cockpit page (cockpit/) on loopback for its browser tests (tests/tests/cockpit.rs)",
    ),
    (
        "cockpit-bridge",
        "the Cockpit bridge that carries the page's D-Bus calls to the sandbox's bus",
    ),
    (
        "chromium",
        "the headless browser the Cockpit page's tests drive through the DevTools protocol",
    ),
    (
        "strace",
        "traces every exec of the daemon and its workers, to show it never runs systemctl or systemd-run (tests/reliability.rs)",
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("cockpit") => cockpit(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("bench-compare") => bench_compare(&args[1..]),
        Some("install") => packaging::install(&args[1..]),
        Some("deb") => packaging::deb(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test|demo|cockpit|bench|install|deb> [ARGS...]");
            eprintln!(
                "  test   install what is missing, check fmt and clippy, run the whole suite"
            );
            eprintln!("  demo   install what is missing, build, and run the sandbox demo");
            eprintln!(
                "  cockpit  the Cockpit page on a sandbox node, served on loopback [--port 9091] (docs/cockpit.md)"
            );
            eprintln!(
                "  bench  install what is missing, build --release, and compare the daemon with \
                 NS8's pipeline (--quick: N=1 and 10, one run; --profile node: behind a shaped \
                 uplink, overlay storage; --json FILE; --help for more)"
            );
            eprintln!(
                "  bench-compare REV [--rounds K] [BENCH ARGS]  the bench with REV's daemon and \
                 this one in turn, K rounds (default 3), side by side"
            );
            eprintln!(
                "  install  build --release and install [--prefix /usr] [--destdir DIR] (docs/install.md)"
            );
            eprintln!("  deb      build --release and package it with cargo-deb [--output DIR]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask/ is one level below the workspace root. `cargo run` (the `xtask` alias) says where
    // at run time; the path compiled in is only a fallback, since a binary built in another
    // checkout sharing this target dir would point there.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed ({status})", args.join(" ")))
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the Debian packages the sandbox needs, saying what and why.
fn ensure_packages() -> Result<(), String> {
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in &missing {
        eprintln!("xtask: installing {package}: {why}");
    }
    if !nix_is_root() {
        return Err("installing packages needs root: run as root (the sandbox creates users and cgroups too)".into());
    }
    run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().map(|(p, _)| *p));
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("apt-get {} failed ({status})", args.join(" ")));
    }
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn has_nextest() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn test(extra: &[String]) -> Result<(), String> {
    ensure_packages()?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // End-to-end tests start the daemon and client binaries: build them first.
    run("cargo", &["build", "--workspace", "--bins"])?;
    // The packaging tests check the Debian package: build it here (a release build takes minutes
    // on two cores; the tests then only repackage the cached build, within their time limit).
    packaging::ensure_cargo_deb()?;
    packaging::deb(&[])?;
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    if has_nextest() {
        let mut args = vec!["nextest", "run", "--workspace", "--profile", "ci"];
        args.extend(extra);
        run("cargo", &args)
    } else {
        eprintln!(
            "xtask: cargo-nextest not found, using cargo test (install it with `cargo install cargo-nextest`)"
        );
        let mut args = vec!["test", "--workspace"];
        args.extend(extra);
        run("cargo", &args)
    }
}

fn demo(extra: &[String]) -> Result<(), String> {
    ensure_packages()?;
    run("cargo", &["build", "--workspace", "--bins"])?;
    let mut args = vec![
        "run",
        "--quiet",
        "-p",
        "module-updater-tests",
        "--bin",
        "demo",
        "--",
    ];
    args.extend(extra.iter().map(String::as_str));
    run("cargo", &args)
}

/// The Cockpit page against a sandbox node, for working on it by hand (docs/cockpit.md).
fn cockpit(extra: &[String]) -> Result<(), String> {
    ensure_packages()?;
    run("cargo", &["build", "--workspace", "--bins"])?;
    let mut args = vec![
        "run",
        "--quiet",
        "-p",
        "module-updater-tests",
        "--bin",
        "cockpit-demo",
        "--",
    ];
    args.extend(extra.iter().map(String::as_str));
    run("cargo", &args)
}

fn bench(extra: &[String]) -> Result<(), String> {
    let program = build_bench()?;
    let args: Vec<&str> = extra.iter().map(String::as_str).collect();
    run(&program, &args)
}

/// Builds REV's daemon in a worktree under target/compare (with a target dir of its own, so that
/// neither build overwrites the other's artefacts), then runs the bench with each daemon in turn,
/// the order swapped every round, and has the bench print both side by side.
fn bench_compare(extra: &[String]) -> Result<(), String> {
    let Some(rev) = extra.first().filter(|r| !r.starts_with('-')) else {
        return Err("usage: cargo xtask bench-compare REV [--rounds K] [BENCH ARGS]".into());
    };
    let mut rounds = 3_usize;
    let mut bench_args: Vec<String> = Vec::new();
    let mut rest = extra[1..].iter();
    while let Some(arg) = rest.next() {
        if arg == "--rounds" {
            rounds = rest
                .next()
                .and_then(|k| k.parse().ok())
                .filter(|k| *k > 0)
                .ok_or("--rounds needs a positive number")?;
        } else {
            bench_args.push(arg.clone());
        }
    }
    let program = build_bench()?;
    let dir = target_dir().join("compare");
    let source = dir.join(format!("src-{rev}"));
    let source_text = source.display().to_string();
    if !source.exists() {
        run("git", &["worktree", "add", "--detach", &source_text, rev])?;
    }
    let other_target = dir.join("target").display().to_string();
    let manifest = source.join("Cargo.toml").display().to_string();
    run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "module-updaterd",
            "--manifest-path",
            &manifest,
            "--target-dir",
            &other_target,
        ],
    )?;
    let theirs = dir.join("target/release/module-updaterd");
    let ours = target_dir().join("release/module-updaterd");
    let results = dir.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)
        .map_err(|e| format!("cannot create {}: {e}", results.display()))?;
    for round in 1..=rounds {
        let pair = [(rev.as_str(), &theirs), ("this", &ours)];
        let order: Vec<_> = if round % 2 == 1 {
            pair.iter().collect()
        } else {
            pair.iter().rev().collect()
        };
        for (label, daemon) in order {
            let json = results.join(format!("{label}-{round}.json"));
            let mut args: Vec<String> = bench_args.clone();
            args.extend(["--json".to_owned(), json.display().to_string()]);
            eprintln!(
                "xtask: round {round}/{rounds}, daemon {label} ({})",
                daemon.display()
            );
            let status = Command::new(&program)
                .args(&args)
                .env("MODULE_UPDATERD_BIN", daemon)
                .current_dir(root())
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if !status.success() {
                return Err(format!("the bench with daemon {label} failed ({status})"));
            }
        }
    }
    run(
        &program,
        &["--compare-report", &results.display().to_string()],
    )
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds the release binaries the bench measures; returns the bench's path.
fn build_bench() -> Result<String, String> {
    ensure_packages()?;
    // Release binaries: the daemon and client are measured, the bench itself samples and
    // follows signals while they run. The bench finds the daemon next to itself.
    run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "module-updaterd",
            "-p",
            "module-updater",
            "-p",
            "module-updater-tests",
            "--bins",
        ],
    )?;
    let binary = root().join(target_dir()).join("release/bench");
    Ok(binary.display().to_string())
}
