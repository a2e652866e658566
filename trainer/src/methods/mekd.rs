//! MEKD: deprivatization (step 1, [`super::deprivatize`]), then the student's logits aligned
//! with the teacher's through the frozen generator, on synthetic images only (the edge images
//! never leave the board).

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Distribution, Tensor};

use mekd_models::{Generator, GeneratorConfig};

use super::config::{DistillConfig, QueryMode};
use super::deprivatize::{GanEpoch, deprivatize, freeze, to_pixels};
use super::losses::{ImageDistance, image_alignment, image_alignment_grad, kd_kl};
use super::run::{RunConfig, Stage};
use super::student::{BatchLoss, EpochLength, Objective, Transfer};
use super::{DistillMethod, Prepared};
use crate::progress;

/// Steps per student epoch of MEKD in the reference (the baselines make one pass over their
/// transfer set instead).
pub const MEKD_STEPS_PER_EPOCH: usize = 500;

/// Images generated per forward pass when a budgeted pool is drawn: the generator's activations
/// for a whole pool would not fit in memory.
const POOL_CHUNK: usize = 256;

/// The MEKD method.
pub struct Mekd;

impl DistillMethod for Mekd {
    fn settings_error(&self, config: &RunConfig) -> Option<&'static str> {
        let g = &config.gan;
        (g.epochs == 0 || g.batch == 0 || g.generator_width == 0)
            .then_some("MEKD needs at least one GAN epoch, a GAN batch and a generator width of at least 1")
    }

    fn reference_epoch_length(&self) -> EpochLength {
        EpochLength::Steps(MEKD_STEPS_PER_EPOCH)
    }

    fn prepare<'a>(&self, stage: &mut Stage<'a, '_>) -> Result<Prepared<'a>> {
        let generator = deprivatization_stage(stage)?;
        let (config, device, classes) = (stage.config, stage.device, stage.info.num_classes);
        let transfer = match config.distill.queries {
            QueryMode::Fresh => Transfer::Fresh(Box::new(generator.clone())),
            QueryMode::Budget(n) => Transfer::Pool(stage.cached_pool(|| {
                device.seed(config.seed ^ 0xB0D6E7);
                let mut pixels = Vec::new();
                for start in (0..n).step_by(POOL_CHUNK) {
                    let z = Tensor::<2>::random(
                        [POOL_CHUNK.min(n - start), classes],
                        Distribution::Normal(0.0, 1.0),
                        device,
                    );
                    pixels.extend(to_pixels(generator.forward(z)));
                }
                Ok(pixels)
            })?),
        };
        Ok(Prepared { transfer, objective: Box::new(MekdObjective { generator, config: &config.distill }) })
    }
}

/// The MEKD loss for one batch: `w_f * dist(G(s / tau_g), G(t / tau_g)) + w_kl * KL_tau(t || s)`.
/// Gradients flow through the frozen generator into the student only.
///
/// The generator runs without autodiff: the image term's gradient with respect to `s / tau_g`
/// is computed by [`Generator::latent_grad`] (the generator's vector-Jacobian product by hand:
/// no autodiff graph through the generator) and enters the differentiated loss as
/// `<s / tau_g, g>`, whose gradient is `g`; the reported values are the real ones. The
/// generator's side is kept apart from the student's autodiff graph: the logits cross to it
/// detached and without autodiff, and `g` comes back as a constant of the student's graph. No
/// value is read back to the host, so a step can be recorded as a device graph
/// ([`crate::graph_step`]).
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
    let latent = student_logits.clone().div_scalar(config.tau_g);
    let latents = Tensor::cat(vec![latent.clone().detach(), targets.clone().div_scalar(config.tau_g)], 0);
    let (image, latent_grad) = image_term(generator, latents.without_autodiff(), config.distance);
    let image_by_gradient = (latent * latent_grad.autodiff()).sum();
    let kl = kd_kl(student_logits, targets, config.tau);
    let kl_value = kl.clone().detach().without_autodiff();
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
    pub generator: Generator,
    /// Temperatures and weights.
    pub config: &'a DistillConfig,
}

impl Objective for MekdObjective<'_> {
    fn term_names(&self) -> &'static [&'static str] {
        &["image", "kl"]
    }

    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss {
        mekd_loss(&self.generator, student_logits, targets, self.config)
    }
}

/// MEKD step 1, or its finished result when a resumed run already holds it.
fn deprivatization_stage(stage: &mut Stage) -> Result<Generator> {
    let Stage { run, config, edge, device, resume, .. } = *stage;
    let info = stage.info.clone();
    let [c, h, w] = info.input_shape;
    let done: Vec<GanEpoch> = run.read_jsonl("gan.jsonl")?;
    if resume && done.len() == config.gan.epochs && run.file("generator.bpk").exists() {
        eprintln!("deprivatization finished earlier: reusing {}", run.file("generator.bpk").display());
        let generator = GeneratorConfig::new(info.num_classes, c)
            .with_width(config.gan.generator_width)
            .init(device)?
            .try_load_file(run.file("generator.bpk"))
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", run.file("generator.bpk").display()))?;
        return Ok(freeze(&generator));
    }
    if resume && !done.is_empty() {
        eprintln!(
            "deprivatization was interrupted after epoch {}: it restarts, taking the answers it paid for from the journal",
            done.len()
        );
    }
    std::fs::create_dir_all(run.file("samples"))?;
    let mut gan_rows = Vec::new();
    let bar = progress::bar(config.gan.epochs as u64, "deprivatize");
    let generator = deprivatize(
        edge,
        &mut *stage.teacher,
        &config.gan,
        device,
        config.device.records_graphs(),
        |row, generator: &Generator, usage| {
            bar.inc(1);
            bar.set_message(format!(
                "d {:.3} g {:.3} im {:.3} queries {}",
                row.d_loss, row.g_loss, row.im_loss, row.queries
            ));
            bar.suspend(|| {
                let classes = if row.teacher_labels.is_empty() {
                    String::new()
                } else {
                    let seen = row.teacher_labels.iter().filter(|&&n| n > 0).count();
                    format!(", teacher labels {seen}/{} classes {:?}", row.teacher_labels.len(), row.teacher_labels)
                };
                eprintln!(
                    "deprivatize epoch {:>3}/{}: d {:.4} g {:.4} im {:.4} queries {}{classes} ({:.1}s)",
                    row.epoch, config.gan.epochs, row.d_loss, row.g_loss, row.im_loss, row.queries, row.seconds
                )
            });
            gan_rows.push(row.clone());
            let z = Tensor::<2>::random([64, info.num_classes], Distribution::Normal(0.0, 1.0), device);
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
            run.write_json("usage.json", &usage)
        },
    )?;
    bar.finish_and_clear();
    Ok(freeze(&generator))
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
