//! `mekd distill`: one command from the edge subset to a verified student ONNX for any method,
//! with everything written to one run directory, resumable after an interruption.
//!
//! Layout: `config.json`, `queries.journal` (every teacher answer and its cost, durable before
//! use: [`crate::journal`]), `usage.json` (queries and bytes so far), for MEKD `gan.jsonl`,
//! `samples/epoch-N.png` and `generator.bpk`; `transfer.pool` (the cached answers of a
//! budgeted or baseline run), `metrics.jsonl`, `checkpoints/`, `student.onnx`, `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use mekd_contract::Usage;
use mekd_contract::protocol::ResponseMode;
use mekd_contract::protocol::TeacherInfo;
use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, ClassifierSpec};
use mekd_runtime::data::edge_subset;
use mekd_runtime::{Dataset, Split};

use super::config::{DistillConfig, QueryMode};
use super::deprivatize::GanConfig;
use super::student::{EpochLength, Pool, StudentJob, Transfer, train_student};
use super::{Method, Prepared};
use crate::blackbox::Teacher;
use crate::device::DeviceKind;
use crate::export::export_verified;
use crate::journal::{self, Journal, JournaledTeacher, SharedJournal};
use crate::numerics::CpuNumerics;
use crate::progress;
use crate::rundir::RunDir;

/// Everything a distillation run depends on; saved as `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    /// The method.
    pub method: Method,
    /// Where the teacher is (for the record).
    pub teacher: String,
    /// The dataset whose training split holds the edge images and whose test split scores.
    pub data: PathBuf,
    /// Fraction of the training split the edge holds (unlabeled).
    pub edge_fraction: f64,
    /// Student architecture.
    pub student: Architecture,
    /// Deprivatization settings.
    pub gan: GanConfig,
    /// Distillation settings.
    pub distill: DistillConfig,
    /// Backend.
    pub device: DeviceKind,
    /// How the teacher answered when the run started (a resumed run must get the same; absent
    /// in runs written before it was recorded).
    #[serde(default)]
    pub response: Option<ResponseMode>,
    /// Evaluate on the first N test images only.
    pub limit_test: Option<usize>,
    /// Seed of the edge subset.
    pub seed: u64,
}

/// `summary.json` of a distillation run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// `mekd`, `kd`, `ml`, `dkd`, `kn` or `scratch`.
    pub method: String,
    /// `soft` or `hard` (`labels` for `scratch`).
    pub response: String,
    /// Dataset path.
    pub dataset: String,
    /// Teacher location.
    pub teacher: String,
    /// Student architecture.
    pub student: String,
    /// Test accuracy after the last epoch (percent).
    pub final_acc: f64,
    /// Best test accuracy over epochs (percent).
    pub best_acc: f64,
    /// Teacher queries (images).
    pub queries: u64,
    /// Bytes sent to the teacher.
    pub bytes_up: u64,
    /// Bytes received from the teacher.
    pub bytes_down: u64,
    /// Seed.
    pub seed: u64,
    /// The budget of the student stage (pool size), if the run had one.
    pub budget: Option<usize>,
    /// Unlabeled edge images.
    pub edge_images: usize,
    /// Images in the student's transfer set (`None`: fresh synthetic queries every step).
    pub transfer_images: Option<usize>,
    /// Student steps per epoch as run (absent in runs written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_epoch: Option<usize>,
    /// Student parameters.
    pub student_params: usize,
    /// Wall time of the run (this process; a resumed run counts its last part only).
    pub seconds: f64,
    /// The exported student.
    pub onnx: PathBuf,
    /// What fixed the rounding of a CPU (flex) run on this machine; absent for other backends
    /// and in runs written before it was recorded. Two flex runs of one configuration agree bit
    /// for bit only where this agrees (`crate::numerics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<CpuNumerics>,
}

impl RunConfig {
    /// Reject settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let d = &self.distill;
        if d.epochs == 0 || d.steps_per_epoch == Some(0) || d.batch == 0 {
            bail!("epochs, steps and batch size must be at least 1");
        }
        if let Some(reason) = self.method.implementation().settings_error(self) {
            bail!("{reason}");
        }
        if !(d.tau > 0.0 && d.tau_g > 0.0) {
            bail!("temperatures must be positive");
        }
        d.sgd.validate().map_err(anyhow::Error::msg)?;
        if !(self.edge_fraction > 0.0 && self.edge_fraction <= 1.0) {
            bail!("--edge-fraction must be in (0, 1], got {}", self.edge_fraction);
        }
        if !(d.kn_fraction > 0.0 && d.kn_fraction <= 1.0) {
            bail!("--kn-fraction must be in (0, 1], got {}", d.kn_fraction);
        }
        if d.queries == QueryMode::Budget(0) {
            bail!("--budget must be at least 1");
        }
        Ok(())
    }
}

