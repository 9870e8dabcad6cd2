//! End-to-end tests of the foundation (issue 2): the daemon on a private bus with the shipped
//! policy, sd-notify, and the sandbox itself (user managers, rootless podman, rootful instances,
//! teardown). Every test stands up its own sandbox of real components.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use module_updater_tests::{ImageSpec, Sandbox, cmd, daemon_binary};
use nix::sys::signal::Signal;
use nix::unistd::User;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BUS_NAME: &str = module_updater_dbus::BUS_NAME;
const OBJECT_PATH: &str = module_updater_dbus::OBJECT_PATH;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command (killed after 30 s) and returns its output.
fn run(command: &mut std::process::Command) -> Output {
    cmd::output_timeout(command, Duration::from_secs(30)).expect("command runs")
}

fn busctl(address: &str, args: &[&str]) -> Output {
    let mut command = cmd::clean("busctl");
    command.arg(format!("--address={address}")).args(args);
    run(&mut command)
}

#[test]
fn daemon_owns_its_name_and_answers_stock_clients() {
    let sandbox = Sandbox::new().expect("sandbox");
    let _daemon = sandbox.start_daemon(&[]).expect("daemon starts");
    let address = sandbox.bus_address();

    let owner = busctl(
        &address,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            BUS_NAME,
        ],
    );
    assert_eq!(text(&owner.stdout).trim(), "b true", "{owner:?}");

    let introspect = busctl(&address, &["introspect", BUS_NAME, OBJECT_PATH]);
    assert!(
        introspect.status.success(),
        "busctl introspect: {introspect:?}"
    );
    let listing = text(&introspect.stdout);
    let version_line = listing
        .lines()
        .find(|l| l.starts_with(".Version"))
        .unwrap_or_else(|| panic!("no .Version member in:\n{listing}"));
    assert!(version_line.contains("property"), "{version_line}");
    assert!(
        listing.contains(module_updater_dbus::MANAGER_INTERFACE),
        "{listing}"
    );

    let property = busctl(
        &address,
        &[
            "get-property",
            BUS_NAME,
            OBJECT_PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "Version",
        ],
    );
    assert!(
        property.status.success(),
        "busctl get-property: {property:?}"
    );
    assert_eq!(text(&property.stdout).trim(), format!("s \"{VERSION}\""));

    let version = run(sandbox.client().expect("client binary").arg("version"));
    assert!(
        version.status.success(),
        "module-updater version: {version:?}"
    );
    let printed = text(&version.stdout);
    assert!(
        printed.contains(&format!("module-updater {VERSION}")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("module-updaterd {VERSION}")),
        "{printed}"
    );
}

#[test]
fn shipped_policy_refuses_a_non_root_owner() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    let instance = sandbox
        .add_rootless_instance("policy")
        .expect("rootless instance");
    let address = sandbox.bus_address();

    // The user reaches the bus (its directory is traversable) but may not own the name.
    let daemon = sandbox
        .user_executable(&daemon_binary().expect("daemon binary"))
        .expect("copy");
    // Its own state dir and config: the refusal must come from the bus policy, not from a
    // state dir it cannot write.
    let state = instance.home.join("daemon-state");
    let config = sandbox.daemon_config().expect("config");
    let mut as_user = sandbox.command_as(
        &instance,
        &[
            daemon.as_os_str(),
            "--address".as_ref(),
            address.as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    );
    let refused = run(&mut as_user);
    let stderr = text(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "module-updaterd as {}: {refused:?}",
        instance.id
    );
    assert!(
        stderr.contains(module_updater_dbus::POLICY_FILE),
        "stderr should name the policy: {stderr}"
    );

    let mut gdbus = sandbox.command_as(
        &instance,
        &[
            "gdbus",
            "call",
            "--address",
            &address,
            "--dest",
            "org.freedesktop.DBus",
            "--object-path",
            "/org/freedesktop/DBus",
            "--method",
            "org.freedesktop.DBus.RequestName",
            BUS_NAME,
            "4",
        ],
    );
    let call = run(&mut gdbus);
    assert!(
        !call.status.success(),
        "RequestName as {} succeeded: {call:?}",
        instance.id
    );
    assert!(
        text(&call.stderr).contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{call:?}"
    );

    // Nobody owns it after all that.
    let owner = busctl(
        &address,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            BUS_NAME,
        ],
    );
    assert_eq!(text(&owner.stdout).trim(), "b false");
}

