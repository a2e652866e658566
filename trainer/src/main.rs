//! `mekd`: train a teacher, serve it as a black box, distill a student, export it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, ClassifierSpec, zoo_entries};
use mekd_runtime::Normalisation;
use mekd_runtime::protocol::{API_KEY_ENV, ResponseMode};
use mekd_trainer::blackbox::{BurnTeacher, HttpTeacher, OnnxTeacher, Teacher};
use mekd_trainer::demo::{DemoConfig, run_demo};
use mekd_trainer::device::DeviceKind;
use mekd_trainer::export::export_verified;
use mekd_trainer::methods::Method;
use mekd_trainer::methods::deprivatize::GanConfig;
use mekd_trainer::methods::losses::{ImWeight, ImageDistance};
use mekd_trainer::methods::mekd::{DistillConfig, QueryMode};
use mekd_trainer::methods::run::{RunConfig, run_method};
use mekd_trainer::report;
use mekd_trainer::rundir::{RunDir, read_json_file};
use mekd_trainer::schedule::default_milestones;
use mekd_trainer::teacher::server::{DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, ServeConfig, serve};
use mekd_trainer::teacher::train::{TrainConfig, train};

/// Black-box knowledge distillation (MEKD) from a cloud teacher to an edge student.
#[derive(Parser)]
#[command(name = "mekd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every architecture of the model zoo with its parameter count and cost per image.
    Zoo {
        /// Input channels to size the networks for (1 = gray, 3 = RGB).
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Number of classes.
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Export a zoo classifier to ONNX (with metadata), verified with tract before it is written.
    Export {
        /// Architecture, e.g. `resnet8`, `lenet5-half` (see `mekd zoo`).
        #[arg(long)]
        arch: String,
        /// Burnpack checkpoint to load; without it the network gets fresh seeded weights.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Output ONNX file.
        #[arg(long)]
        out: PathBuf,
        /// Input channels.
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Number of classes.
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Seed for fresh weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Backend to build the model on: flex (CPU), ndarray, wgpu[:N] (N-th discrete GPU) or wgpu:cpu.
        #[arg(long, default_value_t = DeviceKind::Flex)]
        device: DeviceKind,
    },
    /// The whole path on the embedded MNIST slice, in one command: train a LeNet-5 teacher,
    /// serve it on loopback (soft answers, API keys, a query budget), distill a LeNet-5-half
    /// student with MEKD and with KD at the same budget through the API, benchmark both with
    /// tract against the served teacher, and write the report and summary.json. Re-running with
    /// the same --out continues an interrupted demo.
    Demo {
        /// Output directory.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Labeled dataset (its train split is the cloud's data and holds the edge subset).
        #[arg(long, default_value = "data/mnist-slice")]
        data: PathBuf,
        /// Queries each method may make [default: 50,000; MEKD spends 16% of it deprivatizing
        /// and 80% on its distillation pool].
        #[arg(long)]
        budget: Option<u64>,
        /// A tiny configuration (one to two minutes; what the end-to-end test runs).
        #[arg(long)]
        tiny: bool,
        /// Seed of every stage (weights, edge subset, batches, latents). Another seed is another
        /// sample of the demo's result: README and BENCHMARKS give the spread over seeds.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Backend: flex (CPU, default), ndarray, wgpu[:N] or wgpu:cpu.
        #[arg(long, default_value_t = DeviceKind::Flex)]
        device: DeviceKind,
    },
    /// Time one training step of each stage on a device: teacher training (ResNet32, b128),
    /// deprivatization (DCGAN + IM query, b64), MEKD distillation (ResNet32 teacher in-process,
    /// ResNet8 student, b128) and, with --http, the same against the teacher served over HTTP on
    /// loopback. Reports warm-up apart from the steady-state median and spread.
    BenchTrain {
        /// Backend: flex (CPU), ndarray, wgpu[:N] or wgpu:cpu.
        #[arg(long, default_value_t = DeviceKind::Flex)]
        device: DeviceKind,
        /// Unmeasured steps first (autotuning, compilation).
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Measured steps per stage.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Also time MEKD against the HTTP teacher on loopback (needs ONNX Runtime).
        #[arg(long)]
        http: bool,
        /// The ONNX Runtime library [default: $ORT_DYLIB_PATH, .cache/onnxruntime/, python onnxruntime].
        #[arg(long)]
        ort_library: Option<PathBuf>,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that a training backend computes distillation's numbers right: the generator, the
    /// MEKD loss and its gradients (hand VJP and autodiff), the GAN's BCE gradient, compared
    /// with the CPU reference backend (flex). Exits with an error on any mismatch.
    SelfTest {
        /// Backend under test: flex, ndarray, wgpu[:N] or wgpu:cpu.
        #[arg(long, default_value_t = DeviceKind::Flex)]
        device: DeviceKind,
        /// Print every value, not only the comparison.
        #[arg(long)]
        verbose: bool,
    },
    /// Compare tract (the board's engine) with ONNX Runtime on the same ONNX files and inputs.
    BenchEngines {
        /// ONNX classifiers to time.
        #[arg(long = "model", required = true)]
        models: Vec<PathBuf>,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        batch: Vec<usize>,
        /// Timed calls per engine and batch size.
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Distill a student from a black-box teacher with MEKD (deprivatization on the unlabeled
    /// edge subset, then logit alignment through the frozen generator) or a baseline (KD, ML,
    /// DKD, KN on real edge images; scratch on true labels); exports the student to ONNX
    /// (verified with tract). Writes config.json, usage.json, gan.jsonl, samples/,
    /// generator.bpk, transfer.pool, metrics.jsonl, checkpoints/, student.onnx and
    /// summary.json into --out; `--resume` continues an interrupted run.
    Distill(Box<DistillArgs>),
    /// Compare finished `mekd distill` runs: a table (markdown and JSON; mean and spread over
    /// seeds; queries; bytes) and the test accuracy per epoch (SVG). Directories are searched
    /// for runs three levels deep.
    Report {
        /// Run directories, or folders holding them.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Print the rows as a JSON array instead of the markdown table.
        #[arg(long)]
        json: bool,
        /// One row per run instead of one per method, response and budget (over seeds).
        #[arg(long)]
        per_run: bool,
        /// Also write report.md, report.json and accuracy.svg into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The cloud side: train a teacher on labeled data.
    Teacher {
        #[command(subcommand)]
        command: TeacherCommand,
    },
}

#[derive(clap::Args)]
struct DistillArgs {
    /// Method: mekd, or a baseline (kd, ml, dkd, kn, scratch).
    #[arg(long, value_enum, default_value_t = Method::Mekd)]
    method: Method,
    /// Teacher HTTP API base URL (`mekd teacher serve`).
    #[arg(long, group = "teacher_source")]
    teacher: Option<String>,
    /// API key for --teacher.
    #[arg(long, env = API_KEY_ENV, hide_env_values = true)]
    api_key: Option<String>,
    /// A local ONNX teacher (ONNX Runtime, no server).
    #[arg(long, group = "teacher_source")]
    teacher_onnx: Option<PathBuf>,
    /// A `mekd teacher train` run directory, run in-process with burn on --device.
    #[arg(long, group = "teacher_source")]
    teacher_run: Option<PathBuf>,
    /// Response mode of a local teacher (the HTTP server fixes its own).
    #[arg(long, value_enum, default_value_t = ResponseMode::Soft)]
    response: ResponseMode,
    /// Client-side cap on teacher queries; reaching it stops the run cleanly.
    #[arg(long)]
    max_queries: Option<u64>,
    /// Dataset: its training split provides the edge images (labels unused), its test split scores.
    #[arg(long, default_value = "data/mnist-slice")]
    data: PathBuf,
    /// Fraction of the training split held by the edge.
    #[arg(long, default_value_t = 0.1)]
    edge_fraction: f64,
    /// Student architecture.
    #[arg(long, default_value = "lenet5-half")]
    student: String,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    /// Deprivatization epochs (reference 200).
    #[arg(long, default_value_t = 200)]
    gan_epochs: usize,
    /// Deprivatization batch size.
    #[arg(long, default_value_t = 64)]
    gan_batch: usize,
    /// Adam learning rate of both GAN networks (reference 2e-4).
    #[arg(long, default_value_t = 2e-4)]
    gan_lr: f64,
    /// Generator width (reference 128; narrower is much cheaper on CPU).
    #[arg(long, default_value_t = 128)]
    generator_width: usize,
    /// Discriminator width (reference 16).
    #[arg(long, default_value_t = 16)]
    discriminator_width: usize,
    /// IM weight: the paper's `max-response` or the reference code's `class-index`.
    #[arg(long, value_enum, default_value_t = ImWeight::MaxResponse)]
    im_weight: ImWeight,
    /// Weight of the IM term.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Cap on deprivatization's teacher queries: the IM term then runs on every k-th generator
    /// step only, spread over the run (default: every step asks, as the reference).
    #[arg(long)]
    gan_queries: Option<u64>,
    /// Distillation epochs (reference 240).
    #[arg(long, default_value_t = 240)]
    epochs: usize,
    /// Steps per student epoch [default: the reference's schedule: 500 for MEKD, one pass over
    /// the transfer set for the baselines (e.g. 47 steps of 128 for 6,000 edge images)].
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// 0-based epochs where the rate drops x0.1 [default: 1/3 and 2/3 of --epochs].
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// KL temperature.
    #[arg(long, default_value_t = 5.0)]
    tau: f64,
    /// Temperature of the logits fed to the generator.
    #[arg(long, default_value_t = 5.0)]
    tau_g: f64,
    /// Image-alignment weight.
    #[arg(long, default_value_t = 1.0)]
    w_f: f64,
    /// KL weight.
    #[arg(long, default_value_t = 1.0)]
    w_kl: f64,
    /// Image distance.
    #[arg(long, value_enum, default_value_t = ImageDistance::L1)]
    distance: ImageDistance,
    /// Budgeted mode. MEKD: a fixed pool of this many synthetic images, each queried once
    /// (default: fresh queries every step, as the reference). Baselines: at most this many edge
    /// images in the transfer set (default: all). Deprivatization queries come on top; cap the
    /// whole run with --max-queries.
    #[arg(long)]
    budget: Option<usize>,
    /// DKD: weight of the target-class term.
    #[arg(long, default_value_t = 1.0)]
    dkd_alpha: f64,
    /// DKD: weight of the non-target term.
    #[arg(long, default_value_t = 8.0)]
    dkd_beta: f64,
    /// KN: fraction of the edge images in the one-shot transfer set.
    #[arg(long, default_value_t = 0.2)]
    kn_fraction: f64,
    /// Take every setting from this JSON file (a run's config.json) instead of the flags
    /// (the teacher, --out and --resume still come from the command line).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the interrupted run in --out with its saved settings (its config.json; other
    /// setting flags are ignored, --device may move it), reusing its checkpoints and cached
    /// teacher answers.
    #[arg(long)]
    resume: bool,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Seed (edge subset, noise, batch order, weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend: flex (CPU, the default), ndarray, wgpu[:N] (N-th discrete GPU; feature `wgpu`) or
    /// wgpu:cpu (software Vulkan). With --resume or --config: the saved run's device unless given
    /// (a resumed run may continue on another device).
    #[arg(long)]
    device: Option<DeviceKind>,
}

#[derive(Subcommand)]
enum TeacherCommand {
    /// Train a zoo classifier on a labeled dataset with the reference recipe, checkpoint every
    /// epoch, and export it to ONNX (verified with tract) as RUN_DIR/teacher.onnx.
    Train(TrainArgs),
    /// Serve an ONNX image classifier as a black box over HTTP (API keys, per-key query budget,
    /// size limits, soft or hard responses). Ctrl-C stops it gracefully, saving the counts.
    Serve(ServeArgs),
    /// Measure the server's query throughput on loopback (images/s per batch size and number
    /// of concurrent clients).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The ONNX classifier to serve.
    #[arg(long)]
    model: PathBuf,
    /// Images per request, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,128")]
    batch: Vec<usize>,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    clients: Vec<usize>,
    /// Seconds per configuration.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Per-channel mean for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "std")]
    mean: Option<Vec<f32>>,
    /// Per-channel std for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "mean")]
    std: Option<Vec<f32>>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The ONNX classifier (any producer; input [N, C, H, W] float32, output [N, classes]).
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// What each image gets back: `soft` (logits) or `hard` (top-1 class only).
    #[arg(long, value_enum, default_value_t = ResponseMode::Soft)]
    response: ResponseMode,
    /// File with one API key per line (`#` comments allowed).
    #[arg(long)]
    keys: PathBuf,
    /// Queries (images) each key may make in total; unlimited without it.
    #[arg(long)]
    budget: Option<u64>,
    /// Where per-key query counts persist across restarts [default: KEYS.usage.json].
    #[arg(long)]
    usage_file: Option<PathBuf>,
    /// Per-channel mean on pixels in [0, 1], for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "std")]
    mean: Option<Vec<f32>>,
    /// Per-channel std on pixels in [0, 1], for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "mean")]
    std: Option<Vec<f32>>,
    /// Most images per request (413 above).
    #[arg(long, default_value_t = 1024)]
    max_batch: usize,
    /// Most images per model call; concurrent requests are merged up to this.
    #[arg(long, default_value_t = 256)]
    model_batch: usize,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Most open connections; connections over the cap are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers, and then its body (slower clients
    /// are disconnected: 408 for a slow body).
    #[arg(long, default_value_t = DEFAULT_READ_TIMEOUT.as_secs())]
    read_timeout: u64,
    /// The ONNX Runtime library [default: $ORT_DYLIB_PATH, .cache/onnxruntime/, python onnxruntime].
    #[arg(long, alias = "ort-lib")]
    ort_library: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Architecture (see `mekd zoo`).
    #[arg(long, default_value = "lenet5")]
    arch: String,
    /// Labeled dataset: IDX folder, CIFAR-10 batches, image folders or .tar.gz.
    #[arg(long, default_value = "data/mnist-slice")]
    data: PathBuf,
    /// Run directory (config, metrics.jsonl, checkpoints, teacher.onnx, summary.json).
    #[arg(long)]
    out: PathBuf,
    /// Continue an interrupted run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Image channels for the network (data is converted: 1 = gray, 3 = RGB).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Epochs.
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Initial learning rate (SGD).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// 0-based epochs where the rate is multiplied by --gamma [default: 1/3 and 2/3 of --epochs].
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// Learning-rate decay factor at each milestone.
    #[arg(long, default_value_t = 0.1)]
    gamma: f64,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend: flex (CPU, default), ndarray, wgpu[:N] (N-th discrete GPU; feature `wgpu`) or wgpu:cpu (software Vulkan).
    #[arg(long, default_value_t = DeviceKind::Flex)]
    device: DeviceKind,
    /// Train on the first N training images only.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Zoo { channels, classes, json } => zoo(channels, classes, json),
        Command::Export { arch, checkpoint, out, channels, classes, seed, device } => {
            let architecture: Architecture = arch.parse()?;
            let spec = ClassifierSpec { architecture, in_channels: channels, num_classes: classes };
            spec.validate()?;
            let device = device.device()?;
            let model = match &checkpoint {
                Some(path) => {
                    spec.load(path, &device).with_context(|| format!("loading checkpoint {}", path.display()))?
                }
                None => {
                    device.seed(seed);
                    spec.init(&device)?
                }
            };
            let check = export_verified(&model, &spec, &ExportMetadata::symmetric(channels), &out)
                .with_context(|| format!("exporting {architecture} to {}", out.display()))?;
            println!(
                "wrote {} ({} bytes); tract agrees with burn: max |diff| {:.2e} on {} probe images",
                out.display(),
                check.bytes,
                check.agreement.max_abs_diff,
                check.probe_images
            );
            Ok(())
        }
        Command::Teacher { command: TeacherCommand::Train(args) } => teacher_train(args),
        Command::Distill(args) => distill_command(*args),
        Command::Report { dirs, json, per_run, out } => report_command(&dirs, json, per_run, out.as_deref()),
        Command::Demo { out, data, budget, tiny, seed, device } => {
            let mut config = if tiny { DemoConfig::tiny(data) } else { DemoConfig::new(data) };
            config.device = device;
            config.seed = seed;
            if let Some(budget) = budget {
                config = config.with_budget(budget);
            }
            let summary = run_demo(&out, &config)?;
            print!("{}", mekd_trainer::demo::table(&summary));
            println!("report: {}", out.join("report.md").display());
            Ok(())
        }
        Command::SelfTest { device, verbose } => {
            let checks = mekd_trainer::self_test::self_test(device)?;
            println!("{:<40} {:>12} {:>12}  result", "check (vs flex)", "worst |diff|", "its tolerance");
            for c in &checks {
                let verdict = if c.pass { "ok" } else { "MISMATCH" };
                println!("{:<40} {:>12.3e} {:>12.3e}  {verdict}", c.name, c.worst_diff, c.tolerance);
                if verbose || !c.pass {
                    let shown =
                        |v: &[f32]| format!("{:?}{}", &v[..v.len().min(12)], if v.len() > 12 { " ..." } else { "" });
                    println!(
                        "    flex: {}
    {device}: {}",
                        shown(&c.reference),
                        shown(&c.got)
                    );
                }
            }
            let failed = checks.iter().filter(|c| !c.pass).count();
            if failed > 0 {
                bail!("{failed} of {} checks differ between {device} and flex", checks.len());
            }
            println!("all {} checks agree with flex", checks.len());
            Ok(())
        }
        Command::BenchTrain { device, warmup, steps, http, ort_library, out } => {
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let config = mekd_trainer::bench_train::BenchTrainConfig { device, warmup, steps, http, ort_library };
            let rows = mekd_trainer::bench_train::bench_train(&config)?;
            let json = serde_json::to_string_pretty(&rows)?;
            if let Some(out) = out {
                mekd_runtime::fsutil::write_atomic(&out, json.as_bytes())?;
            }
            println!("{json}");
            Ok(())
        }
        Command::BenchEngines { models, batch, iterations, json } => {
            let mut rows = Vec::new();
            for model in &models {
                rows.extend(mekd_trainer::engines::compare(model, &batch, iterations.max(1))?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<32} {:>5} {:>12} {:>12} {:>12} {:>12} {:>7}",
                    "model", "batch", "tract p50", "tract p90", "ORT p50", "ORT p90", "ratio"
                );
                for r in rows {
                    println!(
                        "{:<32} {:>5} {:>9.4} ms {:>9.4} ms {:>9.4} ms {:>9.4} ms {:>7.2}",
                        r.model, r.batch, r.tract_ms.p50, r.tract_ms.p90, r.ort_ms.p50, r.ort_ms.p90, r.ratio
                    );
                }
            }
            Ok(())
        }
        Command::Teacher { command: TeacherCommand::Serve(args) } => {
            let mut config = ServeConfig::new(args.model, &args.listen, args.response, args.keys);
            config.budget = args.budget;
            config.usage_file = args.usage_file;
            config.normalisation = args.mean.zip(args.std).map(|(mean, std)| Normalisation { mean, std });
            config.max_batch = args.max_batch;
            config.model_batch = args.model_batch;
            config.threads = args.threads;
            config.max_connections = args.max_connections;
            config.read_timeout = std::time::Duration::from_secs(args.read_timeout);
            config.ort_library = args.ort_library;
            serve(&config)
        }
        Command::Teacher { command: TeacherCommand::Bench(args) } => {
            let norm = args.mean.zip(args.std).map(|(mean, std)| Normalisation { mean, std });
            let rows = mekd_trainer::teacher::bench::run(&args.model, norm, &args.batch, &args.clients, args.seconds)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>6} {:>8} {:>10} {:>12} {:>9} {:>9}",
                    "batch", "clients", "requests", "images/s", "p50 ms", "p90 ms"
                );
                for r in rows {
                    println!(
                        "{:>6} {:>8} {:>10} {:>12.0} {:>9.3} {:>9.3}",
                        r.batch, r.clients, r.requests, r.images_per_s, r.p50_ms, r.p90_ms
                    );
                }
            }
            Ok(())
        }
    }
}

fn teacher_train(args: TrainArgs) -> Result<()> {
    let config = TrainConfig {
        arch: args.arch.parse()?,
        data: args.data,
        channels: args.channels,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        milestones: args.milestones.unwrap_or_else(|| default_milestones(args.epochs)),
        gamma: args.gamma,
        seed: args.seed,
        device: args.device,
        limit_train: args.limit_train,
        limit_test: args.limit_test,
    };
    let summary = train(&args.out, &config, args.resume)?;
    println!(
        "teacher {}: test accuracy {:.2}% (best {:.2}%), exported to {} (tract max |diff| {:.1e})",
        config.arch,
        summary.final_acc,
        summary.best_acc,
        summary.onnx.display(),
        summary.export_max_abs_diff
    );
    Ok(())
}

fn distill_command(args: DistillArgs) -> Result<()> {
    // Settings from a file: --config, or the run's own config.json when resuming.
    let saved: Option<RunConfig> = match (&args.config, args.resume) {
        (Some(path), _) => Some(read_json_file(path)?),
        (None, true) => Some(read_json_file(&args.out.join("config.json")).context("--resume")?),
        (None, false) => None,
    };
    let device_kind = args.device.or(saved.as_ref().map(|config| config.device)).unwrap_or_default();
    let device = device_kind.device()?;
    let (mut teacher, where_): (Box<dyn Teacher>, String) = match (&args.teacher, &args.teacher_onnx, &args.teacher_run)
    {
        (Some(url), _, _) => {
            let key =
                args.api_key.clone().with_context(|| format!("--teacher needs --api-key KEY (or {API_KEY_ENV})"))?;
            (Box::new(HttpTeacher::connect(url, &key, args.max_queries)?), url.clone())
        }
        (_, Some(path), _) => {
            (Box::new(OnnxTeacher::open(path, args.response, None, args.max_queries)?), path.display().to_string())
        }
        (_, _, Some(dir)) => {
            (Box::new(BurnTeacher::from_run(dir, &device, args.response, args.max_queries)?), dir.display().to_string())
        }
        _ => bail!("give a teacher: --teacher URL, --teacher-onnx FILE or --teacher-run DIR"),
    };
    let config = if let Some(mut config) = saved {
        if args.config.is_some() {
            config.teacher = where_;
            config.response = Some(teacher.info().response);
        }
        config.device = device_kind;
        config
    } else {
        RunConfig {
            method: args.method,
            teacher: where_,
            data: args.data,
            edge_fraction: args.edge_fraction,
            student: args.student.parse()?,
            gan: GanConfig {
                epochs: args.gan_epochs,
                batch: args.gan_batch,
                lr: args.gan_lr,
                alpha: args.alpha,
                im_weight: args.im_weight,
                generator_width: args.generator_width,
                discriminator_width: args.discriminator_width,
                im_queries: args.gan_queries,
                seed: args.seed,
            },
            distill: DistillConfig {
                epochs: args.epochs,
                steps_per_epoch: args.steps,
                batch: args.batch,
                lr: args.lr,
                milestones: args.milestones.unwrap_or_else(|| default_milestones(args.epochs)),
                tau: args.tau,
                tau_g: args.tau_g,
                w_f: args.w_f,
                w_kl: args.w_kl,
                distance: args.distance,
                queries: args.budget.map_or(QueryMode::Fresh, QueryMode::Budget),
                dkd_alpha: args.dkd_alpha,
                dkd_beta: args.dkd_beta,
                kn_fraction: args.kn_fraction,
                seed: args.seed,
                ..DistillConfig::default()
            },
            device: device_kind,
            response: Some(teacher.info().response),
            limit_test: args.limit_test,
            seed: args.seed,
        }
    };
    config.validate()?;
    let summary = run_method(&args.out, &config, teacher.as_mut(), args.resume)?;
    println!(
        "{} student {}: test accuracy {:.2}% (best {:.2}%), {} teacher queries, {} bytes up, {} bytes down; {}",
        summary.method,
        summary.student,
        summary.final_acc,
        summary.best_acc,
        summary.queries,
        summary.bytes_up,
        summary.bytes_down,
        summary.onnx.display()
    );
    Ok(())
}

fn report_command(dirs: &[PathBuf], json: bool, per_run: bool, out: Option<&std::path::Path>) -> Result<()> {
    let runs = report::collect_runs(dirs)?;
    let rows = if per_run {
        runs.iter().flat_map(|run| report::aggregate(std::slice::from_ref(run))).collect()
    } else {
        report::aggregate(&runs)
    };
    if let Some(out) = out {
        let run = RunDir::create(out)?;
        mekd_runtime::fsutil::write_atomic(&run.file("report.md"), report::markdown(&rows).as_bytes())?;
        run.write_json("report.json", &rows)?;
        mekd_runtime::fsutil::write_atomic(&run.file("accuracy.svg"), report::accuracy_svg(&rows, &runs).as_bytes())?;
        eprintln!("wrote report.md, report.json and accuracy.svg to {}", out.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report::markdown(&rows));
    }
    Ok(())
}

fn zoo(channels: usize, classes: usize, json: bool) -> Result<()> {
    if channels == 0 || classes < 2 {
        bail!("need at least 1 channel and 2 classes");
    }
    let entries = zoo_entries(channels, classes, &DeviceKind::Flex.device()?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!("{channels} channel(s), {classes} classes, 32x32 input\n");
    println!("{:<14} {:<11} {:>12} {:>16} {:>16}", "name", "kind", "params", "MACs/image", "FLOPs/image");
    for e in &entries {
        println!(
            "{:<14} {:<11} {:>12} {:>16} {:>16}",
            e.name,
            e.kind,
            group(e.params as u64),
            group(e.macs),
            group(e.flops)
        );
    }
    Ok(())
}

/// `1234567` -> `1,234,567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
