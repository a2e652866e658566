//! CIFAR-style ResNets (8/20/32/56/110) as in the reference code's `ResNet_simple`.

use crate::ops::{batch_norm, conv2d};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::cost::{self, Hw};

/// 3x3 convolution without bias, stride `stride`, padding 1.
fn conv3x3(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

/// Convolution followed by batch norm.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(conv: Conv2d, channels: usize, device: &Device) -> Self {
        Self { conv, bn: BatchNormConfig::new(channels).init(device) }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        batch_norm(&self.bn, conv2d(&self.conv, x))
    }

    fn macs(&self, input: Hw) -> (u64, Hw) {
        cost::conv2d(&self.conv, input)
    }
}

/// conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    first: ConvBn,
    second: ConvBn,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Self {
        let shortcut = (stride != 1 || c_in != c_out).then(|| {
            let conv =
                Conv2dConfig::new([c_in, c_out], [1, 1]).with_stride([stride, stride]).with_bias(false).init(device);
            ConvBn::new(conv, c_out, device)
        });
        Self {
            first: ConvBn::new(conv3x3(c_in, c_out, stride, device), c_out, device),
            second: ConvBn::new(conv3x3(c_out, c_out, 1, device), c_out, device),
            shortcut,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.shortcut {
            Some(shortcut) => shortcut.forward(x.clone()),
            None => x.clone(),
        };
        let out = relu(self.first.forward(x));
        relu(self.second.forward(out) + identity)
    }

    fn macs(&self, input: Hw) -> (u64, Hw) {
        let (a, mid) = self.first.macs(input);
        let (b, out) = self.second.macs(mid);
        let c = self.shortcut.as_ref().map_or(0, |s| s.macs(input).0);
        (a + b + c, out)
    }
}

/// A CIFAR-style ResNet: stem conv(16), three stages (16/32/64, strides 1/2/2), GAP, Linear.
#[derive(Module, Debug)]
pub struct ResNet {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet {
    /// Build a ResNet with `blocks_per_stage` BasicBlocks in each of the three stages
    /// (1/3/5/9/18 for ResNet 8/20/32/56/110).
    pub fn new(blocks_per_stage: usize, in_channels: usize, num_classes: usize, device: &Device) -> Self {
        let stem = ConvBn::new(conv3x3(in_channels, 16, 1, device), 16, device);
        let mut blocks = Vec::with_capacity(3 * blocks_per_stage);
        let mut c_in = 16;
        for (c_out, stride) in [(16, 1), (32, 2), (64, 2)] {
            for i in 0..blocks_per_stage {
                blocks.push(BasicBlock::new(c_in, c_out, if i == 0 { stride } else { 1 }, device));
                c_in = c_out;
            }
        }
        Self {
            stem,
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(64, num_classes).init(device),
        }
    }

    /// Logits for a batch of images.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = relu(self.stem.forward(x));
        for block in &self.blocks {
            x = block.forward(x);
        }
        crate::head::pooled_logits(&self.pool, &self.fc, x)
    }

    /// Multiply-adds per image of size `input`.
    pub fn macs(&self, input: Hw) -> u64 {
        let (mut total, mut hw) = self.stem.macs(input);
        for block in &self.blocks {
            let (m, out) = block.macs(hw);
            total += m;
            hw = out;
        }
        let [d_in, d_out] = self.fc.weight.shape().dims();
        total + cost::linear(d_in, d_out)
    }
}
