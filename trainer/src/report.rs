//! `mekd report`: the comparison table (markdown and JSON, mean and spread over seeds) and the
//! accuracy curves (SVG) of a set of `mekd distill` run directories.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mekd_runtime::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

use crate::methods::run::RunSummary;
use crate::methods::student::StudentEpoch;
use crate::rundir::RunDir;

/// One finished run: its summary and its per-epoch rows.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// The run directory.
    pub dir: PathBuf,
    /// `summary.json`.
    pub summary: RunSummary,
    /// `metrics.jsonl`.
    pub epochs: Vec<StudentEpoch>,
    /// `config.json` with its seeds taken out: runs that differ only by seed share it (`null`
    /// when the run has no config.json).
    pub settings: serde_json::Value,
}

/// A run's `config.json` without its seeds (the settings its seed siblings share).
fn settings_without_seeds(mut config: serde_json::Value) -> serde_json::Value {
    for section in [None, Some("gan"), Some("distill")] {
        let object = match section {
            None => config.as_object_mut(),
            Some(name) => config.get_mut(name).and_then(|v| v.as_object_mut()),
        };
        if let Some(object) = object {
            object.remove("seed");
        }
    }
    config
}

/// One row of the table: the runs of one configuration (everything but the seed), over seeds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReportRow {
    /// `mekd`, `kd`, `ml`, `dkd`, `kn` or `scratch`.
    pub method: String,
    /// `soft`, `hard` or `labels`.
    pub response: String,
    /// Dataset.
    pub dataset: String,
    /// Teacher location.
    pub teacher: String,
    /// Student architecture.
    pub student: String,
    /// Student-stage budget, if any.
    pub budget: Option<usize>,
    /// Student steps per epoch (absent for runs that did not record it).
    pub steps_per_epoch: Option<usize>,
    /// The student's initial learning rate (absent without config.json).
    pub lr: Option<f64>,
    /// Mean final-epoch test accuracy (percent).
    pub final_acc: f64,
    /// Sample standard deviation of the final accuracy over seeds (0 for one seed).
    pub final_acc_std: f64,
    /// Mean best-epoch test accuracy (percent).
    pub best_acc: f64,
    /// Sample standard deviation of the best accuracy over seeds.
    pub best_acc_std: f64,
    /// Mean teacher queries per run.
    pub queries: u64,
    /// Mean bytes sent to the teacher per run.
    pub bytes_up: u64,
    /// Mean bytes received per run.
    pub bytes_down: u64,
    /// The seeds aggregated.
    pub seeds: Vec<u64>,
    /// The number of runs aggregated (the sample size of the means and deviations).
    pub n: usize,
    /// The run directories aggregated.
    pub runs: Vec<PathBuf>,
    /// What tells this row apart from the other rows of its method beyond the columns above:
    /// each `config.json` setting (dotted path, e.g. `gan.epochs`) whose value is not the same
    /// in every row of the method, with this row's value (empty when they differ only in the
    /// columns; settings a method ignores, like a baseline's GAN, never differ between methods).
    #[serde(default)]
    pub distinct_settings: BTreeMap<String, serde_json::Value>,
}

/// Settings shown as their own columns, so never repeated in `distinct_settings`.
const COLUMN_SETTINGS: [&str; 7] =
    ["method", "response", "student", "data", "distill.lr", "distill.steps_per_epoch", "distill.queries.images"];

/// `value`'s leaves under dotted paths (`{"gan": {"epochs": 26}}` -> `gan.epochs = 26`); arrays
/// are leaves.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match value.as_object() {
        Some(object) => {
            for (name, child) in object {
                let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                flatten(&path, child, out);
            }
        }
        None => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

/// Fill each row's `distinct_settings` from its runs' shared settings, comparing the rows of
/// one method with each other.
fn mark_distinct_settings(rows: &mut [ReportRow], settings: &[&serde_json::Value]) {
    let methods: std::collections::BTreeSet<String> = rows.iter().map(|r| r.method.clone()).collect();
    for method in methods {
        let (mut group, group_settings): (Vec<&mut ReportRow>, Vec<&serde_json::Value>) =
            rows.iter_mut().zip(settings).filter(|(r, _)| r.method == method).map(|(r, s)| (r, *s)).unzip();
        mark_within(&mut group, &group_settings);
    }
}

