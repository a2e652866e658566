//! `mekd demo`: the whole path on the embedded data in one command.

use std::path::PathBuf;

use anyhow::Result;
use mekd_trainer::demo::{DemoConfig, run_demo, table};
use mekd_trainer::device::DeviceKind;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Labeled dataset (its train split is the cloud's data and holds the edge subset).
    #[arg(long, default_value = mekd_runtime::data::EMBEDDED_DATA)]
    data: PathBuf,
    /// Queries each method may make (MEKD spends 16% of it deprivatizing and 80% on its
    /// distillation pool) [default: the demo's, or the tiny demo's with --tiny].
    #[arg(long)]
    budget: Option<u64>,
    /// A tiny configuration (one to two minutes; what the end-to-end test runs).
    #[arg(long)]
    tiny: bool,
    /// Seed of every stage (weights, edge subset, batches, latents). Another seed is another
    /// sample of the demo's result: README and BENCHMARKS give the spread over seeds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = DeviceKind::Flex, help = device_help!())]
    device: DeviceKind,
}

impl DemoArgs {
    pub fn run(self) -> Result<()> {
        let mut config = if self.tiny { DemoConfig::tiny(self.data) } else { DemoConfig::new(self.data) };
        config.device = self.device;
        config.seed = self.seed;
        if let Some(budget) = self.budget {
            config = config.with_budget(budget);
        }
        let summary = run_demo(&self.out, &config)?;
        print!("{}", table(&summary));
        println!("report: {}", self.out.join("report.md").display());
        Ok(())
    }
}
