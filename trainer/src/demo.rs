//! `mekd demo`: the whole path in one command on the embedded MNIST slice: train the cloud's
//! teacher, serve it over HTTP on loopback (soft answers, API keys, a query budget), distill a
//! LeNet-5-half student with MEKD and with KD at the same budget through that API, benchmark
//! both students with the edge runtime (tract) against the served teacher, and write the report.
//!
//! Every stage is resumable: re-running the command with the same `--out` skips finished
//! stages and continues interrupted ones. The server lives inside this process, so stopping
//! the demo leaves no server behind, and every file is written atomically.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use mekd_contract::protocol::ResponseMode;
use mekd_models::Architecture;
use mekd_runtime::bench::{BenchOptions, BenchReport, TeacherSource};
use mekd_runtime::display::Screen;
use mekd_runtime::fsutil::write_atomic;
use mekd_runtime::teacher_client::HttpClient;
use mekd_runtime::{Dataset, Split};

use crate::blackbox::HttpTeacher;
use crate::device::DeviceKind;
use crate::methods::Method;
use crate::methods::config::{DistillConfig, QueryMode};
use crate::methods::deprivatize::GanConfig;
use crate::methods::losses::ImWeight;
use crate::methods::run::{RunConfig, RunSummary, run_method};
use crate::numerics::CpuNumerics;
use crate::report;
use crate::rundir::RunDir;
use crate::schedule::Sgd;
use crate::teacher::server::{ServeConfig, start};
use crate::teacher::train::{TrainConfig, TrainSummary, train};

/// The demo's settings. The defaults fit 10 minutes on 2 CPU cores; `DemoConfig::tiny` is
/// the end-to-end test's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DemoConfig {
    /// Labeled dataset (train split: the cloud's data, of which the edge holds a fraction
    /// unlabeled; test split: scoring).
    pub data: PathBuf,
    /// Teacher training epochs (LeNet-5).
    pub teacher_epochs: usize,
    /// Teacher queries each method may make (enforced by the server, per API key).
    pub budget: u64,
    /// Fraction of the training split held by the edge.
    pub edge_fraction: f64,
    /// Deprivatization epochs.
    pub gan_epochs: usize,
    /// Generator width (reference 128).
    pub generator_width: usize,
    /// Queries deprivatization may use (its IM term is spread over the run).
    pub gan_queries: u64,
    /// Synthetic images in MEKD's distillation pool, each queried once.
    pub mekd_pool: usize,
    /// Student epochs (both methods).
    pub epochs: usize,
    /// MEKD's student steps per epoch (KD makes one pass over its transfer set per epoch, the
    /// reference's schedule).
    pub steps: usize,
    /// Student batch.
    pub batch: usize,
    /// Score on the first N test images only.
    pub limit_test: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Backend.
    pub device: DeviceKind,
}

