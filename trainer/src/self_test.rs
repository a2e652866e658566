//! `mekd self-test --device X`: runs distillation's numeric paths on a device and on the CPU
//! reference backend (flex), and compares them. A backend that trains without error can still
//! compute wrong numbers (a fusion or kernel bug); this finds out in seconds, on a generator
//! and inputs small enough to print.
//!
//! Checked: the generator's images, the MEKD loss (value, its terms, and its gradient with
//! respect to the student's logits, through the hand-written generator VJP and through plain
//! autodiff), the GAN's BCE gradient at saturated logits, a tracked tensor times a plain one
//! (the value of `x - x.detach()`, which a correct backend keeps at exactly zero, and the
//! gradient), one whole MEKD step of a small student (its loss, and its logits after it), and
//! MEKD steps of a ResNet8 recorded as a device graph and replayed (`graph_step`).
//! On a GPU (`wgpu:N`) also the reference-width generator over the MEKD loss's 256 latents:
//! kernels are chosen by size (autotuning), so the small probes alone leave the real ones
//! unchecked.

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::Serialize;

use mekd_contract::protocol::ResponseMode;
use mekd_models::{
    Architecture, Classifier, ClassifierSpec, Discriminator, DiscriminatorConfig, Generator, GeneratorConfig,
};

use mekd_contract::{Normalisation, to_model_input};
use mekd_runtime::rng::SplitMix64;

use crate::blackbox::BurnTeacher;
use crate::device::DeviceKind;
use crate::graph_step::{self, StepInputs};
use crate::methods::config::DistillConfig;
use crate::methods::deprivatize::{Gan, GanConfig, freeze};
use crate::methods::losses::{ImageDistance, bce_with_logits, image_alignment};
use crate::methods::mekd::{MekdObjective, mekd_loss};
use crate::methods::student::{Objective, StudentStep};

/// One compared quantity.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was computed.
    pub name: String,
    /// Values on flex.
    pub reference: Vec<f32>,
    /// Values on the device under test.
    pub got: Vec<f32>,
    /// The absolute difference of the element furthest outside its tolerance.
    pub worst_diff: f32,
    /// That element's tolerance ([`Tolerance::allowed`]).
    pub tolerance: f32,
    /// Within tolerance.
    pub pass: bool,
}

const BATCH: usize = 8;
const CLASSES: usize = 10;
/// The full-size probe: the reference generator width over the MEKD loss's stacked batch
/// (student and teacher latents of a batch of 128).
const FULL_WIDTH: usize = 128;
const FULL_BATCH: usize = 256;

/// `n` deterministic values, uniform on a grid in `[-scale, scale]`.
fn draw(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.below(20_001) as f32 / 10_000.0 - 1.0) * scale).collect()
}

/// Deterministic inputs: logits of a student and a teacher.
fn inputs() -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(11);
    (draw(&mut rng, BATCH * CLASSES, 3.0), draw(&mut rng, BATCH * CLASSES, 8.0))
}

/// A frozen generator of `width` with non-trivial BatchNorm statistics, built on flex (seeded)
/// so every device gets the same weights.
fn reference_generator(width: usize) -> Result<Generator> {
    let train = Device::flex().autodiff();
    train.seed(17);
    let generator = GeneratorConfig::new(CLASSES, 1).with_width(width).init(&train)?;
    for _ in 0..2 {
        let _ = generator.forward(Tensor::<2>::random([32, CLASSES], Distribution::Normal(0.0, 2.0), &train));
    }
    Ok(generator.valid().no_grad())
}

/// The values of `t`, as f32, on the host.
pub(crate) fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().expect("f32 values")
}