#[test]
fn second_daemon_on_the_same_bus_fails_clearly() {
    let sandbox = Sandbox::new().expect("sandbox");
    let mut first = sandbox.start_daemon(&[]).expect("first daemon starts");
    let second = run(&mut sandbox.daemon_command(&[]).expect("daemon command"));
    assert_eq!(second.status.code(), Some(1), "second daemon: {second:?}");
    let stderr = text(&second.stderr);
    assert!(
        stderr.contains("already owned"),
        "stderr should say the name is taken: {stderr}"
    );
    assert!(
        first.is_running(),
        "the first daemon must keep running: {}",
        first.log()
    );
}

#[test]
fn sd_notify_ready_and_stopping_and_sigterm_exits_zero_quickly() {
    let sandbox = Sandbox::new().expect("sandbox");
    let socket_path = sandbox.root().join("notify.sock");
    let mut notify = module_updater_tests::NotifySocket::bind(&socket_path).expect("notify socket");
    let mut command = sandbox.daemon_command(&[]).expect("daemon command");
    command.env("NOTIFY_SOCKET", &socket_path);
    let mut daemon = sandbox.start_daemon_with(command).expect("daemon starts");
    notify
        .wait_for("READY=1", Duration::from_secs(5))
        .expect("READY=1 arrives");

    let sent = Instant::now();
    daemon.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = daemon
        .wait(Duration::from_secs(5))
        .expect("wait")
        .expect("daemon exits after SIGTERM");
    let took = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{}",
        daemon.log()
    );
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    let received = notify
        .wait_for("STOPPING=1", Duration::from_secs(1))
        .expect("STOPPING=1 arrives");
    let ready = received.iter().position(|l| l == "READY=1");
    let stopping = received.iter().position(|l| l == "STOPPING=1");
    assert!(
        ready < stopping,
        "READY=1 comes before STOPPING=1: {received:?}"
    );
}

#[test]
fn rootless_instance_has_a_live_user_manager_and_rootless_podman() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    let instance = sandbox
        .add_rootless_instance("hello")
        .expect("rootless instance");

    // NS8 layout: the user's home is 0700, state dir 0700, environment with MODULE_ID.
    assert!(User::from_name(&instance.id).expect("getpwnam").is_some());
    assert!(regex_like_module_id(&instance.id), "{}", instance.id);
    assert_eq!(instance.home, sandbox.home_base().join(&instance.id));
    assert_eq!(mode(&instance.home), 0o700);
    assert_eq!(instance.install_dir, instance.home.join(".config"));
    assert_eq!(mode(&instance.state_dir), 0o700);
    assert_eq!(
        instance.read_env().expect("env").get("MODULE_ID"),
        Some(&instance.id)
    );

    // A unit in ~/.config/systemd/user loads after a reload and starts.
    instance
        .write_file(
            "systemd/user/hello.service",
            "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
            0o644,
        )
        .expect("unit file");
    sandbox.daemon_reload(&instance).expect("daemon-reload");
    let start = sandbox
        .systemctl_as(&instance, &["start", "hello.service"])
        .expect("systemctl");
    assert!(
        start.status.success(),
        "systemctl --user start hello.service: {start:?}"
    );
    let state = sandbox
        .unit_property(&instance, "hello.service", "ActiveState")
        .expect("ActiveState");
    assert_eq!(state, "s \"active\"");

    // Rootless podman pulls from the sandbox registry, as the user.
    let url = sandbox
        .build_image(
            &ImageSpec::module("hello", "1.0").executable("bin/hello", "#!/bin/sh\necho hello\n"),
        )
        .expect("image builds and is pushed");
    assert!(
        url.starts_with(&format!("{}/hello:1.0", sandbox.registry())),
        "{url}"
    );
    let pull = sandbox
        .podman_as(&instance, &["pull", "--quiet", &url])
        .expect("podman");
    assert!(
        pull.status.success(),
        "podman pull as {}: {pull:?}",
        instance.id
    );
    let inspect = sandbox
        .podman_as(
            &instance,
            &[
                "image",
                "inspect",
                "--format",
                "{{index .RepoDigests 0}}",
                &url,
            ],
        )
        .expect("podman");
    assert!(
        text(&inspect.stdout).starts_with(&format!("{}/hello@sha256:", sandbox.registry())),
        "{inspect:?}"
    );
    // The image is in the user's own storage.
    assert!(
        instance
            .home
            .join(".local/share/containers/storage")
            .is_dir()
    );
}

