//! Packaging, as a node administrator meets it: `cargo xtask install` into a DESTDIR (every file,
//! its mode, paths rewritten for another prefix), the Debian package built by `cargo xtask deb`
//! (`dpkg-deb -c`/`-I`), and the package installed on this machine with `dpkg -i`: a private bus
//! configured with the INSTALLED bus policy and activation directory, a root-run `systemd --user`
//! manager loading the INSTALLED unit, a `busctl` call that starts the daemon through it (with
//! the unit's hardening in force), a real update through the hardened unit, then `dpkg --purge`
//! and nothing left. Plus the configuration file end to end: a bad one stops the real daemon
//! with exit status 1 and a message naming key, value and what is allowed.
//!
//! The release build behind `cargo xtask install`/`deb` is cached in `target/` (`cargo xtask
//! test` builds the package before the tests run, so here it is only repackaged).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use module_updater_tests::{ExtraManager, ImageSpec, Sandbox, cmd, daemon_binary};
use nix::fcntl::{Flock, FlockArg};

const PACKAGE: &str = "module-updater";
const NAME: &str = "org.nethserver.ModuleUpdater";
const PATH: &str = "/org/nethserver/ModuleUpdater";
const UNIT: &str = "module-updaterd.service";
const INSTALLED_UNIT: &str = "/usr/lib/systemd/system/module-updaterd.service";
const INSTALLED_POLICY: &str = "/usr/share/dbus-1/system.d/org.nethserver.ModuleUpdater.conf";
const INSTALLED_SERVICES: &str = "/usr/share/dbus-1/system-services";
const INSTALLED_DAEMON: &str = "/usr/libexec/module-updaterd";
const CONFIG_DIR: &str = "/etc/module-updater";
const STATE_DIR: &str = "/var/lib/module-updater";
/// How long a cargo step may take (a release build from scratch is minutes on two cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// CAP_SYS_TIME, dropped by the unit's CapabilityBoundingSet=.
const CAP_SYS_TIME: u32 = 25;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// `cargo xtask ARGS` in the workspace, as a developer types it; panics with its output unless
/// it succeeds.
fn xtask(args: &[&str], umask: Option<&str>) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new("sh");
    command
        .current_dir(workspace())
        .arg("-c")
        .arg(format!(
            "umask {}; exec \"$0\" xtask \"$@\"",
            umask.unwrap_or("022")
        ))
        .arg(&cargo)
        .args(args);
    let started = Instant::now();
    let output = cmd::output_timeout(&mut command, BUILD_TIMEOUT).unwrap();
    assert!(
        output.status.success(),
        "cargo xtask {} failed ({}):\n{}\n{}",
        args.join(" "),
        output.status,
        text(&output.stderr),
        text(&output.stdout)
    );
    eprintln!(
        "cargo xtask {} took {:?}",
        args.join(" "),
        started.elapsed()
    );
    output
}

