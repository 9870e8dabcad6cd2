//! `bench --compare-report DIR`: the results of `cargo xtask bench-compare`, two daemons run in
//! turn (files `<label>-<round>.json`), side by side: (a)'s wall time per N and round, and the
//! median over the rounds of one daemon's time ÷ the other's in the same round.

use std::collections::BTreeMap;
use std::path::Path;

use crate::BenchError;
use crate::measure::median;

/// label -> round -> N -> (a)'s and (b)'s median wall seconds.
type Table = BTreeMap<String, BTreeMap<usize, BTreeMap<u64, (f64, f64)>>>;

fn read(dir: &Path) -> Result<Table, BenchError> {
    let mut table = Table::new();
    let entries = std::fs::read_dir(dir).map_err(|e| BenchError::io("read", dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| BenchError::io("read", dir, e))?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Some((label, round)) = stem.rsplit_once('-') else {
            continue;
        };
        let (Ok(round), Some("json")) = (
            round.parse::<usize>(),
            path.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io("read", &path, e))?;
        let report: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::Check(format!("{}: {e}", path.display())))?;
        let summaries = report
            .get("summaries")
            .and_then(|s| s.as_array())
            .ok_or_else(|| BenchError::Check(format!("{}: no summaries", path.display())))?;
        for summary in summaries {
            let number = |key: &str| summary.get(key).and_then(|v| v.as_f64());
            let (Some(n), Some(a), Some(b)) = (
                summary.get("n").and_then(|v| v.as_u64()),
                number("daemon_wall_s"),
                number("baseline_wall_s"),
            ) else {
                continue;
            };
            table
                .entry(label.to_owned())
                .or_default()
                .entry(round)
                .or_default()
                .insert(n, (a, b));
        }
    }
    Ok(table)
}

/// The markdown table of `dir`'s results.
pub fn report(dir: &Path) -> Result<String, BenchError> {
    let table = read(dir)?;
    let labels: Vec<&String> = table.keys().collect();
    let [first, second] = labels.as_slice() else {
        return Err(BenchError::Check(format!(
            "{}: expected the results of two daemons, found {labels:?}",
            dir.display()
        )));
    };
    let sizes: std::collections::BTreeSet<u64> = table
        .values()
        .flat_map(|rounds| rounds.values().flat_map(|points| points.keys().copied()))
        .collect();
    let mut out = format!(
        "| N | (a) wall s, {first} (each round) | (a) wall s, {second} | median of {second} ÷ {first}, same round | (b) wall s, all runs (median) |\n|---:|---|---|---:|---:|\n"
    );
    for n in sizes {
        let walls = |label: &String| -> Vec<(usize, f64, f64)> {
            table
                .get(label)
                .map(|rounds| {
                    rounds
                        .iter()
                        .filter_map(|(round, points)| points.get(&n).map(|(a, b)| (*round, *a, *b)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (a, b) = (walls(first), walls(second));
        let ratios: Vec<f64> = b
            .iter()
            .filter_map(|(round, wall, _)| {
                a.iter()
                    .find(|(r, _, _)| r == round)
                    .map(|(_, other, _)| wall / other)
            })
            .collect();
        let list = |runs: &[(usize, f64, f64)]| {
            runs.iter()
                .map(|(_, wall, _)| format!("{wall:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let baselines: Vec<f64> = a.iter().chain(&b).map(|(_, _, b)| *b).collect();
        out.push_str(&format!(
            "| {n} | {} | {} | {} | {} |\n",
            list(&a),
            list(&b),
            median(&ratios)
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "–".into()),
            median(&baselines)
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "–".into()),
        ));
    }
    Ok(out)
}
