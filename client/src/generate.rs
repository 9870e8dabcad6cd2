//! Shell completions and the man pages, generated from the clap definition in [`crate::cli`].
//! `cargo xtask` calls these; `module-updater generate ...` (hidden) prints them.

use std::io::{self, Write};

use clap::CommandFactory;
use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};

use crate::cli::{BIN_NAME, COMPLETE_VAR, Cli, Shell};

/// Writes the completion script of `shell`: a registration that asks `module-updater` itself
/// for the candidates on each Tab (see [`crate::complete`]).
pub fn completions(shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &Bash,
        Shell::Zsh => &Zsh,
        Shell::Fish => &Fish,
    };
    completer.write_registration(COMPLETE_VAR, BIN_NAME, BIN_NAME, BIN_NAME, out)
}

/// The visible subcommands, each of which has its page `module-updater-NAME(1)`.
pub fn subcommand_names() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect()
}

fn see_also(out: &mut dyn Write, pages: &[String]) -> io::Result<()> {
    let refs: Vec<String> = pages.iter().map(|p| format!("{p}(1)")).collect();
    let text = format!("{}, module-updaterd(8), busctl(1)", refs.join(", "));
    let mut roff = roff::Roff::new();
    roff.control("SH", ["SEE ALSO"]).text([roff::roman(text)]);
    roff.to_writer(out)
}

/// Writes the man page `module-updater(1)` in roff.
pub fn man(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)?;
    let pages: Vec<String> = subcommand_names()
        .iter()
        .map(|name| format!("{BIN_NAME}-{name}"))
        .collect();
    see_also(out, &pages)
}

/// Writes the man page `module-updater-NAME(1)` of a subcommand; `None` for an unknown one.
pub fn subcommand_man(name: &str, out: &mut dyn Write) -> Option<io::Result<()>> {
    if !subcommand_names().iter().any(|n| n == name) {
        return None;
    }
    let mut root = Cli::command();
    // Building propagates the global options into the subcommands, so each page lists them.
    root.build();
    let sub = root.find_subcommand(name)?.clone();
    let render = || -> io::Result<()> {
        clap_mangen::Man::new(sub)
            .source(format!("{BIN_NAME} {}", env!("CARGO_PKG_VERSION")))
            .render(out)?;
        see_also(out, &[BIN_NAME.to_owned()])
    };
    Some(render())
}

/// The file name a packager installs each completion script as.
pub fn completion_file_name(shell: Shell) -> String {
    match shell {
        Shell::Bash => BIN_NAME.to_owned(),
        Shell::Zsh => format!("_{BIN_NAME}"),
        Shell::Fish => format!("{BIN_NAME}.fish"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        completions(shell, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completions_build_for_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            // The script calls the binary back with COMPLETE=<shell>.
            assert!(text.contains("COMPLETE"), "{shell:?}: {text}");
            assert!(text.contains("module-updater"), "{shell:?}: {text}");
        }
        assert_eq!(completion_file_name(Shell::Zsh), "_module-updater");
    }

    #[test]
    fn bash_completion_is_valid_bash() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module-updater.bash");
        std::fs::write(&file, script(Shell::Bash)).unwrap();
        let status = std::process::Command::new("bash")
            .arg("-n")
            .arg(&file)
            .status()
            .expect("bash is needed to check the completion script (apt-get install bash)");
        assert!(status.success());
    }

    #[test]
    fn man_page_builds() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH module-updater 1"), "{text}");
        for word in [
            "update",
            "monitor",
            "\\-\\-timeout",
            "Exit codes",
            "module\\-updater\\-wait(1)",
        ] {
            assert!(text.contains(word), "man page lacks {word}");
        }
    }

    #[test]
    fn a_page_per_subcommand() {
        let names = subcommand_names();
        assert_eq!(
            names,
            [
                "run", "update", "rollback", "prune", "list", "show", "jobs", "check", "history",
                "status", "cancel", "wait", "ns8", "monitor", "version"
            ]
        );
        for name in &names {
            let mut out = Vec::new();
            subcommand_man(name, &mut out).unwrap().unwrap();
            let text = String::from_utf8(out).unwrap();
            let title = format!(".TH module-updater-{name} 1");
            assert!(text.contains(&title), "{name}: {text}");
            // The global options are on every page.
            assert!(text.contains("\\-\\-json"), "{name}: {text}");
            assert!(text.contains("module\\-updater(1)"), "{name}: {text}");
        }
        let mut out = Vec::new();
        subcommand_man("wait", &mut out).unwrap().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("detaches"), "{text}");
        assert!(subcommand_man("generate", &mut Vec::new()).is_none());
        assert!(subcommand_man("nosuch", &mut Vec::new()).is_none());
    }
}
