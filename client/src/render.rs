//! Everything the user reads while a command runs: tables, the live view of a followed job
//! (progress bars on a terminal, timestamped lines otherwise), and signals as text or JSON for
//! `monitor`. The summary of a finished job is [`crate::summary`]'s.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use unicode_width::UnicodeWidthStr;
use zbus::wire::Variant;

use crate::clock::{Clock, now_iso_utc};
use crate::summary::JobResult;

// ---------------------------------------------------------------------------------------------
// Tables

/// How many terminal columns `text` takes (a CJK character takes two, a combining accent none).
pub fn text_width(text: &str) -> usize {
    text.width()
}

/// Left-aligned columns separated by two spaces, widths counted in terminal columns.
/// The last column is not padded, so lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| text_width(h)).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(text_width(cell));
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate().take(columns) {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i + 1 < columns {
                let pad = widths[i].saturating_sub(text_width(cell));
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Following a job

/// How a followed job is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Progress bars on stderr.
    Terminal,
    /// Timestamped lines on stderr.
    Plain,
    /// Nothing but the result on stdout.
    Quiet,
}

impl Mode {
    /// Bars when stderr is a terminal that can draw them, lines otherwise.
    pub fn detect(quiet: bool) -> Mode {
        if quiet {
            return Mode::Quiet;
        }
        let term = std::env::var("TERM").unwrap_or_default();
        // indicatif draws nothing on a dumb terminal, so it gets the plain lines.
        if std::io::stderr().is_terminal() && !term.is_empty() && term != "dumb" {
            Mode::Terminal
        } else {
            Mode::Plain
        }
    }
}

/// Journal priority as a prefix: warnings and worse are labelled, informational lines are not.
fn priority_label(priority: u32) -> &'static str {
    match priority {
        0..=3 => "error: ",
        4 => "warning: ",
        7.. => "debug: ",
        _ => "",
    }
}

/// syslog's `LOG_DEBUG`: the environment keys written, skipped files, which copy of the image
/// is read. Shown only with `-v`; the journal keeps them all.
const DEBUG_PRIORITY: u32 = 7;

/// How a followed job is shown, besides the mode.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    pub mode: Mode,
    /// Show debug-level messages (`-v`).
    pub verbose: bool,
    /// Timestamps of the plain lines.
    pub clock: Clock,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    instances: Vec<(String, ProgressBar)>,
}

