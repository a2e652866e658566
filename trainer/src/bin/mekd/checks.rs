//! The measuring and checking commands: `mekd bench-train`, `mekd self-test`,
//! `mekd bench-engines`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use mekd_trainer::device::DeviceKind;
use mekd_trainer::perf::train_steps::{BenchTrainConfig, bench_train};
use mekd_trainer::self_test::Tolerance;

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = DeviceKind::Flex, help = device_help!())]
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
    /// Also time the teacher, GAN and MEKD steps recorded once as device graphs and replayed, as
    /// the training commands run them on `cuda` (where these rows are always timed, unless
    /// MEKD_NO_GRAPHS is set); on other backends the step runs again each time, and the row says so.
    #[arg(long)]
    graphs: bool,
    #[command(flatten)]
    ort_library: crate::OrtArgs,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl BenchTrainArgs {
    pub fn run(self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        let BenchTrainArgs { device, warmup, steps, http, graphs, ort_library, out } = self;
        let graphs = graphs || device.records_graphs();
        let config = BenchTrainConfig { device, warmup, steps, http, graphs, ort_library: ort_library.path };
        let rows = bench_train(&config)?;
        let json = serde_json::to_string_pretty(&rows)?;
        if let Some(out) = out {
            mekd_runtime::fsutil::write_atomic(&out, json.as_bytes())?;
        }
        println!("{json}");
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct SelfTestArgs {
    #[arg(long, default_value_t = DeviceKind::Flex, help = device_help!())]
    device: DeviceKind,
    /// Print every value, not only the comparison.
    #[arg(long)]
    verbose: bool,
}

impl SelfTestArgs {
    pub fn run(self) -> Result<()> {
        let device = self.device;
        let checks = mekd_trainer::self_test::self_test(device)?;
        let tolerance = Tolerance::of(device);
        println!(
            "tolerance: {} of each value plus {} of the check's largest{}",
            tolerance.relative,
            tolerance.of_largest,
            if tolerance == Tolerance::TF32 {
                " (TF32 tensor cores, as PyTorch's default for convolutions)"
            } else {
                ""
            }
        );
        println!("{:<40} {:>12} {:>12}  result", "check (vs flex)", "worst |diff|", "its tolerance");
        for c in &checks {
            let verdict = if c.pass { "ok" } else { "MISMATCH" };
            println!("{:<40} {:>12.3e} {:>12.3e}  {verdict}", c.name, c.worst_diff, c.tolerance);
            if self.verbose || !c.pass {
                let shown =
                    |v: &[f32]| format!("{:?}{}", &v[..v.len().min(12)], if v.len() > 12 { " ..." } else { "" });
                println!("    flex: {}\n    {device}: {}", shown(&c.reference), shown(&c.got));
            }
        }
        let failed = checks.iter().filter(|c| !c.pass).count();
        if failed > 0 {
            bail!("{failed} of {} checks differ between {device} and flex", checks.len());
        }
        println!("all {} checks agree with flex", checks.len());
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct BenchEnginesArgs {
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
    /// Also list the convolutions tract ran with this project's direct kernel, and which kernel.
    #[arg(long)]
    verbose: bool,
}

impl BenchEnginesArgs {
    pub fn run(self) -> Result<()> {
        let mut rows = Vec::new();
        for model in &self.models {
            rows.extend(mekd_trainer::perf::engines::compare(model, &self.batch, self.iterations.max(1))?);
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        println!(
            "{:<32} {:>5} {:>12} {:>12} {:>14} {:>12} {:>12} {:>7}",
            "model", "batch", "tract p50", "tract p90", "tract-im2col", "ORT p50", "ORT p90", "ratio"
        );
        for r in &rows {
            println!(
                "{:<32} {:>5} {:>9.4} ms {:>9.4} ms {:>11.4} ms {:>9.4} ms {:>9.4} ms {:>7.2}",
                r.model,
                r.batch,
                r.tract_ms.p50,
                r.tract_ms.p90,
                r.tract_im2col_ms.p50,
                r.ort_ms.p50,
                r.ort_ms.p90,
                r.ratio
            );
        }
        if self.verbose {
            for r in &rows {
                let execution = if r.tract_per_image { "one image at a time" } else { "whole batch" };
                println!(
                    "{} batch {}: {} direct convolutions, tract ran the {execution}",
                    r.model,
                    r.batch,
                    r.direct_convs.len()
                );
                for conv in &r.direct_convs {
                    println!("  {conv}");
                }
            }
        }
        Ok(())
    }
}