/// Every probed quantity on `device` (`plain` without autodiff), in a fixed order; `full`: the
/// full-size generator probe too; `graphs`: the GAN's steps as recorded graphs (the device
/// under test), else op by op (the reference).
fn probe(
    generator: &Generator,
    full: Option<&Generator>,
    plain: &Device,
    device: &Device,
    graphs: bool,
) -> Result<Vec<(String, Vec<f32>)>> {
    let generator = generator.clone().to_device(plain);
    let (s, t) = inputs();
    let tensor = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [BATCH, CLASSES]), device);
    let mut out = Vec::new();
    let images = generator.forward(tensor(&t).without_autodiff());
    out.push(("generator images".to_string(), values(images)));
    if let Some(full) = full {
        let latents = draw(&mut SplitMix64::new(13), FULL_BATCH * CLASSES, 2.0);
        let latents = Tensor::<2>::from_data(TensorData::new(latents, [FULL_BATCH, CLASSES]), plain);
        let images = full.clone().to_device(plain).forward_traced(latents).images().clone();
        out.push((format!("generator images, width {FULL_WIDTH}, b{FULL_BATCH}"), values(images)));
    }

    for distance in [ImageDistance::L1, ImageDistance::L2] {
        // The image term alone carries the gradient (the KL's would hide an error in it); the
        // KL's value is still reported.
        let config = DistillConfig { distance, w_kl: 0.0, ..DistillConfig::default() };
        let logits = tensor(&s).require_grad();
        let loss = mekd_loss(&generator, logits.clone(), tensor(&t), &config);
        let mut reported = values(loss.total.clone());
        reported.extend(loss.terms.iter().flat_map(|term| values(term.clone())));
        out.push((format!("mekd {distance:?}: total, image, kl"), reported));
        let grads = loss.differentiable.backward();
        out.push((
            format!("mekd {distance:?}: d/d logits, hand VJP"),
            logits.grad(&grads).map(values).unwrap_or_default(),
        ));

        // Plain autodiff through the generator; the teacher's images arrive as host data (two
        // generator outputs combined on the device hit a burn-wgpu bug, see `mekd_loss`).
        let logits = tensor(&s).require_grad();
        let g_t = generator.forward(tensor(&t).div_scalar(config.tau_g).without_autodiff()).into_data();
        let g_t = Tensor::<4>::from_data(g_t, device);
        let g_s = generator.forward(logits.clone().div_scalar(config.tau_g));
        let grads = image_alignment(g_s, g_t, distance).backward();
        out.push((
            format!("mekd {distance:?}: d/d logits, autodiff"),
            logits.grad(&grads).map(values).unwrap_or_default(),
        ));
    }

    let saturated = Tensor::<2>::from_data(TensorData::new(vec![200.0f32, -200.0, 3.0, -3.0], [4, 1]), device);
    let saturated = saturated.require_grad();
    let grads = bce_with_logits(saturated.clone(), 0.0).backward();
    out.push(("bce logits gradient".to_string(), saturated.grad(&grads).map(values).unwrap_or_default()));

    // A tracked tensor times a plain one created for the product (its last use on the plain
    // side): the pattern of the first hand-VJP loss, which gave wrong values on burn-wgpu.
    let logits = tensor(&s).require_grad();
    let plain_factor = Tensor::<2>::from_data(TensorData::new(t.clone(), [BATCH, CLASSES]), plain);
    let linear = (logits.clone() * plain_factor).sum();
    out.push(("mixed graph: x - x.detach() (must be 0)".to_string(), values(linear.clone() - linear.clone().detach())));
    let grads = linear.backward();
    out.push(("mixed graph: d/dx <x, plain>".to_string(), logits.grad(&grads).map(values).unwrap_or_default()));

    // A whole MEKD student step, as `mekd distill` runs it: a student network's logits (not a
    // leaf) through the loss, backward into its weights, one SGD step.
    let spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: CLASSES };
    let student = reference_student(&spec, device);
    let pixels: Vec<u8> = (0..BATCH * 32 * 32).map(|i| ((i * 37 + i / 1024 * 11) % 256) as u8).collect();
    let config = DistillConfig::default();
    let objective = MekdObjective { generator: generator.clone(), config: &config };
    let step = StudentStep { spec: &spec, objective: &objective, device };
    let mut optim = config.sgd.optimizer();
    let (student, loss, terms) = step.run(student, &mut optim, &pixels, t.clone(), 0.1);
    let mut reported = values(loss);
    reported.extend(terms.into_iter().flat_map(values));
    out.push(("student step: loss, image, kl".to_string(), reported));
    let input = to_model_input(&pixels, spec.image_shape(), &Normalisation::symmetric(1));
    let x = Tensor::<4>::from_data(TensorData::new(input.clone(), [BATCH, 1, 32, 32]), device);
    out.push((
        "student step: logits after it".to_string(),
        values(student.valid().forward(x.clone().without_autodiff())),
    ));

    // The same step recorded as a device graph and replayed (`graph_step`; CUDA graphs on
    // cuda, the step run again on flex): a ResNet8, whose BatchNorm running statistics are
    // rewritten in place too, three steps on three batches. A replay that read stale buffers
    // would repeat a loss, or leave the model as it was.
    let spec = ClassifierSpec { architecture: Architecture::ResNet8, in_channels: 1, num_classes: CLASSES };
    let student = reference_student(&spec, device);
    let flat = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), plain);
    let inputs = StepInputs { floats: vec![flat(input.clone()), flat(t.clone())], ints: Vec::new() };
    let recorded = graph_step::record(student, &config.sgd, 0.1, inputs, plain, |student: &Classifier, inputs| {
        let x = inputs.floats[0].clone().reshape([BATCH, 1, 32, 32]).autodiff();
        let loss = objective.loss(student.forward(x), inputs.floats[1].clone().reshape([BATCH, CLASSES]).autodiff());
        (loss.differentiable, loss.total)
    });
    let mut step = recorded.context("recording the graph step")?;
    let mut losses = Vec::new();
    for k in 0..3 {
        let shifted: Vec<f32> = input.iter().map(|v| (v + 0.25 * k as f32).min(1.0)).collect();
        step.set_floats(0, shifted)?;
        step.set_floats(1, s.iter().map(|v| v * (k + 1) as f32).collect())?;
        losses.extend(values(step.step()?));
    }
    out.push(("graph steps: three losses".to_string(), losses));
    let logits = values(step.model().forward(x.without_autodiff()));
    out.push(("graph steps: logits after them".to_string(), logits));

    // Deprivatization's step (`Gan::step`): on the device under test as two recorded graphs
    // around the teacher's query (Adam in place, host draws written in), against flex op by op:
    // three steps' losses, then the generator's images.
    let (gan_generator, discriminator) = reference_gan(device)?;
    let gan_config = GanConfig { batch: BATCH, ..GanConfig::default() };
    let teacher_spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: CLASSES };
    let teacher_model = reference_student(&teacher_spec, &Device::flex().autodiff()).valid().to_device(plain);
    let mut teacher = BurnTeacher::from_model(teacher_model, &teacher_spec, plain, ResponseMode::Soft, None, None);
    let mut gan = Gan::with_networks(gan_generator, discriminator, &gan_config, CLASSES, false, graphs);
    let mut losses = Vec::new();
    for k in 0..3 {
        let shifted: Vec<f32> = input.iter().map(|v| (v - 0.25 * k as f32).max(-1.0)).collect();
        let real = Tensor::<4>::from_data(TensorData::new(shifted, [BATCH, 1, 32, 32]), device);
        losses.extend(gan.step(real, &mut teacher)?.into_iter().flat_map(values));
    }
    out.push(("gan steps: d, g and im losses of three".to_string(), losses));
    let latents = Tensor::<2>::from_data(TensorData::new(t.clone(), [BATCH, CLASSES]), plain);
    let images = values(freeze(&gan.generator()).to_device(plain).forward(latents));
    out.push(("gan steps: generator images after them".to_string(), images));
    Ok(out)
}

