//! `mekd-edge`: run and measure an ONNX student on the board.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mekd_contract::{Normalisation, to_model_input};
use mekd_runtime::bench::{BenchOptions, BenchReport, TeacherSource};
use mekd_runtime::cli::{HttpTeacherArgs, NormArgs};
use mekd_runtime::data::decode_image;
use mekd_runtime::data::preprocess::convert_image;
use mekd_runtime::display::Screen;
use mekd_runtime::engine::{Engine, argmax_rows, inspect};
use mekd_runtime::runner::EngineKind;
use mekd_runtime::{Dataset, Split};

/// The edge side of MEKD: load an ONNX classifier with tract and measure it.
#[derive(Parser)]
#[command(name = "mekd-edge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what an ONNX classifier says about itself (shape, classes, normalisation).
    Info {
        /// The ONNX model.
        #[arg(long)]
        model: PathBuf,
        /// Also list the operators of the graph tract optimised for batch 1.
        #[arg(long)]
        ops: bool,
    },
    /// Measure a model: load time, batch-1 latency p50/p90/p99, throughput, peak memory, size,
    /// accuracy, and against a teacher (HTTP API or local ONNX): its accuracy, the agreement
    /// and the round trip per query.
    Bench(Box<BenchArgs>),
    /// Classify image files (PNG/JPEG): prints the top class and its softmax score per file.
    Classify {
        /// The ONNX model.
        #[arg(long)]
        model: PathBuf,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        norm: NormArgs,
    },
    /// Top-1 accuracy of a model on a labeled dataset.
    Eval {
        #[command(flatten)]
        on: ModelOnData,
        #[command(flatten)]
        norm: NormArgs,
        /// Batch size for inference.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A model and the labeled data to run it on.
#[derive(clap::Args)]
struct ModelOnData {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Labeled data: IDX folder, CIFAR-10 batches, image folders or .tar.gz.
    #[arg(long)]
    data: PathBuf,
    /// Split to use.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Use only the first N images.
    #[arg(long)]
    limit: Option<usize>,
}

impl ModelOnData {
    /// The data's split, cut to --limit.
    fn dataset(&self) -> Result<Dataset> {
        let data = Dataset::load(&self.data, self.split).with_context(|| format!("reading {}", self.data.display()))?;
        Ok(data.take(self.limit.unwrap_or(usize::MAX)))
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    on: ModelOnData,
    #[command(flatten)]
    teacher: HttpTeacherArgs,
    /// A local ONNX teacher instead of one over HTTP (run with tract here, the board's engine).
    #[arg(long, group = "teacher_source")]
    teacher_onnx: Option<PathBuf>,
    #[command(flatten)]
    norm: NormArgs,
    /// Timed batch-1 runs.
    #[arg(long, default_value_t = BenchOptions::default().iterations)]
    iterations: usize,
    /// Batch size of the throughput run.
    #[arg(long, default_value_t = BenchOptions::default().batch)]
    batch: usize,
    /// The engine that runs the student: tract (pure Rust, the default) or ONNX Runtime
    /// (`ort`: a binary built with `--features ort`, and libonnxruntime.so from the PyPI
    /// `onnxruntime` wheel, found in .cache/onnxruntime/, the python3 package or ORT_DYLIB_PATH).
    #[arg(long, value_enum, default_value_t = EngineKind::default())]
    engine: EngineKind,
    /// Also measure batch-1 throughput on this many threads at once, each with its own run
    /// state over one loaded model (--iterations runs each): images/s over the board's cores.
    /// Batch-1 latency is always measured on one thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
    /// Draw the results screen (128x64) into this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Also draw it on an SSD1306 OLED at this I2C device (e.g. /dev/i2c-1).
    #[cfg(feature = "ssd1306")]
    #[arg(long)]
    oled: Option<String>,
    /// Print the CPU features and the kernels the plan runs (the direct convolutions and the
    /// matrix-multiply kernels tract selected).
    #[arg(long, short)]
    verbose: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model, ops } => {
            let (info, _) = inspect(&model)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            if ops {
                let engine = Engine::load(&model, 1)?;
                for node in engine.plan().model().nodes() {
                    println!("{:>4} {:<28} {}", node.id, node.op.name(), node.name);
                }
            }
            Ok(())
        }
        Command::Bench(args) => bench(*args),
        Command::Classify { model, images, norm } => {
            let mut engine = Engine::load(&model, 1)?;
            let info = engine.info().clone();
            let [c, h, w] = info.input_shape;
            let norm = Normalisation::choose(norm.get(), info.normalisation.as_ref(), c, &model)?;
            for path in images {
                let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let (pixels, shape) = decode_image(&path, &bytes)?;
                let pixels = convert_image(&pixels, shape, [c, h, w])?;
                let logits = engine.run(&to_model_input(&pixels, [c, h, w], &norm))?;
                let max = logits.iter().copied().fold(f32::MIN, f32::max);
                let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                let best = argmax_rows(&logits, info.num_classes)[0];
                let name =
                    info.class_names.as_ref().and_then(|n| n.get(best).cloned()).unwrap_or_else(|| best.to_string());
                println!("{}\t{name}\t{:.4}", path.display(), exp[best] / sum);
            }
            Ok(())
        }
        Command::Eval { on, norm, batch, json } => {
            let mut engine = Engine::load(&on.model, batch)?;
            let info = engine.info().clone();
            let [c, h, w] = info.input_shape;
            let norm = Normalisation::choose(norm.get(), info.normalisation.as_ref(), c, &on.model)?;
            let dataset = on.dataset()?.prepare(c, h.max(w))?;
            if dataset.shape != [c, h, w] {
                bail!("model input {h}x{w} is not square; resize is to squares only");
            }
            let input = to_model_input(&dataset.pixels, dataset.shape, &norm);
            let logits = engine.run_many(&input)?;
            let predictions = argmax_rows(&logits, info.num_classes);
            let correct = dataset.correct(&predictions);
            let accuracy = 100.0 * correct as f64 / dataset.len() as f64;
            if json {
                println!("{}", serde_json::json!({"accuracy": accuracy, "images": dataset.len(), "correct": correct}));
            } else {
                println!("accuracy {accuracy:.2}% ({correct}/{} images)", dataset.len());
            }
            Ok(())
        }
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    let teacher = match (args.teacher.client()?, &args.teacher_onnx) {
        (Some(client), _) => Some(TeacherSource::Http {
            url: args.teacher.teacher.clone().unwrap_or_default(),
            client: Box::new(client),
        }),
        (None, Some(path)) => Some(TeacherSource::Onnx { path: path.clone(), norm: None }),
        (None, None) => None,
    };
    let data = args.on.dataset()?;
    let options = BenchOptions {
        iterations: args.iterations.max(1),
        batch: args.batch.max(1),
        engine: args.engine,
        threads: usize::from(args.threads),
        ..BenchOptions::default()
    };
    let norm = args.norm.get();
    let report = mekd_runtime::bench::run(&args.on.model, &data, norm, &options, teacher.as_ref())?;
    let screen = Screen::from_report(&report);
    if let Some(png) = &args.png {
        mekd_runtime::fsutil::write_atomic(png, &screen.render().to_png(4))
            .with_context(|| format!("writing {}", png.display()))?;
    }
    #[cfg(feature = "ssd1306")]
    if let Some(device) = &args.oled {
        mekd_runtime::display::show_on_ssd1306(&screen, device).map_err(anyhow::Error::msg)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.verbose);
    }
    Ok(())
}

