//! Shell completions and the man page, generated from the clap definition in [`crate::cli`].
//! `cargo xtask` calls these; `module-updater generate ...` (hidden) prints them.

use std::io::{self, Write};

use clap::CommandFactory;

use crate::cli::{Cli, Shell};

/// The program name the completions are registered for.
pub const BIN_NAME: &str = "module-updater";

/// Writes the completion script of `shell`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut command = Cli::command();
    match shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut command, BIN_NAME, out)
        }
        Shell::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut command, BIN_NAME, out)
        }
        Shell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut command, BIN_NAME, out)
        }
    }
}

/// Writes the man page `module-updater(1)` in roff.
pub fn man(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
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
        completions(shell, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completions_build_for_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for word in ["update-module", "monitor", "wait", "address", "timeout"] {
                assert!(text.contains(word), "{shell:?} completion lacks {word}");
            }
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
        assert!(
            text.starts_with(".ie") || text.contains(".TH module-updater"),
            "{text}"
        );
        assert!(text.contains(".TH module-updater 1"));
        for word in ["update", "monitor", "\\-\\-timeout", "Exit codes"] {
            assert!(text.contains(word), "man page lacks {word}");
        }
    }
}
