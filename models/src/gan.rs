//! The MEKD deprivatization GAN: a DCGAN generator whose latent has one dimension per class
//! (so it can also take logits), and its discriminator.

use crate::ops::{batch_norm, conv2d, convolve};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::interpolate::{Interpolate2d, Interpolate2dConfig, InterpolateMode};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{leaky_relu, tanh};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};

use crate::IMAGE_SIZE;
use crate::cost::{self, Hw};
use crate::error::ModelError;

/// LeakyReLU slope of both networks.
const LEAKY_SLOPE: f64 = 0.2;

/// Hyperparameters of the generator.
#[derive(Config, Debug, PartialEq)]
pub struct GeneratorConfig {
    /// Latent size = number of classes of the teacher.
    pub num_classes: usize,
    /// Image channels produced.
    pub channels: usize,
    /// Channels of the 8x8 seed and the first conv; the second conv has half. Reference: 128.
    #[config(default = 128)]
    pub width: usize,
    /// Epsilon of the BatchNorms after the convolutions (the reference code's quirk: 0.8).
    #[config(default = 0.8)]
    pub bn_eps: f64,
}

impl GeneratorConfig {
    /// Check the configuration.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.num_classes < 2 || self.channels == 0 || self.width < 2 || !self.width.is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!(
                "generator needs >= 2 classes, >= 1 channel and an even width >= 2, got {self:?}"
            )));
        }
        if !(self.bn_eps.is_finite() && self.bn_eps > 0.0) {
            return Err(ModelError::InvalidConfig(format!("bn_eps must be positive, got {}", self.bn_eps)));
        }
        Ok(())
    }

    /// Build a generator with the reference initialisation (conv N(0, 0.02), BN weight N(1, 0.02)).
    pub fn init(&self, device: &Device) -> Result<Generator, ModelError> {
        self.validate()?;
        let seed = IMAGE_SIZE / 4;
        let w = self.width;
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device)
        };
        let conv = |c_in, c_out| reset_bias(conv(c_in, c_out), c_in, device);
        Ok(Generator {
            fc: LinearConfig::new(self.num_classes, w * seed * seed).init(device),
            bn0: gan_batch_norm(w, 1e-5, device),
            up: Interpolate2dConfig::new()
                .with_scale_factor(Some([2.0, 2.0]))
                .with_mode(InterpolateMode::Nearest)
                .init(),
            conv1: conv(w, w),
            bn1: gan_batch_norm(w, self.bn_eps, device),
            conv2: conv(w, w / 2),
            bn2: gan_batch_norm(w / 2, self.bn_eps, device),
            conv3: conv(w / 2, self.channels),
            width: w,
            seed,
        })
    }
}

/// PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the reference
/// keeps (its custom init only touches conv weights).
fn reset_bias(mut conv: Conv2d, c_in: usize, device: &Device) -> Conv2d {
    let bound = 1.0 / ((c_in * 9) as f64).sqrt();
    conv.bias = conv.bias.map(|b| {
        let [n] = b.shape().dims();
        Param::from_tensor(Tensor::random([n], Distribution::Uniform(-bound, bound), device))
    });
    conv
}

/// BatchNorm with weight ~ N(1, 0.02), bias 0.
fn gan_batch_norm(channels: usize, eps: f64, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).with_epsilon(eps).init(device);
    bn.gamma = Initializer::Normal { mean: 1.0, std: 0.02 }.init([channels], device);
    bn
}

/// Generator: Linear(C -> w*8*8), BN, up x2, conv(w)-BN-LReLU, up x2, conv(w/2)-BN-LReLU,
/// conv(channels)-Tanh. 312,705 parameters at the reference width for C=10, 1 channel.
#[derive(Module, Debug)]
pub struct Generator {
    fc: Linear,
    bn0: BatchNorm,
    up: Interpolate2d,
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    width: usize,
    seed: usize,
}

impl Generator {
    /// Images in `[-1, 1]`, shape `[batch, channels, 32, 32]`, from latents `[batch, classes]`.
    pub fn forward(&self, z: Tensor<2>) -> Tensor<4> {
        self.forward_parts(z).images
    }

    /// The forward pass of a frozen generator (see [`Generator::latent_grad`]), keeping what its
    /// backward pass needs. `z` is taken without autodiff: nothing is recorded.
    pub fn forward_traced(&self, z: Tensor<2>) -> GeneratorTrace {
        self.forward_parts(z.without_autodiff())
    }