impl DemoConfig {
    /// The shipped demo on `data`.
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            teacher_epochs: 5,
            budget: 50_000,
            edge_fraction: 0.1,
            gan_epochs: 52,
            generator_width: 16,
            gan_queries: 8_000,
            mekd_pool: 40_000,
            epochs: 24,
            steps: 100,
            batch: 64,
            limit_test: None,
            seed: 0,
            device: DeviceKind::Flex,
        }
    }

    /// A configuration small enough for the end-to-end test (a few hundred images, one or two
    /// epochs of each stage).
    pub fn tiny(data: PathBuf) -> Self {
        Self {
            teacher_epochs: 1,
            budget: 2_500,
            edge_fraction: 0.1,
            gan_epochs: 6,
            generator_width: 16,
            gan_queries: 600,
            mekd_pool: 1_500,
            epochs: 2,
            steps: 100,
            limit_test: Some(500),
            ..Self::new(data)
        }
    }

    /// The same demo at another budget: deprivatization gets 16% of it and MEKD's pool 80%
    /// (the defaults' split of their budget).
    pub fn with_budget(self, budget: u64) -> Self {
        Self { budget, gan_queries: budget * 4 / 25, mekd_pool: (budget * 4 / 5) as usize, ..self }
    }

    /// Reject settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.teacher_epochs > 0 && self.gan_epochs > 0 && self.epochs > 0, "epochs must be >= 1");
        anyhow::ensure!(self.mekd_pool > 0, "a budget of {} leaves MEKD no distillation pool", self.budget);
        anyhow::ensure!(
            self.gan_queries + self.mekd_pool as u64 <= self.budget,
            "MEKD's deprivatization queries ({}) plus its pool ({}) exceed the budget ({})",
            self.gan_queries,
            self.mekd_pool,
            self.budget
        );
        Ok(())
    }

    fn teacher_config(&self) -> TrainConfig {
        TrainConfig {
            seed: self.seed,
            device: self.device,
            limit_test: self.limit_test,
            ..TrainConfig::reference(Architecture::LeNet5, self.data.clone(), self.teacher_epochs)
        }
    }

    fn run_config(&self, method: Method) -> RunConfig {
        RunConfig {
            method,
            // A stable label (the port changes between runs, and a resumed run must match).
            teacher: "demo teacher (HTTP on loopback, soft)".into(),
            data: self.data.clone(),
            edge_fraction: self.edge_fraction,
            student: Architecture::LeNet5Half,
            gan: GanConfig {
                epochs: self.gan_epochs,
                generator_width: self.generator_width,
                im_weight: ImWeight::MaxResponse,
                im_queries: Some(self.gan_queries),
                seed: self.seed,
                ..GanConfig::default()
            },
            distill: DistillConfig {
                epochs: self.epochs,
                steps_per_epoch: (method == Method::Mekd).then_some(self.steps),
                batch: self.batch,
                // One decay, three quarters in: short runs need the high rate longest.
                sgd: Sgd { milestones: vec![(self.epochs * 3).div_ceil(4)], ..Sgd::reference(self.epochs) },
                queries: QueryMode::Budget(match method {
                    Method::Mekd => self.mekd_pool,
                    _ => self.budget as usize,
                }),
                seed: self.seed,
                ..DistillConfig::default()
            },
            device: self.device,
            response: Some(ResponseMode::Soft),
            limit_test: self.limit_test,
            seed: self.seed,
        }
    }
}

/// One model's line of the demo's table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelLine {
    /// Top-1 accuracy on the test slice (percent).
    pub accuracy: f64,
    /// Top-1 agreement with the served teacher on the test slice (percent; 100 for the teacher).
    pub agreement: f64,
    /// Trainable parameters.
    pub params: u64,
    /// ONNX file size.
    pub model_bytes: u64,
    /// Median latency of one image (ms): tract on this CPU for students, the HTTP round trip
    /// for the teacher.
    pub latency_ms: f64,
    /// Teacher queries used.
    pub queries: u64,
    /// Bytes sent to the teacher.
    pub bytes_up: u64,
    /// Bytes received from the teacher.
    pub bytes_down: u64,
}

/// `summary.json` of the demo.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DemoSummary {
    /// The served teacher.
    pub teacher: ModelLine,
    /// The MEKD student.
    pub mekd: ModelLine,
    /// The KD student.
    pub kd: ModelLine,
    /// Queries each method could make.
    pub budget: u64,
    /// Queries the server counted, per method key.
    pub server_queries: ServerCounts,
    /// Wall time of this invocation (s).
    pub wall_s: f64,
    /// The settings.
    pub config: DemoConfig,
    /// What fixed the rounding of the CPU training on this machine (`crate::numerics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<CpuNumerics>,
}

/// The server's own counts (they must equal the clients').
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServerCounts {
    /// MEKD's key.
    pub mekd: u64,
    /// KD's key.
    pub kd: u64,
}

