//! MEKD step 1, deprivatization: a DCGAN trained on the unlabeled edge images, with the
//! information-maximisation term that queries the teacher once per synthetic image (through
//! the black-box [`Teacher`] only).

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use mekd_contract::Usage;
use mekd_models::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
use mekd_runtime::Dataset;

use super::MethodError;
use super::losses::{ImWeight, bce_with_logits, im_weights, information_maximisation};
use crate::batches::{self, epoch_order};
use crate::blackbox::Teacher;

/// Hyperparameters of deprivatization; [`GanConfig::default`] holds the reference's values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GanConfig {
    /// Epochs over the edge images (the reference takes its generator after 175 of 200).
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Adam learning rate of both networks.
    pub lr: f64,
    /// Weight of the IM term.
    pub alpha: f64,
    /// How the IM weight is read from the teacher's answer.
    pub im_weight: ImWeight,
    /// Generator width.
    pub generator_width: usize,
    /// Discriminator width.
    pub discriminator_width: usize,
    /// Cap on the teacher queries of deprivatization: the IM term is then computed on every
    /// k-th generator step only (k chosen so the cap holds, spread over the whole run) and left
    /// out of the others. `None`: every step asks (the reference).
    #[serde(default)]
    pub im_queries: Option<u64>,
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
            im_queries: None,
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
    /// How many of the epoch's queried synthetic images the teacher put in each class (its top
    /// answer): a generator that collapses onto a few classes shows here first. Empty when the
    /// epoch asked nothing.
    #[serde(default)]
    pub teacher_labels: Vec<u64>,
    /// Wall time of the epoch's steps, teacher queries included (its sample grid and checkpoint
    /// not); 0 in rows written before it was recorded.
    #[serde(default)]
    pub seconds: f64,
}

/// Images in [-1, 1] as the `u8` pixels a black-box API takes (what the teacher really sees).
pub fn to_pixels(images: Tensor<4>) -> Vec<u8> {
    let values: Vec<f32> = images.into_data().try_to_vec().expect("f32 images");
    values.iter().map(|v| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8).collect()
}

/// The two networks of deprivatization, their optimisers, and one training step.
pub struct Gan {
    /// The generator being trained.
    pub generator: Generator,
    discriminator: Discriminator,
    opt_g: ModuleOptimizer,
    opt_d: ModuleOptimizer,
    config: GanConfig,
    classes: usize,
    hard: bool,
    needs_answers: bool,
    /// Ask the teacher on every `im_every`-th generator step.
    im_every: usize,
    steps_done: usize,
    queries_done: u64,
    /// Per class: synthetic images the teacher labelled so, since the last `take_label_counts`.
    label_counts: Vec<u64>,
}

impl Gan {
    /// Fresh networks for a teacher with `classes` classes answering `hard` or soft, for images
    /// with `channels` channels (seeded by `config.seed`).
    pub fn new(
        config: &GanConfig,
        classes: usize,
        channels: usize,
        hard: bool,
        device: &Device,
    ) -> Result<Self, MethodError> {
        device.seed(config.seed);
        let generator = GeneratorConfig::new(classes, channels).with_width(config.generator_width).init(device)?;
        let discriminator = DiscriminatorConfig::new(channels).with_width(config.discriminator_width).init(device)?;
        let adam = AdamConfig::new().with_beta_1(0.5).with_beta_2(0.999).with_epsilon(1e-8);
        Ok(Self {
            generator,
            discriminator,
            opt_g: adam.init(),
            opt_d: adam.init(),
            config: config.clone(),
            classes,
            hard,
            // The paper's IM weight of a hard answer is 1 whatever the answer, so asking is
            // pointless (and so is asking when the IM term is off).
            needs_answers: config.alpha != 0.0 && !(hard && config.im_weight == ImWeight::MaxResponse),
            im_every: 1,
            steps_done: 0,
            queries_done: 0,
            label_counts: vec![0; classes],
        })
    }

    /// Spread `config.im_queries` over a run of `images` synthetic images in total (epochs times
    /// edge images): the IM term is computed on every k-th step.
    pub fn plan_queries(&mut self, images: u64) {
        if let Some(cap) = self.config.im_queries {
            self.im_every = if cap == 0 { usize::MAX } else { images.div_ceil(cap).max(1) as usize };
        }
    }

    /// The teacher's top answers counted per class since the last call (empty if none).
    pub fn take_label_counts(&mut self) -> Vec<u64> {
        let counts = std::mem::replace(&mut self.label_counts, vec![0; self.classes]);
        if counts.iter().all(|&n| n == 0) { Vec::new() } else { counts }
    }