/// Deprivatization's networks at small widths, seeded on flex (so every device gets the same
/// weights), forked to `device`.
fn reference_gan(device: &Device) -> Result<(Generator, Discriminator)> {
    let flex = Device::flex().autodiff();
    flex.seed(29);
    let generator = GeneratorConfig::new(CLASSES, 1).with_width(16).init(&flex)?;
    let discriminator = DiscriminatorConfig::new(1).with_width(4).init(&flex)?;
    mekd_models::initialise(&generator);
    mekd_models::initialise(&discriminator);
    Ok((generator.fork(device), discriminator.fork(device)))
}

/// A `spec` student with seeded weights, built on flex so every device gets the same ones (a
/// forward pass materialises burn's lazily initialised parameters here, before they move), on
/// `device` for training. Moved by `fork`, not `to_device`: a moved parameter is no longer a
/// leaf that requires a gradient, and a step would leave the student as it was.
fn reference_student(spec: &ClassifierSpec, device: &Device) -> Classifier {
    let flex = Device::flex().autodiff();
    flex.seed(23);
    let student = spec.init(&flex).expect("the zoo's students build");
    let _ = student.forward(Tensor::<4>::zeros([1, 1, 32, 32], &flex));
    student.fork(device)
}

/// How far a device's value may be from flex's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Times the element's own reference magnitude.
    pub relative: f32,
    /// Times the largest reference magnitude of the check (so a small term next to a large one is
    /// still checked).
    pub of_largest: f32,
}