const KEYS: [&str; 3] = ["demo-mekd", "demo-kd", "demo-bench"];

/// Run the demo into `out`.
pub fn run_demo(out: &Path, config: &DemoConfig) -> Result<DemoSummary> {
    let started = Instant::now();
    config.validate()?;
    let run = RunDir::create(out)?;
    let saved = run.file("demo-config.json");
    if saved.exists() {
        let previous: DemoConfig = run.read_json("demo-config.json")?;
        anyhow::ensure!(
            previous == *config,
            "{} holds a demo with other settings; choose another --out",
            out.display()
        );
        eprintln!("continuing the demo in {}", out.display());
    } else {
        run.write_json("demo-config.json", config)?;
    }

    // 1. The cloud: a LeNet-5 teacher, exported to ONNX.
    eprintln!("[1/5] training the cloud teacher (LeNet-5) on {}", config.data.display());
    let teacher_dir = run.file("teacher");
    let teacher: TrainSummary = if teacher_dir.join("summary.json").exists() {
        RunDir::open(&teacher_dir)?.read_json("summary.json")?
    } else {
        train(&teacher_dir, &config.teacher_config(), teacher_dir.join("config.json").exists())?
    };

    // 2. Serve it: soft answers, one key per client, the budget per key.
    let server_dir = run.file("server");
    std::fs::create_dir_all(&server_dir)?;
    let keys = server_dir.join("keys.txt");
    if !keys.exists() {
        // The methods' keys get the budget; the benchmark's key (the teacher's accuracy and
        // agreement on the test slice) is not a distillation cost.
        write_atomic(&keys, format!("{}\n{}\n{} unlimited\n", KEYS[0], KEYS[1], KEYS[2]).as_bytes())?;
    }
    let mut serve = ServeConfig::new(teacher.onnx.clone(), "127.0.0.1:0", ResponseMode::Soft, keys);
    serve.budget = Some(config.budget);
    let server = start(&serve).context("starting the teacher server")?;
    let url = server.url();
    eprintln!("[2/5] teacher served at {url} (soft answers, {} queries per key)", config.budget);

    // 3. MEKD and KD through the API.
    let mut summaries = Vec::new();
    for (step, method, key) in [("3/5", Method::Mekd, KEYS[0]), ("4/5", Method::Kd, KEYS[1])] {
        let dir = run.file(method.name());
        eprintln!("[{step}] distilling a LeNet-5-half student with {method} through the API");
        let summary: RunSummary = if dir.join("summary.json").exists() {
            RunDir::open(&dir)?.read_json("summary.json")?
        } else {
            let mut client = HttpTeacher::connect(&url, key, Some(config.budget))?;
            run_method(&dir, &config.run_config(method), &mut client, dir.join("config.json").exists())?
        };
        summaries.push(summary);
    }
    let (mekd, kd) = (&summaries[0], &summaries[1]);

    // 4. The edge runtime on both students, against the served teacher.
    eprintln!("[5/5] benchmarking the students with tract against the served teacher");
    let test = Dataset::load(&config.data, Split::Test)?.take(config.limit_test.unwrap_or(usize::MAX));
    let options =
        BenchOptions { warmup: 10, iterations: 200, batch: 64, teacher_rtt_queries: 30, ..BenchOptions::default() };
    let source = TeacherSource::Http { url: url.clone(), client: Box::new(HttpClient::new(&url, KEYS[2])?) };
    let bench = |summary: &RunSummary| -> Result<BenchReport> {
        let report = mekd_runtime::bench::run(&summary.onnx, &test, None, &options, Some(&source))
            .with_context(|| format!("benchmarking {}", summary.onnx.display()))?;
        Ok(report)
    };
    let (mekd_bench, kd_bench) = (bench(mekd)?, bench(kd)?);
    run.write_json("bench-mekd.json", &mekd_bench)?;
    run.write_json("bench-kd.json", &kd_bench)?;
    // What the server counted for each method's key, asked as any client would (`/v1/usage`).
    let count = |key: &str| -> Result<u64> {
        let usage = HttpClient::new(&url, key)?.usage().context("asking the server for a key's usage")?;
        Ok(usage.used)
    };
    let server_queries = ServerCounts { mekd: count(KEYS[0])?, kd: count(KEYS[1])? };
    server.shutdown()?;

    // The report: table, curves, the board's screen.
    let runs = report::collect_runs(&[run.file("mekd"), run.file("kd")])?;
    let rows = report::aggregate(&runs);
    write_atomic(&run.file("report.md"), report::markdown(&rows).as_bytes())?;
    run.write_json("report.json", &rows)?;
    write_atomic(&run.file("accuracy.svg"), report::accuracy_svg(&rows, &runs).as_bytes())?;
    write_atomic(&run.file("screen.png"), &Screen::from_report(&mekd_bench).render().to_png(4))?;

    let teacher_report = mekd_bench.teacher.as_ref().context("the benchmark had no teacher")?;
    let teacher_onnx = std::fs::metadata(&teacher.onnx)?.len();
    let (teacher_info, _) = mekd_runtime::engine::inspect(&teacher.onnx)?;
    let line = |summary: &RunSummary, bench: &BenchReport| ModelLine {
        accuracy: bench.accuracy,
        agreement: bench.teacher.as_ref().map_or(0.0, |t| t.agreement),
        params: bench.params,
        model_bytes: bench.model_bytes,
        latency_ms: bench.latency_ms.p50,
        queries: summary.queries,
        bytes_up: summary.bytes_up,
        bytes_down: summary.bytes_down,
    };
    let summary = DemoSummary {
        teacher: ModelLine {
            accuracy: teacher_report.accuracy,
            agreement: 100.0,
            params: teacher_info.params,
            model_bytes: teacher_onnx,
            latency_ms: teacher_report.rtt_ms.p50,
            queries: 0,
            bytes_up: 0,
            bytes_down: 0,
        },
        mekd: line(mekd, &mekd_bench),
        kd: line(kd, &kd_bench),
        budget: config.budget,
        server_queries,
        wall_s: started.elapsed().as_secs_f64(),
        config: config.clone(),
        numerics: CpuNumerics::for_device(config.device),
    };
    run.write_json("summary.json", &summary)?;
    Ok(summary)
}