#[test]
fn install_lays_out_an_instance_as_add_module_does() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    let instance = sandbox
        .add_rootless_instance("demo")
        .expect("rootless instance");
    let service = sandbox
        .build_blob_image("node-exporter", "2.1", 64 * 1024, 7)
        .expect("service image");
    let spec = ImageSpec::module("demo", "1.0")
        .executable("actions/create-module/10setup", "#!/bin/sh\nexit 0\n")
        .file(
            "systemd/user/demo.service",
            "[Service]\nType=oneshot\nExecStart=/bin/true\n",
            0o644,
        )
        .symlink(
            "update-module.d/10setup",
            "../actions/create-module/10setup",
        )
        .dir("etc", 0o750)
        .file("etc/.gitignore", "*\n", 0o644)
        .label("org.nethserver.images", service.clone());
    let url = sandbox.build_image(&spec).expect("module image");
    sandbox.install(&instance, &url).expect("install");

    let env = instance.read_env().expect("environment");
    assert_eq!(env.get("IMAGE_URL"), Some(&url));
    assert_eq!(env.get("MODULE_ID"), Some(&instance.id));
    assert_eq!(env.get("NODE_EXPORTER_IMAGE"), Some(&service));
    assert!(env["IMAGE_ID"].len() == 64, "{env:?}");
    assert!(env["IMAGE_DIGEST"].starts_with("sha256:"), "{env:?}");
    assert!(
        env["IMAGE_REOPODIGEST"].starts_with(&format!("{}/demo@sha256:", sandbox.registry())),
        "{env:?}"
    );
    let file = std::fs::read_to_string(instance.env_file()).expect("environment file");
    let keys: Vec<&str> = file
        .lines()
        .map(|l| l.split('=').next().unwrap_or_default())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "sorted K=V lines");
    assert!(file.ends_with('\n'));

    let lst = std::fs::read_to_string(instance.install_dir.join(".imageroot.lst"))
        .expect(".imageroot.lst");
    assert_eq!(
        lst,
        "./actions/\n./actions/create-module/\n./actions/create-module/10setup\n./etc/\n\
         ./systemd/\n./systemd/user/\n./systemd/user/demo.service\n./update-module.d/\n\
         ./update-module.d/10setup\n"
    );
    let script = instance.install_dir.join("actions/create-module/10setup");
    assert_eq!(mode(&script) & 0o111, 0o111, "executable bit kept");
    assert_eq!(owner(&script), instance.uid);
    assert!(
        instance
            .install_dir
            .join("update-module.d/10setup")
            .is_symlink()
    );
    assert!(
        !instance.install_dir.join("etc/.gitignore").exists(),
        ".gitignore is skipped"
    );
    // The manager was reloaded: the new unit is known.
    let load = sandbox
        .unit_property(&instance, "demo.service", "LoadState")
        .expect("LoadState");
    assert_eq!(load, "s \"loaded\"");
    // Both images are in the user's storage.
    let images = sandbox
        .podman_as(&instance, &["image", "exists", &service])
        .expect("podman");
    assert!(images.status.success(), "{images:?}");
}

