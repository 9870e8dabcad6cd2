//! Everything the user reads: timestamps, tables, the summary of a job's result, the live view of a
//! followed job (progress bars on a terminal, timestamped lines otherwise), and signals as text or
//! JSON for `monitor`.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use zbus::wire::Variant;

// ---------------------------------------------------------------------------------------------
// Time

/// `2026-11-30T17:00:00Z` for seconds since the epoch (UTC, proleptic Gregorian calendar).
pub fn utc_from_secs(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil conversion: day 0 is 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (day 1..=31, month 1..=12).
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// The current time as [`utc_from_secs`] prints it.
pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    utc_from_secs(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// A `*Usec` property as a timestamp; 0 (not yet) as `-`.
pub fn usec_to_utc(usec: u64) -> String {
    if usec == 0 {
        return "-".to_owned();
    }
    utc_from_secs(i64::try_from(usec / 1_000_000).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Tables

/// Left-aligned columns separated by two spaces, widths counted in characters (`→` is one).
/// The last column is not padded, so lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
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
                let pad = widths[i].saturating_sub(cell.chars().count());
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
// Job results

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// `old → new`, or the one that is known.
fn image_change(result: &Value) -> String {
    match (
        str_field(result, "old_image_url"),
        str_field(result, "new_image_url"),
    ) {
        (Some(old), Some(new)) if old != new => format!("{old} → {new}"),
        (_, Some(new)) => new.to_owned(),
        (Some(old), None) => old.to_owned(),
        (None, None) => "-".to_owned(),
    }
}

/// Scripts that did not end `ok`: `30c failed (3)`, `40x timeout`.
fn script_warnings(result: &Value) -> String {
    let mut out: Vec<String> = result
        .get("scripts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|script| str_field(script, "status").is_some_and(|s| s != "ok"))
        .map(|script| {
            let name = str_field(script, "name").unwrap_or("?");
            let status = str_field(script, "status").unwrap_or("?");
            match script.get("exit_code").and_then(Value::as_i64) {
                Some(code) if status == "failed" => format!("{name} {status} ({code})"),
                _ => format!("{name} {status}"),
            }
        })
        .collect();
    let warnings = result
        .get("warnings")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if out.is_empty() && warnings > 0 {
        out.push(format!(
            "{warnings} warning{}",
            if warnings == 1 { "" } else { "s" }
        ));
    }
    if out.is_empty() {
        "-".to_owned()
    } else {
        out.join(", ")
    }
}

fn result_cell(result: &Value) -> String {
    let status = str_field(result, "status").unwrap_or("?");
    match result.get("error").and_then(|e| str_field(e, "step")) {
        Some(step) => format!("{status} at {step}"),
        None => status.to_owned(),
    }
}

/// The instances of a result in the job's order first, then any other in name order.
fn ordered_instances<'a>(result: &'a Value, order: &[String]) -> Vec<(&'a str, &'a Value)> {
    let Some(map) = result.get("instances").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out: Vec<(&str, &Value)> = order
        .iter()
        .filter_map(|id| map.get_key_value(id.as_str()))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let rest: BTreeMap<&str, &Value> = map
        .iter()
        .filter(|(k, _)| !order.contains(k))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    out.extend(rest);
    out
}

/// The summary of a finished job: a table (instance, result, old → new image, scripts with
/// warnings), then one line per failure reason and the job-level error, if any.
pub fn summary(result: &Value, order: &[String]) -> String {
    let instances = ordered_instances(result, order);
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|(id, r)| {
            vec![
                (*id).to_owned(),
                result_cell(r),
                image_change(r),
                script_warnings(r),
            ]
        })
        .collect();
    let mut out = table(&["INSTANCE", "RESULT", "IMAGE", "WARNINGS"], &rows);
    for (id, r) in &instances {
        if let Some(error) = r.get("error").filter(|e| !e.is_null()) {
            let step = str_field(error, "step").unwrap_or("?");
            let reason = str_field(error, "reason").unwrap_or("");
            out.push_str(&format!("{id}: {step}: {reason}\n"));
        }
    }
    let status = str_field(result, "status").unwrap_or("?");
    let exit_code = result
        .get("exit_code")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    match str_field(result, "error") {
        Some(error) => out.push_str(&format!("job {status} (exit code {exit_code}): {error}\n")),
        None => out.push_str(&format!("job {status} (exit code {exit_code})\n")),
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
        _ => "",
    }
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    instances: Vec<(String, ProgressBar)>,
}

/// The live view of one followed job.
pub struct View {
    mode: Mode,
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
    pub fn new(mode: Mode, job: u64, instances: &[String]) -> View {
        let mut view = View {
            mode,
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
                let _ = writeln!(err, "{} {text}", now_utc());
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
    pub fn job_progress(&mut self, percent: u32) {
        self.job_progress = self.job_progress.max(percent.min(100));
        self.update_total();
    }

    pub fn message(&mut self, instance: &str, priority: u32, text: &str) {
        if self.mode == Mode::Quiet {
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

    /// The end of the job: the summary table (terminal) or a last line (plain).
    pub fn finish(&mut self, result: &Value) {
        let status = str_field(result, "status").unwrap_or("?").to_owned();
        let exit_code = result
            .get("exit_code")
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        // Instances whose InstanceFinished was missed (attached late) still get their line.
        if let Some(map) = result.get("instances").and_then(Value::as_object) {
            for (id, r) in map {
                if !self.finished.contains_key(id) {
                    let s = str_field(r, "status").unwrap_or("?").to_owned();
                    let code = r.get("exit_code").and_then(Value::as_i64).unwrap_or(-1);
                    self.instance_finished(id, &s, i32::try_from(code).unwrap_or(-1));
                }
            }
        }
        self.done = true;
        if let Some(bars) = &self.bars {
            if status == "completed" {
                bars.total.set_position(100);
            }
            bars.total.set_message(status.clone());
        }
        match self.mode {
            Mode::Terminal => {
                self.clear();
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "{}", summary(result, &self.order));
            }
            Mode::Plain => {
                let error = str_field(result, "error").map_or(String::new(), |e| format!(": {e}"));
                self.line(&format!(
                    "job {} {status} (exit code {exit_code}){error}",
                    self.job
                ));
            }
            Mode::Quiet => {}
        }
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
pub fn monitor_line(msg: &zbus::Message, as_json: bool) -> String {
    let header = msg.header();
    let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
    let path = header.path().map(|p| p.to_string()).unwrap_or_default();
    let interface = header
        .interface()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let member = header.member().map(|m| m.to_string()).unwrap_or_default();
    let args = signal_args(msg);
    let time = now_utc();
    if as_json {
        json!({
            "time": time,
            "sender": sender,
            "path": path,
            "interface": interface,
            "member": member,
            "args": args,
        })
        .to_string()
    } else {
        let args: Vec<String> = args.iter().map(Value::to_string).collect();
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
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(utc_from_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_secs(951_782_400), "2000-02-29T00:00:00Z");
        // 2026-11-30T17:00:00Z, the example of the spec.
        assert_eq!(utc_from_secs(1_796_058_000), "2026-11-30T17:00:00Z");
        assert_eq!(utc_from_secs(-1), "1969-12-31T23:59:59Z");
        assert_eq!(usec_to_utc(0), "-");
        assert_eq!(usec_to_utc(1_796_058_000_123_456), "2026-11-30T17:00:00Z");
    }

    #[test]
    fn table_aligns_by_characters() {
        let rows = vec![
            vec!["mail1".to_owned(), "a → b".to_owned(), "x".to_owned()],
            vec!["nextcloud12".to_owned(), "c".to_owned(), String::new()],
        ];
        let text = table(&["ID", "IMAGE", "JOB"], &rows);
        assert_eq!(
            text,
            "ID           IMAGE  JOB\n\
             mail1        a → b  x\n\
             nextcloud12  c\n"
        );
    }

    #[test]
    fn summary_of_a_result() {
        let result: Value = serde_json::from_str(
            r#"{"status":"aborted","exit_code":1,"instances":{
                "mail2":{"status":"failed","exit_code":1,
                    "old_image_url":"ghcr.io/nethserver/mail:1.7.0","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
                    "scripts":[],"warnings":[],"error":{"step":"extract","reason":"no imageroot in the image"}},
                "mail1":{"status":"completed","exit_code":0,
                    "old_image_url":"ghcr.io/nethserver/mail:1.7.0","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
                    "scripts":[{"name":"10a","status":"ok","exit_code":0,"duration_ms":3},
                               {"name":"30c","status":"failed","exit_code":3,"duration_ms":5},
                               {"name":"40t","status":"timeout","exit_code":null,"duration_ms":5}],
                    "warnings":["30c has failed (exit code 3)"],"error":null},
                "mail3":{"status":"already-installed","exit_code":0,
                    "old_image_url":"ghcr.io/nethserver/mail:1.7.1","new_image_url":"ghcr.io/nethserver/mail:1.7.1",
                    "scripts":[],"warnings":["w"],"error":null}}}"#,
        )
        .unwrap();
        let text = summary(&result, &["mail1".to_owned(), "mail2".to_owned()]);
        let expected = "\
INSTANCE  RESULT             IMAGE                                                          WARNINGS
mail1     completed          ghcr.io/nethserver/mail:1.7.0 → ghcr.io/nethserver/mail:1.7.1  30c failed (3), 40t timeout
mail2     failed at extract  ghcr.io/nethserver/mail:1.7.0 → ghcr.io/nethserver/mail:1.7.1  -
mail3     already-installed  ghcr.io/nethserver/mail:1.7.1                                  1 warning
mail2: extract: no imageroot in the image
job aborted (exit code 1)
";
        assert_eq!(text, expected);

        let interrupted: Value = serde_json::from_str(
            r#"{"status":"aborted","exit_code":1,"instances":{},"error":"interrupted"}"#,
        )
        .unwrap();
        assert!(summary(&interrupted, &[]).ends_with("job aborted (exit code 1): interrupted\n"));
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
        let line = monitor_line(&msg, false);
        assert!(
            line.ends_with(
                " /org/nethserver/ModuleUpdater/job/7 org.nethserver.ModuleUpdater.Job.Progress \"mail1\" \"pull-image\" 25"
            ),
            "{line}"
        );
        let object: Value = serde_json::from_str(&monitor_line(&msg, true)).unwrap();
        assert_eq!(object["member"], "Progress");
        assert_eq!(object["args"], json!(["mail1", "pull-image", 25]));
    }
}