    /// The layers, with the pre-activations of the two hidden convolution blocks kept.
    fn forward_parts(&self, z: Tensor<2>) -> GeneratorTrace {
        let [batch, _] = z.dims();
        let x = self.fc.forward(z).reshape([batch, self.width, self.seed, self.seed]);
        let x = self.up.forward(batch_norm(&self.bn0, x));
        let pre1 = batch_norm(&self.bn1, conv2d(&self.conv1, x));
        let x = self.up.forward(leaky_relu(pre1.clone(), LEAKY_SLOPE));
        let pre2 = batch_norm(&self.bn2, conv2d(&self.conv2, x));
        let images = tanh(conv2d(&self.conv3, leaky_relu(pre2.clone(), LEAKY_SLOPE)));
        GeneratorTrace { pre1, pre2, images }
    }

    /// The gradient with respect to the latent of a loss whose gradient with respect to the
    /// images of `trace` is `images_grad`: the vector-Jacobian product of the frozen generator
    /// (inference BatchNorm), by hand.
    ///
    /// Why by hand: MEKD differentiates through the frozen generator at every step, and this
    /// needs no autodiff graph and no data-gradient kernels: for the generator's 3x3, stride 1,
    /// padding 1 convolutions the input gradient *is* a forward convolution, with the kernel
    /// transposed (in/out channels) and flipped; nearest 2x upsampling's is a 2x2 sum;
    /// BatchNorm's a per-channel scale. (Its cost is that of the convolutions; on burn-wgpu
    /// 0.22 they run as direct convolutions: `BENCHMARKS.md`.)
    /// Agrees with autodiff through [`Generator::forward`] (test `latent_grad_matches_autodiff`).
    pub fn latent_grad(&self, trace: &GeneratorTrace, images_grad: Tensor<4>) -> Tensor<2> {
        let [batch, _, _, _] = images_grad.dims();
        let images = &trace.images;
        let g = images_grad.without_autodiff() * images.clone().powi_scalar(2).neg().add_scalar(1.0);
        let g = conv_input_grad(&self.conv3, g) * leaky_relu_slope(&trace.pre2);
        let g = conv_input_grad(&self.conv2, g * bn_scale(&self.bn2));
        let g = upsample_grad(g) * leaky_relu_slope(&trace.pre1);
        let g = conv_input_grad(&self.conv1, g * bn_scale(&self.bn1));
        let g = (upsample_grad(g) * bn_scale(&self.bn0)).reshape([batch, self.width * self.seed * self.seed]);
        g.matmul(self.fc.weight.val().without_autodiff().transpose())
    }

    /// Multiply-adds per generated image.
    pub fn macs(&self) -> u64 {
        let [i, o] = self.fc.weight.shape().dims();
        let hw: Hw = (self.seed * 2, self.seed * 2);
        let (a, hw) = cost::conv2d(&self.conv1, hw);
        let (b, _) = cost::conv2d(&self.conv2, (hw.0 * 2, hw.1 * 2));
        let (c, _) = cost::conv2d(&self.conv3, (hw.0 * 2, hw.1 * 2));
        cost::linear(i, o) + a + b + c
    }
}

/// A frozen generator's forward pass: its images and the pre-activations its backward pass
/// needs.
pub struct GeneratorTrace {
    pre1: Tensor<4>,
    pre2: Tensor<4>,
    images: Tensor<4>,
}

impl GeneratorTrace {
    /// The generated images, in `[-1, 1]`.
    pub fn images(&self) -> &Tensor<4> {
        &self.images
    }

    /// The trace of the batch rows `rows` alone (as if only their latents had been passed).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> GeneratorTrace {
        GeneratorTrace {
            pre1: self.pre1.clone().slice(rows.clone()),
            pre2: self.pre2.clone().slice(rows.clone()),
            images: self.images.clone().slice(rows),
        }
    }
}

/// Input gradient of a 3x3, stride 1, padding 1 convolution: the same convolution of the output
/// gradient with the kernel's channel axes swapped and its taps flipped.
fn conv_input_grad(conv: &Conv2d, output_grad: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val().without_autodiff().swap_dims(0, 1).flip([2, 3]);
    convolve(output_grad, weight, ConvOptions::new([1, 1], [1, 1], [1, 1], 1))
}