fn print_report(r: &BenchReport, verbose: bool) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("model          {} ({})", r.model, r.architecture.as_deref().unwrap_or("no metadata"));
    println!("engine         {}", r.engine);
    println!("size           {:.1} KiB, {} weights", r.model_bytes as f64 / 1024.0, r.params);
    println!("load+optimise  {:.1} ms (batch 1), {:.1} ms (batch {})", r.load_ms, r.batch_load_ms, r.throughput_batch);
    println!(
        "latency b=1    p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  ({} runs)",
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.samples
    );
    println!("throughput     {:.0} images/s at batch {}", r.throughput_ips, r.throughput_batch);
    if let Some(p) = &r.parallel {
        println!(
            "parallel       {:.0} images/s on {} threads at batch 1 (p50 {:.3} ms, p99 {:.3} ms per run; {} runs)",
            p.throughput_ips, p.threads, p.latency_ms.p50, p.latency_ms.p99, p.runs
        );
    }
    if let Some(rss) = r.peak_rss_bytes {
        println!("peak memory    {:.1} MiB resident", mib(rss));
    }
    println!("accuracy       {:.2}% on {} images", r.accuracy, r.images);
    if let Some(t) = &r.teacher {
        println!(
            "teacher        {:.2}% accuracy, agreement {:.2}%, round trip p50 {:.3} ms ({} queries)",
            t.accuracy, t.agreement, t.rtt_ms.p50, t.queries
        );
    }
    if verbose {
        println!("cpu            {}", r.isa);
        println!("kernels        {}", r.kernels.join(", "));
        if let Some(execution) = &r.batch_execution {
            println!("batch {:<8} {execution}", r.throughput_batch);
        }
    }
}
