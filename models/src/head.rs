//! The classifier head the ResNets and MobileNet end with: global average pooling, then a
//! linear layer from the channels to the classes.

use burn::nn::Linear;
use burn::nn::pool::AdaptiveAvgPool2d;
use burn::tensor::Tensor;

/// Logits of `x` (`[batch, channels, h, w]`): pooled to `[batch, channels]`, then `fc`.
pub(crate) fn pooled_logits(pool: &AdaptiveAvgPool2d, fc: &Linear, x: Tensor<4>) -> Tensor<2> {
    let x = pool.forward(x);
    let [batch, channels, _, _] = x.dims();
    fc.forward(x.reshape([batch, channels]))
}
