//! `mekd teacher train`: supervised training of a zoo classifier with the reference recipe
//! (SGD 0.1 / 0.9 / 5e-4, batch 128, step decay x0.1 at 1/3 and 2/3 of the epochs), resumable
//! checkpoints every epoch, and an ONNX export verified with tract at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, Classifier, ClassifierSpec, IMAGE_SIZE};
use mekd_runtime::{Dataset, Split};

use crate::batches::{self, epoch_order};
use crate::device::DeviceKind;
use crate::export::export_verified;
use crate::graph_step::{StepInputs, Training};
use crate::progress;
use crate::rundir::RunDir;
use crate::schedule::{REFERENCE_BATCH, Sgd};

/// Everything a teacher training run depends on; saved as `config.json` in the run directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Architecture to train.
    pub arch: Architecture,
    /// Labeled dataset (folder or archive).
    pub data: PathBuf,
    /// Image channels fed to the network (the data is converted).
    pub channels: usize,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// The optimiser and its schedule.
    #[serde(flatten)]
    pub sgd: Sgd,
    /// Seed of weights and batch order.
    pub seed: u64,
    /// Backend.
    pub device: DeviceKind,
    /// Use only the first N training images.
    pub limit_train: Option<usize>,
    /// Use only the first N test images.
    pub limit_test: Option<usize>,
}

impl TrainConfig {
    /// The reference recipe for `arch` on `data`.
    pub fn reference(arch: Architecture, data: PathBuf, epochs: usize) -> Self {
        Self {
            arch,
            data,
            channels: 1,
            epochs,
            batch: REFERENCE_BATCH,
            sgd: Sgd::reference(epochs),
            seed: 0,
            device: DeviceKind::Flex,
            limit_train: None,
            limit_test: None,
        }
    }

    /// Refuse configurations that cannot train.
    pub fn validate(&self) -> Result<()> {
        if !self.arch.is_classifier() {
            bail!("{} is not a classifier", self.arch);
        }
        if self.epochs == 0 || self.batch == 0 {
            bail!("epochs and batch must be at least 1");
        }
        self.sgd.validate().map_err(anyhow::Error::msg)?;
        if !(1..=4).contains(&self.channels) {
            bail!("channels must be 1..=4");
        }
        Ok(())
    }
}

/// One row of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (percent, on the fly).
    pub train_acc: f64,
    /// Test accuracy (percent).
    pub test_acc: f64,
    /// Seconds spent on the epoch.
    pub seconds: f64,
}

/// What a finished run reports (also `summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Test accuracy after the last epoch (percent).
    pub final_acc: f64,
    /// Best test accuracy over epochs (percent).
    pub best_acc: f64,
    /// The exported ONNX file.
    pub onnx: PathBuf,
    /// Largest |burn - tract| on the export check.
    pub export_max_abs_diff: f32,
    /// Classes of the dataset.
    pub classes: Vec<String>,
    /// What fixed the rounding of a CPU (flex) run on this machine (`crate::numerics`); absent
    /// for other backends and in runs written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<crate::numerics::CpuNumerics>,
}

