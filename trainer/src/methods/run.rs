//! `mekd distill --method mekd`: one command from the edge subset to a verified student ONNX,
//! with everything written to one run directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use serde::{Deserialize, Serialize};

use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, ClassifierSpec, Generator};
use mekd_runtime::data::edge_subset;
use mekd_runtime::{Dataset, Split};

use super::deprivatize::{GanConfig, deprivatize, freeze, to_pixels};
use super::mekd::{DistillConfig, DistillEpoch, distill};
use crate::blackbox::{Teacher, Usage};
use crate::device::DeviceKind;
use crate::export::export_verified;
use crate::progress;
use crate::rundir::RunDir;

/// Everything a distillation run depends on; saved as `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
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
    /// Evaluate on the first N test images only.
    pub limit_test: Option<usize>,
    /// Seed of the edge subset.
    pub seed: u64,
}

/// `summary.json` of a distillation run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// `mekd`.
    pub method: String,
    /// `soft` or `hard`.
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
    /// The exported student.
    pub onnx: PathBuf,
}

/// A grid of up to 64 images (8 per row) as PNG bytes.
pub fn sample_grid(pixels: &[u8], shape: [usize; 3]) -> Vec<u8> {
    let [c, h, w] = shape;
    let n = (pixels.len() / (c * h * w)).min(64);
    let cols = 8.min(n.max(1));
    let rows = n.div_ceil(cols);
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..n {
        let img = &pixels[i * c * h * w..(i + 1) * c * h * w];
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| img[(ch.min(c - 1)) * h * w + y * w + x];
                let (gx, gy) = ((i % cols) * w + x, (i / cols) * h + y);
                grid.put_pixel(gx as u32, gy as u32, image::Rgb([px(0), px(1), px(2)]));
            }
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    grid.write_to(&mut out, image::ImageFormat::Png).expect("PNG to memory");
    out.into_inner()
}

/// Run MEKD end to end into `dir`.
pub fn run_mekd(dir: &Path, config: &RunConfig, teacher: &mut dyn Teacher) -> Result<RunSummary> {
    let run = RunDir::create(dir)?;
    if run.file("summary.json").exists() || run.file("config.json").exists() {
        bail!("{} already holds a run; choose another --out", dir.display());
    }
    run.write_json("config.json", config)?;
    let info = teacher.info().clone();
    let [c, h, w] = info.input_shape;
    if h != w {
        bail!("the teacher's input {h}x{w} is not square");
    }
    let train =
        Dataset::load(&config.data, Split::Train).with_context(|| format!("reading {}", config.data.display()))?;
    let indices = edge_subset(train.len(), config.edge_fraction, config.seed).map_err(anyhow::Error::msg)?;
    let edge = train.select(&indices).prepare(c, h)?;
    let test = Dataset::load(&config.data, Split::Test)?.take(config.limit_test.unwrap_or(usize::MAX)).prepare(c, h)?;
    eprintln!("edge subset: {} unlabeled images; test: {} images; teacher: {}", edge.len(), test.len(), config.teacher);
    let device = config.device.training_device()?;

    std::fs::create_dir_all(run.file("samples"))?;
    let mut gan_rows = Vec::new();
    let bar = progress::bar(config.gan.epochs as u64, "deprivatize");
    let generator = deprivatize(&edge, teacher, &config.gan, &device, |row, generator: &Generator| {
        bar.inc(1);
        bar.set_message(format!(
            "d {:.3} g {:.3} im {:.3} queries {}",
            row.d_loss, row.g_loss, row.im_loss, row.queries
        ));
        gan_rows.push(row.clone());
        let z = burn::tensor::Tensor::<2>::random(
            [64, info.num_classes],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let samples = to_pixels(freeze(generator).forward(z));
        mekd_runtime::fsutil::write_atomic(
            &run.file(&format!("samples/epoch-{}.png", row.epoch)),
            &sample_grid(&samples, [c, h, w]),
        )?;
        generator
            .clone()
            .save_file(run.file("generator.bpk.tmp"))
            .map_err(|e| anyhow::anyhow!("saving the generator: {e:?}"))?;
        std::fs::rename(run.file("generator.bpk.tmp"), run.file("generator.bpk"))?;
        run.write_jsonl("gan.jsonl", &gan_rows)?;
        Ok(())
    })?;
    bar.finish_and_clear();
    let generator = freeze(&generator);

    let spec = ClassifierSpec { architecture: config.student, in_channels: c, num_classes: info.num_classes };
    let mut rows: Vec<DistillEpoch> = Vec::new();
    let bar = progress::bar(config.distill.epochs as u64, "distill");
    let student = distill(&generator, teacher, &spec, &config.distill, &test, &device, |row, _| {
        bar.inc(1);
        bar.set_message(format!("loss {:.4} test {:.2}% queries {}", row.loss, row.test_acc, row.queries));
        eprintln!(
            "distill epoch {:>3}: loss {:.4} (image {:.4}, kl {:.4}) test {:.2}% queries {}",
            row.epoch, row.loss, row.image_loss, row.kl_loss, row.test_acc, row.queries
        );
        rows.push(row.clone());
        run.write_metrics(&rows)
    })?;
    bar.finish_and_clear();

    let onnx = run.file("student.onnx");
    let mut metadata = ExportMetadata::symmetric(c);
    metadata.class_names = info.class_names.clone();
    export_verified(&student, &spec, &metadata, &onnx).context("exporting the student")?;
    let usage: Usage = teacher.usage();
    let summary = RunSummary {
        method: "mekd".into(),
        response: info.response.to_string(),
        dataset: config.data.display().to_string(),
        teacher: config.teacher.clone(),
        student: config.student.to_string(),
        final_acc: rows.last().map_or(0.0, |r| r.test_acc),
        best_acc: rows.iter().map(|r| r.test_acc).fold(0.0, f64::max),
        queries: usage.queries,
        bytes_up: usage.bytes_up,
        bytes_down: usage.bytes_down,
        seed: config.seed,
        onnx,
    };
    run.write_json("summary.json", &summary)?;
    Ok(summary)
}
