//! MobileNet v1 (width 1.0) for 32x32 inputs, as in the reference code's `mobilenet.py`.

use crate::ops::{batch_norm, conv2d};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::cost::{self, Hw};

/// `(output channels, stride)` of the depthwise-separable blocks after the 32-channel stem.
const BLOCKS: [(usize, usize); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

/// Depthwise 3x3 (no bias)-BN-ReLU, then pointwise 1x1 (with bias)-BN-ReLU.
#[derive(Module, Debug)]
pub struct DepthwiseSeparable {
    depthwise: Conv2d,
    bn1: BatchNorm,
    pointwise: Conv2d,
    bn2: BatchNorm,
}

impl DepthwiseSeparable {
    fn new(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Self {
        Self {
            depthwise: Conv2dConfig::new([c_in, c_in], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_groups(c_in)
                .with_bias(false)
                .init(device),
            bn1: BatchNormConfig::new(c_in).init(device),
            pointwise: Conv2dConfig::new([c_in, c_out], [1, 1]).init(device),
            bn2: BatchNormConfig::new(c_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu(batch_norm(&self.bn1, conv2d(&self.depthwise, x)));
        relu(batch_norm(&self.bn2, conv2d(&self.pointwise, x)))
    }
}

/// MobileNet v1: conv3x3(32)-BN-ReLU stem, 13 depthwise-separable blocks, GAP, Linear(1024 -> C).
#[derive(Module, Debug)]
pub struct MobileNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    blocks: Vec<DepthwiseSeparable>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl MobileNet {
    /// Build MobileNet v1.
    pub fn new(in_channels: usize, num_classes: usize, device: &Device) -> Self {
        let mut c_in = 32;
        let blocks = BLOCKS
            .iter()
            .map(|&(c_out, stride)| {
                let block = DepthwiseSeparable::new(c_in, c_out, stride, device);
                c_in = c_out;
                block
            })
            .collect();
        Self {
            stem: Conv2dConfig::new([in_channels, 32], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device),
            stem_bn: BatchNormConfig::new(32).init(device),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(c_in, num_classes).init(device),
        }
    }

    /// Logits for a batch of images.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = relu(batch_norm(&self.stem_bn, conv2d(&self.stem, x)));
        for block in &self.blocks {
            x = block.forward(x);
        }
        crate::head::pooled_logits(&self.pool, &self.fc, x)
    }

    /// Multiply-adds per image of size `input`.
    pub fn macs(&self, input: Hw) -> u64 {
        let (mut total, mut hw) = cost::conv2d(&self.stem, input);
        for block in &self.blocks {
            let (a, out) = cost::conv2d(&block.depthwise, hw);
            let (b, out) = cost::conv2d(&block.pointwise, out);
            total += a + b;
            hw = out;
        }
        let [i, o] = self.fc.weight.shape().dims();
        total + cost::linear(i, o)
    }
}
