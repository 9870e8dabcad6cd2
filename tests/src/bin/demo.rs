//! `cargo xtask demo`: a sandbox node with two instances of a demo module at 1.0, updated to 2.0
//! by the client through the daemon, with the state before and after. Everything it creates is
//! removed when it ends.

use std::process::ExitCode;

use module_updater_tests::{ImageSpec, Instance, Sandbox, SandboxError};

const RESTART: &str = "#!/bin/sh\n# Restart the module's service as a real update script does.\necho \"<6>restarting demo.service for $MODULE_ID\"\nsystemctl --user try-restart demo.service 2>/dev/null || true\necho set-progress 100 >&3\n";
const MIGRATE: &str = "#!/bin/sh\necho \"migrating data of $MODULE_ID from ${PREV_IMAGE_URL##*:} to ${IMAGE_URL##*:}\"\nsleep 1\n";

fn main() -> ExitCode {
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("demo: {err}");
            ExitCode::FAILURE
        }
    }
}

fn module(tag: &str, extras: &[String]) -> ImageSpec {
    let unit = format!(
        "[Unit]\nDescription=Demo module {tag}\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
    );
    ImageSpec::module("demo", tag)
        .file("systemd/user/demo.service", unit, 0o644)
        .file(
            "bin/demo-version",
            format!("#!/bin/sh\necho {tag}\n"),
            0o755,
        )
        .file("update-module.d/20migrate", MIGRATE, 0o755)
        .file("update-module.d/80restart", RESTART, 0o755)
        .label("org.nethserver.images", extras.join(" "))
}

fn demo() -> Result<bool, SandboxError> {
    println!(
        "== Standing up a sandbox node: private bus, loopback registry, two rootless instances"
    );
    let mut sandbox = Sandbox::new()?;
    let db1 = sandbox.build_blob_image("demo-db", "1.0", 2 * 1024 * 1024, 1)?;
    let db2 = sandbox.build_blob_image("demo-db", "2.0", 2 * 1024 * 1024, 2)?;
    let v1 = sandbox.build_image(&module("1.0", std::slice::from_ref(&db1)))?;
    let v2 = sandbox.build_image(&module("2.0", std::slice::from_ref(&db2)))?;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let instance = sandbox.add_rootless_instance("demo")?;
        sandbox.install(&instance, &v1)?;
        instances.push(instance);
    }
    let daemon = sandbox.start_daemon(&[])?;
    println!(
        "   module-updaterd (pid {}) owns org.nethserver.ModuleUpdater on {}",
        daemon.pid(),
        sandbox.bus_address()
    );

    println!("\n== Before");
    for instance in &instances {
        show(&sandbox, instance)?;
    }

    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    println!("\n== module-updater update {v2} {}", ids.join(" "));
    let mut client = sandbox.client()?;
    client.arg("update").arg(&v2).args(&ids);
    let status = client.status().map_err(|source| SandboxError::Spawn {
        command: "module-updater".into(),
        source,
    })?;
    println!("   client exit status: {status}");

    println!("\n== After");
    for instance in &instances {
        show(&sandbox, instance)?;
    }
    println!("\n== Tearing down (users, managers, registry, bus, files)");
    drop(daemon);
    drop(sandbox);
    Ok(status.success())
}

fn show(sandbox: &Sandbox, instance: &Instance) -> Result<(), SandboxError> {
    println!("-- {} (uid {})", instance.id, instance.uid);
    for (key, value) in instance.read_env()? {
        if key.contains("IMAGE") {
            println!("   {key}={value}");
        }
    }
    let unit = sandbox.unit_property(instance, "demo.service", "Description")?;
    println!("   demo.service: {unit}");
    let images = sandbox.podman_as(
        instance,
        &["images", "--format", "{{.Repository}}:{{.Tag}}"],
    )?;
    let images = String::from_utf8_lossy(&images.stdout).into_owned();
    println!(
        "   images: {}",
        images.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}