/// An exclusive lock on a file, across test processes.
fn lock(path: &Path) -> Flock<File> {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// Builds the package with `cargo xtask deb` (one test process at a time: they share
/// `target/debian/`) and returns a private copy of it.
fn built_deb(dir: &Path) -> PathBuf {
    let _lock = lock(&workspace().join("target/packaging-tests.lock"));
    let output = xtask(&["deb"], None);
    let printed = text(&output.stdout);
    let built = PathBuf::from(printed.lines().last().unwrap_or_default());
    assert!(
        built.is_file() && built.extension().is_some_and(|e| e == "deb"),
        "cargo xtask deb printed {printed:?}"
    );
    let copy = dir.join(built.file_name().unwrap());
    std::fs::copy(&built, &copy).unwrap();
    copy
}

/// Every file the install tree has, with its mode, for `prefix`.
/// The client's subcommands, each with its page module-updater-NAME(1).
const CLIENT_SUBCOMMANDS: [&str; 15] = [
    "run", "update", "rollback", "prune", "list", "show", "jobs", "check", "history", "status",
    "cancel", "wait", "ns8", "monitor", "version",
];

/// The Cockpit page's files (`cockpit/`).
const COCKPIT_FILES: &[&str] = &[
    "manifest.json",
    "index.html",
    "app.js",
    "dom.js",
    "jobs.js",
    "plan.js",
    "service.js",
    "module-updater.css",
];

fn expected_tree(prefix: &str) -> BTreeMap<String, u32> {
    let mut tree: BTreeMap<String, u32> = [
        ("libexec/module-updaterd", 0o755),
        ("bin/module-updater", 0o755),
        ("lib/systemd/system/module-updaterd.service", 0o644),
        (
            "share/dbus-1/system.d/org.nethserver.ModuleUpdater.conf",
            0o644,
        ),
        (
            "share/dbus-1/system-services/org.nethserver.ModuleUpdater.service",
            0o644,
        ),
        (
            &format!(
                "share/polkit-1/actions/{}",
                module_updater_dbus::POLKIT_ACTIONS_FILE
            ),
            0o644,
        ),
        ("share/man/man1/module-updater.1.gz", 0o644),
        ("share/man/man8/module-updaterd.8.gz", 0o644),
        ("share/bash-completion/completions/module-updater", 0o644),
        ("share/zsh/vendor-completions/_module-updater", 0o644),
        ("share/fish/vendor_completions.d/module-updater.fish", 0o644),
        (
            "share/module-updater/ns8/update-module-instances/validate-input.json",
            0o644,
        ),
        (
            "share/module-updater/ns8/update-module-instances/50update",
            0o755,
        ),
    ]
    .iter()
    .map(|(path, mode)| (format!("{prefix}/{path}"), *mode))
    .collect();
    tree.insert("/etc/module-updater/config.toml".to_owned(), 0o644);
    for name in COCKPIT_FILES {
        tree.insert(
            format!("{prefix}/share/cockpit/module-updater/{name}"),
            0o644,
        );
    }
    for name in CLIENT_SUBCOMMANDS {
        tree.insert(
            format!("{prefix}/share/man/man1/module-updater-{name}.1.gz"),
            0o644,
        );
    }
    tree
}

/// Files (not directories) below `root` as absolute paths of the installed system, with modes.
fn files_below(root: &Path) -> BTreeMap<String, u32> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                assert_eq!(
                    meta.mode() & 0o7777,
                    0o755,
                    "directory {} has mode {:o}",
                    path.display(),
                    meta.mode() & 0o7777
                );
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                files.insert(format!("/{}", rel.display()), meta.mode() & 0o7777);
            }
        }
    }
    files
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn gunzip(path: &Path) -> String {
    let output = Command::new("gzip").arg("-dc").arg(path).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn shipped(relative: &str) -> String {
    read(workspace().join(relative))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let mut command = cmd::clean(program);
    command.args(args);
    let output = cmd::output_timeout(&mut command, Duration::from_secs(300)).unwrap();
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}\n{}",
        args.join(" "),
        output.status,
        text(&output.stderr),
        text(&output.stdout)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn install_into_a_destdir_gives_every_file_with_its_mode() {
    let dir = tempfile::tempdir().unwrap();

    // The default prefix, with a root umask that would hide /usr/share from everyone else.
    let usr = dir.path().join("usr-tree");
    let usr_arg = usr.display().to_string();
    xtask(&["install", "--destdir", &usr_arg], Some("077"));
    assert_eq!(files_below(&usr), expected_tree("/usr"));
    let at = |path: &str| usr.join(path.trim_start_matches('/'));
    assert_eq!(
        read(at(INSTALLED_UNIT)),
        shipped("systemd/units/module-updaterd.service")
    );
    assert_eq!(
        read(at(
            "/usr/share/dbus-1/system-services/org.nethserver.ModuleUpdater.service"
        )),
        shipped("dbus/data/org.nethserver.ModuleUpdater.service")
    );
    assert_eq!(
        read(at(INSTALLED_POLICY)),
        shipped("dbus/data/org.nethserver.ModuleUpdater.conf")
    );
    assert_eq!(
        read(at(&format!(
            "/usr/share/polkit-1/actions/{}",
            module_updater_dbus::POLKIT_ACTIONS_FILE
        ))),
        read(module_updater_dbus::data_dir().join(module_updater_dbus::POLKIT_ACTIONS_FILE))
    );
    assert_eq!(
        read(at("/etc/module-updater/config.toml")),
        shipped("daemon/data/config.toml")
    );
    // Man pages: gzip'd roff of the right name and section, one per client subcommand too.
    let man1 = gunzip(&at("/usr/share/man/man1/module-updater.1.gz"));
    assert!(man1.contains(".TH module-updater 1"), "{man1}");
    for name in CLIENT_SUBCOMMANDS {
        let page = gunzip(&at(&format!(
            "/usr/share/man/man1/module-updater-{name}.1.gz"
        )));
        assert!(
            page.contains(&format!(".TH module-updater-{name} 1")),
            "{page}"
        );
        assert!(page.contains("module\\-updater(1)"), "{page}");
    }
    let man8 = gunzip(&at("/usr/share/man/man8/module-updaterd.8.gz"));
    assert!(man8.contains(".TH module-updaterd 8"), "{man8}");
    assert!(man8.contains("config.toml"), "{man8}");
    // Completions each shell loads.
    let bash = at("/usr/share/bash-completion/completions/module-updater");
    run_ok("bash", &["-n", bash.to_str().unwrap()]);
    assert!(read(&bash).contains("module-updater"));
    assert!(
        read(at("/usr/share/zsh/vendor-completions/_module-updater"))
            .starts_with("#compdef module-updater")
    );
    assert!(
        read(at(
            "/usr/share/fish/vendor_completions.d/module-updater.fish"
        ))
        .contains("complete --keep-order --exclusive --command module-updater")
    );
    // The installed binaries run.
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        run_ok(
            at("/usr/bin/module-updater").to_str().unwrap(),
            &["--version"]
        )
        .contains(version)
    );
    assert!(run_ok(at(INSTALLED_DAEMON).to_str().unwrap(), &["--version"]).contains(version));

    // Another prefix: the unit and the activation file point at the daemon there.
    let local = dir.path().join("local-tree");
    let local_arg = local.display().to_string();
    let output = xtask(
        &["install", "--prefix", "/usr/local", "--destdir", &local_arg],
        None,
    );
    assert_eq!(files_below(&local), expected_tree("/usr/local"));
    let unit = read(local.join("usr/local/lib/systemd/system/module-updaterd.service"));
    assert_eq!(
        unit,
        shipped("systemd/units/module-updaterd.service").replace(
            "ExecStart=/usr/libexec/module-updaterd",
            "ExecStart=/usr/local/libexec/module-updaterd"
        )
    );
    assert!(unit.contains("\nExecStart=/usr/local/libexec/module-updaterd --system\n"));
    let activation = read(
        local.join("usr/local/share/dbus-1/system-services/org.nethserver.ModuleUpdater.service"),
    );
    assert!(
        activation.contains("\nExec=/usr/local/libexec/module-updaterd --system\n"),
        "{activation}"
    );
    for (name, file) in [("unit", &unit), ("activation file", &activation)] {
        assert!(
            !file.contains("/usr/libexec"),
            "the {name} still names /usr/libexec:\n{file}"
        );
    }
    // dbus-daemon and polkitd do not look below /usr/local: the administrator is told.
    assert!(
        text(&output.stderr).contains("/etc/dbus-1/system.d"),
        "{}",
        text(&output.stderr)
    );

    // An administrator's configuration survives a re-install.
    let config = at("/etc/module-updater/config.toml");
    std::fs::write(&config, "max_parallel = 3\n").unwrap();
    let output = xtask(&["install", "--destdir", &usr_arg], None);
    assert_eq!(read(&config), "max_parallel = 3\n");
    assert!(
        text(&output.stderr).contains(&format!("keeping {}", config.display())),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(files_below(&usr), expected_tree("/usr"));
}

/// `dpkg-deb -c` as path → (mode, owner).
fn deb_listing(deb: &Path) -> BTreeMap<String, (u32, String)> {
    let listing = run_ok("dpkg-deb", &["-c", deb.to_str().unwrap()]);
    listing
        .lines()
        .filter(|line| line.starts_with('-'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let perms = fields[0];
            let mode = perms[1..]
                .chars()
                .fold(0u32, |acc, c| (acc << 1) | u32::from(c != '-'));
            let path = fields.last().unwrap().trim_start_matches('.').to_owned();
            (path, (mode, fields[1].to_owned()))
        })
        .collect()
}

#[test]
fn the_deb_has_the_install_tree_its_dependencies_and_a_conffile() {
    let dir = tempfile::tempdir().unwrap();
    let deb = built_deb(dir.path());
    let deb_arg = deb.to_str().unwrap();

    let listing = deb_listing(&deb);
    let mut expected: BTreeMap<String, (u32, String)> = expected_tree("/usr")
        .into_iter()
        .map(|(path, mode)| (path, (mode, "0/0".to_owned())))
        .collect();
    expected.insert(
        "/usr/share/doc/module-updater/copyright".to_owned(),
        (0o644, "0/0".to_owned()),
    );
    assert_eq!(listing, expected);

    let field = |name: &str| text(run_ok("dpkg-deb", &["-f", deb_arg, name]).as_bytes());
    assert_eq!(field("Package"), PACKAGE);
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    let depends: Vec<String> = field("Depends")
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    for needed in ["podman", "dbus", "polkitd", "libc6"] {
        assert!(
            depends.iter().any(|d| d == needed),
            "Depends lacks {needed}: {depends:?}"
        );
    }
    let info = run_ok("dpkg-deb", &["-I", deb_arg]);
    for part in ["conffiles", "postinst", "prerm", "postrm"] {
        assert!(info.contains(part), "{info}");
    }
    assert_eq!(
        text(run_ok("dpkg-deb", &["-I", deb_arg, "conffiles"]).as_bytes()),
        "/etc/module-updater/config.toml"
    );

    // The files from the repository are in it unchanged; the maintainer scripts parse.
    let root = dir.path().join("x");
    run_ok("dpkg-deb", &["-x", deb_arg, root.to_str().unwrap()]);
    for (installed, source) in [
        (INSTALLED_UNIT, "systemd/units/module-updaterd.service"),
        (
            INSTALLED_POLICY,
            "dbus/data/org.nethserver.ModuleUpdater.conf",
        ),
        (
            "/usr/share/dbus-1/system-services/org.nethserver.ModuleUpdater.service",
            "dbus/data/org.nethserver.ModuleUpdater.service",
        ),
        ("/etc/module-updater/config.toml", "daemon/data/config.toml"),
    ] {
        assert_eq!(
            read(root.join(installed.trim_start_matches('/'))),
            shipped(source),
            "{installed}"
        );
    }
    let control = dir.path().join("control");
    run_ok("dpkg-deb", &["-e", deb_arg, control.to_str().unwrap()]);
    for script in ["postinst", "prerm", "postrm"] {
        run_ok("sh", &["-n", control.join(script).to_str().unwrap()]);
    }
}

/// NS8's node agent directory, where the package's postinst puts the node action.
const NS8_NODE: &str = "/var/lib/nethserver/node";

/// `/var/lib/nethserver/node` for the test: made when missing, and then removed at the end with
/// the parents the test made (a real NS8 node's directory is left alone).
struct NodeDir {
    existed: bool,
    made: Vec<PathBuf>,
}

impl NodeDir {
    fn new() -> NodeDir {
        NodeDir {
            existed: Path::new(NS8_NODE).exists(),
            made: Vec::new(),
        }
    }

    /// Makes the directory and the parents that are missing, remembering which.
    fn ensure(&mut self) {
        let mut missing: Vec<PathBuf> = Path::new(NS8_NODE)
            .ancestors()
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        for dir in missing {
            std::fs::create_dir(&dir).unwrap();
            self.made.push(dir);
        }
    }
}

impl Drop for NodeDir {
    fn drop(&mut self) {
        // The outermost directory the test made, with what the postinst put below it.
        if let Some(top) = self.made.first() {
            let _ = std::fs::remove_dir_all(top);
        }
    }
}

/// The package installed with dpkg; purged when dropped (also when the test fails).
struct InstalledPackage {
    purged: bool,
}

impl InstalledPackage {
    fn install(deb: &Path) -> InstalledPackage {
        if is_installed() {
            eprintln!("{PACKAGE} is installed (left by an earlier run?): purging it first");
            purge();
        }
        let mut dpkg = cmd::clean("dpkg");
        dpkg.arg("-i").arg(deb);
        let output = cmd::output_timeout(&mut dpkg, Duration::from_secs(300)).unwrap();
        let package = InstalledPackage { purged: false };
        if !output.status.success() {
            // Missing dependencies: what an administrator does next.
            eprintln!(
                "dpkg -i: {}; running apt-get install -f",
                text(&output.stderr)
            );
            let mut apt = cmd::clean("apt-get");
            apt.args(["install", "-f", "-y", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive");
            let output = cmd::output_timeout(&mut apt, Duration::from_secs(600)).unwrap();
            assert!(output.status.success(), "{}", text(&output.stderr));
        }
        assert!(is_installed(), "{PACKAGE} is not installed after dpkg -i");
        package
    }

    fn purge(mut self) -> Output {
        self.purged = true;
        purge()
    }
}

impl Drop for InstalledPackage {
    fn drop(&mut self) {
        if !self.purged {
            purge();
        }
    }
}

fn is_installed() -> bool {
    let mut command = cmd::clean("dpkg-query");
    command.args(["-W", "-f=${Status}", PACKAGE]);
    cmd::output(&mut command)
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn purge() -> Output {
    let mut command = cmd::clean("dpkg");
    command.args(["--purge", PACKAGE]);
    cmd::output_timeout(&mut command, Duration::from_secs(300)).unwrap()
}

/// The user bus of `manager` configured like a system bus with the INSTALLED files: the
/// installed activation directory and bus policy (plus a permissive default so that root can
/// talk, as in the activation test).
fn configure_bus(manager: &ExtraManager) {
    manager
        .configure_activation_bus(Path::new(INSTALLED_SERVICES), Path::new(INSTALLED_POLICY))
        .unwrap();
}

fn busctl(manager: &ExtraManager, args: &[&str]) -> Output {
    let mut command = cmd::clean("busctl");
    command
        .arg(format!("--address={}", manager.bus_address()))
        .args(args);
    cmd::output_timeout(&mut command, Duration::from_secs(40)).unwrap()
}

fn show(manager: &ExtraManager) -> BTreeMap<String, String> {
    manager
        .show(
            UNIT,
            &[
                "ActiveState",
                "SubState",
                "StatusText",
                "MainPID",
                "FragmentPath",
                "DropInPaths",
                "LoadState",
            ],
        )
        .unwrap()
}

fn wait_active(manager: &ExtraManager) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let properties = show(manager);
        if (properties["ActiveState"] == "active" && properties["StatusText"] == "idle")
            || Instant::now() > deadline
        {
            return properties;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What of the unit's hardening is in force on the running daemon `pid`: seccomp filter mode,
/// CAP_SYS_TIME out of the bounding set, /usr read-only, and no NoNewPrivileges.
fn assert_hardened(pid: &str) {
    let status = read(format!("/proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in\n{status}"))
    };
    assert_eq!(
        field("Seccomp"),
        "2",
        "SystemCallFilter=/RestrictAddressFamilies= are in force"
    );
    assert_eq!(
        field("NoNewPrivs"),
        "0",
        "rootless podman needs setuid newuidmap"
    );
    let bounding = u64::from_str_radix(&field("CapBnd"), 16).unwrap();
    assert_eq!(
        bounding & (1 << CAP_SYS_TIME),
        0,
        "CAP_SYS_TIME is out of the bounding set: {bounding:x}"
    );
    let mountinfo = read(format!("/proc/{pid}/mountinfo"));
    let usr = mountinfo
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/usr"))
        .unwrap_or_else(|| panic!("no /usr mount (ProtectSystem=yes):\n{mountinfo}"));
    let options = usr.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "/usr is read-only: {usr}"
    );
}

/// The pid of rootless podman's pause process for an instance user, if one runs.
fn pause_pid(instance: &module_updater_tests::Instance) -> Option<i32> {
    let text = std::fs::read_to_string(instance.runtime_dir.join("libpod/tmp/pause.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Kills the instance user's pause process (as `podman system migrate` would), so that the next
/// rootless podman command has to start one.
fn kill_pause_process(instance: &module_updater_tests::Instance) {
    if let Some(pid) = pause_pid(instance) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The pause process of rootless podman for an instance, with its cgroup and mount namespace
/// (for the report: see docs/install.md).
fn describe_pause_process(instance: &module_updater_tests::Instance) -> String {
    let Ok(pid) = std::fs::read_to_string(instance.runtime_dir.join("libpod/tmp/pause.pid")) else {
        return "no pause process".to_owned();
    };
    let pid = pid.trim();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let unified = cgroup
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default()
        .to_owned();
    let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("pause pid {pid}, cgroup {unified}, {mnt}")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_package_activates_updates_and_purges_cleanly() {
    let started = Instant::now();
    // The package puts our polkit actions into /usr/share/polkit-1/actions, which the polkit
    // tests install and restore themselves: one at a time.
    let _polkit = lock(Path::new("/run/module-updater-tests/polkit.lock"));
    let dir = tempfile::tempdir().unwrap();
    let deb = built_deb(dir.path());
    let built = started.elapsed();

    let package = InstalledPackage::install(&deb);
    let listed: Vec<String> = run_ok("dpkg", &["-L", PACKAGE])
        .lines()
        .map(str::to_owned)
        .collect();
    for (path, mode) in expected_tree("/usr") {
        assert!(listed.contains(&path), "dpkg -L lacks {path}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, mode, "{path}");
        assert_eq!(meta.uid(), 0, "{path}");
    }
    let installed = started.elapsed() - built;
    // NS8's node action: not on a machine that is no NS8 node; on one, the postinst puts it
    // into the node agent's actions (the package's own copy is in /usr/share).
    let mut node = NodeDir::new();
    let action = Path::new(NS8_NODE).join("actions/update-module-instances");
    if !node.existed {
        assert!(
            !action.exists(),
            "the node action was put on a machine that is no NS8 node"
        );
    }
    node.ensure();
    run_ok(
        &format!("/var/lib/dpkg/info/{PACKAGE}.postinst"),
        &["configure"],
    );
    for (step, mode) in [("validate-input.json", 0o644), ("50update", 0o755)] {
        let installed = action.join(step);
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../client/ns8/update-module-instances")
            .join(step);
        assert_eq!(read(&installed), read(&shipped), "{}", installed.display());
        let meta = std::fs::metadata(&installed).unwrap();
        assert_eq!(meta.mode() & 0o7777, mode, "{}", installed.display());
    }

    // A manager and a bus set up from the installed files only.
    let mut sandbox = Sandbox::new().unwrap();
    let manager = sandbox.prepare_extra_manager("package").unwrap();
    configure_bus(&manager);
    // The installed unit, unchanged: a root-run user manager does all it asks for.
    let unit = manager.write_unit(UNIT, &read(INSTALLED_UNIT)).unwrap();
    sandbox.start_extra_manager(&manager).unwrap();
    // `--system` means DBUS_SYSTEM_BUS_ADDRESS when set: the manager's bus is our system bus.
    let out = manager
        .systemctl(&[
            "set-environment",
            &format!("DBUS_SYSTEM_BUS_ADDRESS={}", manager.bus_address()),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = show(&manager);
    assert_eq!(before["LoadState"], "loaded", "{before:?}");
    assert_eq!(before["FragmentPath"], unit.display().to_string());
    assert_eq!(before["ActiveState"], "inactive");

    // A plain busctl call starts the installed daemon through the installed activation file
    // and unit.
    let activation_started = Instant::now();
    let out = busctl(&manager, &["get-property", NAME, PATH, NAME, "Version"]);
    let activation_took = activation_started.elapsed();
    assert!(
        out.status.success(),
        "activation failed: {}\n{}",
        text(&out.stderr),
        manager.status_text(&["dbus.service", UNIT])
    );
    assert_eq!(
        text(&out.stdout),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );
    let active = wait_active(&manager);
    assert_eq!(
        active["ActiveState"],
        "active",
        "{}",
        manager.status_text(&[UNIT])
    );
    let pid = active["MainPID"].clone();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        Path::new(INSTALLED_DAEMON)
    );
    assert_hardened(&pid);
    let out = busctl(&manager, &["call", NAME, PATH, NAME, "ListInstances"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("a(ssso) "),
        "{}",
        text(&out.stdout)
    );
    // The daemon's defaults: its state in /var/lib/module-updater.
    assert!(Path::new(STATE_DIR).is_dir());
    let out = manager.systemctl(&["stop", UNIT]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A real update through the hardened unit: a rootless and a rootful instance. The only
    // change to the installed unit is ExecStart=, for a configuration file with the sandbox's
    // paths and root podman's private storage (flags only).
    let v1 = sandbox
        .build_image(&ImageSpec::module("hardened", "1.0"))
        .unwrap();
    let v2 = sandbox
        .build_image(&ImageSpec::module("hardened", "2.0").file(
            "update-module.d/50record",
            "#!/bin/sh\nset -e\necho \"uid=$(id -u) $(podman --version)\" > \"$AGENT_STATE_DIR/record\"\n",
            0o755,
        ))
        .unwrap();
    let rootless = sandbox.add_rootless_instance("hardened").unwrap();
    // A second rootless instance: the job downloads the images once for both (skopeo and
    // podman as root, inside the unit's sandboxing).
    let rootless2 = sandbox.add_rootless_instance("hardened").unwrap();
    let rootful = sandbox.add_rootful_instance("hardened").unwrap();
    for instance in [&rootless, &rootless2, &rootful] {
        sandbox.install(instance, &v1).unwrap();
    }
    let config = manager.dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "home_base = {:?}\nrootful_base = {:?}\nstate_dir = {:?}\nsystem_manager_address = {:?}\nscript_timeout = 120\n",
            sandbox.home_base(),
            sandbox.rootful_base(),
            manager.dir.join("state"),
            sandbox.root_manager_address().unwrap(),
        ),
    )
    .unwrap();
    let podman_args: Vec<String> = sandbox
        .rootful_podman_args()
        .iter()
        .map(|a| format!("--rootful-podman-arg={a}"))
        .collect();
    manager
        .write_drop_in(
            UNIT,
            "test-paths.conf",
            &format!(
                "[Service]\nExecStart=\nExecStart={INSTALLED_DAEMON} --system --config {} {}\n",
                config.display(),
                podman_args.join(" ")
            ),
        )
        .unwrap();
    let out = manager.systemctl(&["daemon-reload"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let update_started = Instant::now();
    let connection = zbus::connection::Builder::address(manager.bus_address().as_str())
        .build()
        .await
        .unwrap();
    let run = common::run_job(
        &connection,
        &common::request(&v2, &[&rootless.id, &rootless2.id, &rootful.id], false),
    )
    .await;
    let update_took = update_started.elapsed();
    assert_eq!(
        run.status,
        "completed",
        "{:#}\n{}",
        run.result,
        manager.status_text(&[UNIT])
    );
    let active = wait_active(&manager);
    assert_hardened(&active["MainPID"]);
    for instance in [&rootless, &rootless2] {
        let loaded = format!("Loading {v2} (downloaded once for the node)");
        let messages = run.messages_of(&instance.id);
        assert!(messages.contains(&loaded), "{}: {messages:#?}", instance.id);
    }
    for instance in [&rootless, &rootless2, &rootful] {
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v2);
        let record = read(instance.state_dir.join("record"));
        assert!(
            record.starts_with(&format!("uid={} podman version", instance.uid)),
            "{record}"
        );
    }
    eprintln!(
        "after the update through the hardened unit: daemon pid {}, {}; rootless instance: {}",
        active["MainPID"],
        std::fs::read_link(format!("/proc/{}/ns/mnt", active["MainPID"]))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        describe_pause_process(&rootless)
    );

    // What the unit must not say, verified on this update. With no pause process left for the
    // instance user, a worker's podman starts one inside the unit's mount namespace, and every
    // podman command of that user joins it while it lives (docs/install.md: why no
    // PrivateTmp=). Where podman cannot move it to a scope of the user's manager (here), it is
    // in the update's scope and stops with it: a script of the update records it.
    kill_pause_process(&rootless);
    let v3 = sandbox
        .build_image(&ImageSpec::module("hardened", "3.0").file(
            "update-module.d/50pause",
            "#!/bin/sh\np=$(cat \"$XDG_RUNTIME_DIR/libpod/tmp/pause.pid\")\n\
             echo $p > \"$AGENT_STATE_DIR/pause.pid\"\n\
             cat /proc/$p/mountinfo > \"$AGENT_STATE_DIR/pause.mountinfo\"\n\
             cat /proc/$p/cgroup > \"$AGENT_STATE_DIR/pause.cgroup\"\n",
            0o755,
        ))
        .unwrap();
    let run = common::run_job(&connection, &common::request(&v3, &[&rootless.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let pause: i32 = read(rootless.state_dir.join("pause.pid"))
        .trim()
        .parse()
        .expect("the worker's podman started a pause process");
    assert_eq!(
        pause_pid(&rootless),
        None,
        "the pause process {pause} the update started outlived its scope"
    );
    let pause_mounts = read(rootless.state_dir.join("pause.mountinfo"));
    let pause_usr: Vec<&str> = pause_mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/usr"))
        .collect();
    eprintln!(
        "a pause process started by a worker: {}; /usr in its mount namespace: {pause_usr:?}",
        describe_pause_process(&rootless)
    );
    assert!(
        pause_usr
            .last()
            .and_then(|l| l.split_whitespace().nth(5))
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "the pause process has the unit's read-only /usr: {pause_usr:?}"
    );
    let pause_cgroup = read(rootless.state_dir.join("pause.cgroup"));
    let scope = "/module-updater.slice/module-updater-job";
    assert!(
        pause_cgroup.lines().any(|l| l.starts_with("0::")
            && l.contains(scope)
            && l.ends_with(&format!("-{}.scope", rootless.id))),
        "the pause process is in the update's scope: {pause_cgroup}"
    );
    // NoNewPrivileges=yes: the setuid newuidmap cannot map the user's ids, so rootless podman
    // fails when it has to start a pause process.
    kill_pause_process(&rootless);
    manager
        .write_drop_in(
            UNIT,
            "no-new-privileges.conf",
            "[Service]\nNoNewPrivileges=yes\n",
        )
        .unwrap();
    let out = manager.systemctl(&["daemon-reload"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = manager.systemctl(&["restart", UNIT]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v4 = sandbox
        .build_image(&ImageSpec::module("hardened", "4.0"))
        .unwrap();
    let run = common::run_job(&connection, &common::request(&v4, &[&rootless.id], false)).await;
    let reason = run.instance(&rootless.id)["error"]["reason"].to_string();
    assert_eq!(run.status, "aborted", "{:#}", run.result);
    assert!(reason.contains("newuidmap"), "{:#}", run.result);
    eprintln!("with NoNewPrivileges=yes: {reason}");

    drop(connection);
    let out = manager.systemctl(&["stop", UNIT]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!(
        "after the unit stopped: {}",
        describe_pause_process(&rootless)
    );
    drop(sandbox);

    // Purge: the package's files, its state and its configuration directory are gone.
    let purge_started = Instant::now();
    let out = package.purge();
    assert!(out.status.success(), "dpkg --purge: {}", text(&out.stderr));
    assert!(!is_installed());
    for path in &listed {
        let path = Path::new(path);
        if path.is_dir() {
            continue; // shared directories (/usr/share/man, ...)
        }
        assert!(
            !path.exists() && path.symlink_metadata().is_err(),
            "{} is left after dpkg --purge",
            path.display()
        );
    }
    for dir in [STATE_DIR, CONFIG_DIR] {
        assert!(!Path::new(dir).exists(), "{dir} is left after dpkg --purge");
    }
    assert!(
        !action.exists(),
        "{} is left after dpkg --purge",
        action.display()
    );
    drop(node);
    eprintln!(
        "packaging timings: deb {built:?}, dpkg -i {installed:?}, first activation \
         {activation_took:?}, update {update_took:?}, purge {:?}, total {:?}",
        purge_started.elapsed(),
        started.elapsed()
    );
}

/// Starts the built daemon with `args` (on a bus that does not exist: a good configuration
/// would fail later, at connecting) and returns its exit status and stderr.
fn daemon_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut command = cmd::clean(daemon_binary().unwrap());
    command
        .args([
            "--address",
            "unix:path=/nonexistent/module-updater-test-bus",
        ])
        .args(args);
    let output = cmd::output_timeout(&mut command, Duration::from_secs(30)).unwrap();
    (output.status.code(), text(&output.stderr))
}

#[test]
fn a_bad_configuration_file_stops_the_daemon_with_exit_status_1_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    let file_arg = file.to_str().unwrap();
    let cases = [
        (
            "max_parallel = 0\n",
            format!("max_parallel = 0 in {file_arg}: must be at least 1"),
        ),
        (
            "script_timeout = \"soon\"\n",
            format!(
                "script_timeout = \"soon\" in {file_arg}: must be a whole number of seconds from 1 \
                 to 604800"
            ),
        ),
        (
            "home_base = \"/home\"\nmax_paralel = 4\n",
            format!(
                "unknown key max_paralel in {file_arg} (line 2): the keys are home_base, \
                 rootful_base, max_parallel, script_timeout, worker_nice, job_linger, idle_timeout, \
                 state_dir, system_manager_address"
            ),
        ),
        (
            "state_dir = \"relative/dir\"\n",
            format!(
                "state_dir = \"relative/dir\" in {file_arg}: must be an absolute path (starting \
                 with /)"
            ),
        ),
    ];
    for (contents, message) in cases {
        std::fs::write(&file, contents).unwrap();
        let (code, stderr) = daemon_exit(&["--config", file_arg]);
        assert_eq!(code, Some(1), "{contents:?}: {stderr}");
        assert!(
            stderr.contains(&message),
            "{contents:?}:\n{stderr}\nwanted: {message}"
        );
        assert!(!stderr.contains("cannot connect"), "{stderr}");
    }
    // A missing file given with --config.
    let missing = dir.path().join("absent.toml");
    let (code, stderr) = daemon_exit(&["--config", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot read the configuration file {} (given with --config): No such file",
            missing.display()
        )),
        "{stderr}"
    );
    // A bad flag is clap's usage error (exit status 2), checked like the file.
    let (code, stderr) = daemon_exit(&["--max-parallel", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '0' for '--max-parallel <N>': must be at least 1"),
        "{stderr}"
    );
    let (code, stderr) = daemon_exit(&["--worker-nice", "20"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '20' for '--worker-nice <N>': must be at most 19"),
        "{stderr}"
    );
}

#[test]
fn settings_of_the_file_reach_the_running_daemon_and_flags_override_them() {
    let sandbox = Sandbox::new().unwrap();
    // The sandbox's daemons read the sandbox's own configuration file (`--config`).
    let file = sandbox.daemon_config().unwrap();
    std::fs::write(&file, "idle_timeout = 1\njob_linger = 5\n").unwrap();
    let file_arg = file.to_str().unwrap();
    let args = common::daemon_args(&sandbox);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // idle_timeout = 1 from the file: the daemon exits by itself, successfully.
    let mut daemon = sandbox.start_daemon(&args).unwrap();
    let status = daemon.wait(Duration::from_secs(20)).unwrap();
    let log = daemon.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: the daemon did not exit when idle:\n{log}"
    );
    assert!(
        log.contains(&format!("configuration from {file_arg}")),
        "{log}"
    );
    assert!(log.contains("idle for 1 s: exiting"), "{log}");

    // --idle-timeout overrides the file.
    let mut with_flag = args.clone();
    with_flag.extend(["--idle-timeout", "3"]);
    let mut daemon = sandbox.start_daemon(&with_flag).unwrap();
    let status = daemon.wait(Duration::from_secs(20)).unwrap();
    let log = daemon.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    assert!(log.contains("idle for 3 s: exiting"), "{log}");
}
