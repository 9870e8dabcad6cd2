//! The Cockpit page in a real browser: Debian's `cockpit-ws` on loopback serving the project's
//! `cockpit/` package with a bridge that talks to the sandbox's bus, and headless Chromium driven
//! through the DevTools protocol.
//!
//! cockpit-ws runs with `--local-session=cockpit-bridge` (no login: the bridge runs as the test's
//! user, root) and `DBUS_SYSTEM_BUS_ADDRESS` = the sandbox's bus, which the bridge inherits: the
//! page keeps `bus: "system"` and has no test-only code path. Chromium speaks the DevTools
//! protocol on a pipe (`--remote-debugging-pipe`: NUL-terminated JSON on its fds 3 and 4) rather
//! than a port, so there is no port to race for and no WebSocket client to depend on. Both run in
//! process groups of their own, killed as groups at drop, and are recorded in the sandbox's
//! footprint for the cleanup after a killed test.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::process::{ProcessRecord, terminate};
use crate::{Result, Sandbox, SandboxError};

/// Where Debian's cockpit-ws package puts the web service.
pub const COCKPIT_WS: &str = "/usr/lib/cockpit/cockpit-ws";
/// The name the page is installed under (`/usr/share/cockpit/<name>`).
pub const PACKAGE: &str = "module-updater";
/// How long a page or one of its answers may take on a busy machine.
const DEVTOOLS_TIMEOUT: Duration = Duration::from_secs(30);

/// cockpit-ws serving the page and a headless Chromium with a tab on it (closed first).
pub struct Cockpit {
    browser: Browser,
    ws: CockpitWs,
}

/// cockpit-ws on a loopback port, serving the page with a bridge on the sandbox's bus.
pub struct CockpitWs {
    child: Child,
    port: u16,
}

/// A headless Chromium with one tab, driven through the DevTools protocol.
pub struct Browser {
    child: Child,
    input: ChildStdin,
    replies: Receiver<Value>,
    next_id: u64,
    session: String,
}

impl Sandbox {
    /// [`Sandbox::start_cockpit_ws`] and a browser. Needs the Debian packages `cockpit-ws`,
    /// `cockpit-bridge` and `chromium`.
    pub fn start_cockpit(&mut self, package_dir: &Path) -> Result<Cockpit> {
        self.start_cockpit_as(package_dir, None)
    }

    /// [`Sandbox::start_cockpit`] with cockpit-ws and its bridge running as `user` (uid, gid)
    /// instead of root: a session without administrative access.
    pub fn start_cockpit_as(
        &mut self,
        package_dir: &Path,
        user: Option<(u32, u32)>,
    ) -> Result<Cockpit> {
        let chromium = chromium_binary()?;
        let ws = self.cockpit_ws(package_dir, None, user)?;
        let profile = self.root().join("cockpit").join("chromium");
        let browser = Browser::start(&chromium, &profile, &self.log_dir())?;
        self.footprint
            .processes
            .push(ProcessRecord::new("chromium", browser.child.id()));
        self.footprint.save()?;
        Ok(Cockpit { browser, ws })
    }

    /// Starts cockpit-ws on `port` (a free loopback port when `None`) with the package in
    /// `package_dir` (the repository's `cockpit/`) and the sandbox's bus as the system bus.
    pub fn start_cockpit_ws(&mut self, package_dir: &Path, port: Option<u16>) -> Result<CockpitWs> {
        self.cockpit_ws(package_dir, port, None)
    }

    fn cockpit_ws(
        &mut self,
        package_dir: &Path,
        port: Option<u16>,
        user: Option<(u32, u32)>,
    ) -> Result<CockpitWs> {
        let missing: Vec<&str> = [COCKPIT_WS, "/usr/bin/cockpit-bridge"]
            .into_iter()
            .filter(|path| !Path::new(path).exists())
            .collect();
        if !missing.is_empty() {
            return Err(SandboxError::MissingTools {
                tools: missing.join(", "),
                packages: "--no-install-recommends cockpit-ws cockpit-bridge".to_owned(),
            });
        }
        let cockpit_root = self.root().join("cockpit");
        let data = cockpit_root.join("share");
        let packages = data.join("cockpit");
        std::fs::create_dir_all(&packages).map_err(|e| SandboxError::io("create", &packages, e))?;
        let link = packages.join(PACKAGE);
        if !link.exists() {
            std::os::unix::fs::symlink(package_dir, &link)
                .map_err(|e| SandboxError::io("link the package at", &link, e))?;
        }
        let home = cockpit_root.join("home");
        std::fs::create_dir_all(&home).map_err(|e| SandboxError::io("create", &home, e))?;
        if let Some((uid, gid)) = user {
            // The user's bridge must reach the package and the bus, and own its home.
            for dir in [
                self.root(),
                cockpit_root.as_path(),
                data.as_path(),
                packages.as_path(),
            ] {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| SandboxError::io("open up", dir, e))?;
            }
            std::os::unix::fs::chown(&home, Some(uid), Some(gid))
                .map_err(|e| SandboxError::io("chown", &home, e))?;
        }