/// The summary as a short table.
pub fn table(summary: &DemoSummary) -> String {
    let mut out = format!(
        "{:<22} {:>9} {:>10} {:>8} {:>10} {:>11} {:>8} {:>9} {:>9}\n",
        "model", "accuracy", "agreement", "params", "ONNX KB", "latency ms", "queries", "MB up", "MB down"
    );
    for (name, line) in [
        ("teacher LeNet-5 (API)", &summary.teacher),
        ("MEKD LeNet-5-half", &summary.mekd),
        ("KD LeNet-5-half", &summary.kd),
    ] {
        out.push_str(&format!(
            "{:<22} {:>8.2}% {:>9.2}% {:>8} {:>10.1} {:>11.3} {:>8} {:>9.2} {:>9.2}\n",
            name,
            line.accuracy,
            line.agreement,
            line.params,
            line.model_bytes as f64 / 1024.0,
            line.latency_ms,
            line.queries,
            line.bytes_up as f64 / 1e6,
            line.bytes_down as f64 / 1e6
        ));
    }
    out.push_str(&format!(
        "budget {} queries per method; the server counted {} (MEKD) and {} (KD); {:.0} s\n",
        summary.budget, summary.server_queries.mekd, summary.server_queries.kd, summary.wall_s
    ));
    if let Some(numerics) = &summary.numerics {
        // The README's numbers come from one machine: say what fixes the rounding on this one.
        out.push_str(&format!("CPU numerics (results match another machine's only where these do): {numerics}\n"));
    }
    out
}
