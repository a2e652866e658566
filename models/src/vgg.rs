//! VGG-11/13 for 32x32 inputs, with or without batch norm (the reference code's `vgg.py`).

use crate::ops::{batch_norm, conv2d};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::cost::{self, Hw};

/// Convolution widths per group; a max-pool follows each group.
pub fn groups(depth: usize) -> Option<&'static [&'static [usize]]> {
    match depth {
        11 => Some(&[&[64], &[128], &[256, 256], &[512, 512], &[512, 512]]),
        13 => Some(&[&[64, 64], &[128, 128], &[256, 256], &[512, 512], &[512, 512]]),
        _ => None,
    }
}

/// conv3x3 (+BN) + ReLU.
#[derive(Module, Debug)]
pub struct VggConv {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

/// VGG: five conv groups with max-pooling (32 -> 1), then Dropout-Linear(512)-ReLU twice and
/// Linear(512 -> classes).
#[derive(Module, Debug)]
pub struct Vgg {
    groups: Vec<Vec<VggConv>>,
    pool: MaxPool2d,
    dropout: Dropout,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Vgg {
    /// Build the VGG of the given `widths` (see [`groups`]).
    pub fn new(widths: &[&[usize]], batch_norm: bool, in_channels: usize, num_classes: usize, device: &Device) -> Self {
        let mut c_in = in_channels;
        let groups = widths
            .iter()
            .map(|group| {
                group
                    .iter()
                    .map(|&c_out| {
                        let std = (2.0 / (9 * c_out) as f64).sqrt();
                        let conv = Conv2dConfig::new([c_in, c_out], [3, 3])
                            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                            .with_initializer(Initializer::Normal { mean: 0.0, std })
                            .init(device);
                        let conv = Conv2d { bias: conv.bias.map(|b| b.map(|t| t.zeros_like())), ..conv };
                        c_in = c_out;
                        VggConv { conv, bn: batch_norm.then(|| BatchNormConfig::new(c_out).init(device)) }
                    })
                    .collect()
            })
            .collect();
        Self {
            groups,
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            dropout: DropoutConfig::new(0.5).init(),
            fc1: LinearConfig::new(c_in, 512).init(device),
            fc2: LinearConfig::new(512, 512).init(device),
            fc3: LinearConfig::new(512, num_classes).init(device),
        }
    }

    /// Logits for a batch of images.
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<2> {
        for group in &self.groups {
            for layer in group {
                x = conv2d(&layer.conv, x);
                if let Some(bn) = &layer.bn {
                    x = batch_norm(bn, x);
                }
                x = relu(x);
            }
            x = self.pool.forward(x);
        }
        let [batch, channels, h, w] = x.dims();
        let x = x.reshape([batch, channels * h * w]);
        let x = relu(self.fc1.forward(self.dropout.forward(x)));
        let x = relu(self.fc2.forward(self.dropout.forward(x)));
        self.fc3.forward(x)
    }

    /// Multiply-adds per image of size `input`.
    pub fn macs(&self, mut hw: Hw) -> u64 {
        let mut total = 0;
        for group in &self.groups {
            for layer in group {
                let (m, out) = cost::conv2d(&layer.conv, hw);
                total += m;
                hw = out;
            }
            hw = (hw.0 / 2, hw.1 / 2);
        }
        let [i, _] = self.fc1.weight.shape().dims();
        let [_, classes] = self.fc3.weight.shape().dims();
        total + cost::linear(i, 512) + cost::linear(512, 512) + cost::linear(512, classes)
    }
}