    /// One discriminator step on `real` images and one generator step with fresh noise, asking
    /// the teacher once per synthetic image (when its answer matters). Returns the
    /// discriminator loss, the generator loss and the IM term, still on the device.
    pub fn step(&mut self, real: Tensor<4>, teacher: &mut dyn Teacher) -> Result<[Tensor<1>; 3], MethodError> {
        let [b, _, _, _] = real.dims();
        let device = real.device();
        let (classes, lr) = (self.classes, self.config.lr);
        let z = Tensor::<2>::random([b, classes], Distribution::Normal(0.0, 1.0), &device);
        let fake = self.generator.forward(z).detach();
        let d_loss = bce_with_logits(self.discriminator.forward_logits(real), 1.0)
            + bce_with_logits(self.discriminator.forward_logits(fake), 0.0);
        let grads = GradientsParams::from_grads(d_loss.backward(), &self.discriminator);
        self.discriminator = self.opt_d.step(lr, self.discriminator.clone(), grads);

        let z = Tensor::<2>::random([b, classes], Distribution::Normal(0.0, 1.0), &device);
        let fake = self.generator.forward(z);
        let cap = self.config.im_queries.unwrap_or(u64::MAX);
        let ask = self.steps_done.is_multiple_of(self.im_every) && self.queries_done + b as u64 <= cap;
        self.steps_done += 1;
        let weights = if !self.needs_answers {
            vec![1.0; b]
        } else if ask {
            let responses = teacher.query(&to_pixels(fake.clone().detach()))?;
            self.queries_done += b as u64;
            let (targets, labels) = (responses.targets(classes), responses.labels(classes));
            for &label in &labels {
                self.label_counts[label] += 1;
            }
            im_weights(&targets, &labels, classes, self.hard, self.config.im_weight)
        } else {
            // Over the query cap: the IM term is left out of this step.
            vec![0.0; b]
        };
        let weights = Tensor::<1>::from_data(TensorData::new(weights, [b]), &device);
        let d_fake = self.discriminator.forward_logits(fake);
        let im = information_maximisation(sigmoid(d_fake.clone()), weights);
        let g_loss = bce_with_logits(d_fake, 1.0) + im.clone().mul_scalar(self.config.alpha);
        let grads = GradientsParams::from_grads(g_loss.backward(), &self.generator);
        self.generator = self.opt_g.step(lr, self.generator.clone(), grads);
        Ok([d_loss.detach(), g_loss.detach(), im.detach()])
    }
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
    let hard = teacher.info().response == mekd_contract::protocol::ResponseMode::Hard;
    let mut gan = Gan::new(config, teacher.info().num_classes, edge.shape[0], hard, device)?;
    gan.plan_queries((config.epochs * edge.len()) as u64);
    for epoch in 0..config.epochs {
        let started = std::time::Instant::now();
        let order = epoch_order(edge.len(), config.seed, epoch);
        // Loss sums stay on the device: the only host round trip of a step is the teacher's.
        let mut sums: Option<[Tensor<1>; 3]> = None;
        let mut steps = 0usize;
        for chunk in order.chunks(config.batch) {
            let values = gan.step(batches::images(edge, chunk, device), teacher)?;
            sums = Some(match sums {
                None => values,
                Some([a, b, c]) => {
                    let [x, y, z] = values;
                    [a + x, b + y, c + z]
                }
            });
            steps += 1;
        }
        let [d_loss, g_loss, im_loss] =
            sums.map_or([0.0; 3], |sums| sums.map(|t| t.into_scalar::<f32>() as f64 / steps.max(1) as f64));
        let row = GanEpoch {
            epoch: epoch + 1,
            d_loss,
            g_loss,
            im_loss,
            queries: teacher.usage().queries,
            teacher_labels: gan.take_label_counts(),
            seconds: started.elapsed().as_secs_f64(),
        };
        on_epoch(&row, &gan.generator, teacher.usage()).map_err(MethodError::Callback)?;
    }
    Ok(gan.generator)
}

/// The frozen generator for distillation: inference BatchNorm, no parameter gradients.
pub fn freeze(generator: &Generator) -> Generator {
    generator.valid().no_grad()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frozen_generator_is_a_pure_function_even_of_autodiff_inputs() {
        let train = Device::flex().autodiff();
        train.seed(2);
        let generator = GeneratorConfig::new(10, 1).with_width(8).init(&train).unwrap();
        let frozen = freeze(&generator);
        let z = Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 1.0), &train);
        let first: Vec<f32> = frozen.forward(z.clone()).into_data().try_to_vec().unwrap();
        let other = Tensor::<2>::random([64, 10], Distribution::Normal(0.0, 3.0), &train);
        let _ = frozen.forward(other);
        let again: Vec<f32> = frozen.forward(z.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(first, again, "a frozen generator's output may not depend on earlier batches");
        let single: Vec<f32> = frozen.forward(z.slice([0..1, 0..10])).into_data().try_to_vec().unwrap();
        assert_eq!(&first[..1024], &single[..], "nor on the rest of its batch (inference BatchNorm)");
    }
}
