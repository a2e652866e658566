//! LeNet-5 and LeNet-5-half (the DAFL/DB3KD variants for 32x32 inputs).

use crate::ops::conv2d;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::cost::{self, Hw};

/// conv5x5-ReLU-maxpool2, conv5x5-ReLU-maxpool2, conv5x5-ReLU (to 1x1), Linear-ReLU, Linear.
///
/// LeNet-5 has widths 6/16/120/84 (61,706 parameters for 1 channel, 10 classes);
/// LeNet-5-half has 3/8/60/42 (15,738 parameters).
#[derive(Module, Debug)]
pub struct LeNet {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl LeNet {
    /// LeNet with the given widths `[conv1, conv2, conv3, fc1]`.
    pub fn new(widths: [usize; 4], in_channels: usize, num_classes: usize, device: &Device) -> Self {
        let [c1, c2, c3, f1] = widths;
        let conv = |a, b| Conv2dConfig::new([a, b], [5, 5]).init(device);
        Self {
            conv1: conv(in_channels, c1),
            conv2: conv(c1, c2),
            conv3: conv(c2, c3),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(c3, f1).init(device),
            fc2: LinearConfig::new(f1, num_classes).init(device),
        }
    }

    /// Logits for a batch of images.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(conv2d(&self.conv1, x)));
        let x = self.pool.forward(relu(conv2d(&self.conv2, x)));
        let x = relu(conv2d(&self.conv3, x));
        let [batch, channels, h, w] = x.dims();
        let x = relu(self.fc1.forward(x.reshape([batch, channels * h * w])));
        self.fc2.forward(x)
    }

    /// Multiply-adds per image of size `input`.
    pub fn macs(&self, input: Hw) -> u64 {
        let (a, hw) = cost::conv2d(&self.conv1, input);
        let (b, hw) = cost::conv2d(&self.conv2, (hw.0 / 2, hw.1 / 2));
        let (c, _) = cost::conv2d(&self.conv3, (hw.0 / 2, hw.1 / 2));
        let [i1, o1] = self.fc1.weight.shape().dims();
        let [i2, o2] = self.fc2.weight.shape().dims();
        a + b + c + cost::linear(i1, o1) + cost::linear(i2, o2)
    }
}