/// Gradient of nearest 2x upsampling: each input pixel receives the sum of its 2x2 block.
fn upsample_grad(grad: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = grad.dims();
    grad.reshape([b, c, h / 2, 2, w / 2, 2]).sum_dim(5).sum_dim(3).reshape([b, c, h / 2, w / 2])
}

/// LeakyReLU's derivative at the pre-activations: 1 where positive, the slope elsewhere.
fn leaky_relu_slope(pre: &Tensor<4>) -> Tensor<4> {
    pre.clone().greater_elem(0.0).float().mul_scalar(1.0 - LEAKY_SLOPE).add_scalar(LEAKY_SLOPE)
}

/// Inference BatchNorm's derivative, `gamma / sqrt(running_var + eps)`, shaped `[1, C, 1, 1]`.
fn bn_scale(bn: &BatchNorm) -> Tensor<4> {
    let var = bn.running_var.value().without_autodiff();
    let [c] = var.dims();
    let scale = bn.gamma.val().without_autodiff() / var.add_scalar(bn.epsilon).sqrt();
    scale.reshape([1, c, 1, 1])
}

/// Hyperparameters of the discriminator.
#[derive(Config, Debug, PartialEq)]
pub struct DiscriminatorConfig {
    /// Image channels.
    pub channels: usize,
    /// Channels of the first block; each next block doubles. Reference: 16.
    #[config(default = 16)]
    pub width: usize,
    /// Epsilon of the BatchNorms (reference quirk: 0.8).
    #[config(default = 0.8)]
    pub bn_eps: f64,
    /// Channel dropout probability after each block.
    #[config(default = 0.25)]
    pub dropout: f64,
}

impl DiscriminatorConfig {
    /// Build a discriminator with the reference initialisation.
    pub fn init(&self, device: &Device) -> Result<Discriminator, ModelError> {
        if self.channels == 0 || self.width == 0 || !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::InvalidConfig(format!(
                "discriminator needs >= 1 channel, width >= 1 and dropout in [0, 1), got {self:?}"
            )));
        }
        let mut c_in = self.channels;
        let blocks = (0..4)
            .map(|i| {
                let c_out = self.width << i;
                let conv = Conv2dConfig::new([c_in, c_out], [3, 3])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                    .init(device);
                let block = DiscriminatorBlock {
                    conv: reset_bias(conv, c_in, device),
                    bn: (i > 0).then(|| gan_batch_norm(c_out, self.bn_eps, device)),
                };
                c_in = c_out;
                block
            })
            .collect();
        let side = IMAGE_SIZE / 16;
        Ok(Discriminator {
            blocks,
            dropout: Dropout2d { prob: self.dropout, training: Param::from_bool(true) },
            fc: LinearConfig::new(c_in * side * side, 1).init(device),
        })
    }
}

/// Channel dropout (PyTorch's `Dropout2d`): zeroes whole feature maps while training.
#[derive(Module, Debug)]
pub struct Dropout2d {
    prob: f64,
    training: Param<burn::module::Flag>,
}

impl Dropout2d {
    /// Whether a forward pass of `device`'s tensors drops maps (training, with autodiff).
    fn active(&self, device: &Device) -> bool {
        self.training.is_enabled() && device.is_autodiff() && self.prob != 0.0
    }

    /// `x` with each map kept where its uniform draw (`[batch, channels, 1, 1]`) is below the
    /// keep share, as one Bernoulli(keep) draw per map, and rescaled; `x` itself when inactive.
    fn forward_drawn(&self, x: Tensor<4>, uniform: Option<&Tensor<4>>) -> Tensor<4> {
        let Some(uniform) = uniform.filter(|_| self.active(&x.device())) else { return x };
        let keep = 1.0 - self.prob;
        let mask = uniform.clone().lower_elem(keep).float();
        x * mask.div_scalar(keep)
    }
}

