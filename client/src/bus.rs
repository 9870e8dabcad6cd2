//! Connecting to the bus the user chose, as busctl does: the system bus by default, `--user`,
//! `--address ADDR`, or `-H [USER@]HOST` through `ssh -xT [USER@]HOST systemd-stdio-bridge`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::Duration;

use zbus::Connection;
use zbus::address::Transport;
use zbus::address::transport::Unixexec;
use zbus::proxy::MethodFlags;

use crate::agent::Agent;
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
            Target::Address(_) => {
                "check the --address value (e.g. unix:path=/run/dbus/system_bus_socket)"
            }
            Target::Host(_) => {
                "check that `ssh -xT HOST systemd-stdio-bridge` works (ssh keys, systemd on the host)"
            }
        }
    }
}

/// Decodes a D-Bus address value: `%XX` is the byte XX, any other byte stands for itself (as
/// sd-bus reads it; the specification only requires the escapes to be understood).
pub fn decode_address_value(value: &str) -> Result<OsString, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{value:?} has a '%' not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(OsString::from_vec(out))
}

/// Parses a `unixexec:path=P[,argv0=A][,argv1=X,...]` address with its `%XX` escapes decoded.
///
/// zbus 6.2.1 hands the raw option text to the program (`argv1=--bus-path%3dunix:...` would reach
/// systemd-stdio-bridge with a literal `%3d`), so the client decodes the values itself, as busctl does.
pub fn parse_unixexec(address: &str) -> Result<zbus::Address, String> {
    let options = address
        .strip_prefix("unixexec:")
        .ok_or_else(|| format!("{address:?} is not a unixexec: address"))?;
    let mut values = std::collections::HashMap::new();
    for option in options.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| format!("{option:?} in {address:?} is not key=value"))?;
        values.insert(key.to_owned(), decode_address_value(value)?);
    }
    let path = values
        .remove("path")
        .ok_or_else(|| format!("{address:?} has no path= (the program to run)"))?;
    let argv0 = values.remove("argv0");
    let mut args = Vec::new();
    while let Some(arg) = values.remove(&format!("argv{}", args.len() + 1)) {
        args.push(arg);
    }
    values.remove("guid");
    if let Some(key) = values.keys().next() {
        return Err(format!(
            "{address:?} has {key}= which unixexec does not know (argvN must be numbered from 1 without gaps)"
        ));
    }
    Ok(zbus::Address::new(Transport::Unixexec(Unixexec::new(
        PathBuf::from(path),
        argv0,
        args,
    ))))
}

/// The `unixexec:` address that runs `ssh -xT -- [USER@]HOST systemd-stdio-bridge`, the command
/// busctl -H runs (`--` keeps a host name from being read as an ssh option).
pub fn host_address(host: &str) -> Result<zbus::Address, ClientError> {
    let valid = !host.is_empty()
        && !host.starts_with('@')
        && !host.ends_with('@')
        && !host.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        return Err(ClientError::Usage(format!(
            "-H needs [USER@]HOST (e.g. root@node1), got {host:?}"
        )));
    }
    let args = ["-xT", "--", host, "systemd-stdio-bridge"]
        .into_iter()
        .map(OsString::from)
        .collect();
    Ok(zbus::Address::new(Transport::Unixexec(Unixexec::new(
        PathBuf::from("ssh"),
        None,
        args,
    ))))
}

/// How much longer than the daemon's polkit wait a call that may prompt waits for its reply: the
/// daemon's work after polkit said yes (starting the job) and the round trip.
const PROMPT_MARGIN: Duration = Duration::from_secs(30);

/// A connection, the name of the bus it goes to (for messages), and how calls are made.
pub struct Bus {
    pub connection: Connection,
    pub target: Target,
    /// How long a call waits for its reply (`--timeout`).
    pub timeout: Duration,
    /// Whether calls that polkit gates let it ask for a password: stdin is a terminal and
    /// `--no-ask-password` was not given.
    pub ask_password: bool,
}

impl Bus {
    pub fn describe(&self) -> String {
        self.target.describe()
    }

    /// How long a call that polkit gates waits: when a password prompt may come, longer than the
    /// daemon waits for polkit, so that the daemon's answer (allowed, or refused) always arrives
    /// before the client gives up.
    pub fn gated_timeout(&self) -> Duration {
        gated_timeout(self.timeout, self.ask_password)
    }

    /// Where an authentication agent for this client registers: polkit on the bus the daemon is
    /// on (`None`: the system bus, pkttyagent's default). No agent for a bus on another host
    /// (it could not ask on this terminal) or for the session bus (polkit is on the system bus).
    fn agent_bus(&self) -> Option<Option<&str>> {
        match &self.target {
            Target::System => Some(None),
            Target::Address(address) if !address.starts_with("unixexec:") => {
                Some(Some(address.as_str()))
            }
            Target::Address(_) | Target::Host(_) | Target::User => None,
        }
    }