/// [`mark_distinct_settings`] for the rows of one method.
fn mark_within(rows: &mut [&mut ReportRow], settings: &[&serde_json::Value]) {
    let flat: Vec<BTreeMap<String, serde_json::Value>> = settings
        .iter()
        .map(|s| {
            let mut out = BTreeMap::new();
            flatten("", s, &mut out);
            out
        })
        .collect();
    let keys: std::collections::BTreeSet<&String> = flat.iter().flat_map(|f| f.keys()).collect();
    let null = serde_json::Value::Null;
    for key in keys {
        if COLUMN_SETTINGS.contains(&key.as_str()) {
            continue;
        }
        let value = |f: &BTreeMap<String, serde_json::Value>| f.get(key).unwrap_or(&null).clone();
        if flat.iter().all(|f| value(f) == value(&flat[0])) {
            continue;
        }
        for (row, f) in rows.iter_mut().zip(&flat) {
            row.distinct_settings.insert(key.clone(), value(f));
        }
    }
}

/// A row's distinct settings as `key=value, ...` (empty when it has none).
fn distinct_label(row: &ReportRow) -> String {
    row.distinct_settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// Every run under `paths`: a path holding `summary.json` is a run; otherwise its
/// subdirectories are searched (three levels deep). Unfinished runs are skipped with a note.
pub fn collect_runs(paths: &[PathBuf]) -> Result<Vec<RunRecord>> {
    let mut dirs = Vec::new();
    for path in paths {
        if !path.is_dir() {
            bail!("{} is not a directory", path.display());
        }
        find_runs(path, 3, &mut dirs)?;
    }
    dirs.sort();
    dirs.dedup();
    let mut runs = Vec::new();
    for dir in dirs {
        let run = RunDir::open(&dir)?;
        let raw: serde_json::Value = run.read_json("summary.json")?;
        if raw.get("method").is_none() {
            eprintln!("skipping {}: not a `mekd distill` run (e.g. a teacher)", dir.display());
            continue;
        }
        let summary: RunSummary =
            serde_json::from_value(raw).with_context(|| format!("parsing {}", run.file("summary.json").display()))?;
        let epochs: Vec<StudentEpoch> = run.read_metrics()?;
        let settings = if run.file("config.json").is_file() {
            settings_without_seeds(run.read_json("config.json")?)
        } else {
            serde_json::Value::Null
        };
        runs.push(RunRecord { dir, summary, epochs, settings });
    }
    if runs.is_empty() {
        bail!("no finished run (a directory with summary.json) under {paths:?}");
    }
    Ok(runs)
}

fn find_runs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if dir.join("summary.json").is_file() && dir.join("metrics.jsonl").is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    if depth == 0 {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for entry in entries {
        if entry.join("config.json").is_file() && !entry.join("summary.json").is_file() {
            eprintln!("skipping {}: the run has not finished", entry.display());
            continue;
        }
        find_runs(&entry, depth - 1, out)?;
    }
    Ok(())
}

type GroupKey = (String, String, String, String, String, Option<usize>, Option<usize>, String);

fn key(run: &RunRecord) -> GroupKey {
    let summary = &run.summary;
    (
        summary.method.clone(),
        summary.response.clone(),
        summary.dataset.clone(),
        summary.teacher.clone(),
        summary.student.clone(),
        summary.budget,
        summary.steps_per_epoch,
        run.settings.to_string(),
    )
}

/// Write `report.md`, `report.json` and `accuracy.svg` of `rows` (over `runs`) into `dir`.
pub fn write(dir: &Path, rows: &[ReportRow], runs: &[RunRecord]) -> Result<()> {
    let out = RunDir::create(dir)?;
    write_atomic(&out.file("report.md"), markdown(rows).as_bytes())?;
    out.write_json("report.json", &rows)?;
    write_atomic(&out.file("accuracy.svg"), accuracy_svg(rows, runs).as_bytes())?;
    eprintln!("wrote report.md, report.json and accuracy.svg to {}", dir.display());
    Ok(())
}

/// Mean and sample standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Group the runs by method, response, dataset, teacher, student, budget, steps per epoch and
/// every other setting but the seed; one row each, in
/// a stable order (method order of the paper's tables, then response, then budget).
pub fn aggregate(runs: &[RunRecord]) -> Vec<ReportRow> {
    let mut groups: BTreeMap<GroupKey, Vec<&RunRecord>> = BTreeMap::new();
    for run in runs {
        groups.entry(key(run)).or_default().push(run);
    }
    let (mut rows, settings): (Vec<ReportRow>, Vec<&serde_json::Value>) = groups
        .into_iter()
        .map(|((method, response, dataset, teacher, student, budget, steps_per_epoch, _), members)| {
            let finals: Vec<f64> = members.iter().map(|r| r.summary.final_acc).collect();
            let bests: Vec<f64> = members.iter().map(|r| r.summary.best_acc).collect();
            let (final_acc, final_acc_std) = mean_std(&finals);
            let (best_acc, best_acc_std) = mean_std(&bests);
            let n = members.len() as u64;
            let total = |f: fn(&RunSummary) -> u64| members.iter().map(|r| f(&r.summary)).sum::<u64>() / n;
            let row = ReportRow {
                method,
                response,
                dataset,
                teacher,
                student,
                budget,
                steps_per_epoch,
                lr: members[0].settings["distill"]["lr"].as_f64(),
                final_acc,
                final_acc_std,
                best_acc,
                best_acc_std,
                queries: total(|s| s.queries),
                bytes_up: total(|s| s.bytes_up),
                bytes_down: total(|s| s.bytes_down),
                seeds: members.iter().map(|r| r.summary.seed).collect(),
                n: members.len(),
                runs: members.iter().map(|r| r.dir.clone()).collect(),
                distinct_settings: BTreeMap::new(),
            };
            (row, &members[0].settings)
        })
        .unzip();
    mark_distinct_settings(&mut rows, &settings);
    let order = |m: &str| ["mekd", "kd", "ml", "dkd", "kn", "scratch"].iter().position(|x| *x == m).unwrap_or(99);
    rows.sort_by(|a, b| {
        (order(&a.method), &a.response, a.budget, &a.student).cmp(&(
            order(&b.method),
            &b.response,
            b.budget,
            &b.student,
        ))
    });
    rows
}

fn megabytes(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / 1e6)
}

