//! `cargo xtask cockpit [--port P]`: the Cockpit page against a sandbox node, to work on it by
//! hand. Three instances of a demo module at 1.0, tags 1.0 to 2.0 in the loopback registry (2.0
//! runs a slow script that prints a line a second), the daemon, and cockpit-ws serving the page
//! from the repository's `cockpit/` (edits show on reload). Enter stops it and removes everything.

use std::path::Path;
use std::process::ExitCode;

use module_updater_tests::{ImageSpec, Sandbox, SandboxError};

const SLOW: &str = "#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8 9 10; do echo \"migrating $MODULE_ID: step $i of 10\"; sleep 1; done\n";

fn module(tag: &str) -> ImageSpec {
    let unit = format!(
        "[Unit]\nDescription=Demo module {tag}\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
    );
    let spec = ImageSpec::module("demo", tag).file("systemd/user/demo.service", unit, 0o644);
    if tag == "1.0" {
        spec
    } else {
        spec.file("update-module.d/20migrate", SLOW, 0o755)
    }
}

fn main() -> ExitCode {
    let mut port = 9091;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|p| p.parse::<u16>())) {
            ("--port", Some(Ok(value))) => port = value,
            _ => {
                eprintln!("usage: cargo xtask cockpit [--port PORT]");
                return ExitCode::from(2);
            }
        }
    }
    match run(port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cockpit-demo: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(port: u16) -> Result<(), SandboxError> {
    println!("== Standing up a sandbox node (private bus, loopback registry, three instances)");
    let mut sandbox = Sandbox::new()?;
    let v1 = sandbox.build_image(&module("1.0"))?;
    for tag in ["1.1", "2.0"] {
        sandbox.build_image(&module(tag))?;
    }
    for _ in 0..3 {
        let instance = sandbox.add_rootless_instance("demo")?;
        sandbox.install(&instance, &v1)?;
    }
    let _daemon = sandbox.start_daemon(&[])?;
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cockpit");
    let ws = sandbox.start_cockpit_ws(&package, Some(port))?;
    println!("== The page: {}", ws.page_url());
    println!(
        "   The CLI on the same node: module-updater --address {} list",
        sandbox.bus_address()
    );
    println!("== Press Enter to stop and remove everything");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}
