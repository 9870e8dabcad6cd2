//! A private `dbus-daemon` that stands in for the system bus. Its configuration includes the
//! bus policy the project ships (`dbus/data/org.nethserver.ModuleUpdater.conf`), so every test
//! exercises exactly the policy that is installed on a real node.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

use crate::process::{self, ProcessRecord};
use crate::{Result, SandboxError, cmd};

/// polkit's own bus policy: included when present so that a real polkitd can own its name on
/// the private bus.
const POLKIT_POLICY: &str = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf";

/// A running private bus.
pub struct BusDaemon {
    child: Child,
    // Kept open: dbus-daemon must not get SIGPIPE if it ever writes again.
    _stdout: BufReader<ChildStdout>,
    pub record: ProcessRecord,
    pub socket: PathBuf,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The bus configuration: a system-bus-like default policy (modeled on Debian's `system.conf`),
/// then the project's policy, which therefore decides about `org.nethserver.ModuleUpdater`.
pub fn config_text(socket: &Path, service_dir: &Path, policy: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Written by the module-updater test sandbox: a private stand-in for the system bus. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{service_dir}</servicedir>

  <policy context="default">
    <!-- Anyone may connect; nobody owns a name or calls a method unless a policy says so. -->
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <!-- Signals and the replies that were asked for flow freely. -->
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <!-- The bus driver itself answers everyone. -->
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>

  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>

  <!-- The policy module-updater ships. -->
  <include>{policy}</include>
  <include ignore_missing="yes">{polkit}</include>
</busconfig>
"#,
        socket = escape(&socket.display().to_string()),
        service_dir = escape(&service_dir.display().to_string()),
        policy = escape(&policy.display().to_string()),
        polkit = escape(POLKIT_POLICY),
    )
}

impl BusDaemon {
    /// Writes the configuration under `dir` and starts the bus; returns once it answers.
    pub fn start(dir: &Path, logs: &Path) -> Result<BusDaemon> {
        let policy = module_updater_dbus::data_dir().join(module_updater_dbus::POLICY_FILE);
        if !policy.is_file() {
            return Err(SandboxError::io(
                "find the shipped bus policy",
                &policy,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let socket = dir.join("bus");
        let service_dir = dir.join("bus-services");
        let config = dir.join("bus.conf");
        let log = logs.join("dbus-daemon.log");
        std::fs::create_dir_all(&service_dir)
            .map_err(|e| SandboxError::io("create", &service_dir, e))?;
        std::fs::write(&config, config_text(&socket, &service_dir, &policy))
            .map_err(|e| SandboxError::io("write the bus configuration", &config, e))?;
        let log_file =
            std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;

        let mut command = cmd::clean("dbus-daemon");
        command
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        if cmd::find_tool("dbus-daemon").is_none() {
            return Err(SandboxError::MissingTools {
                tools: "dbus-daemon".into(),
                packages: "dbus".into(),
            });
        }
        let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let record = ProcessRecord::new("private dbus-daemon", child.id());
        let Some(stdout) = child.stdout.take() else {
            process::kill_child(&mut child);
            return Err(SandboxError::Exited {
                what: "dbus-daemon".into(),
                status: "no stdout".into(),
                log: String::new(),
            });
        };
        let mut stdout = BufReader::new(stdout);
        // --print-address prints once the socket listens; EOF means it exited.
        let mut address = String::new();
        let read = stdout.read_line(&mut address);
        let log_text = || {
            std::fs::read(&log)
                .map(|b| cmd::tail(&b))
                .unwrap_or_default()
        };
        if read.is_err() || address.trim().is_empty() {
            let status = process::kill_child(&mut child);
            return Err(SandboxError::Exited {
                what: format!("dbus-daemon --config-file={}", config.display()),
                status: status.map(|s| s.to_string()).unwrap_or_default(),
                log: log_text(),
            });
        }
        let bus = BusDaemon {
            child,
            _stdout: stdout,
            record,
            socket,
        };
        // Listening is not answering: make one real call before handing the bus out.
        let mut ping = cmd::clean("busctl");
        ping.arg(format!("--address={}", bus.address()))
            .args(["call", "org.freedesktop.DBus", "/org/freedesktop/DBus"])
            .args(["org.freedesktop.DBus", "GetId"]);
        let answer = cmd::output_timeout(&mut ping, Duration::from_secs(10))?;
        cmd::check(&ping, answer)?;
        Ok(bus)
    }

    /// `unix:path=...`
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    pub fn stop(&mut self) {
        process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for BusDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