/// The live view of one followed job.
pub struct View {
    mode: Mode,
    verbose: bool,
    clock: Clock,
    job: u64,
    order: Vec<String>,
    bars: Option<Bars>,
    /// Last (step, percent) per instance: plain lines only when something changed, and the total.
    last: HashMap<String, (String, u32)>,
    finished: HashMap<String, String>,
    job_progress: u32,
    /// The end was confirmed: the total bar shows the job's status, no longer "running".
    done: bool,
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:<14.bold} [{bar:30}] {pos:>3}% {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl View {
    pub fn new(options: ViewOptions, job: u64, instances: &[String]) -> View {
        let ViewOptions {
            mode,
            verbose,
            clock,
        } = options;
        let mut view = View {
            mode,
            verbose,
            clock,
            job,
            order: Vec::new(),
            bars: None,
            last: HashMap::new(),
            finished: HashMap::new(),
            job_progress: 0,
            done: false,
        };
        if mode == Mode::Terminal {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let total = multi.add(
                ProgressBar::new(100)
                    .with_style(bar_style())
                    .with_prefix(format!("job {job}"))
                    .with_message("pending"),
            );
            view.bars = Some(Bars {
                multi,
                total,
                instances: Vec::new(),
            });
        }
        for instance in instances {
            view.instance(instance);
        }
        if mode == Mode::Plain {
            view.line(&format!("job {job}: {}", instances.join(" ")));
        }
        view
    }

    /// The bar of an instance, created on first sight (signals may name one not yet known).
    fn instance(&mut self, instance: &str) -> Option<&ProgressBar> {
        if !self.order.iter().any(|i| i == instance) {
            self.order.push(instance.to_owned());
            if let Some(bars) = &mut self.bars {
                let bar = bars.multi.insert_before(
                    &bars.total,
                    ProgressBar::new(100)
                        .with_style(bar_style())
                        .with_prefix(instance.to_owned())
                        .with_message("waiting"),
                );
                bars.instances.push((instance.to_owned(), bar));
            }
        }
        self.bars
            .as_ref()
            .and_then(|b| b.instances.iter().find(|(i, _)| i == instance))
            .map(|(_, bar)| bar)
    }

    /// A timestamped line (plain mode) or a line above the bars (terminal mode).
    fn line(&self, text: &str) {
        match (&self.bars, self.mode) {
            (Some(bars), _) => {
                // A failed write to the terminal is not worth aborting the follow for.
                let _ = bars.multi.println(text);
            }
            (None, Mode::Plain) => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{} {text}", self.clock.now_iso());
            }
            _ => {}
        }
    }

    fn update_total(&mut self) {
        // The mean of the instances' percents, never below what the service reported.
        let count = self.order.len().max(1) as u64;
        let sum: u64 = self
            .order
            .iter()
            .map(|i| {
                if self.finished.contains_key(i) {
                    100
                } else {
                    u64::from(self.last.get(i).map_or(0, |(_, p)| *p))
                }
            })
            .sum();
        let mean = u32::try_from(sum / count).unwrap_or(100);
        self.job_progress = self.job_progress.max(mean).min(100);
        if let Some(bars) = &self.bars
            && !self.done
        {
            bars.total.set_position(u64::from(self.job_progress));
            bars.total.set_message("running");
        }
    }

    pub fn progress(&mut self, instance: &str, step: &str, percent: u32) {
        let percent = percent.min(100);
        let changed = self.last.get(instance) != Some(&(step.to_owned(), percent));
        if let Some(bar) = self.instance(instance) {
            bar.set_position(u64::from(percent));
            bar.set_message(step.to_owned());
        }
        self.last
            .insert(instance.to_owned(), (step.to_owned(), percent));
        if changed && self.mode == Mode::Plain {
            self.line(&format!("{instance} {step} {percent}%"));
        }
        self.update_total();
    }

    /// The job's `Progress` property.
    /// The job's percent as shown: never going down.
    pub fn percent(&self) -> u32 {
        self.job_progress
    }

    pub fn job_progress(&mut self, percent: u32) {
        self.job_progress = self.job_progress.max(percent.min(100));
        self.update_total();
    }

    pub fn message(&mut self, instance: &str, priority: u32, text: &str) {
        if self.mode == Mode::Quiet || (priority >= DEBUG_PRIORITY && !self.verbose) {
            return;
        }
        let label = priority_label(priority);
        for line in text.lines() {
            self.line(&format!("{instance} {label}{line}"));
        }
    }

    pub fn instance_finished(&mut self, instance: &str, status: &str, exit_code: i32) {
        if let Some(bar) = self.instance(instance) {
            if status == "completed" || status == "already-installed" {
                bar.set_position(100);
            }
            bar.set_message(status.to_owned());
            bar.abandon();
        }
        self.finished.insert(instance.to_owned(), status.to_owned());
        if self.mode == Mode::Plain {
            self.line(&format!("{instance} {status} (exit code {exit_code})"));
        }
        self.update_total();
    }

    /// A note from the client itself (cancelling, detaching), shown in every mode but quiet.
    pub fn note(&self, text: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain | Mode::Terminal => self.line(&format!("job {} {text}", self.job)),
        }
    }

    /// Removes the bars, leaving the screen to the final output.
    pub fn clear(&mut self) {
        if let Some(bars) = self.bars.take() {
            for (_, bar) in &bars.instances {
                bar.abandon();
            }
            bars.total.abandon();
            let _ = bars.multi.clear();
        }
    }

    /// The end of the job: the bars go (the command prints the summary or the JSON), plain mode
    /// writes a last line.
    pub fn finish(&mut self, result: &JobResult) {
        // Instances whose InstanceFinished was missed (attached late) still get their line.
        for (id, r) in &result.instances {
            if !self.finished.contains_key(id) {
                self.instance_finished(id, r.status.as_str(), r.exit_code);
            }
        }
        self.done = true;
        if let Some(bars) = &self.bars {
            if result.status == "completed" {
                bars.total.set_position(100);
            }
            bars.total.set_message(result.status.clone());
        }
        match self.mode {
            Mode::Terminal => self.clear(),
            Mode::Plain => {
                let error = result
                    .error
                    .as_ref()
                    .map_or(String::new(), |e| format!(": {e}"));
                self.line(&format!(
                    "job {} {} (exit code {}){error}",
                    self.job, result.status, result.exit_code
                ));
            }
            Mode::Quiet => {}
        }
    }

    /// The job's instances in the order they were first seen.
    pub fn order(&self) -> &[String] {
        &self.order
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Signals for `monitor`

/// A D-Bus value as JSON: numbers, strings, arrays; dictionaries with string-like keys as objects.
pub fn variant_to_json(value: &Variant<'_>) -> Value {
    match value {
        Variant::U8(v) => json!(v),
        Variant::Bool(v) => json!(v),
        Variant::I16(v) => json!(v),
        Variant::U16(v) => json!(v),
        Variant::I32(v) => json!(v),
        Variant::U32(v) => json!(v),
        Variant::I64(v) => json!(v),
        Variant::U64(v) => json!(v),
        Variant::F64(v) => json!(v),
        Variant::Str(v) => json!(v.as_str()),
        Variant::Signature(v) => json!(v.to_string()),
        Variant::ObjectPath(v) => json!(v.as_str()),
        Variant::Variant(v) => variant_to_json(v),
        Variant::Array(v) => Value::Array(v.inner().iter().map(variant_to_json).collect()),
        Variant::Dict(v) => {
            let entries: Vec<(Value, Value)> = v
                .iter()
                .map(|(k, v)| (variant_to_json(k), variant_to_json(v)))
                .collect();
            if entries.iter().all(|(k, _)| k.is_string()) {
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), v))
                        .collect(),
                )
            } else {
                Value::Array(entries.into_iter().map(|(k, v)| json!([k, v])).collect())
            }
        }
        Variant::Structure(v) => Value::Array(v.fields().iter().map(variant_to_json).collect()),
        Variant::Fd(_) => json!("<fd>"),
    }
}

