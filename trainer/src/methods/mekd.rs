//! MEKD step 2: align student and teacher logits through the frozen generator, using only
//! synthetic images (the edge images never leave the board).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use mekd_models::{Classifier, ClassifierSpec, Generator};
use mekd_runtime::Dataset;
use mekd_runtime::data::preprocess::{Normalisation, to_model_input};

use super::MethodError;
use super::deprivatize::to_pixels;
use super::losses::{ImageDistance, image_alignment, kd_kl};
use crate::batches::epoch_order;
use crate::blackbox::Teacher;
use crate::schedule::{multi_step, reference_sgd};
use crate::teacher::train::accuracy;

/// Where the synthetic queries come from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "mode", content = "images")]
pub enum QueryMode {
    /// A new synthetic batch and new queries every step (the reference).
    Fresh,
    /// A fixed pool of this many synthetic images, each queried once, reused for every step.
    Budget(usize),
}

/// Hyperparameters of MEKD distillation (reference defaults).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillConfig {
    /// Epochs (240).
    pub epochs: usize,
    /// Steps per epoch (500).
    pub steps_per_epoch: usize,
    /// Batch size (128).
    pub batch: usize,
    /// SGD learning rate (0.1), momentum (0.9), weight decay (5e-4).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Epochs (0-based) where the rate is multiplied by `gamma` (80, 160).
    pub milestones: Vec<usize>,
    /// Decay factor (0.1).
    pub gamma: f64,
    /// KL temperature (5).
    pub tau: f64,
    /// Temperature dividing logits before they enter the generator (5).
    pub tau_g: f64,
    /// Weight of the image alignment (1).
    pub w_f: f64,
    /// Weight of the KL term (1).
    pub w_kl: f64,
    /// L1 (reference) or L2 image distance.
    pub distance: ImageDistance,
    /// Fresh queries every step, or a fixed budgeted pool.
    pub queries: QueryMode,
    /// Seed.
    pub seed: u64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            epochs: 240,
            steps_per_epoch: 500,
            batch: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            milestones: vec![80, 160],
            gamma: 0.1,
            tau: 5.0,
            tau_g: 5.0,
            w_f: 1.0,
            w_kl: 1.0,
            distance: ImageDistance::L1,
            queries: QueryMode::Fresh,
            seed: 0,
        }
    }
}

/// One epoch of distillation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean total loss.
    pub loss: f64,
    /// Mean image-alignment term.
    pub image_loss: f64,
    /// Mean KL term.
    pub kl_loss: f64,
    /// Student test accuracy (percent).
    pub test_acc: f64,
    /// Teacher queries so far.
    pub queries: u64,
}

/// Synthetic images from the frozen generator, as `u8` pixels (what the teacher answers on).
fn synthesize(generator: &Generator, n: usize, classes: usize, device: &Device) -> Vec<u8> {
    let z = Tensor::<2>::random([n, classes], Distribution::Normal(0.0, 1.0), device);
    to_pixels(generator.forward(z))
}

/// The MEKD loss for one batch: `w_f * dist(G(s / tau_g), G(t / tau_g)) + w_kl * KL_tau(t || s)`.
/// Gradients flow through the frozen generator into the student only.
pub fn mekd_loss(
    generator: &Generator,
    student_logits: Tensor<2>,
    targets: Tensor<2>,
    config: &DistillConfig,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let g_t = generator.forward(targets.clone().div_scalar(config.tau_g)).detach();
    let g_s = generator.forward(student_logits.clone().div_scalar(config.tau_g));
    let image = image_alignment(g_s, g_t, config.distance);
    let kl = kd_kl(student_logits, targets, config.tau);
    (image.clone().mul_scalar(config.w_f) + kl.clone().mul_scalar(config.w_kl), image, kl)
}

/// Distill a fresh student of `spec` from `teacher` through the frozen `generator`, evaluating on
/// `test` after every epoch and calling `on_epoch` (for metrics and checkpoints).
pub fn distill(
    generator: &Generator,
    teacher: &mut dyn Teacher,
    spec: &ClassifierSpec,
    config: &DistillConfig,
    test: &Dataset,
    device: &Device,
    mut on_epoch: impl FnMut(&DistillEpoch, &Classifier) -> anyhow::Result<()>,
) -> Result<Classifier, MethodError> {
    let classes = teacher.info().num_classes;
    let shape = teacher.info().input_shape;
    let per_image: usize = shape.iter().product();
    let norm = Normalisation::symmetric(shape[0]);
    device.seed(config.seed);
    let mut student = spec.init(device)?;
    let mut optim = reference_sgd(config.momentum, config.weight_decay);
    // Budgeted mode: one pool, each image queried exactly once.
    let pool: Option<(Vec<u8>, Vec<f32>)> = match config.queries {
        QueryMode::Fresh => None,
        QueryMode::Budget(n) => {
            let mut pixels = Vec::with_capacity(n * per_image);
            let mut targets = Vec::with_capacity(n * classes);
            for start in (0..n).step_by(config.batch) {
                let images = synthesize(generator, config.batch.min(n - start), classes, device);
                targets.extend(teacher.query(&images)?.targets(classes));
                pixels.extend(images);
            }
            Some((pixels, targets))
        }
    };
    for epoch in 0..config.epochs {
        let lr = multi_step(config.lr, config.gamma, &config.milestones, epoch);
        let order = pool.as_ref().map(|(_, t)| epoch_order(t.len() / classes, config.seed, epoch));
        let (mut loss_sum, mut image_sum, mut kl_sum) = (0.0, 0.0, 0.0);
        for step in 0..config.steps_per_epoch {
            let (pixels, targets) = match (&pool, &order) {
                (Some((pool_pixels, pool_targets)), Some(order)) => {
                    let start = (step * config.batch) % order.len();
                    let picks: Vec<usize> =
                        (0..config.batch.min(order.len())).map(|i| order[(start + i) % order.len()]).collect();
                    let pixels: Vec<u8> = picks
                        .iter()
                        .flat_map(|&i| pool_pixels[i * per_image..(i + 1) * per_image].iter().copied())
                        .collect();
                    let targets: Vec<f32> = picks
                        .iter()
                        .flat_map(|&i| pool_targets[i * classes..(i + 1) * classes].iter().copied())
                        .collect();
                    (pixels, targets)
                }
                _ => {
                    let pixels = synthesize(generator, config.batch, classes, device);
                    let targets = teacher.query(&pixels)?.targets(classes);
                    (pixels, targets)
                }
            };
            let b = targets.len() / classes;
            let [c, h, w] = shape;
            let x =
                Tensor::<4>::from_data(TensorData::new(to_model_input(&pixels, shape, &norm), [b, c, h, w]), device);
            let t = Tensor::<2>::from_data(TensorData::new(targets, [b, classes]), device);
            let (loss, image, kl) = mekd_loss(generator, student.forward(x), t, config);
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            student = optim.step(lr, student, grads);
            loss_sum += loss.into_scalar::<f32>() as f64;
            image_sum += image.into_scalar::<f32>() as f64;
            kl_sum += kl.into_scalar::<f32>() as f64;
        }
        let steps = config.steps_per_epoch.max(1) as f64;
        let row = DistillEpoch {
            epoch: epoch + 1,
            lr,
            loss: loss_sum / steps,
            image_loss: image_sum / steps,
            kl_loss: kl_sum / steps,
            test_acc: accuracy(&student, test, device),
            queries: teacher.usage().queries,
        };
        on_epoch(&row, &student).map_err(MethodError::Callback)?;
    }
    Ok(student.valid())
}
