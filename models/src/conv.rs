//! The 2-D convolution every model runs. On burn's CPU backend (flex) a dense convolution runs
//! `mekd-kernels`' kernel ([`kernel`]); on other backends, and for groups or dilation, burn's.

#[cfg(feature = "flex")]
pub mod kernel;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::ops::ConvOptions;

/// `conv`'s forward pass on `x`: `mekd-kernels`' convolution on flex where it applies
/// ([`kernel`]), burn's otherwise.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some(options) = options(conv) else {
        return conv.forward(x);
    };
    let y = convolve(x, conv.weight.val(), options);
    match &conv.bias {
        Some(bias) => {
            let channels = bias.dims()[0];
            y + bias.val().reshape([1, channels, 1, 1])
        }
        None => y,
    }
}

/// The convolution of `x` by `weight` (no bias): `mekd-kernels`' on flex for groups 1 without
/// dilation ([`kernel`]), burn's otherwise.
pub fn convolve(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if kernel::takes(&x, &options) {
        return kernel::convolve(x, weight, options);
    }
    burn::tensor::module::conv2d(x, weight, None, options)
}

/// The options burn's own forward pass uses; none for `Same` padding (which depends on the
/// input's size: burn's convolution runs it).
fn options(conv: &Conv2d) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Same => return None,
    };
    Some(ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups))
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// Largest difference between `a` and `b`, relative to `b`'s largest magnitude.
    fn relative_difference(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// Forward values and both gradients of [`conv2d`] against burn's convolution on flex, for
    /// the geometries the zoo trains (3x3 with padding 1 at strides 1 and 2, 1x1 at strides 1
    /// and 2, 5x5 without padding and with a bias) and uneven ones.
    #[test]
    fn matches_burn_values_and_gradients() {
        let device = Device::flex().autodiff();
        // (in, out, height, width, kernel, stride, padding, bias)
        let cases = [
            (16, 16, 32, 32, 3, 1, 1, false),
            (16, 32, 32, 32, 3, 2, 1, false),
            (32, 64, 16, 16, 1, 2, 0, false),
            (8, 8, 8, 8, 1, 1, 0, false),
            (3, 6, 32, 32, 5, 1, 0, true),
            (5, 7, 11, 9, 3, 2, 2, true),
            (4, 3, 7, 13, 4, 1, 3, true),
        ];
        for (ci, co, h, w, k, stride, pad, bias) in cases {
            device.seed(7);
            let conv: Conv2d = Conv2dConfig::new([ci, co], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(bias)
                .init(&device);
            let x = Tensor::<4>::random([3, ci, h, w], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let ours = conv2d(&conv, x.clone());
            let theirs = conv.forward(x.clone());
            // The output gradient: random, so that each weight's gradient differs.
            let r = Tensor::<4>::random(theirs.dims(), Distribution::Normal(0.0, 1.0), &device);
            let mut grads = Vec::new();
            for y in [ours.clone(), theirs.clone()] {
                let g = (y * r.clone()).sum().backward();
                let dx = x.grad(&g).expect("input gradient");
                let dw = conv.weight.grad(&g).expect("weight gradient");
                grads.push((Tensor::<4>::from_inner(dx), Tensor::<4>::from_inner(dw)));
            }
            let case = format!("{ci}->{co} {h}x{w} k{k} s{stride} p{pad}");
            let values = relative_difference(ours.inner(), theirs.inner());
            let dx = relative_difference(grads[0].0.clone(), grads[1].0.clone());
            let dw = relative_difference(grads[0].1.clone(), grads[1].1.clone());
            println!("{case}: values {values:.2e}, input gradient {dx:.2e}, weight gradient {dw:.2e}");
            assert!(values < 1e-5 && dx < 1e-5 && dw < 1e-5, "{case}: {values:e} {dx:e} {dw:e}");
        }
    }
}
