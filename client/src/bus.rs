//! Connecting to the bus the user chose, as busctl does: the system bus by default, `--user`,
//! `--address ADDR`, or `-H [USER@]HOST` through `ssh -xT [USER@]HOST systemd-stdio-bridge`.

use std::time::Duration;

use zbus::Connection;

use crate::cli::BusArgs;
use crate::error::ClientError;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    System,
    User,
    Address(String),
    /// `[USER@]HOST`, reached through ssh.
    Host(String),
}

impl Target {
    pub fn from_args(args: &BusArgs) -> Target {
        if let Some(address) = &args.address {
            Target::Address(address.clone())
        } else if let Some(host) = &args.host {
            Target::Host(host.clone())
        } else if args.user {
            Target::User
        } else {
            Target::System
        }
    }

    /// How the bus is named in messages.
    pub fn describe(&self) -> String {
        match self {
            Target::System => "the system bus".to_owned(),
            Target::User => "the session bus".to_owned(),
            Target::Address(address) => format!("the bus at {address}"),
            Target::Host(host) => format!("the system bus of {host}"),
        }
    }

    /// What to try when the connection itself fails.
    fn connect_hint(&self) -> &'static str {
        match self {
            Target::System => {
                "is dbus running? (systemctl status dbus; DBUS_SYSTEM_BUS_ADDRESS overrides the socket)"
            }
            Target::User => "is there a session bus? (DBUS_SESSION_BUS_ADDRESS, or use --system)",
            Target::Address(_) => "check the --address value (e.g. unix:path=/run/dbus/system_bus_socket)",
            Target::Host(_) => {
                "check that `ssh -xT HOST systemd-stdio-bridge` works (ssh keys, systemd on the host)"
            }
        }
    }
}

/// Characters D-Bus addresses may carry unescaped (D-Bus specification, "Server Addresses").
fn is_address_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.' | b'\\' | b'*')
}

/// Percent-escapes a value for a D-Bus address.
pub fn escape_address_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if is_address_safe(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// The `unixexec:` address that runs `ssh -xT -- [USER@]HOST systemd-stdio-bridge`, the command
/// busctl -H runs (`--` keeps a host name from being read as an ssh option).
pub fn host_address(host: &str) -> Result<String, ClientError> {
    if host.is_empty() || host.starts_with('@') || host.ends_with('@') {
        return Err(ClientError::Usage(format!(
            "-H needs [USER@]HOST, got {host:?}"
        )));
    }
    Ok(format!(
        "unixexec:path=ssh,argv1=-xT,argv2=--,argv3={},argv4=systemd-stdio-bridge",
        escape_address_value(host)
    ))
}

/// A connection and the name of the bus it goes to (for messages).
pub struct Bus {
    pub connection: Connection,
    pub target: Target,
}

impl Bus {
    pub fn describe(&self) -> String {
        self.target.describe()
    }
}

/// Connects to the chosen bus; every method call then times out after `timeout`.
pub async fn connect(args: &BusArgs, timeout: Duration) -> Result<Bus, ClientError> {
    let target = Target::from_args(args);
    let builder = match &target {
        Target::System => zbus::connection::Builder::system(),
        Target::User => zbus::connection::Builder::session(),
        Target::Address(address) => zbus::connection::Builder::address(address.as_str()),
        Target::Host(host) => zbus::connection::Builder::address(host_address(host)?.as_str()),
    };
    let connection = builder
        .method_timeout(timeout)
        .build()
        .await
        .map_err(|source| ClientError::Connect {
            bus: target.describe(),
            reason: crate::error::describe_zbus(&source),
            hint: target.connect_hint(),
        })?;
    Ok(Bus { connection, target })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_address_runs_ssh_like_busctl() {
        assert_eq!(
            host_address("root@node1.example.org").unwrap(),
            "unixexec:path=ssh,argv1=-xT,argv2=--,argv3=root%40node1.example.org,argv4=systemd-stdio-bridge"
        );
        // Commas and equals signs would split the address; they are escaped.
        assert_eq!(
            host_address("a,b=c").unwrap(),
            "unixexec:path=ssh,argv1=-xT,argv2=--,argv3=a%2cb%3dc,argv4=systemd-stdio-bridge"
        );
        assert!(host_address("").is_err());
        assert!(host_address("root@").is_err());
    }

    #[test]
    fn host_address_parses_back_to_the_ssh_command() {
        let address: zbus::Address = host_address("admin@node-2").unwrap().parse().unwrap();
        match address.transport() {
            zbus::address::Transport::Unixexec(exec) => {
                assert_eq!(exec.path().to_str(), Some("ssh"));
                let args: Vec<_> = exec.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
                assert_eq!(args, ["-xT", "--", "admin@node-2", "systemd-stdio-bridge"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn target_follows_the_flags() {
        let mut args = BusArgs::default();
        assert_eq!(Target::from_args(&args), Target::System);
        args.user = true;
        assert_eq!(Target::from_args(&args), Target::User);
        args.host = Some("h".to_owned());
        assert_eq!(Target::from_args(&args), Target::Host("h".to_owned()));
        args.address = Some("unix:path=/x".to_owned());
        assert_eq!(Target::from_args(&args), Target::Address("unix:path=/x".to_owned()));
    }
}
