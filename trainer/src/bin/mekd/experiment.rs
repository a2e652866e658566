//! `mekd experiment`: run a schedule file (`experiments/*.toml`): the teacher once, then every
//! run and seed as its own `mekd distill` process, then the report.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mekd_trainer::experiment::{Job, Schedule, prune};
use mekd_trainer::{progress, report};

#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// The schedule (TOML): the dataset, the seeds, the teacher's `mekd teacher train` flags,
    /// the `mekd distill` flags every run shares and the runs (see experiments/).
    schedule: PathBuf,
    /// The experiment's folder: teacher/, one NAME-seed-N/ per run and seed with its log, the
    /// schedule as run, and report/. Run again with the same --out to finish what is missing:
    /// finished runs are kept, interrupted ones resumed.
    #[arg(long)]
    out: PathBuf,
    /// Runs at a time.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// CPU threads of each run (`RAYON_NUM_THREADS`) [default: the cores shared among --jobs].
    #[arg(long)]
    threads: Option<usize>,
    /// CPU threads of the teacher's training [default: --threads].
    #[arg(long)]
    teacher_threads: Option<usize>,
    /// Only the runs with these names (all their seeds).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// After each run finishes, delete what a reviewer does not read (checkpoints, pools, the
    /// journal, models, sample images), keeping configs, metrics, summaries and the log.
    #[arg(long)]
    prune: bool,
    /// Print the commands instead of running them.
    #[arg(long)]
    dry_run: bool,
}

impl ExperimentArgs {
    pub fn run(self) -> Result<()> {
        let schedule = Schedule::load(&self.schedule)?;
        if self.jobs == 0 || self.threads == Some(0) || self.teacher_threads == Some(0) {
            bail!("--jobs, --threads and --teacher-threads must be at least 1");
        }
        if let Some(unknown) = self.only.iter().find(|name| !schedule.runs.iter().any(|run| &run.name == *name)) {
            bail!("--only {unknown}: {} has no run of that name", self.schedule.display());
        }
        let jobs: Vec<Job> = schedule
            .jobs()
            .into_iter()
            .filter(|job| {
                self.only.is_empty() || self.only.iter().any(|name| job.name == format!("{name}-seed-{}", job.seed))
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = self.threads.unwrap_or((cores / self.jobs).max(1));
        let runner = Runner {
            exe: std::env::current_exe().context("finding this program")?,
            out: self.out.clone(),
            threads,
            teacher_threads: self.teacher_threads.unwrap_or(threads),
        };
        if self.dry_run {
            println!("{}", runner.teacher_command(&schedule).join(" "));
            for job in &jobs {
                println!("{}", runner.distill_command(&schedule, job).join(" "));
            }
            return Ok(());
        }
        std::fs::create_dir_all(&self.out).with_context(|| format!("creating {}", self.out.display()))?;
        std::fs::copy(&self.schedule, self.out.join("schedule.toml")).context("keeping the schedule with the runs")?;
        runner.train_teacher(&schedule)?;

        let todo: VecDeque<&Job> =
            jobs.iter().filter(|job| !runner.dir(&job.name).join("summary.json").is_file()).collect();
        eprintln!(
            "{}: {} runs, {} finished already, {} to run, {} at a time with {threads} threads each",
            self.schedule.display(),
            jobs.len(),
            jobs.len() - todo.len(),
            todo.len(),
            self.jobs
        );
        let bar = progress::bar(todo.len() as u64, "runs");
        let (queue, failures) = (Mutex::new(todo), Mutex::new(Vec::new()));
        std::thread::scope(|scope| {
            for _ in 0..self.jobs {
                scope.spawn(|| {
                    while let Some(job) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                        let outcome = runner.distill(&schedule, job).and_then(|seconds| {
                            if self.prune {
                                prune(&runner.dir(&job.name)).context("pruning the run")?;
                            }
                            Ok(seconds)
                        });
                        bar.inc(1);
                        match outcome {
                            Ok(seconds) => bar.suspend(|| eprintln!("{}: finished in {seconds:.0} s", job.name)),
                            Err(e) => {
                                bar.suspend(|| eprintln!("{}: failed: {e:#}", job.name));
                                failures.lock().unwrap_or_else(|e| e.into_inner()).push(job.name.clone());
                            }
                        }
                    }
                });
            }
        });
        bar.finish_and_clear();

        let runs = report::collect_runs(std::slice::from_ref(&self.out))?;
        let rows = report::aggregate(&runs);
        report::write(&self.out.join("report"), &rows, &runs)?;
        print!("{}", report::markdown(&rows));
        let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
        if !failures.is_empty() {
            bail!(
                "{} of {} runs failed ({}); each one's log is beside its folder in {}; run the same command again to retry them",
                failures.len(),
                jobs.len(),
                failures.join(", "),
                self.out.display()
            );
        }
        Ok(())
    }
}

/// Runs this program's commands for one experiment folder.
struct Runner {
    exe: PathBuf,
    out: PathBuf,
    threads: usize,
    teacher_threads: usize,
}

impl Runner {
    fn dir(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    fn teacher_command(&self, schedule: &Schedule) -> Vec<String> {
        let mut command = vec![self.exe.display().to_string(), "teacher".into(), "train".into()];
        command.extend(schedule.teacher.args.iter().cloned());
        command.extend(["--data".into(), schedule.data.display().to_string()]);
        command.extend(["--out".into(), self.dir("teacher").display().to_string()]);
        command
    }

    fn distill_command(&self, schedule: &Schedule, job: &Job) -> Vec<String> {
        let mut command = vec![self.exe.display().to_string(), "distill".into()];
        command.extend(job.args.iter().cloned());
        command.extend(["--teacher-run".into(), self.dir("teacher").display().to_string()]);
        command.extend(["--data".into(), schedule.data.display().to_string()]);
        command.extend(["--seed".into(), job.seed.to_string()]);
        command.extend(["--out".into(), self.dir(&job.name).display().to_string()]);
        command
    }

    /// The schedule's teacher in `OUT/teacher`, trained (or its interrupted training resumed)
    /// unless it is there already.
    fn train_teacher(&self, schedule: &Schedule) -> Result<()> {
        let dir = self.dir("teacher");
        if dir.join("summary.json").is_file() {
            return Ok(());
        }
        eprintln!("training the teacher into {} (log: {})", dir.display(), self.log("teacher").display());
        let mut command = self.teacher_command(schedule);
        if dir.join("config.json").is_file() {
            command.push("--resume".into());
        }
        self.execute(&command, "teacher", self.teacher_threads)
            .map(drop)
            .context("the teacher did not train; no run can start")
    }

    /// One job, resumed when an earlier attempt was interrupted; its wall time in seconds.
    fn distill(&self, schedule: &Schedule, job: &Job) -> Result<f64> {
        let mut command = self.distill_command(schedule, job);
        if self.dir(&job.name).join("config.json").is_file() {
            command.push("--resume".into());
        }
        self.execute(&command, &job.name, self.threads)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.out.join(format!("{name}.log"))
    }

    /// Run `command` on `threads` CPU threads, its output appended to `NAME.log`.
    fn execute(&self, command: &[String], name: &str, threads: usize) -> Result<f64> {
        let log_path = self.log(name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let started = Instant::now();
        let status = Command::new(&command[0])
            .args(&command[1..])
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("starting {}", command[0]))?;
        if !status.success() {
            bail!("{status}; the end of {}:\n{}", log_path.display(), tail(&log_path, 5));
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The last `n` lines of a log.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
