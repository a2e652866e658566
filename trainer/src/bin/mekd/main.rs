//! `mekd`: train a teacher, serve it as a black box, distill a student, export it. One module
//! per group of commands; this file parses the command line and dispatches.

/// What every `--device` flag takes (a macro, so that `concat!` can extend it).
macro_rules! device_help {
    () => {
        "Backend: flex (CPU, the default), ndarray, wgpu[:N] (the N-th discrete GPU; feature `wgpu`), \
         wgpu:cpu (software Vulkan) or cuda[:N] (the N-th NVIDIA GPU, TF32 tensor cores, each training \
         step replayed as a CUDA graph unless MEKD_NO_GRAPHS=1; feature `cuda`)"
    };
}

mod checks;
mod demo;
mod distill;
mod experiment;
mod models;
mod report;
mod teacher;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `--ort-library`: where ONNX Runtime is, for the commands that load it.
#[derive(clap::Args)]
struct OrtArgs {
    /// The ONNX Runtime library [default: $ORT_DYLIB_PATH, .cache/onnxruntime/, python onnxruntime].
    #[arg(long = "ort-library", alias = "ort-lib")]
    path: Option<PathBuf>,
}

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
    Zoo(models::ZooArgs),
    /// Export a zoo classifier to ONNX (with metadata), verified with tract before it is written.
    Export(models::ExportArgs),
    /// The whole path on the embedded MNIST slice, in one command: train a LeNet-5 teacher,
    /// serve it on loopback (soft answers, API keys, a query budget), distill a LeNet-5-half
    /// student with MEKD and with KD at the same budget through the API, benchmark both with
    /// tract against the served teacher, and write the report and summary.json. Re-running with
    /// the same --out continues an interrupted demo.
    Demo(demo::DemoArgs),
    /// Time one training step of each stage on a device: teacher training (ResNet32, b128),
    /// deprivatization (DCGAN + IM query, b64), MEKD distillation (ResNet32 teacher in-process,
    /// ResNet8 student, b128) and, with --http, the same against the teacher served over HTTP on
    /// loopback. Reports warm-up apart from the steady-state median and spread.
    BenchTrain(checks::BenchTrainArgs),
    /// Check that a training backend computes distillation's numbers right: the generator, the
    /// MEKD loss and its gradients (hand VJP and autodiff), the GAN's BCE gradient, compared
    /// with the CPU reference backend (flex). Exits with an error on any mismatch.
    SelfTest(checks::SelfTestArgs),
    /// Compare tract (the board's engine; with this project's direct convolutions and with its
    /// own) with ONNX Runtime on the same ONNX files and inputs, one thread each.
    BenchEngines(checks::BenchEnginesArgs),
    /// Distill a student from a black-box teacher with MEKD (deprivatization on the unlabeled
    /// edge subset, then logit alignment through the frozen generator) or a baseline (KD, ML,
    /// DKD, KN on real edge images; scratch on true labels); exports the student to ONNX
    /// (verified with tract). Writes config.json, queries.journal, usage.json, gan.jsonl,
    /// samples/, generator.bpk, transfer.pool, metrics.jsonl, checkpoints/, student.onnx and
    /// summary.json into --out; `--resume` continues an interrupted run.
    Distill(Box<distill::DistillArgs>),
    /// Run an experiment schedule (a TOML file, see experiments/): train its teacher once, then
    /// every run and seed as its own `mekd distill` (in parallel with --jobs; finished runs are
    /// kept, interrupted ones resumed when run again), then write the report.
    Experiment(experiment::ExperimentArgs),
    /// Compare finished `mekd distill` runs: a table (markdown and JSON; mean and spread over
    /// seeds; queries; bytes) and the test accuracy per epoch (SVG). Directories are searched
    /// for runs three levels deep.
    Report(report::ReportArgs),
    /// The cloud side: train a teacher on labeled data, serve it, measure the server.
    Teacher {
        #[command(subcommand)]
        command: teacher::TeacherCommand,
    },
}

fn main() {
    mekd_trainer::allocator::keep_freed_memory();
    let result = match Cli::parse().command {
        Command::Zoo(args) => args.run(),
        Command::Export(args) => args.run(),
        Command::Demo(args) => args.run(),
        Command::BenchTrain(args) => args.run(),
        Command::SelfTest(args) => args.run(),
        Command::BenchEngines(args) => args.run(),
        Command::Distill(args) => args.run(),
        Command::Experiment(args) => args.run(),
        Command::Report(args) => args.run(),
        Command::Teacher { command } => command.run(),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
