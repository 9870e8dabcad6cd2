//! Measures how long the sandbox takes to stand up (bus, registry and N rootless instances with
//! their user managers) and to tear down. `sandbox-timing [INSTANCES] [--hold SECS]`; `--hold`
//! keeps the sandbox up for a while (e.g. to look at it, or to kill this process and see the next
//! sandbox clean up after it).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use module_updater_tests::Sandbox;

fn main() -> ExitCode {
    let mut instances = 2usize;
    let mut hold = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--hold" => hold = args.next().and_then(|s| s.parse::<u64>().ok()),
            other => match other.parse() {
                Ok(n) => instances = n,
                Err(_) => {
                    eprintln!("usage: sandbox-timing [INSTANCES] [--hold SECS]");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let started = Instant::now();
    let mut sandbox = match Sandbox::new() {
        Ok(sandbox) => sandbox,
        Err(err) => {
            eprintln!("sandbox-timing: {err}");
            return ExitCode::FAILURE;
        }
    };
    let base = started.elapsed();
    println!(
        "bus + registry:                  {:>8.3} s",
        base.as_secs_f64()
    );
    for n in 1..=instances {
        let before = Instant::now();
        match sandbox.add_rootless_instance("demo") {
            Ok(instance) => println!(
                "rootless instance {n} ({:<12}): {:>8.3} s",
                instance.id,
                before.elapsed().as_secs_f64()
            ),
            Err(err) => {
                eprintln!("sandbox-timing: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "stand-up total ({instances} rootless):     {:>8.3} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(secs) = hold {
        println!(
            "holding the sandbox at {} for {secs} s",
            sandbox.root().display()
        );
        std::thread::sleep(Duration::from_secs(secs));
    }
    let footprint = sandbox.footprint();
    let before = Instant::now();
    drop(sandbox);
    println!(
        "teardown:                        {:>8.3} s",
        before.elapsed().as_secs_f64()
    );
    let leftovers = footprint.leftovers();
    if leftovers.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("sandbox-timing: {leftovers}");
        ExitCode::FAILURE
    }
}