/// Run `config.method` end to end into `dir`; with `resume`, continue the run already there
/// (its `config.json` wins), skipping finished stages and reusing cached teacher answers.
pub fn run_method(dir: &Path, config: &RunConfig, teacher: &mut dyn Teacher, resume: bool) -> Result<RunSummary> {
    let started = Instant::now();
    config.validate()?;
    let run = RunDir::create(dir)?;
    if resume {
        if run.file("summary.json").exists() {
            eprintln!("{} is complete; nothing to resume", dir.display());
            return run.read_json("summary.json");
        }
        let saved: RunConfig = run.read_json("config.json").context("--resume needs the run's config.json")?;
        config.device.announce_resume(saved.device);
        if (RunConfig { device: config.device, ..saved }) != *config {
            bail!(
                "--resume: the settings differ from {}; resume with the same flags",
                run.file("config.json").display()
            );
        }
    } else if run.file("summary.json").exists() || run.file("config.json").exists() {
        bail!("{} already holds a run; pass --resume to continue it, or choose another --out", dir.display());
    }
    // Every answer is journaled before it is used; a run from before journals existed carries
    // its count in usage.json.
    let journal_path = run.file("queries.journal");
    let prior = if resume && !journal_path.exists() && run.file("usage.json").exists() {
        run.read_json("usage.json")?
    } else {
        Usage::default()
    };
    let journal: SharedJournal = Arc::new(Mutex::new(Journal::open(&journal_path, prior)?));
    if resume {
        let journal = journal::lock(&journal);
        eprintln!(
            "resuming {}: {} teacher queries already paid for, {} answers stored for replay",
            dir.display(),
            journal.total().queries,
            journal.unreplayed()
        );
    }
    let mut journaled = JournaledTeacher::new(teacher, journal.clone());
    let teacher: &mut dyn Teacher = &mut journaled;
    let info = teacher.info().clone();
    if let Some(response) = config.response
        && response != info.response
    {
        bail!(
            "{} was started with a teacher answering {response}, this one answers {} (a local teacher takes --response {response})",
            dir.display(),
            info.response
        );
    }
    // Written (again, on resume) only once the teacher fits: a resumed run records its device.
    run.write_json("config.json", config)?;
    let [c, h, w] = info.input_shape;
    if h != w {
        bail!("the teacher's input {h}x{w} is not square");
    }
    let method = config.method.implementation();
    if let Some(reason) = method.unsupported(info.response) {
        bail!("{reason}");
    }
    let train =
        Dataset::load(&config.data, Split::Train).with_context(|| format!("reading {}", config.data.display()))?;
    if train.classes.len() != info.num_classes {
        bail!(
            "{} has {} classes but the teacher answers {}",
            config.data.display(),
            train.classes.len(),
            info.num_classes
        );
    }
    let indices = edge_subset(train.len(), config.edge_fraction, config.seed).map_err(anyhow::Error::msg)?;
    let edge = train.select(&indices).prepare(c, h)?;
    let test = Dataset::load(&config.data, Split::Test)?.take(config.limit_test.unwrap_or(usize::MAX)).prepare(c, h)?;
    eprintln!(
        "{}: edge subset {} unlabeled images; test {} images; teacher {} ({})",
        config.method,
        edge.len(),
        test.len(),
        config.teacher,
        info.response
    );
    let device = config.device.training_device()?;
    let spec = ClassifierSpec { architecture: config.student, in_channels: c, num_classes: info.num_classes };

    let mut stage =
        Stage { run: &run, config, edge: &edge, teacher: &mut *teacher, info: info.clone(), device: &device, resume };
    let Prepared { transfer, objective } = method.prepare(&mut stage)?;
    let transfer_images = match &transfer {
        Transfer::Pool(pool) => Some(pool.len()),
        Transfer::Fresh(_) => None,
    };
    run.write_json("usage.json", &teacher.usage())?;

    let bar = progress::bar(config.distill.epochs as u64, &format!("{} student", config.method));
    let epoch_length = config.distill.steps_per_epoch.map_or(method.reference_epoch_length(), EpochLength::Steps);
    let steps_per_epoch = epoch_length.steps(&transfer, config.distill.batch)?;
    eprintln!("{}: {} epochs of {steps_per_epoch} steps ({epoch_length})", config.method, config.distill.epochs);
    let job = StudentJob {
        spec: &spec,
        config: &config.distill,
        epoch_length,
        test: &test,
        device: &device,
        run: &run,
        graphs: config.device.records_graphs(),
    };
    let (student, rows) = train_student(objective.as_ref(), &transfer, teacher, &job, |row, usage| {
        bar.set_position(row.epoch as u64);
        bar.set_message(format!("loss {:.4} test {:.2}% queries {}", row.loss, row.test_acc, row.queries));
        bar.suspend(|| {
            eprintln!(
                "{} epoch {:>3}/{}: lr {:.4} loss {:.4} test {:.2}% queries {} ({:.1}s)",
                config.method,
                row.epoch,
                config.distill.epochs,
                row.lr,
                row.loss,
                row.test_acc,
                row.queries,
                row.seconds
            )
        });
        // The checkpoint covers every request so far: no resumption asks for them again.
        journal::lock(&journal).rotate()?;
        run.write_json("usage.json", &usage)
    })?;
    bar.finish_and_clear();
    run.write_json("usage.json", &teacher.usage())?;

    let onnx = run.file("student.onnx");
    let mut metadata = ExportMetadata::symmetric(c);
    metadata.class_names = info.class_names.clone();
    export_verified(&student, &spec, &metadata, &onnx).context("exporting the student")?;
    let usage: Usage = teacher.usage();
    let summary = RunSummary {
        method: config.method.to_string(),
        response: if method.queries_teacher() { info.response.to_string() } else { "labels".into() },
        dataset: config.data.display().to_string(),
        teacher: config.teacher.clone(),
        student: config.student.to_string(),
        final_acc: rows.last().map_or(0.0, |r| r.test_acc),
        best_acc: rows.iter().map(|r| r.test_acc).fold(0.0, f64::max),
        queries: usage.queries,
        bytes_up: usage.bytes_up,
        bytes_down: usage.bytes_down,
        seed: config.seed,
        budget: match config.distill.queries {
            QueryMode::Budget(n) => Some(n),
            QueryMode::Fresh => None,
        },
        edge_images: edge.len(),
        transfer_images,
        steps_per_epoch: Some(steps_per_epoch),
        student_params: mekd_models::params::trainable_params(&student),
        seconds: started.elapsed().as_secs_f64(),
        onnx,
        numerics: CpuNumerics::for_device(config.device),
    };
    run.write_json("summary.json", &summary)?;
    Ok(summary)
}