fn with_spread(mean: f64, std: f64, n: usize) -> String {
    if n > 1 { format!("{mean:.2} ± {std:.2}") } else { format!("{mean:.2}") }
}

/// The table as markdown; a `settings` column joins it when rows differ in more than the
/// columns show (`ReportRow::distinct_settings`).
pub fn markdown(rows: &[ReportRow]) -> String {
    let settings = rows.iter().any(|r| !r.distinct_settings.is_empty());
    let mut out = String::from(
        "| method | response | student | budget | steps/epoch | lr | final acc % | best acc % | queries | MB up | MB down | n | seeds |",
    );
    out.push_str(if settings { " settings |\n" } else { "\n" });
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    out.push_str(if settings { "---|\n" } else { "\n" });
    for r in rows {
        let n = r.n;
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {n} | {} |",
            r.method,
            r.response,
            r.student,
            r.budget.map_or("-".to_string(), |b| b.to_string()),
            r.steps_per_epoch.map_or("-".to_string(), |s| s.to_string()),
            r.lr.map_or("-".to_string(), |lr| lr.to_string()),
            with_spread(r.final_acc, r.final_acc_std, n),
            with_spread(r.best_acc, r.best_acc_std, n),
            r.queries,
            megabytes(r.bytes_up),
            megabytes(r.bytes_down),
            r.seeds.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
        );
        if settings {
            let _ = write!(out, " {} |", distinct_label(r));
        }
        out.push('\n');
    }
    out
}

const PALETTE: [&str; 8] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"];

