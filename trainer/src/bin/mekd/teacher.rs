//! `mekd teacher train|serve|bench`: the cloud side.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use mekd_contract::protocol::ResponseMode;
use mekd_runtime::cli::NormArgs;
use mekd_trainer::device::DeviceKind;
use mekd_trainer::schedule::{
    REFERENCE_BATCH, REFERENCE_GAMMA, REFERENCE_LR, REFERENCE_MOMENTUM, REFERENCE_WEIGHT_DECAY, Sgd, default_milestones,
};
use mekd_trainer::teacher::server::{
    DEFAULT_MAX_BATCH, DEFAULT_MAX_CONNECTIONS, DEFAULT_MODEL_BATCH, DEFAULT_READ_TIMEOUT, DEFAULT_THREADS,
    ServeConfig, TlsFiles, serve,
};
use mekd_trainer::teacher::train::{TrainConfig, train};

#[derive(Subcommand)]
pub enum TeacherCommand {
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

impl TeacherCommand {
    pub fn run(self) -> Result<()> {
        match self {
            TeacherCommand::Train(args) => args.run(),
            TeacherCommand::Serve(args) => args.run(),
            TeacherCommand::Bench(args) => args.run(),
        }
    }
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Architecture (see `mekd zoo`).
    #[arg(long, default_value = "lenet5")]
    arch: String,
    /// Labeled dataset: IDX folder, CIFAR-10 batches, image folders or .tar.gz.
    #[arg(long, default_value = mekd_runtime::data::EMBEDDED_DATA)]
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
    #[arg(long, default_value_t = REFERENCE_BATCH)]
    batch: usize,
    /// Initial learning rate (SGD).
    #[arg(long, default_value_t = REFERENCE_LR)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = REFERENCE_MOMENTUM)]
    momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = REFERENCE_WEIGHT_DECAY)]
    weight_decay: f64,
    /// 0-based epochs where the rate is multiplied by --gamma [default: 1/3 and 2/3 of --epochs].
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// Learning-rate decay factor at each milestone.
    #[arg(long, default_value_t = REFERENCE_GAMMA)]
    gamma: f64,
    /// Seed of the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = DeviceKind::Flex, help = device_help!())]
    device: DeviceKind,
    /// Train on the first N training images only.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    limit_test: Option<usize>,
}

impl TrainArgs {
    fn run(self) -> Result<()> {
        let config = TrainConfig {
            arch: self.arch.parse()?,
            data: self.data,
            channels: self.channels,
            epochs: self.epochs,
            batch: self.batch,
            sgd: Sgd {
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                milestones: self.milestones.unwrap_or_else(|| default_milestones(self.epochs)),
                gamma: self.gamma,
            },
            seed: self.seed,
            device: self.device,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
        };
        let summary = train(&self.out, &config, self.resume)?;
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
}

#[derive(clap::Args)]
pub struct ServeArgs {
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
    #[command(flatten)]
    norm: NormArgs,
    /// Most images per request (413 above).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Most images per model call; concurrent requests are merged up to this.
    #[arg(long, default_value_t = DEFAULT_MODEL_BATCH)]
    model_batch: usize,
    /// HTTP worker threads.
    #[arg(long, default_value_t = DEFAULT_THREADS)]
    threads: usize,
    /// Most open connections; connections over the cap are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers, and then its body (slower clients
    /// are disconnected: 408 for a slow body).
    #[arg(long, default_value_t = DEFAULT_READ_TIMEOUT.as_secs())]
    read_timeout: u64,
    /// The model's name on the Open Inference Protocol (KServe v2) endpoints, which the server
    /// also answers (`/v2/models/NAME/infer`, same keys and budgets) [default: the model file's
    /// name without extension].
    #[arg(long)]
    model_name: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, the server's certificate first).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    ort_library: crate::OrtArgs,
}

impl ServeArgs {
    fn run(self) -> Result<()> {
        let mut config = ServeConfig::new(self.model, &self.listen, self.response, self.keys);
        config.budget = self.budget;
        config.usage_file = self.usage_file;
        config.normalisation = self.norm.get();
        config.max_batch = self.max_batch;
        config.model_batch = self.model_batch;
        config.threads = self.threads;
        config.max_connections = self.max_connections;
        config.read_timeout = std::time::Duration::from_secs(self.read_timeout);
        config.ort_library = self.ort_library.path;
        config.model_name = self.model_name;
        config.tls = self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles { cert, key });
        serve(&config)
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
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
    /// Hostile connections held open during every measurement (half send a request head one byte
    /// every 100 ms, half stay silent; both reconnect when the server closes them): the latency
    /// honest clients see under a slow-loris attack.
    #[arg(long, default_value_t = 0)]
    attackers: usize,
    #[command(flatten)]
    norm: NormArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn run(self) -> Result<()> {
        let rows = mekd_trainer::perf::server::run(
            &self.model,
            self.norm.get(),
            &self.batch,
            &self.clients,
            self.seconds,
            self.attackers,
        )?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!(
            "{:>6} {:>8} {:>9} {:>10} {:>12} {:>9} {:>9} {:>9}",
            "batch", "clients", "attackers", "requests", "images/s", "p50 ms", "p90 ms", "p99 ms"
        );
        for r in rows {
            println!(
                "{:>6} {:>8} {:>9} {:>10} {:>12.0} {:>9.3} {:>9.3} {:>9.3}",
                r.batch, r.clients, r.attackers, r.requests, r.images_per_s, r.p50_ms, r.p90_ms, r.p99_ms
            );
        }
        Ok(())
    }
}
