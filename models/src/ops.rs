//! The layers' operations every model runs: convolution and batch norm. On burn's CPU backend
//! (flex) they run kernels of our own ([`flex`]: `mekd-kernels`' convolution, batch norm in two
//! passes over the batch); on other backends, and for what those kernels do not take, burn's.

#[cfg(feature = "flex")]
pub mod flex;

use burn::nn::BatchNorm;
#[cfg(feature = "flex")]
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::ops::ConvOptions;

/// `conv`'s forward pass on `x`: `mekd-kernels`' convolution on flex where it applies
/// ([`flex`]), burn's [`Conv2d::forward`] otherwise (bias included, as the GPU backends were
/// checked with).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(options) = options(conv)
        && flex::takes(&x, &options)
    {
        let y = flex::convolve(x, conv.weight.val(), options);
        return match &conv.bias {
            Some(bias) => {
                let channels = bias.dims()[0];
                y + bias.val().reshape([1, channels, 1, 1])
            }
            None => y,
        };
    }
    conv.forward(x)
}

/// The convolution of `x` by `weight` (no bias): `mekd-kernels`' on flex for groups 1 without
/// dilation ([`flex`]), burn's otherwise.
pub fn convolve(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if flex::takes(&x, &options) {
        return flex::convolve(x, weight, options);
    }
    burn::tensor::module::conv2d(x, weight, None, options)
}

/// `bn`'s forward pass on `x`, as [`BatchNorm::forward`]: in training (on an autodiff device,
/// the layer not frozen) normalised by the batch's statistics, which also update the running
/// ones; otherwise by the running ones. Training on flex runs [`flex`]'s kernel.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if x.device().is_autodiff() && bn.training.is_enabled() && flex::on_flex(&x) {
        let device = x.device();
        let (y, mean, variance) = flex::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
        let momentum = bn.momentum;
        let update = |running: Tensor<1>, batch: Tensor<1>| {
            running.to_device(&device).mul_scalar(1.0 - momentum).add(batch.detach().mul_scalar(momentum)).detach()
        };
        bn.running_mean.update(update(bn.running_mean.value_sync(), mean));
        bn.running_var.update(update(bn.running_var.value_sync(), variance));
        return y;
    }
    bn.forward(x)
}

/// The options burn's own forward pass uses; none for `Same` padding (which depends on the
/// input's size: burn's convolution runs it).
#[cfg(feature = "flex")]
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
    use burn::module::{Module, Param};
    use burn::nn::BatchNormConfig;
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

    /// Largest difference between two vectors, relative to `b`'s largest magnitude.
    fn relative_difference_1d(a: Tensor<1>, b: Tensor<1>) -> f32 {
        relative_difference(a.reshape([1, 1, 1, -1]), b.reshape([1, 1, 1, -1]))
    }

    /// [`batch_norm`] in training against burn's on flex: the output, the running statistics
    /// after the step, the gradients of the input, gamma and beta; and in inference (running
    /// statistics) the same values as burn's.
    #[test]
    fn batch_norm_matches_burn() {
        let device = Device::flex().autodiff();
        // (batch, channels, height, width): rows of whole vectors, rows with a tail, one pixel
        // (two samples per channel would make the input gradient zero but for rounding).
        for (n, c, h, w) in [(4, 16, 8, 8), (3, 5, 7, 3), (5, 3, 1, 1), (64, 8, 2, 2)] {
            device.seed(11);
            let bn = BatchNormConfig::new(c).init(&device);
            // Gamma and beta away from 1 and 0, so that their roles are told apart.
            let bn = BatchNorm {
                gamma: Param::from_tensor(Tensor::random([c], Distribution::Normal(1.0, 0.5), &device)),
                beta: Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 0.5), &device)),
                ..bn
            };
            let theirs_bn = bn.clone();
            let x = (Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.5, 2.0), &device)).require_grad();
            let r = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &device);
            let ours = batch_norm(&bn, x.clone());
            let theirs = theirs_bn.forward(x.clone());
            let case = format!("{n}x{c}x{h}x{w}");
            assert!(relative_difference(ours.clone().inner(), theirs.clone().inner()) < 1e-5, "{case}: values");
            for (a, b, what) in [
                (bn.running_mean.value(), theirs_bn.running_mean.value(), "running mean"),
                (bn.running_var.value(), theirs_bn.running_var.value(), "running variance"),
            ] {
                assert!(relative_difference_1d(a.inner(), b.inner()) < 1e-5, "{case}: {what}");
            }
            let mut grads = Vec::new();
            for (y, layer) in [(ours, &bn), (theirs, &theirs_bn)] {
                let g = (y * r.clone()).sum().backward();
                let dx = Tensor::<4>::from_inner(x.grad(&g).expect("input gradient"));
                let dgamma = Tensor::<1>::from_inner(layer.gamma.grad(&g).expect("gamma gradient"));
                let dbeta = Tensor::<1>::from_inner(layer.beta.grad(&g).expect("beta gradient"));
                grads.push((dx, dgamma, dbeta));
            }
            let dx = relative_difference(grads[0].0.clone(), grads[1].0.clone());
            let dgamma = relative_difference_1d(grads[0].1.clone(), grads[1].1.clone());
            let dbeta = relative_difference_1d(grads[0].2.clone(), grads[1].2.clone());
            println!("{case}: input gradient {dx:.2e}, gamma {dgamma:.2e}, beta {dbeta:.2e}");
            assert!(dx < 1e-5 && dgamma < 1e-5 && dbeta < 1e-5, "{case}: {dx:e} {dgamma:e} {dbeta:e}");
            // Inference: burn's own path.
            let x = x.inner();
            let (bn, theirs_bn) = (bn.valid(), theirs_bn.valid());
            assert!(relative_difference(batch_norm(&bn, x.clone()), theirs_bn.forward(x)) < 1e-6, "{case}: inference");
        }
    }
}