/// The arguments of a signal as JSON values (empty for a body-less signal).
pub fn signal_args(msg: &zbus::Message) -> Vec<Value> {
    let body = msg.body();
    if body.signature().to_string().is_empty() {
        return Vec::new();
    }
    match body.deserialize::<zbus::wire::Structure<'_>>() {
        Ok(structure) => structure.fields().iter().map(variant_to_json).collect(),
        Err(err) => vec![json!(format!("<cannot decode: {err}>"))],
    }
}

/// One signal as `monitor` prints it: a line of text, or one JSON object.
pub fn monitor_line(msg: &zbus::Message, as_json: bool, clock: &Clock) -> String {
    let header = msg.header();
    let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
    let path = header.path().map(|p| p.to_string()).unwrap_or_default();
    let interface = header
        .interface()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let member = header.member().map(|m| m.to_string()).unwrap_or_default();
    let args = signal_args(msg);
    if as_json {
        json!({
            "time": now_iso_utc(),
            "sender": sender,
            "path": path,
            "interface": interface,
            "member": member,
            "args": args,
        })
        .to_string()
    } else {
        let args: Vec<String> = args.iter().map(Value::to_string).collect();
        let time = clock.now_iso();
        format!(
            "{time} {sender} {path} {interface}.{member} {}",
            args.join(" ")
        )
        .trim_end()
        .to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_by_display_width() {
        // `→` takes one column, each of `名前` two, the combining accent of `é` none.
        let rows = vec![
            vec!["mail1".to_owned(), "a → b".to_owned(), "x".to_owned()],
            vec!["名前".to_owned(), "cafe\u{301}".to_owned(), "y".to_owned()],
            vec!["nextcloud12".to_owned(), "c".to_owned(), String::new()],
        ];
        let text = table(&["ID", "IMAGE", "JOB"], &rows);
        assert_eq!(
            text,
            "ID           IMAGE  JOB\n\
             mail1        a → b  x\n\
             名前         cafe\u{301}   y\n\
             nextcloud12  c\n"
        );
    }

    #[test]
    fn variants_become_json() {
        let mut dict =
            zbus::wire::Dict::new(&zbus::wire::Signature::Str, &zbus::wire::Signature::Variant);
        dict.add("Progress", Variant::from(42u32)).unwrap();
        let value = Variant::from(dict);
        assert_eq!(variant_to_json(&value), json!({"Progress": 42}));
        assert_eq!(
            variant_to_json(&Variant::from(vec!["a", "b"])),
            json!(["a", "b"])
        );
    }

    #[test]
    fn signal_as_text_and_json() {
        let msg = zbus::Message::signal(
            "/org/nethserver/ModuleUpdater/job/7",
            "org.nethserver.ModuleUpdater.Job",
            "Progress",
        )
        .build(&("mail1", "pull-image", 25u32))
        .unwrap();
        let line = monitor_line(&msg, false, &Clock::new(true));
        assert!(
            line.ends_with(
                " /org/nethserver/ModuleUpdater/job/7 org.nethserver.ModuleUpdater.Job.Progress \"mail1\" \"pull-image\" 25"
            ),
            "{line}"
        );
        let object: Value =
            serde_json::from_str(&monitor_line(&msg, true, &Clock::new(true))).unwrap();
        assert_eq!(object["member"], "Progress");
        assert_eq!(object["args"], json!(["mail1", "pull-image", 25]));
    }
}