/// Conv3x3 stride 2, LeakyReLU, Dropout2d, then BN on all but the first block.
#[derive(Module, Debug)]
pub struct DiscriminatorBlock {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

/// Discriminator: four stride-2 blocks (16/32/64/128 channels), Linear(512 -> 1), (Sigmoid).
/// 98,113 parameters at the reference width for 1 channel.
#[derive(Module, Debug)]
pub struct Discriminator {
    blocks: Vec<DiscriminatorBlock>,
    dropout: Dropout2d,
    fc: Linear,
}

impl Discriminator {
    /// Logit of the probability that each image is real (the reference's `Sigmoid` output is
    /// `sigmoid` of this), shape `[batch, 1]`. Losses take logits for a finite gradient where
    /// the sigmoid saturates.
    pub fn forward_logits(&self, x: Tensor<4>) -> Tensor<2> {
        let [batch, _, _, _] = x.dims();
        let device = x.device();
        let draws: Vec<Tensor<4>> = (self.dropout_channels(&device).into_iter())
            .map(|c| Tensor::<4>::random([batch, c, 1, 1], Distribution::Uniform(0.0, 1.0), &device))
            .collect();
        self.forward_logits_drawn(x, &draws)
    }

    /// The channels of each block, in order, whose maps channel dropout draws for in a forward
    /// pass on `device` (one uniform value per image and map); none when dropout is inactive
    /// (inference, or a device without autodiff).
    pub fn dropout_channels(&self, device: &Device) -> Vec<usize> {
        if !self.dropout.active(device) {
            return Vec::new();
        }
        self.blocks.iter().map(|block| block.conv.weight.shape().dims::<4>()[0]).collect()
    }

    /// [`Discriminator::forward_logits`] with dropout's uniform draws given, `[batch, channels, 1,
    /// 1]` for each block of [`Discriminator::dropout_channels`], so that the pass draws nothing
    /// itself (a recorded device graph would replay its draws unchanged).
    pub fn forward_logits_drawn(&self, x: Tensor<4>, draws: &[Tensor<4>]) -> Tensor<2> {
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.dropout.forward_drawn(leaky_relu(conv2d(&block.conv, x), LEAKY_SLOPE), draws.get(i));
            if let Some(bn) = &block.bn {
                x = batch_norm(bn, x);
            }
        }
        let [batch, c, h, w] = x.dims();
        self.fc.forward(x.reshape([batch, c * h * w]))
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> u64 {
        let mut hw: Hw = (IMAGE_SIZE, IMAGE_SIZE);
        let mut total = 0;
        for block in &self.blocks {
            let (m, out) = cost::conv2d(&block.conv, hw);
            total += m;
            hw = out;
        }
        let [i, o] = self.fc.weight.shape().dims();
        total + cost::linear(i, o)
    }
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    #[test]
    fn channel_dropout_keeps_the_expected_share_and_rescales() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let dropout = Dropout2d { prob: 0.25, training: Param::from_bool(true) };
        let x = Tensor::<4>::ones([64, 128, 2, 2], &device);
        let uniform = Tensor::<4>::random([64, 128, 1, 1], Distribution::Uniform(0.0, 1.0), &device);
        let y: Vec<f32> = dropout.forward_drawn(x, Some(&uniform)).into_data().try_to_vec().unwrap();
        let maps: Vec<f32> = y.chunks_exact(4).map(|m| m[0]).collect();
        assert!(y.chunks_exact(4).all(|m| m.iter().all(|v| *v == m[0])), "whole maps are kept or dropped");
        let kept = maps.iter().filter(|v| **v > 0.0).count() as f64 / maps.len() as f64;
        assert!((kept - 0.75).abs() < 0.03, "kept share {kept}");
        assert!(maps.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
    }

    /// A pass that draws its own dropout is the pass given the same draws, and a pass without
    /// autodiff draws nothing (it drops nothing).
    #[test]
    fn given_draws_are_the_draws_a_pass_makes() {
        let device = Device::flex().autodiff();
        let d = DiscriminatorConfig::new(1).with_width(4).init(&device).unwrap();
        crate::initialise(&d);
        let x = Tensor::<4>::random([3, 1, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
        let x = Tensor::<4>::from_data(x.into_data(), &device);
        device.seed(11);
        let own: Vec<f32> = d.forward_logits(x.clone()).into_data().try_to_vec().unwrap();
        device.seed(11);
        let channels = d.dropout_channels(&device);
        assert_eq!(channels, [4, 8, 16, 32]);
        let draws: Vec<Tensor<4>> = (channels.iter())
            .map(|&c| Tensor::<4>::random([3, c, 1, 1], Distribution::Uniform(0.0, 1.0), &device))
            .collect();
        let given: Vec<f32> = d.forward_logits_drawn(x.clone(), &draws).into_data().try_to_vec().unwrap();
        assert_eq!(own, given);
        assert!(d.dropout_channels(&Device::flex()).is_empty());
    }
}