    /// Calls `method` of `proxy`, a method the daemon authorises with polkit (`UpdateModule`,
    /// `GetInstance`, a job's `Cancel`). With [`Bus::ask_password`], the call carries the
    /// `ALLOW_INTERACTIVE_AUTHORIZATION` flag, waits [`Bus::gated_timeout`], and a text
    /// authentication agent (pkttyagent) runs for this process while it is pending, unless this
    /// process runs as root (which polkit is never asked about).
    pub async fn call_gated<B, R>(
        &self,
        proxy: &zbus::Proxy<'_>,
        method: &'static str,
        body: &B,
    ) -> zbus::Result<R>
    where
        B: serde::Serialize + zbus::DynamicType,
        R: for<'d> zbus::wire::DynamicDeserialize<'d>,
    {
        let flags = if self.ask_password {
            MethodFlags::ALLOW_INTERACTIVE_AUTH
        } else {
            MethodFlags::empty()
        };
        let agent = match self.agent_bus() {
            Some(bus) if self.ask_password && !nix::unistd::geteuid().is_root() => {
                match Agent::start(bus).await {
                    Ok(agent) => Some(agent),
                    Err(err) => {
                        eprintln!("module-updater: {err}; polkit cannot ask for a password");
                        None
                    }
                }
            }
            _ => None,
        };
        let timeout = self.gated_timeout();
        let reply = tokio::time::timeout(
            timeout,
            proxy.call_with_flags::<_, B, R>(method, flags, body),
        )
        .await;
        if let Some(agent) = agent {
            agent.stop().await;
        }
        match reply {
            Ok(Ok(Some(reply))) => Ok(reply),
            // Only a call flagged NO_REPLY_EXPECTED comes back without a reply.
            Ok(Ok(None)) => Err(zbus::Error::Failure(format!("{method} returned no reply"))),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(zbus::Error::InputOutput(std::sync::Arc::new(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{method} got no reply within {} s", timeout.as_secs()),
                ),
            ))),
        }
    }
}

/// See [`Bus::gated_timeout`].
fn gated_timeout(timeout: Duration, ask_password: bool) -> Duration {
    if ask_password {
        timeout.max(module_updater_dbus::POLKIT_TIMEOUT + PROMPT_MARGIN)
    } else {
        timeout
    }
}

/// Connects to the chosen bus; every method call then times out after `timeout` (calls that
/// polkit gates: see [`Bus::gated_timeout`]).
pub async fn connect(
    args: &BusArgs,
    timeout: Duration,
    ask_password: bool,
) -> Result<Bus, ClientError> {
    let target = Target::from_args(args);
    let builder = match &target {
        Target::System => zbus::connection::Builder::system(),
        Target::User => zbus::connection::Builder::session(),
        Target::Address(address) if address.starts_with("unixexec:") => {
            let address = parse_unixexec(address).map_err(|reason| ClientError::Connect {
                bus: target.describe(),
                reason,
                hint: target.connect_hint(),
            })?;
            zbus::connection::Builder::address(address)
        }
        Target::Address(address) => zbus::connection::Builder::address(address.as_str()),
        Target::Host(host) => zbus::connection::Builder::address(host_address(host)?),
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
    Ok(Bus {
        connection,
        target,
        timeout,
        ask_password,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn unixexec_parts(address: &zbus::Address) -> (String, Option<String>, Vec<String>) {
        match address.transport() {
            Transport::Unixexec(exec) => (
                exec.path().to_string_lossy().into_owned(),
                exec.arg0().map(|a| a.to_string_lossy().into_owned()),
                exec.args()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_runs_ssh_like_busctl() {
        let (path, arg0, args) = unixexec_parts(&host_address("root@node1.example.org").unwrap());
        assert_eq!(path, "ssh");
        assert_eq!(arg0, None);
        assert_eq!(
            args,
            [
                "-xT",
                "--",
                "root@node1.example.org",
                "systemd-stdio-bridge"
            ]
        );
        // Whatever the host text, it is one argument after `--`, never an option or a split.
        let (_, _, args) = unixexec_parts(&host_address("-oProxyCommand=x,y").unwrap());
        assert_eq!(args[2], "-oProxyCommand=x,y");
        assert_eq!(args[1], "--");
        assert!(host_address("").is_err());
        assert!(host_address("root@").is_err());
        assert!(host_address("a b").is_err());
    }

    #[test]
    fn unixexec_values_are_percent_decoded() {
        let address = parse_unixexec(
            "unixexec:path=/usr/bin/systemd-stdio-bridge,argv1=--bus-path%3dunix:path%3d/tmp/x/bus",
        )
        .unwrap();
        let (path, arg0, args) = unixexec_parts(&address);
        assert_eq!(path, "/usr/bin/systemd-stdio-bridge");
        assert_eq!(arg0, None);
        assert_eq!(args, ["--bus-path=unix:path=/tmp/x/bus"]);

        let address = parse_unixexec("unixexec:path=ssh,argv0=x,argv1=-xT,argv2=a%2cb").unwrap();
        assert_eq!(
            unixexec_parts(&address),
            (
                "ssh".to_owned(),
                Some("x".to_owned()),
                vec!["-xT".to_owned(), "a,b".to_owned()]
            )
        );
        assert!(parse_unixexec("unixexec:argv1=x").is_err());
        assert!(parse_unixexec("unixexec:path=x,argv2=y").is_err());
        assert!(parse_unixexec("unixexec:path=x%4").is_err());
        assert!(parse_unixexec("unixexec:path=x%zz").is_err());
    }

    #[test]
    fn a_call_that_may_prompt_outwaits_the_daemon() {
        let short = Duration::from_secs(25);
        assert!(gated_timeout(short, true) > module_updater_dbus::POLKIT_TIMEOUT);
        assert_eq!(gated_timeout(short, false), short);
        let long = Duration::from_secs(600);
        assert_eq!(gated_timeout(long, true), long);
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
        assert_eq!(
            Target::from_args(&args),
            Target::Address("unix:path=/x".to_owned())
        );
    }
}
