//! module-updater: a busctl-style client of module-updaterd.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use module_updater::cli::Cli;
use module_updater::error::exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors; usage errors get 64, since 2 means "busy".
            let code = if err.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
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
            if let Some(text) = err.stdout() {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{}", text.trim_end());
                let _ = stdout.flush();
            }
            eprintln!("module-updater: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
