//! module-updater: a busctl-style client of module-updaterd.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use module_updater::cli::{Cli, Command};
use module_updater::error::{exit, json};

/// Writes one line on stdout; a closed pipe is not worth a panic.
fn print_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", text.trim_end());
    let _ = stdout.flush();
}

/// Whether `--json` is on a command line clap refused (options end at `--`).
fn asks_for_json() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json")
}

fn main() -> ExitCode {
    // Shell completion requests (COMPLETE=bash ...) are answered here and exit.
    module_updater::complete::answer_completion_request();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors; usage errors get 64, since 2 means "busy".
            let code = if err.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            };
            if code == exit::USAGE && asks_for_json() {
                print_stdout(&json::usage_document(&err.render().to_string()).to_string());
            }
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let as_json = cli.json;
    // `run update-module` keeps api-cli's stdout: NS8's array on a refusal, even with --json.
    let api_cli = matches!(cli.command, Command::Run { .. });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!(
                "module-updater: cannot start the async runtime: {err}; check the process limits (ulimit -n)"
            );
            return ExitCode::from(exit::FAILED);
        }
    };
    let outcome = runtime.block_on(module_updater::run(cli));
    // Stop the subscription tasks and the bus connection before printing the last words.
    drop(runtime);
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let failed_job = matches!(err, module_updater::error::ClientError::JobFailed { .. });
            // As an NS8 action step: the agent reads the status from the command channel.
            if matches!(err, module_updater::error::ClientError::Validation { .. })
                && let Some(channel) = module_updater::comfd::channel()
            {
                channel.validation_failed();
            }
            if as_json && !api_cli {
                // A failed job's stdout is already its result JSON, which says what failed.
                if !failed_job {
                    print_stdout(&json::document(&err).to_string());
                }
            } else if let Some(text) = err.stdout() {
                print_stdout(text);
            }
            eprintln!("module-updater: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
