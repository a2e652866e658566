//! MEKD step 1, deprivatization: a DCGAN trained on the unlabeled edge images, with the
//! information-maximisation term that queries the teacher once per synthetic image (through
//! the black-box [`Teacher`] only).

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use mekd_models::{DiscriminatorConfig, Generator, GeneratorConfig};
use mekd_runtime::Dataset;

use super::MethodError;
use super::losses::{ImWeight, bce, im_weights, information_maximisation};
use crate::batches::{self, epoch_order};
use crate::blackbox::{Teacher, Usage};

/// Hyperparameters of deprivatization (reference defaults).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GanConfig {
    /// Epochs over the edge images (reference: 200, generator taken after 175).
    pub epochs: usize,
    /// Batch size (64).
    pub batch: usize,
    /// Adam learning rate (2e-4) for both networks.
    pub lr: f64,
    /// Weight of the IM term (0.5).
    pub alpha: f64,
    /// How the IM weight is read from the teacher's answer.
    pub im_weight: ImWeight,
    /// Generator width (reference 128).
    pub generator_width: usize,
    /// Discriminator width (reference 16).
    pub discriminator_width: usize,
    /// Seed of the noise and the batch order.
    pub seed: u64,
}

impl Default for GanConfig {
    fn default() -> Self {
        Self {
            epochs: 200,
            batch: 64,
            lr: 2e-4,
            alpha: 0.5,
            im_weight: ImWeight::MaxResponse,
            generator_width: 128,
            discriminator_width: 16,
            seed: 0,
        }
    }
}

/// Losses of one epoch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GanEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean discriminator loss.
    pub d_loss: f64,
    /// Mean generator loss (adversarial + alpha * IM).
    pub g_loss: f64,
    /// Mean IM term.
    pub im_loss: f64,
    /// Teacher queries so far.
    pub queries: u64,
}

/// Images in [-1, 1] as the `u8` pixels a black-box API takes (what the teacher really sees).
pub fn to_pixels(images: Tensor<4>) -> Vec<u8> {
    let values: Vec<f32> = images.into_data().try_to_vec().expect("f32 images");
    values.iter().map(|v| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8).collect()
}

/// Train the generator on `edge` (unlabeled images at the teacher's input shape), calling
/// `on_epoch` after every epoch (for checkpoints and sample grids) with the teacher's usage.
/// The teacher is asked once per synthetic image of each generator step, except when its
/// answer cannot change the IM weight (hard answers with the paper's form, or `alpha` = 0).
pub fn deprivatize(
    edge: &Dataset,
    teacher: &mut dyn Teacher,
    config: &GanConfig,
    device: &Device,
    mut on_epoch: impl FnMut(&GanEpoch, &Generator, Usage) -> anyhow::Result<()>,
) -> Result<Generator, MethodError> {
    let classes = teacher.info().num_classes;
    let [channels, _, _] = edge.shape;
    let hard = teacher.info().response == mekd_runtime::protocol::ResponseMode::Hard;
    // The paper's IM weight of a hard answer is 1 whatever the answer, so asking is pointless
    // (and so is asking when the IM term is off).
    let needs_answers = config.alpha != 0.0 && !(hard && config.im_weight == ImWeight::MaxResponse);
    device.seed(config.seed);
    let mut generator = GeneratorConfig::new(classes, channels).with_width(config.generator_width).init(device)?;
    let mut discriminator = DiscriminatorConfig::new(channels).with_width(config.discriminator_width).init(device)?;
    let adam = AdamConfig::new().with_beta_1(0.5).with_beta_2(0.999).with_epsilon(1e-8);
    let (mut opt_g, mut opt_d) = (adam.init(), adam.init());
    for epoch in 0..config.epochs {
        let order = epoch_order(edge.len(), config.seed, epoch);
        let (mut d_sum, mut g_sum, mut im_sum, mut steps) = (0.0, 0.0, 0.0, 0usize);
        for chunk in order.chunks(config.batch) {
            let b = chunk.len();
            // Discriminator step.
            let real = batches::images(edge, chunk, device);
            let z = Tensor::<2>::random([b, classes], Distribution::Normal(0.0, 1.0), device);
            let fake = generator.forward(z).detach();
            let d_loss = bce(discriminator.forward(real), 1.0) + bce(discriminator.forward(fake), 0.0);
            let grads = GradientsParams::from_grads(d_loss.backward(), &discriminator);
            d_sum += d_loss.into_scalar::<f32>() as f64;
            discriminator = opt_d.step(config.lr, discriminator, grads);
            // Generator step, fresh noise, one teacher query per synthetic image.
            let z = Tensor::<2>::random([b, classes], Distribution::Normal(0.0, 1.0), device);
            let fake = generator.forward(z);
            let weights = if needs_answers {
                let responses = teacher.query(&to_pixels(fake.clone().detach()))?;
                im_weights(&responses.targets(classes), &responses.labels(classes), classes, hard, config.im_weight)
            } else {
                vec![1.0; b]
            };
            let weights = Tensor::<1>::from_data(TensorData::new(weights, [b]), device);
            let d_fake = discriminator.forward(fake);
            let im = information_maximisation(d_fake.clone(), weights);
            let g_loss = bce(d_fake, 1.0) + im.clone().mul_scalar(config.alpha);
            let grads = GradientsParams::from_grads(g_loss.backward(), &generator);
            g_sum += g_loss.into_scalar::<f32>() as f64;
            im_sum += im.into_scalar::<f32>() as f64;
            generator = opt_g.step(config.lr, generator, grads);
            steps += 1;
        }
        let row = GanEpoch {
            epoch: epoch + 1,
            d_loss: d_sum / steps.max(1) as f64,
            g_loss: g_sum / steps.max(1) as f64,
            im_loss: im_sum / steps.max(1) as f64,
            queries: teacher.usage().queries,
        };
        on_epoch(&row, &generator, teacher.usage()).map_err(MethodError::Callback)?;
    }
    Ok(generator)
}

/// The frozen generator for distillation: inference BatchNorm, no parameter gradients.
pub fn freeze(generator: &Generator) -> Generator {
    generator.valid().no_grad()
}