/// What a method's [`super::DistillMethod::prepare`] works with.
pub struct Stage<'a, 't> {
    /// The run directory.
    pub run: &'a RunDir,
    /// The run's settings.
    pub config: &'a RunConfig,
    /// The unlabeled edge images, prepared to the teacher's input shape.
    pub edge: &'a Dataset,
    /// The teacher (every answer journaled).
    pub teacher: &'t mut dyn Teacher,
    /// What the teacher said of itself.
    pub info: TeacherInfo,
    /// The training device.
    pub device: &'a Device,
    /// Whether the run continues an interrupted one.
    pub resume: bool,
}

impl Stage<'_, '_> {
    /// The transfer pool cached in `transfer.pool`, or `images()` queried once and cached.
    pub fn cached_pool(&mut self, images: impl FnOnce() -> Result<Vec<u8>>) -> Result<Pool> {
        let path = self.run.file("transfer.pool");
        if path.exists() {
            let pool = Pool::load(&path)?;
            eprintln!("reusing {} cached teacher answers from {}", pool.len(), path.display());
            return Ok(pool);
        }
        let pixels = images()?;
        let per_image: usize = self.info.input_shape.iter().product();
        let bar = progress::bar((pixels.len() / per_image) as u64, "querying the teacher");
        let pool = Pool::query(pixels, self.teacher, 256, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        pool.save(&path).with_context(|| format!("writing {}", path.display()))?;
        self.run.write_json("usage.json", &self.teacher.usage())?;
        Ok(pool)
    }
}
