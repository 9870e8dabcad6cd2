//! A real Redis server (Debian's `redis-server`) on a free loopback port, standing in for an NS8
//! cluster's leader Redis: ACL users per module as NS8 makes them, no persistence.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use crate::process::ProcessRecord;
use crate::{Result, SandboxError, cmd};

/// A running `redis-server`; stopped when dropped.
pub struct Redis {
    child: Option<Child>,
    pub(crate) record: ProcessRecord,
    port: u16,
    log: PathBuf,
}

impl Redis {
    /// Starts a server on a free loopback port, its log in `logs`.
    pub(crate) fn start(logs: &Path) -> Result<Redis> {
        if cmd::find_tool("redis-server").is_none() || cmd::find_tool("redis-cli").is_none() {
            return Err(SandboxError::MissingTools {
                tools: "redis-server, redis-cli".into(),
                packages: "redis-server".into(),
            });
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| SandboxError::io("bind a free port on", Path::new("127.0.0.1"), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| SandboxError::io("read the port of", Path::new("127.0.0.1"), e))?
            .port();
        drop(listener);
        let log = logs.join(format!("redis-{port}.log"));
        let out = std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| SandboxError::io("dup", &log, e))?;
        let mut command = cmd::clean("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let record = ProcessRecord::new(format!("redis-server on 127.0.0.1:{port}"), child.id());
        let mut redis = Redis {
            child: Some(child),
            record,
            port,
            log,
        };
        let ready = cmd::poll(Duration::from_secs(10), || {
            Ok(redis
                .cli(&["PING"])
                .ok()
                .filter(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
                .map(|_| true))
        })?;
        if ready != Some(true) {
            let detail = std::fs::read(&redis.log)
                .map(|b| cmd::tail(&b))
                .unwrap_or_default();
            redis.stop();
            return Err(SandboxError::Timeout {
                what: format!("redis-server on 127.0.0.1:{port} to answer PING"),
                secs: 10.0,
                detail,
            });
        }
        Ok(redis)
    }

    /// `127.0.0.1:PORT`, as NS8's `REDIS_ADDRESS` writes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis-cli` as the default (administrator) user.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut command = cmd::clean("redis-cli");
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        command.args(args);
        cmd::run(&mut command)
    }

    /// An ACL user as NS8 makes one for module `id`: `module/<id>`, all commands on its own keys
    /// (`module/<id>/*`) only.
    pub fn add_module_user(&self, id: &str, password: &str) -> Result<()> {
        self.add_user(
            &format!("module/{id}"),
            password,
            &[&format!("~module/{id}/*")],
        )
    }

    /// An ACL user with every command, `rules` saying which keys and channels (`~…`, `&…`).
    pub fn add_user(&self, user: &str, password: &str, rules: &[&str]) -> Result<()> {
        let secret = format!(">{password}");
        let mut args = vec!["ACL", "SETUSER", user, "on", secret.as_str()];
        args.extend_from_slice(rules);
        args.push("+@all");
        let out = self.cli(&args)?;
        let said = String::from_utf8_lossy(&out.stdout);
        if said.trim() != "OK" {
            return Err(SandboxError::Parse {
                command: format!("redis-cli ACL SETUSER {user}"),
                detail: said.into_owned(),
            });
        }
        Ok(())
    }

    /// A hash as a map (`HGETALL`).
    pub fn hash(&self, key: &str) -> Result<std::collections::BTreeMap<String, String>> {
        let out = self.cli(&["HGETALL", key])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
            .collect())
    }

    /// Stops the server (SIGTERM, then SIGKILL), as when the cluster's Redis goes down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::process::terminate(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
