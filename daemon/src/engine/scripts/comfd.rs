//! NS8's command channel (`AGENT_COMFD`, fd 3): the lines a script writes there, parsed into
//! progress and log lines.

use super::super::events::priority;
use tokio::sync::mpsc;

use super::ScriptOutput;
use super::lines::LineReader;

/// Reads NS8 commands from the `AGENT_COMFD` pipe.
pub(super) async fn read_commands(
    pipe: tokio::net::unix::pipe::Receiver,
    tx: mpsc::Sender<ScriptOutput>,
) {
    let mut lines = LineReader::new(pipe);
    let mut continuation = false;
    loop {
        let output = match lines.next(&mut continuation).await {
            Ok(None) => return,
            Ok(Some(chunk)) if chunk.continuation => Some(ignored(
                "AGENT_COMFD command line too long, rest ignored",
                chunk.bytes,
            )),
            Ok(Some(chunk)) => command_output(chunk.bytes),
            Err(e) => Some(ScriptOutput::Line {
                priority: priority::WARNING,
                text: format!("cannot read the script's AGENT_COMFD: {e}"),
            }),
        };
        if let Some(output) = output
            && tx.send(output).await.is_err()
        {
            return;
        }
    }
}

/// What one command line does: `set-progress N` reports progress; the other NS8 commands steer
/// NS8's own step weights and status, which this updater does not have, so they are logged.
pub(super) fn command_output(line: &[u8]) -> Option<ScriptOutput> {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let Some(fields) = parse_command(text) else {
        return Some(ignored("malformed AGENT_COMFD command ignored", line));
    };
    match fields.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => None,
        ["set-progress", value] => match value.parse::<u8>() {
            Ok(percent) if percent <= 100 => Some(ScriptOutput::Progress(percent)),
            _ => Some(ignored(
                "AGENT_COMFD set-progress ignored: the value must be an integer 0..100",
                line,
            )),
        },
        ["set-weight", ..] | ["set-status", ..] => Some(ignored(
            "AGENT_COMFD command ignored (the updater has no NS8 step weights or task status)",
            line,
        )),
        _ => Some(ignored("unknown AGENT_COMFD command ignored", line)),
    }
}

pub(super) fn ignored(what: &str, line: &[u8]) -> ScriptOutput {
    ScriptOutput::Line {
        priority: priority::DEBUG,
        text: format!("{what}: {}", String::from_utf8_lossy(line)),
    }
}

/// NS8's command syntax (Go `encoding/csv` with a space as separator): fields separated by spaces,
/// a field may be `"`-quoted with `""` for a quote. Empty unquoted fields (repeated spaces) are
/// dropped, which is more forgiving than Go. `None` when malformed.
pub(super) fn parse_command(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Some(fields);
        };
        let mut field = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
            // A closing quote must end the field.
            if !matches!(chars.peek(), None | Some(' ')) {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                if c == '"' {
                    return None;
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
    }
}
