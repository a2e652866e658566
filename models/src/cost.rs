//! Multiply-accumulate counts of the layers the zoo uses, for `mekd zoo`.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;

/// Spatial size `(height, width)` of a feature map.
pub type Hw = (usize, usize);

/// Multiply-adds of one convolution on one image, and its output size.
pub fn conv2d(conv: &Conv2d, input: Hw) -> (u64, Hw) {
    let [c_out, c_in_per_group, kh, kw] = conv.weight.shape().dims();
    let (ph, pw) = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => (top + bottom, left + right),
        PaddingConfig2d::Valid => (0, 0),
        PaddingConfig2d::Same => (kh - 1, kw - 1),
    };
    let out_h = (input.0 + ph - conv.dilation[0] * (kh - 1) - 1) / conv.stride[0] + 1;
    let out_w = (input.1 + pw - conv.dilation[1] * (kw - 1) - 1) / conv.stride[1] + 1;
    let macs = (c_out * c_in_per_group * kh * kw * out_h * out_w) as u64;
    (macs, (out_h, out_w))
}

/// Multiply-adds of a dense layer on one sample.
pub fn linear(d_in: usize, d_out: usize) -> u64 {
    (d_in * d_out) as u64
}