/// Train (or resume) the run in `dir` with `config`.
pub fn train(dir: &Path, config: &TrainConfig, resume: bool) -> Result<TrainSummary> {
    config.validate()?;
    let run = RunDir::create(dir)?;
    if run.file("config.json").exists() {
        if !resume {
            bail!("{} already holds a run; pass --resume to continue it or choose another --out", dir.display());
        }
        let saved: TrainConfig = run.read_json("config.json")?;
        config.device.announce_resume(saved.device);
        if (TrainConfig { device: config.device, ..saved.clone() }) != *config {
            bail!(
                "--resume with a different configuration than {} (saved: {saved:?})",
                run.file("config.json").display()
            );
        }
    }
    run.write_json("config.json", config)?;

    let train_set =
        Dataset::load(&config.data, Split::Train).with_context(|| format!("reading {}", config.data.display()))?;
    let test_set =
        Dataset::load(&config.data, Split::Test).with_context(|| format!("reading {}", config.data.display()))?;
    let train_set = train_set.take(config.limit_train.unwrap_or(usize::MAX)).prepare(config.channels, IMAGE_SIZE)?;
    let test_set = test_set.take(config.limit_test.unwrap_or(usize::MAX)).prepare(config.channels, IMAGE_SIZE)?;
    let spec = ClassifierSpec {
        architecture: config.arch,
        in_channels: config.channels,
        num_classes: train_set.classes.len(),
    };

    let device = config.device.training_device()?;
    device.seed(config.seed);
    let mut model = spec.init(&device)?;
    let mut optim = config.sgd.optimizer();
    let mut metrics: Vec<EpochMetrics> = Vec::new();
    let mut start_epoch = 0;
    if let Some(checkpoint) = run.load_checkpoint(model.clone(), optim.clone())? {
        (start_epoch, model, optim, metrics) =
            (checkpoint.epochs_done, checkpoint.model, checkpoint.optim, checkpoint.rows);
        eprintln!("resuming {} after epoch {start_epoch}", dir.display());
    }

    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let [c, h, w] = train_set.shape;
    // A step's values: the batch's summed loss and its correct predictions.
    let loss = |model: &Classifier, inputs: &StepInputs| {
        let y = inputs.ints[0].clone().autodiff();
        let b = y.dims()[0];
        let logits = model.forward(inputs.floats[0].clone().reshape([b, c, h, w]).autodiff());
        let loss = loss_fn.forward(logits.clone(), y.clone());
        let correct = logits.detach().argmax(1).reshape([b]).equal(y).float().sum();
        (loss.clone(), Tensor::cat(vec![loss.detach().mul_scalar(b as f64), correct], 0))
    };
    let plain = device.clone().inner();
    let mut training = Training::new(model, optim, &config.sgd, config.device.records_graphs(), &plain, loss);
    for epoch in start_epoch..config.epochs {
        let started = Instant::now();
        let lr = config.sgd.lr_at(epoch);
        let order = epoch_order(train_set.len(), config.seed, epoch);
        let bar = progress::bar(order.len() as u64, &format!("epoch {}/{}", epoch + 1, config.epochs));
        // Running sums stay on the device: no host round trip inside a step.
        let mut sums: Option<Tensor<1>> = None;
        let mut seen = 0usize;
        for chunk in order.chunks(config.batch) {
            let inputs =
                (vec![batches::image_values(&train_set, chunk)], vec![batches::label_values(&train_set, chunk)]);
            let values = training.step(inputs, lr)?;
            sums = Some(match sums {
                None => values,
                Some(sums) => sums + values,
            });
            seen += chunk.len();
            bar.inc(chunk.len() as u64);
        }
        let (loss_sum, correct) = match sums.map(|t| t.into_data().try_to_vec::<f32>()) {
            Some(Ok(sums)) => (sums[0] as f64, sums[1] as f64),
            _ => (0.0, 0.0),
        };
        bar.finish_and_clear();
        let test_acc = accuracy(&training.model(), &test_set, &device);
        let row = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen as f64,
            train_acc: 100.0 * correct / seen as f64,
            test_acc,
            seconds: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "epoch {:>3}/{}: lr {:.4} loss {:.4} train {:.2}% test {:.2}% ({:.1}s)",
            row.epoch, config.epochs, row.lr, row.train_loss, row.train_acc, row.test_acc, row.seconds
        );
        metrics.push(row);
        let (model, optim) = training.checkpoint();
        run.save_checkpoint(epoch + 1, &model, &optim, &metrics)?;
    }
    let model = training.model();

    let onnx = run.file("teacher.onnx");
    let mut metadata = ExportMetadata::symmetric(config.channels);
    metadata.class_names = Some(train_set.classes.clone());
    let check = export_verified(&model, &spec, &metadata, &onnx).context("exporting the teacher to ONNX")?;
    let summary = TrainSummary {
        final_acc: metrics.last().map_or(0.0, |m| m.test_acc),
        best_acc: metrics.iter().map(|m| m.test_acc).fold(0.0, f64::max),
        onnx,
        export_max_abs_diff: check.agreement.max_abs_diff,
        classes: train_set.classes.clone(),
        numerics: crate::numerics::CpuNumerics::for_device(config.device),
    };
    run.write_json("summary.json", &summary)?;
    Ok(summary)
}

/// Top-1 accuracy (percent) of `model` in inference mode on `data`.
pub fn accuracy(model: &Classifier, data: &Dataset, device: &Device) -> f64 {
    let model = model.valid();
    let indices: Vec<usize> = (0..data.len()).collect();
    let correct: usize = indices
        .chunks(256)
        .map(|chunk| {
            let logits = model.forward(batches::images(data, chunk, device));
            batches::predictions(logits).iter().zip(chunk).filter(|(p, i)| **p == data.labels[**i] as usize).count()
        })
        .sum();
    100.0 * correct as f64 / data.len().max(1) as f64
}
