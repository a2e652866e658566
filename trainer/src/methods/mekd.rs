//! MEKD step 2: align student and teacher logits through the frozen generator, using only
//! synthetic images (the edge images never leave the board); and the student-stage settings
//! that every method shares.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use mekd_models::Generator;

use super::Method;
use super::losses::{ImageDistance, image_alignment, image_alignment_grad, kd_kl};
use super::student::{BatchLoss, EpochLength, Objective};

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

/// Steps per student epoch of MEKD in the reference (the baselines make one pass over their
/// transfer set instead).
pub const MEKD_STEPS_PER_EPOCH: usize = 500;

/// Hyperparameters of the student stage of every method (reference defaults).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillConfig {
    /// Epochs (240).
    pub epochs: usize,
    /// Steps per epoch; `None` is each method's reference schedule ([`DistillConfig::epoch_length`]):
    /// MEKD [`MEKD_STEPS_PER_EPOCH`], a baseline one pass over its transfer set.
    pub steps_per_epoch: Option<usize>,
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

impl DistillConfig {
    /// How long one student epoch of `method` is: the explicit step count if one was given,
    /// else the reference's schedule (MEKD: [`MEKD_STEPS_PER_EPOCH`] steps; the baselines:
    /// one pass over their transfer set, as KD.py, KN.py, DKD.py and ML.py run).
    pub fn epoch_length(&self, method: Method) -> EpochLength {
        match (self.steps_per_epoch, method) {
            (Some(steps), _) => EpochLength::Steps(steps),
            (None, Method::Mekd) => EpochLength::Steps(MEKD_STEPS_PER_EPOCH),
            (None, _) => EpochLength::OnePass,
        }
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            epochs: 240,
            steps_per_epoch: None,
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
///
/// The generator runs without autodiff: the image term's gradient with respect to `s / tau_g`
/// is computed by [`Generator::latent_grad`] (the generator's vector-Jacobian product by hand:
/// no autodiff graph through the generator) and enters the differentiated loss as
/// `<s / tau_g, g>`, whose gradient is `g`; the reported values are the real ones. The
/// generator's side is kept apart from the student's autodiff graph: the logits cross to it,
/// and `g` and the KL's value come back, as host data (`[batch, classes]` values each way), so
/// no tensor is shared by the two.
///
/// Student and teacher latents go through the generator in one pass, stacked into one batch:
/// fewer kernel launches, and it avoids a burn-wgpu 0.22 fusion bug that computed
/// `tanh(conv(x1)) - tanh(conv(x2))` wrongly for two separate passes when the convolution has
/// one output channel, as the MNIST generator's last layer has (`mekd self-test` finds it;
/// results/mnist-resnet32-resnet8-h200/README.md).
pub fn mekd_loss(
    generator: &Generator,
    student_logits: Tensor<2>,
    targets: Tensor<2>,
    config: &DistillConfig,
) -> BatchLoss {
    let training = student_logits.device();
    let plain = training.clone().without_autodiff();
    let to_plain = |t: Tensor<2>| Tensor::<2>::from_data(t.into_data(), &plain);
    let latent = student_logits.clone().div_scalar(config.tau_g);
    let latents = Tensor::cat(vec![latent.clone().detach(), targets.clone().div_scalar(config.tau_g)], 0);
    let (image, latent_grad) = image_term(generator, to_plain(latents), config.distance);
    let latent_grad = Tensor::<2>::from_data(latent_grad.into_data(), &training);
    let image_by_gradient = (latent * latent_grad).sum();
    let kl = kd_kl(student_logits, targets, config.tau);
    let kl_value = Tensor::<1>::from_data(kl.clone().detach().into_data(), &plain);
    BatchLoss {
        differentiable: image_by_gradient.mul_scalar(config.w_f) + kl.mul_scalar(config.w_kl),
        total: image.clone().mul_scalar(config.w_f) + kl_value.clone().mul_scalar(config.w_kl),
        terms: vec![image, kl_value],
    }
}

/// The image term's generator side, without autodiff: `latents` (the student's rows, then as
/// many of the teacher's, on a plain device) go through the frozen generator in one pass;
/// returns the distance of the two halves' images and its gradient with respect to the
/// student's latents (the hand VJP of the student's rows).
pub fn image_term(generator: &Generator, latents: Tensor<2>, distance: ImageDistance) -> (Tensor<1>, Tensor<2>) {
    let [rows, _] = latents.dims();
    let batch = rows / 2;
    let trace = generator.forward_traced(latents);
    let g_s = trace.images().clone().slice(0..batch);
    let g_t = trace.images().clone().slice(batch..rows);
    let image = image_alignment(g_s.clone(), g_t.clone(), distance);
    let images_grad = image_alignment_grad(g_s, g_t, distance);
    (image, generator.latent_grad(&trace.rows(0..batch), images_grad))
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

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        mekd_loss(self.generator, student_logits, targets, self.config)
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::tensor::{Device, Distribution};
    use mekd_models::GeneratorConfig;

    use super::*;

    /// The loss as plain autodiff would compute it, through the ordinary forward pass.
    fn autodiff_reference(generator: &Generator, s: Tensor<2>, t: Tensor<2>, config: &DistillConfig) -> Tensor<1> {
        let g_t = generator.forward(t.clone().div_scalar(config.tau_g)).detach();
        let g_s = generator.forward(s.clone().div_scalar(config.tau_g));
        image_alignment(g_s, g_t, config.distance).mul_scalar(config.w_f)
            + kd_kl(s, t, config.tau).mul_scalar(config.w_kl)
    }

    #[test]
    fn hand_vjp_loss_equals_autodiff_in_value_and_gradient() {
        let train = Device::flex().autodiff();
        train.seed(5);
        let generator = GeneratorConfig::new(10, 1).with_width(8).init(&train).unwrap();
        let _ = generator.forward(Tensor::<2>::random([16, 10], Distribution::Normal(0.0, 2.0), &train));
        let generator = generator.valid().no_grad();
        let s = Tensor::<2>::random([6, 10], Distribution::Normal(0.0, 3.0), &train);
        let t = Tensor::<2>::random([6, 10], Distribution::Normal(0.0, 3.0), &train);
        for distance in [ImageDistance::L1, ImageDistance::L2] {
            // The image term alone (the KL term is checked by hand in `losses`).
            let config = DistillConfig { distance, w_f: 2.0, w_kl: 0.0, ..DistillConfig::default() };
            let values = |loss: Tensor<1>, s: &Tensor<2>| {
                let value: f32 = loss.clone().into_scalar();
                let grad: Vec<f32> = s.grad(&loss.backward()).unwrap().into_data().try_to_vec().unwrap();
                (value, grad)
            };
            let s_ref = s.clone().detach().require_grad();
            let (expected, expected_grad) =
                values(autodiff_reference(&generator, s_ref.clone(), t.clone(), &config), &s_ref);
            let s_hand = s.clone().detach().require_grad();
            let loss = mekd_loss(&generator, s_hand.clone(), t.clone(), &config);
            let reported: f32 = loss.total.into_scalar();
            let (_, got_grad) = values(loss.differentiable, &s_hand);
            assert!((expected - reported).abs() < 1e-5 * expected.abs(), "{distance:?}: {expected} vs {reported}");
            let scale = expected_grad.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (e, g) in expected_grad.iter().zip(&got_grad) {
                assert!((e - g).abs() <= 1e-4 * scale, "{distance:?}: {expected_grad:?}\nvs\n{got_grad:?}");
            }
        }
    }
}