        let port = match port {
            Some(port) => port,
            None => free_port()?,
        };
        let log = self.log_dir().join("cockpit-ws.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| SandboxError::io("reopen", &log, e))?;
        let bus = self.bus_address();
        // setpriv (util-linux) execs cockpit-ws as the user with no supplementary group of ours.
        let mut command = match user {
            Some((uid, gid)) => {
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(COCKPIT_WS);
                command
            }
            None => Command::new(COCKPIT_WS),
        };
        let mut ws = command
            .args(["--local-session=cockpit-bridge", "--no-tls"])
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            // The bridge inherits these: the page's `bus: "system"` is the sandbox's bus, and
            // no session bus is started that would outlive the test.
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus)
            .env("XDG_DATA_DIRS", format!("{}:/usr/share", data.display()))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_RUNTIME_DIR", &home)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                command: COCKPIT_WS.to_owned(),
                source,
            })?;
        self.footprint
            .processes
            .push(ProcessRecord::new("cockpit-ws", ws.id()));
        self.footprint.save()?;
        if let Err(error) = wait_for_port(&mut ws, port, &log) {
            stop_group(&mut ws);
            return Err(error);
        }
        Ok(CockpitWs { child: ws, port })
    }
}

impl CockpitWs {
    /// The page's URL (outside Cockpit's shell frame, as a package page can be opened).
    pub fn page_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/cockpit/@localhost/{PACKAGE}/index.html",
            self.port
        )
    }
}

impl Drop for CockpitWs {
    fn drop(&mut self) {
        stop_group(&mut self.child);
    }
}

impl Cockpit {
    pub fn page_url(&self) -> String {
        self.ws.page_url()
    }

    pub fn browser(&mut self) -> &mut Browser {
        &mut self.browser
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        stop_group(&mut self.child);
    }
}