/// Test accuracy per epoch, one line per table row (mean over its seeds), as an SVG image.
pub fn accuracy_svg(rows: &[ReportRow], runs: &[RunRecord]) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 420.0, 60.0, 200.0, 20.0, 50.0);
    let curves: Vec<(String, Vec<f64>)> = rows
        .iter()
        .map(|row| {
            let members: Vec<&RunRecord> = runs.iter().filter(|r| row.runs.contains(&r.dir)).collect();
            let epochs = members.iter().map(|r| r.epochs.len()).min().unwrap_or(0);
            let mean = (0..epochs)
                .map(|e| members.iter().map(|r| r.epochs[e].test_acc).sum::<f64>() / members.len() as f64)
                .collect();
            let budget = row.budget.map_or(String::new(), |b| format!(" @{b}"));
            let distinct = distinct_label(row);
            let distinct = if distinct.is_empty() { distinct } else { format!(" {distinct}") };
            (format!("{} {}{}{}", row.method, row.response, budget, distinct), mean)
        })
        .collect();
    let max_epochs = curves.iter().map(|(_, c)| c.len()).max().unwrap_or(1).max(2);
    let lowest = curves.iter().flat_map(|(_, c)| c.iter().copied()).fold(100.0, f64::min);
    let y_min = ((lowest / 10.0).floor() * 10.0).clamp(0.0, 90.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let x = |e: usize| left + plot_w * e as f64 / (max_epochs - 1) as f64;
    let y = |acc: f64| top + plot_h * (1.0 - (acc - y_min) / (100.0 - y_min));
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for step in 0..=5 {
        let acc = y_min + (100.0 - y_min) * step as f64 / 5.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" \
             text-anchor=\"end\">{acc:.0}</text>",
            y(acc),
            left + plot_w,
            left - 6.0,
            y(acc) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\
         <text x=\"{2}\" y=\"{3}\" text-anchor=\"middle\">epoch (1 to {max_epochs})</text>\
         <text x=\"14\" y=\"{4}\" transform=\"rotate(-90 14 {4})\" text-anchor=\"middle\">test accuracy %</text>",
        top + plot_h,
        left + plot_w,
        left + plot_w / 2.0,
        height - 12.0,
        top + plot_h / 2.0
    );
    for (i, (label, curve)) in curves.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<String> =
            curve.iter().enumerate().map(|(e, acc)| format!("{:.1},{:.1}", x(e), y(*acc))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let ly = top + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/>\
             <text x=\"{2}\" y=\"{3}\">{4}</text>",
            left + plot_w + 12.0,
            left + plot_w + 32.0,
            left + plot_w + 38.0,
            ly + 4.0,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_sample_standard_deviation() {
        let (mean, std) = mean_std(&[98.0, 99.0, 100.0]);
        assert!((mean - 99.0).abs() < 1e-12);
        assert!((std - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[97.5]), (97.5, 0.0));
    }

    /// A finished KD run of `seed` with final and best accuracy `acc` and no settings.
    fn record(seed: u64, acc: f64) -> RunRecord {
        RunRecord {
            dir: PathBuf::from(format!("run-{seed}")),
            summary: RunSummary {
                method: "kd".into(),
                response: "soft".into(),
                dataset: "d".into(),
                teacher: "t".into(),
                student: "lenet5-half".into(),
                final_acc: acc,
                best_acc: acc,
                queries: 10,
                bytes_up: 1,
                bytes_down: 1,
                seed,
                budget: None,
                edge_images: 10,
                transfer_images: Some(10),
                steps_per_epoch: Some(1),
                student_params: 1,
                seconds: 1.0,
                onnx: PathBuf::new(),
                numerics: None,
            },
            epochs: Vec::new(),
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn seeds_share_a_row_and_other_settings_do_not() {
        let run = |seed: u64, lr: f64, acc: f64| RunRecord {
            dir: PathBuf::from(format!("run-{seed}-{lr}")),
            settings: settings_without_seeds(serde_json::json!({
                "seed": seed, "gan": {"seed": seed}, "distill": {"seed": seed, "lr": lr}
            })),
            ..record(seed, acc)
        };
        let rows = aggregate(&[run(0, 0.1, 90.0), run(1, 0.1, 92.0), run(0, 0.05, 80.0)]);
        assert_eq!(rows.len(), 2);
        let lr = |r: &ReportRow| (r.lr, r.n, r.final_acc);
        let mut found: Vec<_> = rows.iter().map(lr).collect();
        found.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(found, vec![(Some(0.05), 1, 80.0), (Some(0.1), 2, 91.0)]);
        // lr has its own column, so it is not repeated as a distinct setting.
        assert!(rows.iter().all(|r| r.distinct_settings.is_empty()));
        assert!(!markdown(&rows).contains("settings"));
    }

    #[test]
    fn rows_that_differ_beyond_the_columns_name_their_difference() {
        let run = |seed: u64, gan_epochs: u64, tau: f64, acc: f64| {
            let mut record = record(seed, acc);
            record.dir = PathBuf::from(format!("run-{seed}-{gan_epochs}-{tau}"));
            record.settings = settings_without_seeds(serde_json::json!({
                "seed": seed, "method": "mekd", "gan": {"seed": seed, "epochs": gan_epochs},
                "distill": {"seed": seed, "lr": 0.1, "tau": tau, "milestones": [18]}
            }));
            record
        };
        // Another method's row is not compared with these (its GAN settings are unused).
        let mut other = run(0, 200, 5.0, 80.0);
        other.summary.method = "dkd".into();
        let rows = aggregate(&[
            run(0, 52, 5.0, 90.0),
            run(1, 52, 5.0, 92.0),
            run(0, 26, 5.0, 85.0),
            run(0, 52, 2.0, 93.0),
            other,
        ]);
        let (dkd, rows): (Vec<ReportRow>, Vec<ReportRow>) = rows.into_iter().partition(|r| r.method == "dkd");
        assert!(dkd[0].distinct_settings.is_empty(), "{:?}", dkd[0].distinct_settings);
        assert_eq!(rows.len(), 3);
        let mut labels: Vec<(String, usize)> = rows.iter().map(|r| (distinct_label(r), r.n)).collect();
        labels.sort();
        assert_eq!(
            labels,
            vec![
                ("distill.tau=2.0, gan.epochs=52".to_string(), 1),
                ("distill.tau=5.0, gan.epochs=26".to_string(), 1),
                ("distill.tau=5.0, gan.epochs=52".to_string(), 2),
            ]
        );
        let table = markdown(&rows);
        assert!(table.lines().next().unwrap().ends_with("| seeds | settings |"), "{table}");
        assert!(table.contains("| 0, 1 | distill.tau=5.0, gan.epochs=52 |"), "{table}");
    }
}
