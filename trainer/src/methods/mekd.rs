//! MEKD step 2: align student and teacher logits through the frozen generator, using only
//! synthetic images (the edge images never leave the board); and the student-stage settings
//! that every method shares.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use mekd_models::Generator;

use super::losses::{ImageDistance, image_alignment, kd_kl};
use super::student::Objective;

/// How many teacher queries the student stage may use.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "mode", content = "images")]
pub enum QueryMode {
    /// MEKD: a new synthetic batch and new queries every step (the reference). Baselines: every
    /// edge image of the method's transfer set, queried once.
    Fresh,
    /// MEKD: a fixed pool of this many synthetic images, each queried once, reused for every
    /// step. Baselines: at most this many edge images (a seeded random subset), queried once.
    Budget(usize),
}

/// Hyperparameters of the student stage of every method (reference defaults).
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
    /// DKD: weight of the target-class term (1).
    pub dkd_alpha: f64,
    /// DKD: weight of the non-target term (8).
    pub dkd_beta: f64,
    /// KN: fraction of the edge set in the one-shot transfer set (0.2).
    pub kn_fraction: f64,
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
            dkd_alpha: 1.0,
            dkd_beta: 8.0,
            kn_fraction: 0.2,
            seed: 0,
        }
    }
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

/// MEKD's objective: logits aligned through the frozen generator, plus the temperature KL.
pub struct MekdObjective<'a> {
    /// The frozen generator.
    pub generator: &'a Generator,
    /// Temperatures and weights.
    pub config: &'a DistillConfig,
}

impl Objective for MekdObjective<'_> {
    fn term_names(&self) -> &'static [&'static str] {
        &["image", "kl"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> (Tensor<1>, Vec<Tensor<1>>) {
        let (total, image, kl) = mekd_loss(self.generator, student_logits, targets, self.config);
        (total, vec![image, kl])
    }
}