impl Browser {
    fn start(chromium: &Path, profile: &Path, log_dir: &Path) -> Result<Browser> {
        let log = log_dir.join("chromium.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;
        // The shell gives Chromium our pipes as its fds 3 (commands in) and 4 (replies out).
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--no-zygote",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                command: chromium.display().to_string(),
                source,
            })?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            stop_group(&mut child);
            return Err(SandboxError::Parse {
                command: "chromium".to_owned(),
                detail: "no pipes to its DevTools protocol".to_owned(),
            });
        };
        let (sender, replies) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut message = Vec::new();
            while matches!(reader.read_until(0, &mut message), Ok(n) if n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && sender.send(value).is_err()
                {
                    break;
                }
                message.clear();
            }
        });
        let mut browser = Browser {
            child,
            input,
            replies,
            next_id: 0,
            session: String::new(),
        };
        let attached = browser.attach();
        if let Err(error) = attached {
            drop(browser);
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(SandboxError::Exited {
                what: format!("chromium ({error})"),
                status: "no DevTools session".to_owned(),
                log,
            });
        }
        Ok(browser)
    }

    /// Attaches to the tab Chromium opened, in the flat session mode.
    fn attach(&mut self) -> Result<()> {
        let targets = self.call_in(None, "Target.getTargets", json!({}))?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|list| list.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| devtools_error("Target.getTargets", "no page target"))?;
        let attached = self.call_in(
            None,
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        )?;
        self.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| devtools_error("Target.attachToTarget", "no sessionId"))?
            .to_owned();
        self.call("Page.enable", json!({}))?;
        Ok(())
    }

    /// A DevTools command on the tab; its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.call_in(Some(&session), method, params)
    }

    fn call_in(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(0);
        self.input
            .write_all(&bytes)
            .and_then(|()| self.input.flush())
            .map_err(|source| SandboxError::Spawn {
                command: format!("DevTools {method}"),
                source,
            })?;
        let deadline = Instant::now() + DEVTOOLS_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                // Events (no id) and late replies are not waited for: the tests poll the DOM.
                Ok(reply) if reply["id"] == json!(id) => {
                    if let Some(error) = reply.get("error") {
                        return Err(devtools_error(method, &error.to_string()));
                    }
                    return Ok(reply["result"].clone());
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SandboxError::Timeout {
                        what: format!("Chromium's answer to {method}"),
                        secs: DEVTOOLS_TIMEOUT.as_secs_f64(),
                        detail: String::new(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(devtools_error(method, "Chromium closed its DevTools pipe"));
                }
            }
        }
    }

    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({"url": url})).map(drop)
    }

    pub fn reload(&mut self) -> Result<()> {
        self.call("Page.reload", json!({"ignoreCache": true}))
            .map(drop)
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            let text = exception["exception"]["description"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| exception.to_string());
            return Err(devtools_error("Runtime.evaluate", &text));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it is true; on timeout the error carries the page's text.
    pub fn wait_until(&mut self, what: &str, expression: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            // A page being (re)loaded has no context to evaluate in for a moment: try again.
            if let Ok(Value::Bool(true)) = self.eval(expression) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Err(SandboxError::Timeout {
                    what: what.to_owned(),
                    secs: timeout.as_secs_f64(),
                    detail: format!("the page shows:\n{text}"),
                });
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Writes a PNG of the tab to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = shot["data"]
            .as_str()
            .and_then(base64_decode)
            .ok_or_else(|| devtools_error("Page.captureScreenshot", "no PNG data"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SandboxError::io("create", dir, e))?;
        }
        std::fs::write(path, data).map_err(|e| SandboxError::io("write", path, e))
    }
}

/// Debian's Chromium (`chromium`), or a loud error saying how to install it.
pub fn chromium_binary() -> Result<PathBuf> {
    ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .ok_or_else(|| SandboxError::MissingTools {
            tools: "chromium".to_owned(),
            packages: "--no-install-recommends chromium".to_owned(),
        })
}

fn devtools_error(method: &str, detail: &str) -> SandboxError {
    SandboxError::Parse {
        command: format!("DevTools {method}"),
        detail: detail.to_owned(),
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| SandboxError::io("bind", Path::new("127.0.0.1:0"), e))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|e| SandboxError::io("read the address of", Path::new("127.0.0.1:0"), e))
}

/// Waits until cockpit-ws accepts connections on `port`, or says why it did not.
fn wait_for_port(ws: &mut Child, port: u16, log: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = ws.try_wait() {
            return Err(SandboxError::Exited {
                what: "cockpit-ws".to_owned(),
                status: status.to_string(),
                log: std::fs::read_to_string(log).unwrap_or_default(),
            });
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err(SandboxError::Timeout {
                what: format!("cockpit-ws on port {port}"),
                secs: 15.0,
                detail: std::fs::read_to_string(log).unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to the child's process group (it leads one), SIGKILL to what is left after a grace
/// period, and the child reaped: cockpit-ws takes its bridge along, Chromium its helpers.
fn stop_group(child: &mut Child) {
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = killpg(group, Signal::SIGTERM);
    let _ = terminate(child, Duration::from_secs(5));
    // The leader is gone; its helpers may not be.
    let _ = killpg(group, Signal::SIGKILL);
    let started = Instant::now();
    while killpg(group, None).is_ok() && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Standard base64 (RFC 4648, with padding), for the one place a binary comes back from
/// DevTools: a screenshot.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(byte: u8) -> Option<u32> {
        match byte {
            b'A'..=b'Z' => Some(u32::from(byte - b'A')),
            b'a'..=b'z' => Some(u32::from(byte - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(byte - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes: Vec<u8> = text.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, byte) in chunk.iter().enumerate() {
            acc |= value(*byte)? << (18 - 6 * i);
        }
        let produced = chunk.len().checked_sub(1)?;
        for i in 0..produced {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_padded_and_unpadded_tails() {
        assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(base64_decode("a$==").as_deref(), None);
    }
}