impl Tolerance {
    /// f32 arithmetic in another order: 1e-3 of the element plus 1e-5 of the largest.
    pub const F32: Tolerance = Tolerance { relative: 1e-3, of_largest: 1e-5 };
    /// TF32 tensor cores (10-bit mantissas in the products of matmuls and convolutions, as
    /// PyTorch's default `cudnn.allow_tf32`): 1e-2 of the element plus 1e-2 of the largest. The
    /// second term covers the L1 image term's gradient, `sign(G(s) - G(t))` pulled back through
    /// the generator: where TF32 moves the images past each other a sign flips (measured on an
    /// H200: 0.6% of the largest value; BENCHMARKS.md).
    pub const TF32: Tolerance = Tolerance { relative: 1e-2, of_largest: 1e-2 };

    /// The tolerance `device` is held to.
    pub fn of(device: DeviceKind) -> Tolerance {
        match device {
            DeviceKind::Cuda(_) => Tolerance::TF32,
            _ => Tolerance::F32,
        }
    }

    /// What an element whose reference is `reference` may differ by, in a check whose largest
    /// reference magnitude is `largest`.
    pub fn allowed(self, reference: f32, largest: f32) -> f32 {
        (self.relative * reference.abs() + self.of_largest * largest).max(1e-12)
    }
}

/// Run the probes on flex and on `device`, and compare them within [`Tolerance::of`] `device`.
pub fn self_test(device: DeviceKind) -> Result<Vec<Check>> {
    let generator = reference_generator(16)?;
    // The full-size probe costs seconds on a CPU backend: GPUs only.
    let gpu = matches!(device, DeviceKind::Wgpu(_) | DeviceKind::Cuda(_));
    let full = gpu.then(|| reference_generator(FULL_WIDTH)).transpose()?;
    let tolerance = Tolerance::of(device);
    let reference = probe(&generator, full.as_ref(), &Device::flex(), &Device::flex().autodiff(), false)?;
    let got = probe(&generator, full.as_ref(), &device.device()?, &device.training_device()?, true)?;
    Ok(reference
        .into_iter()
        .zip(got)
        .map(|((name, reference), (_, got))| {
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let allowed = |r: f32| tolerance.allowed(r, scale);
            // The element furthest outside (or least inside) its own tolerance.
            let (worst_diff, tolerance) = if reference.len() == got.len() {
                reference
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| ((a - b).abs(), allowed(*a)))
                    .max_by(|x, y| (x.0 / x.1).total_cmp(&(y.0 / y.1)))
                    .unwrap_or((0.0, 1e-12))
            } else {
                (f32::INFINITY, 0.0)
            };
            let pass = worst_diff <= tolerance;
            Check { name, reference, got, worst_diff, tolerance, pass }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probed student step trains the student: a check of its logits after a step that left
    /// it as it was would test nothing (it did, before `reference_student` forked).
    #[test]
    fn the_student_step_moves_the_student() {
        let spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: CLASSES };
        let device = Device::flex().autodiff();
        let student = reference_student(&spec, &device);
        let pixels: Vec<u8> = (0..BATCH * 32 * 32).map(|i| (i * 37 % 256) as u8).collect();
        let input = to_model_input(&pixels, spec.image_shape(), &Normalisation::symmetric(1));
        let x = Tensor::<4>::from_data(TensorData::new(input, [BATCH, 1, 32, 32]), &Device::flex());
        let before = values(student.valid().forward(x.clone()));
        let config = DistillConfig::default();
        let objective = MekdObjective { generator: reference_generator(16).unwrap(), config: &config };
        let step = StudentStep { spec: &spec, objective: &objective, device: &device };
        let (_, targets) = inputs();
        let (student, _, _) = step.run(student, &mut config.sgd.optimizer(), &pixels, targets, 0.1);
        let after = values(student.valid().forward(x));
        let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved > 1e-4, "the step left the logits within {moved} of where they were");
    }
}