#[test]
fn rootful_instance_layout_and_root_manager() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    assert_eq!(sandbox.root_manager_address(), None, "started lazily");
    let instance = sandbox
        .add_rootful_instance("crowdsec")
        .expect("rootful instance");
    assert!(!instance.rootless);
    assert_eq!(instance.uid, 0);
    assert_eq!(
        instance.install_dir,
        sandbox.rootful_base().join(&instance.id)
    );
    assert_eq!(instance.state_dir, instance.install_dir.join("state"));
    assert_eq!(mode(&instance.state_dir), 0o700);
    assert_eq!(owner(&instance.state_dir), 0);
    assert_eq!(
        instance.read_env().expect("env").get("MODULE_ID"),
        Some(&instance.id)
    );
    assert!(
        User::from_name(&instance.id).expect("getpwnam").is_none(),
        "no Unix user for rootful"
    );

    let address = sandbox
        .root_manager_address()
        .expect("root manager address");
    let version = busctl(
        &address,
        &[
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "Version",
        ],
    );
    assert!(
        version.status.success(),
        "root manager answers: {version:?}"
    );
    assert!(text(&version.stdout).starts_with("s \""), "{version:?}");

    // The daemon is told where the manager of rootful instances answers.
    let command = sandbox.daemon_command(&[]).expect("daemon command");
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--system-manager-address")
        .expect("--system-manager-address");
    assert_eq!(args[at + 1], address);

    // A unit for the root-run manager loads after a reload.
    let unit_dir = sandbox.root_manager_unit_dir();
    std::fs::write(
        unit_dir.join(format!("{}.service", instance.id)),
        "[Service]\nExecStart=/bin/sleep 1000\n",
    )
    .expect("unit");
    sandbox.daemon_reload(&instance).expect("reload");
    let load = sandbox
        .unit_property(&instance, &format!("{}.service", instance.id), "LoadState")
        .expect("LoadState");
    assert_eq!(load, "s \"loaded\"");
    let unit = format!("{}.service", instance.id);
    let start = sandbox
        .systemctl_as(&instance, &["start", &unit])
        .expect("systemctl");
    assert!(
        start.status.success(),
        "systemctl --user start {unit}: {start:?}"
    );
    let state = sandbox
        .unit_property(&instance, &unit, "ActiveState")
        .expect("ActiveState");
    assert_eq!(state, "s \"active\"");

    // Install uses podman storage private to the sandbox, never the machine's.
    let url = sandbox
        .build_image(&ImageSpec::module("crowdsec", "1.0").file("bin/x", "x", 0o644))
        .expect("image");
    sandbox.install(&instance, &url).expect("rootful install");
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/x")).expect("file"),
        "x"
    );
    assert_eq!(
        instance.read_env().expect("env").get("IMAGE_URL"),
        Some(&url)
    );
    let exists = sandbox
        .podman_as(&instance, &["image", "exists", &url])
        .expect("podman");
    assert!(exists.status.success(), "{exists:?}");
    let machine = run(cmd::clean("podman").args(["image", "exists", &url]));
    assert!(
        !machine.status.success(),
        "the machine's root storage must not have {url}"
    );
}

