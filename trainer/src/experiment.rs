//! Experiment schedules as data: a TOML file names the teacher to train once and the
//! distillation runs to make from it (their `mekd distill` flags and seeds). [`Schedule::jobs`]
//! expands it into one job per run and seed; `mekd experiment` runs the jobs (in parallel,
//! skipping finished runs, resuming interrupted ones) and writes the report.
//!
//! ```toml
//! description = "MEKD against KD at the demo's scale"
//! data = "data/mnist-slice"        # the teacher's and every run's dataset
//! seeds = [0, 1, 2]                # every run's seeds, unless the run names its own
//!
//! [teacher]                        # `mekd teacher train` flags; trained once into OUT/teacher
//! args = ["--arch", "lenet5", "--epochs", "5"]
//!
//! [distill]                        # `mekd distill` flags every run shares
//! args = ["--student", "lenet5-half", "--epochs", "24"]
//!
//! [[run]]                          # OUT/mekd-soft-seed-N for every seed
//! name = "mekd-soft"
//! args = ["--method", "mekd", "--response", "soft"]
//!
//! [[run]]
//! name = "kd-lr"
//! args = ["--method", "kd", "--epochs", "12"]   # a run's flag replaces the shared one
//! seeds = [0]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What is wrong with a schedule.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The file is not a schedule.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        reason: String,
    },
    /// The schedule cannot run.
    #[error("{0}")]
    Invalid(String),
}

/// Flags the schedule sets for every job itself; a schedule may not give them.
pub const MANAGED_FLAGS: [&str; 8] =
    ["--out", "--seed", "--data", "--resume", "--config", "--teacher", "--teacher-run", "--teacher-onnx"];

/// A schedule file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// What the experiment measures, for people.
    #[serde(default)]
    pub description: String,
    /// The dataset of the teacher and of every run (relative to the current directory).
    pub data: PathBuf,
    /// The seeds of every run that names none.
    pub seeds: Vec<u64>,
    /// The teacher, trained once.
    pub teacher: Flags,
    /// The flags every run shares.
    #[serde(default)]
    pub distill: Flags,
    /// The runs.
    #[serde(rename = "run")]
    pub runs: Vec<RunSpec>,
}

/// Command-line flags: `--name value` pairs and `--switch`es.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    /// The flags, as on a command line.
    #[serde(default)]
    pub args: Vec<String>,
}

/// One run of the schedule (one job per seed).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Its name: the run directories are `NAME-seed-N`.
    pub name: String,
    /// Its `mekd distill` flags; each replaces the shared flag of the same name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its seeds, instead of the schedule's.
    pub seeds: Option<Vec<u64>>,
}

/// One `mekd distill` to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The run directory's name, `NAME-seed-N`.
    pub name: String,
    /// Its seed.
    pub seed: u64,
    /// Its flags, without `--out`, `--seed`, `--data` and the teacher.
    pub args: Vec<String>,
}

impl Schedule {
    /// Read and check the schedule at `path`.
    pub fn load(path: &Path) -> Result<Self, ScheduleError> {
        let parse = |reason: String| ScheduleError::Parse { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| parse(e.to_string()))?;
        let schedule: Schedule = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        schedule.check()?;
        Ok(schedule)
    }

    /// Refuse a schedule that cannot run: no runs or seeds, a name that is not a plain
    /// directory name or appears twice, malformed flags, or a flag the schedule manages.
    pub fn check(&self) -> Result<(), ScheduleError> {
        let invalid = |message: String| Err(ScheduleError::Invalid(message));
        if self.runs.is_empty() {
            return invalid("the schedule has no [[run]]".into());
        }
        parse_flags(&self.teacher.args)?;
        parse_flags(&self.distill.args)?;
        let mut names = std::collections::BTreeSet::new();
        for run in &self.runs {
            let plain = !run.name.is_empty()
                && run.name != "teacher"
                && run.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !run.name.starts_with('.');
            if !plain {
                return invalid(format!(
                    "run name {:?}: use letters, digits, '-', '_' or '.' (not `teacher`; it names a directory)",
                    run.name
                ));
            }
            if !names.insert(&run.name) {
                return invalid(format!("run name {:?} appears twice", run.name));
            }
            parse_flags(&run.args)?;
            if run.seeds.as_ref().unwrap_or(&self.seeds).is_empty() {
                return invalid(format!("run {:?} has no seeds", run.name));
            }
        }
        Ok(())
    }

    /// Every job: each run once per seed, with the shared flags and the run's own merged.
    pub fn jobs(&self) -> Vec<Job> {
        let shared = parse_flags(&self.distill.args).expect("checked when loaded");
        let mut jobs = Vec::new();
        for run in &self.runs {
            let own = parse_flags(&run.args).expect("checked when loaded");
            let args = to_args(&merge(&shared, &own));
            for &seed in run.seeds.as_ref().unwrap_or(&self.seeds) {
                jobs.push(Job { name: format!("{}-seed-{seed}", run.name), seed, args: args.clone() });
            }
        }
        jobs
    }
}

/// A flag and its value (`None`: a switch).
type Flag = (String, Option<String>);

