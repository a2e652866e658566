//! `mekd distill`: one student from a black-box teacher, with MEKD or a baseline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mekd_contract::protocol::ResponseMode;
use mekd_runtime::cli::HttpTeacherArgs;
use mekd_runtime::teacher_client::RetryPolicy;
use mekd_trainer::blackbox::{BurnTeacher, HttpTeacher, OnnxTeacher, Teacher};
use mekd_trainer::device::DeviceKind;
use mekd_trainer::methods::Method;
use mekd_trainer::methods::config::{DistillConfig, QueryMode};
use mekd_trainer::methods::deprivatize::GanConfig;
use mekd_trainer::methods::losses::{ImWeight, ImageDistance};
use mekd_trainer::methods::run::{RunConfig, run_method};
use mekd_trainer::rundir::read_json_file;
use mekd_trainer::schedule::{Sgd, default_milestones};

#[derive(clap::Args)]
pub struct DistillArgs {
    /// Method: mekd, or a baseline (kd, ml, dkd, kn, scratch).
    #[arg(long, value_enum, default_value_t = Method::Mekd)]
    method: Method,
    #[command(flatten)]
    teacher: HttpTeacherArgs,
    /// How long a query to --teacher that failed in transport or found the server unavailable
    /// (e.g. while it restarts) may be sent again (0: never). It goes under the same idempotency
    /// key, so it is never charged twice; a resumed run's queries carry the keys of the
    /// interrupted run.
    #[arg(long, default_value_t = mekd_runtime::teacher_client::DEFAULT_RETRY_DEADLINE.as_secs())]
    retry_secs: u64,
    /// A local ONNX teacher instead of one over HTTP (run with ONNX Runtime, as the server would).
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
    #[arg(long, default_value = mekd_runtime::data::EMBEDDED_DATA)]
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
    /// Deprivatization epochs.
    #[arg(long, default_value_t = GanConfig::default().epochs)]
    gan_epochs: usize,
    /// Deprivatization batch size.
    #[arg(long, default_value_t = GanConfig::default().batch)]
    gan_batch: usize,
    /// Adam learning rate of both GAN networks.
    #[arg(long, default_value_t = GanConfig::default().lr)]
    gan_lr: f64,
    /// Generator width (narrower is much cheaper on CPU).
    #[arg(long, default_value_t = GanConfig::default().generator_width)]
    generator_width: usize,
    /// Discriminator width.
    #[arg(long, default_value_t = GanConfig::default().discriminator_width)]
    discriminator_width: usize,
    /// IM weight: the paper's `max-response` or the reference code's `class-index`.
    #[arg(long, value_enum, default_value_t = GanConfig::default().im_weight)]
    im_weight: ImWeight,
    /// Weight of the IM term.
    #[arg(long, default_value_t = GanConfig::default().alpha)]
    alpha: f64,
    /// Cap on deprivatization's teacher queries: the IM term then runs on every k-th generator
    /// step only, spread over the run (default: every step asks, as the reference).
    #[arg(long)]
    gan_queries: Option<u64>,
    /// Distillation epochs.
    #[arg(long, default_value_t = DistillConfig::default().epochs)]
    epochs: usize,
    /// Steps per student epoch [default: the reference's schedule: 500 for MEKD, one pass over
    /// the transfer set for the baselines (e.g. 47 steps of 128 for 6,000 edge images)].
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = DistillConfig::default().batch)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = DistillConfig::default().sgd.lr)]
    lr: f64,
    /// 0-based epochs where the rate drops x0.1 [default: 1/3 and 2/3 of --epochs].
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// KL temperature.
    #[arg(long, default_value_t = DistillConfig::default().tau)]
    tau: f64,
    /// Temperature of the logits fed to the generator.
    #[arg(long, default_value_t = DistillConfig::default().tau_g)]
    tau_g: f64,
    /// Image-alignment weight.
    #[arg(long, default_value_t = DistillConfig::default().w_f)]
    w_f: f64,
    /// KL weight.
    #[arg(long, default_value_t = DistillConfig::default().w_kl)]
    w_kl: f64,
    /// Image distance.
    #[arg(long, value_enum, default_value_t = DistillConfig::default().distance)]
    distance: ImageDistance,
    /// Budgeted mode. MEKD: a fixed pool of this many synthetic images, each queried once
    /// (default: fresh queries every step, as the reference). Baselines: at most this many edge
    /// images in the transfer set (default: all). Deprivatization queries come on top; cap the
    /// whole run with --max-queries.
    #[arg(long)]
    budget: Option<usize>,
    /// DKD: weight of the target-class term.
    #[arg(long, default_value_t = DistillConfig::default().dkd_alpha)]
    dkd_alpha: f64,
    /// DKD: weight of the non-target term.
    #[arg(long, default_value_t = DistillConfig::default().dkd_beta)]
    dkd_beta: f64,
    /// KN: fraction of the edge images in the one-shot transfer set.
    #[arg(long, default_value_t = DistillConfig::default().kn_fraction)]
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
    #[arg(long, default_value_t = DistillConfig::default().seed)]
    seed: u64,
    #[arg(
        long,
        help = concat!(
            device_help!(),
            ". With --resume or --config: the saved run's device unless given (a resumed run may continue on another device)"
        )
    )]
    device: Option<DeviceKind>,
}

impl DistillArgs {
    pub fn run(self: Box<Self>) -> Result<()> {
        let args = *self;
        // Settings from a file: --config, or the run's own config.json when resuming.
        let saved: Option<RunConfig> = match (&args.config, args.resume) {
            (Some(path), _) => Some(read_json_file(path)?),
            (None, true) => Some(read_json_file(&args.out.join("config.json")).context("--resume")?),
            (None, false) => None,
        };
        let device_kind = args.device.or(saved.as_ref().map(|config| config.device)).unwrap_or_default();
        let device = device_kind.device()?;
        let (mut teacher, where_): (Box<dyn Teacher>, String) =
            match (args.teacher.client()?, &args.teacher_onnx, &args.teacher_run) {
                (Some(client), _, _) => {
                    let retry = RetryPolicy { deadline: Duration::from_secs(args.retry_secs), ..Default::default() };
                    let teacher = HttpTeacher::from_client(client.with_retry(retry), args.max_queries)?;
                    (Box::new(teacher), args.teacher.teacher.clone().unwrap_or_default())
                }
                (_, Some(path), _) => (
                    Box::new(OnnxTeacher::open(path, args.response, None, args.max_queries)?),
                    path.display().to_string(),
                ),
                (_, _, Some(dir)) => (
                    Box::new(BurnTeacher::from_run(dir, &device, args.response, args.max_queries)?),
                    dir.display().to_string(),
                ),
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
                    sgd: Sgd {
                        lr: args.lr,
                        milestones: args.milestones.unwrap_or_else(|| default_milestones(args.epochs)),
                        ..Sgd::reference(args.epochs)
                    },
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
}