#[test]
fn teardown_leaves_nothing_behind() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    let rootless = sandbox
        .add_rootless_instance("gone")
        .expect("rootless instance");
    let rootful = sandbox
        .add_rootful_instance("gone")
        .expect("rootful instance");
    let url = sandbox
        .build_image(&ImageSpec::module("gone", "1.0").file("x", "x", 0o644))
        .expect("image");
    // A pull leaves rootless podman's pause process behind, which must not block userdel.
    sandbox.install(&rootless, &url).expect("install");
    let pause = rootless.runtime_dir.join("libpod/tmp/pause.pid");
    assert!(pause.exists(), "rootless podman left its pause process");
    // Long-running services of both managers must go with them.
    rootless
        .write_file(
            "systemd/user/sleeper.service",
            "[Service]\nExecStart=/bin/sleep 1000\n",
            0o644,
        )
        .expect("unit");
    sandbox.daemon_reload(&rootless).expect("reload");
    let start = sandbox
        .systemctl_as(&rootless, &["start", "sleeper.service"])
        .expect("systemctl");
    assert!(start.status.success(), "{start:?}");
    // A duration no parallel test uses, to find exactly this process.
    let port = sandbox
        .registry()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let sleep = format!("/bin/sleep 1{port}");
    std::fs::write(
        sandbox.root_manager_unit_dir().join("sleeper.service"),
        format!("[Service]\nExecStart={sleep}\n"),
    )
    .expect("unit");
    sandbox.daemon_reload(&rootful).expect("reload");
    let start = sandbox
        .systemctl_as(&rootful, &["start", "sleeper.service"])
        .expect("systemctl");
    assert!(start.status.success(), "{start:?}");
    let sleeping = || {
        let mut pgrep = cmd::clean("pgrep");
        pgrep.args(["-f", &format!("^{sleep}$")]);
        !text(&run(&mut pgrep).stdout).trim().is_empty()
    };
    assert!(sleeping(), "{sleep} runs");
    let daemon = sandbox.start_daemon(&[]).expect("daemon");
    let footprint = sandbox.footprint();
    let root = sandbox.root().to_path_buf();
    let registry_conf = Path::new(module_updater_tests::REGISTRIES_CONF_D)
        .join(format!("module-updater-test-{port}.conf"));
    assert!(registry_conf.exists());
    assert!(
        footprint.cgroups.iter().all(|c| c.exists()),
        "{:?}",
        footprint.cgroups
    );
    let daemon_pid = daemon.pid();

    drop(daemon);
    drop(sandbox);

    assert!(
        User::from_name(&rootless.id).expect("getpwnam").is_none(),
        "user {} remains",
        rootless.id
    );
    assert!(
        module_updater_tests::process::pids_of_uid(rootless.uid).is_empty(),
        "processes of {} remain",
        rootless.id
    );
    assert!(
        !Path::new(&format!("/proc/{daemon_pid}")).exists(),
        "the daemon remains"
    );
    for cgroup in &footprint.cgroups {
        assert!(!cgroup.exists(), "cgroup {} remains", cgroup.display());
    }
    assert!(
        !rootless.runtime_dir.exists(),
        "{} remains",
        rootless.runtime_dir.display()
    );
    assert!(
        !root.exists(),
        "temporary directory {} remains",
        root.display()
    );
    assert!(
        !registry_conf.exists(),
        "{} remains",
        registry_conf.display()
    );
    assert!(!sleeping(), "a service of the root-run manager survives");
    let leftovers = footprint.leftovers();
    assert!(leftovers.is_empty(), "{leftovers}");
}

#[test]
fn teardown_also_happens_when_a_test_panics() {
    let (sender, receiver) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let mut sandbox = Sandbox::new().expect("sandbox");
        sandbox
            .add_rootless_instance("panic")
            .expect("rootless instance");
        sender.send(sandbox.footprint()).expect("send");
        panic!("a failing test");
    });
    assert!(outcome.is_err());
    let footprint = receiver.recv().expect("footprint");
    assert_eq!(footprint.users.len(), 1);
    let leftovers = footprint.leftovers();
    assert!(leftovers.is_empty(), "{leftovers}");
}

/// Two rootless instances in one sandbox are distinct users. (How long standing them up takes is
/// measured by `sandbox-timing`, not asserted: see docs/testing.md.)
#[test]
fn two_rootless_instances_are_distinct_users() {
    let mut sandbox = Sandbox::new().expect("sandbox");
    let first = sandbox
        .add_rootless_instance("demo")
        .expect("first instance");
    let second = sandbox
        .add_rootless_instance("demo")
        .expect("second instance");
    assert_ne!(first.id, second.id);
    assert_ne!(first.uid, second.uid);
    assert!(regex_like_module_id(&first.id) && regex_like_module_id(&second.id));
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

fn owner(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).expect("stat").uid()
}

/// `^[a-z]+[0-9]+$`
fn regex_like_module_id(id: &str) -> bool {
    let digits = id.trim_start_matches(|c: char| c.is_ascii_lowercase());
    digits.len() < id.len()
        && !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && id.len() <= 31
}