/// `args` as flags: each starts with `--`; a following word that does not is its value.
fn parse_flags(args: &[String]) -> Result<Vec<Flag>, ScheduleError> {
    let mut flags: Vec<Flag> = Vec::new();
    let mut words = args.iter().peekable();
    while let Some(word) = words.next() {
        if !word.starts_with("--") || word.len() < 3 {
            return Err(ScheduleError::Invalid(format!("{word:?} is not a flag (flags start with --): {args:?}")));
        }
        if MANAGED_FLAGS.contains(&word.as_str()) {
            return Err(ScheduleError::Invalid(format!(
                "{word} is set by the schedule itself (data = ..., the seeds, the teacher, the output)"
            )));
        }
        if flags.iter().any(|(name, _)| name == word) {
            return Err(ScheduleError::Invalid(format!("{word} is given twice in {args:?}")));
        }
        let value = words.next_if(|next| !next.starts_with("--")).cloned();
        flags.push((word.clone(), value));
    }
    Ok(flags)
}

/// `base` with each flag of `over` replacing the one of the same name, in `base`'s order, then
/// `over`'s new flags.
fn merge(base: &[Flag], over: &[Flag]) -> Vec<Flag> {
    let mut merged: Vec<Flag> =
        base.iter().map(|flag| over.iter().find(|(name, _)| *name == flag.0).unwrap_or(flag).clone()).collect();
    merged.extend(over.iter().filter(|(name, _)| !base.iter().any(|(b, _)| b == name)).cloned());
    merged
}

fn to_args(flags: &[Flag]) -> Vec<String> {
    flags.iter().flat_map(|(name, value)| std::iter::once(name.clone()).chain(value.clone())).collect()
}

/// What a finished run keeps when its large files are pruned (`mekd experiment --prune`): what a
/// reviewer reads (configs, metrics, summaries, reports, charts), not checkpoints, pools,
/// journals, models or sample images.
pub fn kept_when_pruned(file: &Path) -> bool {
    matches!(file.extension().and_then(|e| e.to_str()), Some("json" | "jsonl" | "md" | "svg"))
}

/// Delete every file under `dir` that [`kept_when_pruned`] does not keep, and the folders
/// left empty.
pub fn prune(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            prune(&path)?;
            if std::fs::read_dir(&path)?.next().is_none() {
                std::fs::remove_dir(&path)?;
            }
        } else if !kept_when_pruned(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(text: &str) -> Result<Schedule, ScheduleError> {
        let schedule: Schedule =
            toml::from_str(text).map_err(|e| ScheduleError::Parse { path: "t.toml".into(), reason: e.to_string() })?;
        schedule.check()?;
        Ok(schedule)
    }

    const BASE: &str = r#"
        data = "data/mnist-slice"
        seeds = [0, 1]
        [teacher]
        args = ["--arch", "lenet5", "--epochs", "5"]
        [distill]
        args = ["--student", "lenet5-half", "--epochs", "24", "--budget", "40000"]
    "#;

    #[test]
    fn runs_expand_per_seed_and_their_flags_replace_the_shared_ones() {
        let s = schedule(&format!(
            r#"{BASE}
            [[run]]
            name = "mekd-soft"
            args = ["--method", "mekd", "--epochs", "12", "--lr", "-0.5"]
            [[run]]
            name = "kd"
            args = ["--method", "kd", "--resume-safe"]
            seeds = [7]
        "#
        ))
        .unwrap();
        let jobs = s.jobs();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["mekd-soft-seed-0", "mekd-soft-seed-1", "kd-seed-7"]);
        assert_eq!(
            jobs[0].args,
            ["--student", "lenet5-half", "--epochs", "12", "--budget", "40000", "--method", "mekd", "--lr", "-0.5"]
        );
        assert_eq!(jobs[2].seed, 7);
        assert_eq!(
            jobs[2].args,
            ["--student", "lenet5-half", "--epochs", "24", "--budget", "40000", "--method", "kd", "--resume-safe"]
        );
    }

    #[test]
    fn schedules_that_cannot_run_are_refused_with_the_reason() {
        let run = |extra: &str| schedule(&format!("{BASE}\n[[run]]\n{extra}")).unwrap_err().to_string();
        assert!(run(r#"name = "a/b""#).contains("run name \"a/b\""));
        assert!(run(r#"name = "teacher""#).contains("not `teacher`"));
        assert!(run("name = \"a\"\nargs = [\"--seed\", \"3\"]").contains("--seed is set by the schedule"));
        assert!(run("name = \"a\"\nargs = [\"epochs\", \"3\"]").contains("is not a flag"));
        assert!(run("name = \"a\"\nargs = [\"--tau\", \"3\", \"--tau\", \"4\"]").contains("given twice"));
        assert!(run("name = \"a\"\nseeds = []").contains("has no seeds"));
        assert!(run("name = \"a\"\n[[run]]\nname = \"a\"").contains("appears twice"));
        assert!(run("name = \"a\"\nflags = []").contains("unknown field `flags`"));
        assert!(schedule(BASE).unwrap_err().to_string().contains("missing field `run`"));
    }

    #[test]
    fn pruning_keeps_what_a_reviewer_reads() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        std::fs::create_dir_all(run.join("samples")).unwrap();
        for file in ["config.json", "metrics.jsonl", "summary.json", "samples/epoch-1.png", "checkpoints/a.bpk"] {
            std::fs::write(run.join(file), b"x").unwrap();
        }
        std::fs::write(run.join("student.onnx"), b"x").unwrap();
        prune(run).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["config.json", "metrics.jsonl", "summary.json"]);
    }
}
