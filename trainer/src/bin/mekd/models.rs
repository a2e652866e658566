//! `mekd zoo` and `mekd export`: the model zoo's architectures, and one exported to ONNX.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, ClassifierSpec, zoo_entries};
use mekd_trainer::device::DeviceKind;
use mekd_trainer::export::export_verified;

#[derive(clap::Args)]
pub struct ZooArgs {
    /// Input channels to size the networks for (1 = gray, 3 = RGB).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl ZooArgs {
    pub fn run(self) -> Result<()> {
        let ZooArgs { channels, classes, json } = self;
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
}

#[derive(clap::Args)]
pub struct ExportArgs {
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
    #[arg(long, default_value_t = DeviceKind::Flex, help = device_help!())]
    device: DeviceKind,
}

impl ExportArgs {
    pub fn run(self) -> Result<()> {
        let architecture: Architecture = self.arch.parse()?;
        let spec = ClassifierSpec { architecture, in_channels: self.channels, num_classes: self.classes };
        spec.validate()?;
        let device = self.device.device()?;
        let model = match &self.checkpoint {
            Some(path) => spec.load(path, &device).with_context(|| format!("loading checkpoint {}", path.display()))?,
            None => {
                device.seed(self.seed);
                spec.init(&device)?
            }
        };
        let check = export_verified(&model, &spec, &ExportMetadata::symmetric(self.channels), &self.out)
            .with_context(|| format!("exporting {architecture} to {}", self.out.display()))?;
        println!(
            "wrote {} ({} bytes); tract agrees with burn: max |diff| {:.2e} on {} probe images",
            self.out.display(),
            check.bytes,
            check.agreement.max_abs_diff,
            check.probe_images
        );
        Ok(())
    }
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
