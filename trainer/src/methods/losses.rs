//! The losses of MEKD and its baselines, exactly as `METHOD.md` specifies them (including the
//! reference code's scaling quirks), on burn tensors.

use burn::tensor::activation::{log_sigmoid, log_softmax, softmax};
use burn::tensor::{Int, Tensor};

/// Knowledge-distillation KL: `KL(softmax(t / tau) || softmax(s / tau)) * tau`, averaged over the
/// batch (PyTorch `KLDivLoss(reduction="batchmean")`). The reference multiplies by `tau`, not
/// `tau^2`. `targets` are teacher logits, or one-hot vectors for hard responses.
pub fn kd_kl(student: Tensor<2>, targets: Tensor<2>, tau: f64) -> Tensor<1> {
    let [batch, _] = student.dims();
    let log_q = log_softmax(student.div_scalar(tau), 1);
    let log_p = log_softmax(targets.div_scalar(tau), 1);
    let p = log_p.clone().exp();
    (p * (log_p - log_q)).sum().div_scalar(batch as f64).mul_scalar(tau)
}

/// How generated images are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDistance {
    /// Mean absolute difference over every pixel (`nn.L1Loss`), the reference default.
    L1,
    /// Mean squared difference over every pixel (`nn.MSELoss`).
    L2,
}

/// MEKD's image alignment: the mean distance between `G(s / tau_g)` and `G(t / tau_g)` over all
/// pixels of the batch.
pub fn image_alignment(
    generated_from_student: Tensor<4>,
    generated_from_teacher: Tensor<4>,
    distance: ImageDistance,
) -> Tensor<1> {
    let diff = generated_from_student - generated_from_teacher;
    match distance {
        ImageDistance::L1 => diff.abs().mean(),
        ImageDistance::L2 => diff.powi_scalar(2).mean(),
    }
}

/// The gradient of [`image_alignment`] with respect to its first argument: `sign(diff) / n`
/// (L1, with PyTorch's zero at zero) or `2 diff / n` (L2), `n` the number of pixels.
pub fn image_alignment_grad(
    generated_from_student: Tensor<4>,
    generated_from_teacher: Tensor<4>,
    distance: ImageDistance,
) -> Tensor<4> {
    let diff = generated_from_student - generated_from_teacher;
    let n = diff.shape().num_elements() as f64;
    match distance {
        ImageDistance::L1 => diff.sign().div_scalar(n),
        ImageDistance::L2 => diff.mul_scalar(2.0 / n),
    }
}

/// Mimic learning: mean squared error between student and teacher logits.
pub fn logit_mse(student: Tensor<2>, teacher: Tensor<2>) -> Tensor<1> {
    (student - teacher).powi_scalar(2).mean()
}

/// Decoupled KD (Zhao et al. 2022) with the teacher's argmax as target, as the reference code:
/// each KL term summed, times `tau`, divided by the batch. Returns `(tckd, nckd)`; the loss is
/// `alpha * tckd + beta * nckd` (reference: 1 and 8).
pub fn dkd_terms(student: Tensor<2>, teacher: Tensor<2>, target: Tensor<1, Int>, tau: f64) -> (Tensor<1>, Tensor<1>) {
    let [batch, classes] = student.dims();
    let gt = target.one_hot(classes).float();
    let other = gt.clone().neg().add_scalar(1.0);
    let p_s = softmax(student.clone().div_scalar(tau), 1);
    let p_t = softmax(teacher.clone().div_scalar(tau), 1);
    // Binary (target, rest) distributions.
    let binary = |p: Tensor<2>| {
        let t = (p.clone() * gt.clone()).sum_dim(1);
        let o = (p * other.clone()).sum_dim(1);
        Tensor::cat(vec![t, o], 1)
    };
    let (b_s, b_t) = (binary(p_s), binary(p_t));
    let tckd = (b_t.clone() * (b_t.clamp_min(1e-30).log() - b_s.clamp_min(1e-30).log())).sum();
    // Distributions over the non-target classes: mask the target with -1000 before softmax.
    let mask = gt.mul_scalar(1000.0);
    let log_q = log_softmax(student.div_scalar(tau) - mask.clone(), 1);
    let log_p = log_softmax(teacher.div_scalar(tau) - mask, 1);
    let nckd = (log_p.clone().exp() * (log_p - log_q)).sum();
    let scale = tau / batch as f64;
    (tckd.mul_scalar(scale), nckd.mul_scalar(scale))
}

/// How the information-maximisation weight `y_i` of a synthetic image is read from the
/// teacher's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImWeight {
    /// The paper: the teacher's response strength, `max_c softmax(T(x))_c` for soft answers and
    /// 1 for hard ones.
    MaxResponse,
    /// The reference code's form, exactly: DCGAN.py multiplies the argmax class indices
    /// (shape `(b,)`) by `log(D(G(z)) + 1e-5)` (shape `(b, 1)`); broadcasting makes a `(b, b)`
    /// matrix whose mean is `mean(class index) x mean(-log D)`. So every image of a batch is
    /// weighted by the batch's mean class index, not by its own.
    ClassIndex,
}

/// The IM term `mean_i(-y_i * log(D(G(z_i)) + 1e-5))`, with `d_fake` the discriminator's outputs
/// `[batch, 1]` and `weights` the `y_i` `[batch]`.
pub fn information_maximisation(d_fake: Tensor<2>, weights: Tensor<1>) -> Tensor<1> {
    let [batch, _] = d_fake.dims();
    let log_d = d_fake.reshape([batch]).add_scalar(1e-5).log();
    (weights * log_d).neg().mean()
}

/// The `y_i` of [`information_maximisation`] from the teacher's answers: `targets` are logits
/// (soft) or one-hot rows (hard); `labels` the argmax per row.
pub fn im_weights(targets: &[f32], labels: &[usize], classes: usize, hard: bool, form: ImWeight) -> Vec<f32> {
    match form {
        ImWeight::ClassIndex => {
            let mean = labels.iter().map(|&l| l as f64).sum::<f64>() / labels.len().max(1) as f64;
            vec![mean as f32; labels.len()]
        }
        ImWeight::MaxResponse if hard => vec![1.0; labels.len()],
        ImWeight::MaxResponse => targets
            .chunks_exact(classes)
            .map(|row| {
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                1.0 / sum
            })
            .collect(),
    }
}

/// Binary cross-entropy on the discriminator's logits `z`, mean over the batch:
/// `-(y ln sigmoid(z) + (1 - y) ln sigmoid(-z))`, through the stable `log_sigmoid`.
///
/// The reference applies `nn.BCELoss` to `sigmoid(z)` (logarithms clamped at -100). The values
/// agree wherever `|z| < 100`; the gradient differs where it matters: once the sigmoid saturates
/// to exactly 0 or 1 in f32, the clamped logarithm's backward multiplies a zero mask by
/// `1 / p = inf` and yields NaN, which on the GPU ended a deprivatization run. Here the gradient
/// is `sigmoid(z) - y`, finite everywhere.
pub fn bce_with_logits(logits: Tensor<2>, target: f64) -> Tensor<1> {
    let log_p = log_sigmoid(logits.clone());
    let log_1mp = log_sigmoid(logits.neg());
    (log_p.mul_scalar(target) + log_1mp.mul_scalar(1.0 - target)).neg().mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t2(rows: &[&[f32]]) -> Tensor<2> {
        let cols = rows[0].len();
        let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [rows.len(), cols]), &Device::flex())
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_scalar::<f32>() as f64
    }

    #[test]
    fn kl_with_temperature_by_hand() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25], q = [0.5, 0.5]:
        // KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308121.
        let kl = scalar(kd_kl(t2(&[&[0.0, 0.0]]), t2(&[&[3f32.ln(), 0.0]]), 1.0));
        assert!((kl - 0.130_812_1).abs() < 1e-6, "{kl}");
        // tau = 2 with doubled logits gives the same distributions, times tau.
        let kl = scalar(kd_kl(t2(&[&[0.0, 0.0]]), t2(&[&[2.0 * 3f32.ln(), 0.0]]), 2.0));
        assert!((kl - 0.261_624_2).abs() < 1e-6, "{kl}");
        // Batch mean: a second, identical-distribution row adds 0.
        let kl = scalar(kd_kl(t2(&[&[0.0, 0.0], &[1.0, 1.0]]), t2(&[&[3f32.ln(), 0.0], &[5.0, 5.0]]), 1.0));
        assert!((kl - 0.130_812_1 / 2.0).abs() < 1e-6, "{kl}");
    }

    #[test]
    fn kd_on_a_hard_answer_matches_the_reference_anchor() {
        // A hard answer enters KD as a one-hot row: softmax(one_hot / 5) for C = 10 is 0.119495
        // at the hot class and 0.097834 elsewhere; against a uniform student (zero logits) the KL
        // is sum p ln(p / 0.1) = 0.00200019, times tau 5 = 0.0100009 (worked in Python, double).
        let mut row = vec![0f32; 10];
        row[3] = 1.0;
        let kl = scalar(kd_kl(t2(&[&[0.0; 10]]), t2(&[&row]), 5.0));
        assert!((kl - 0.010_000_94).abs() < 1e-6, "{kl}");
    }

    #[test]
    fn image_alignment_l1_and_l2_by_hand() {
        let dev = Device::flex();
        let a = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, -1.0, 0.5, 0.0], [1, 1, 2, 2]), &dev);
        let b = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 1.0, 0.5, -0.5], [1, 1, 2, 2]), &dev);
        // |diff| = 1, 2, 0, 0.5 -> mean 0.875; squares 1, 4, 0, 0.25 -> mean 1.3125.
        assert!((scalar(image_alignment(a.clone(), b.clone(), ImageDistance::L1)) - 0.875).abs() < 1e-6);
        assert!((scalar(image_alignment(a.clone(), b.clone(), ImageDistance::L2)) - 1.3125).abs() < 1e-6);
        // diff = [1, -2, 0, 0.5]: sign(diff) / 4 = [0.25, -0.25, 0, 0.25]; 2 diff / 4 = [0.5, -1, 0, 0.25].
        let l1: Vec<f32> =
            image_alignment_grad(a.clone(), b.clone(), ImageDistance::L1).into_data().try_to_vec().unwrap();
        assert_eq!(l1, vec![0.25, -0.25, 0.0, 0.25]);
        let l2: Vec<f32> = image_alignment_grad(a, b, ImageDistance::L2).into_data().try_to_vec().unwrap();
        assert_eq!(l2, vec![0.5, -1.0, 0.0, 0.25]);
    }

    #[test]
    fn dkd_terms_by_hand() {
        // Three classes, target 0 (the teacher's argmax), tau 1.
        // p_t = softmax([2, 1, 0]) = [0.665241, 0.244728, 0.090031]; p_s = softmax([0, 0, 0]) = 1/3 each.
        // TCKD = KL([0.665241, 0.334759] || [1/3, 2/3])
        //      = 0.665241 ln(1.995723) + 0.334759 ln(0.502139) = 0.229077.
        // NCKD = KL(softmax([1, 0]) || softmax([0, 0])) = 0.731059 ln 1.462117 + 0.268941 ln 0.537883
        //      = 0.110944.
        let dev = Device::flex();
        let target = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64], [1]), &dev);
        let (tckd, nckd) = dkd_terms(t2(&[&[0.0, 0.0, 0.0]]), t2(&[&[2.0, 1.0, 0.0]]), target, 1.0);
        assert!((scalar(tckd) - 0.229_077).abs() < 2e-5);
        assert!((scalar(nckd) - 0.110_944).abs() < 2e-5);
    }

    /// The reference's broadcast, computed the way PyTorch does it: `output` `(b,)` times
    /// `log(D + 1e-5)` `(b, 1)` is the `(b, b)` matrix `M[j][i] = y_i * log(D_j + 1e-5)`, and
    /// the loss is `-mean(M)`. Batch: labels [7, 0, 2], D = [0.9, 0.2, 0.5]:
    /// mean(y) = 3, mean(-log(D + 1e-5)) = (0.105349 + 1.609388 + 0.693127) / 3 = 0.802621,
    /// so the loss is 2.407864 (weighting each image by its own index would give 0.707900).
    #[test]
    fn class_index_is_the_reference_broadcast() {
        let labels = [7usize, 0, 2];
        let d = [0.9f64, 0.2, 0.5];
        let mut matrix = 0.0;
        for dj in d {
            for &yi in &labels {
                matrix += yi as f64 * (dj + 1e-5).ln();
            }
        }
        let reference = -matrix / 9.0;
        assert!((reference - 2.407_864).abs() < 1e-5, "{reference}");
        let weights = im_weights(&[0.0; 30], &labels, 10, false, ImWeight::ClassIndex);
        let dev = Device::flex();
        let d_fake = Tensor::<2>::from_data(TensorData::new(d.map(|v| v as f32).to_vec(), [3, 1]), &dev);
        let im = scalar(information_maximisation(d_fake, Tensor::<1>::from_data(TensorData::new(weights, [3]), &dev)));
        assert!((im - reference).abs() < 1e-5, "{im} vs the reference's {reference}");
    }

    #[test]
    fn im_term_in_both_forms() {
        // Soft logits [ln 3, 0] -> max softmax 0.75; class index form uses the argmax (0).
        let targets = [3f32.ln(), 0.0, 0.0, 1.0];
        let labels = [0usize, 1];
        let paper = im_weights(&targets, &labels, 2, false, ImWeight::MaxResponse);
        assert!((paper[0] - 0.75).abs() < 1e-6 && (paper[1] - 0.731_058_6).abs() < 1e-6);
        assert_eq!(im_weights(&targets, &labels, 2, true, ImWeight::MaxResponse), vec![1.0, 1.0]);
        assert_eq!(im_weights(&targets, &labels, 2, false, ImWeight::ClassIndex), vec![0.5, 0.5]);
        // L_IM = mean(-y * ln(D + 1e-5)) with D = [0.5, 0.25], y = [0.75, 1]:
        // (0.75 * 0.693127 + 1 * 1.386254) / 2 = 0.953050.
        let dev = Device::flex();
        let d = Tensor::<2>::from_data(TensorData::new(vec![0.5f32, 0.25], [2, 1]), &dev);
        let y = Tensor::<1>::from_data(TensorData::new(vec![0.75f32, 1.0], [2]), &dev);
        let im = scalar(information_maximisation(d, y));
        let expected = (0.75 * (0.5f64 + 1e-5).ln().abs() + (0.25f64 + 1e-5).ln().abs()) / 2.0;
        assert!((im - expected).abs() < 1e-6, "{im} vs {expected}");
    }

    #[test]
    fn bce_and_mse_by_hand() {
        // z = ln 4 -> sigmoid 0.8: BCE(0.8, 1) = -ln 0.8 = 0.223144; BCE(0.8, 0) = -ln 0.2 = 1.609438.
        let z = 4f32.ln();
        assert!((scalar(bce_with_logits(t2(&[&[z]]), 1.0)) - 0.223_143_6).abs() < 1e-6);
        assert!((scalar(bce_with_logits(t2(&[&[z]]), 0.0)) - 1.609_438).abs() < 1e-5);
        // Saturated logits: the loss is |z| (no overflow) ...
        assert!((scalar(bce_with_logits(t2(&[&[-200.0]]), 1.0)) - 200.0).abs() < 1e-3);
        assert!((scalar(logit_mse(t2(&[&[1.0, 2.0]]), t2(&[&[0.0, 4.0]]))) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn bce_gradient_is_finite_where_the_sigmoid_saturates() {
        // d/dz BCE(z, y) = sigmoid(z) - y: at z = [200, -200] with y = 0 -> [1, 0] / 2 (the mean).
        // The clamped-log form of nn.BCELoss gives NaN here (0 * inf in its backward).
        let dev = Device::flex().autodiff();
        let z = Tensor::<2>::from_data(TensorData::new(vec![200.0f32, -200.0], [2, 1]), &dev).require_grad();
        let grads = bce_with_logits(z.clone(), 0.0).backward();
        let g: Vec<f32> = z.grad(&grads).expect("gradient").into_data().try_to_vec().unwrap();
        assert!((g[0] - 0.5).abs() < 1e-6 && g[1].abs() < 1e-6, "{g:?}");
    }
}
