//! Kernels of our own inside burn's CPU backend (flex), through a backend extension
//! ([`KernelOps`]): one implementation for flex, one for flex under autodiff.
//!
//! Convolution:
//! - Forward: `mekd-kernels`' convolution, the images split over rayon's threads.
//! - Input gradient: with stride 1, the same kernel over the output gradient (weights with
//!   input and output channels swapped, each kernel turned by 180 degrees); burn's otherwise.
//! - Weight gradient: for 3x3 kernels of stride 1 on AVX-512, `mekd-kernels`' (nine dot
//!   products per pair of channels over zero-padded rows); otherwise per image the output gradient times the
//!   matrix of input values each weight met (rows copied, not gathered value by value), by the
//!   `gemm` crate flex uses.
//!
//! Each falls back to burn's own where the kernel does not take the geometry.
//!
//! Batch norm in training (burn's generic one transposes the activations to `[channels, batch x
//! pixels]` twice forward and twice backward, then makes several passes over them): each
//! channel's statistics in one pass over its rows where they lie, the output in a second; the
//! backward pass likewise (the sums of the output gradient and of its product with the
//! centred input per channel, then the input gradient).

use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, DispatchDevice, Flex, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use mekd_kernels::batch_norm;
use rayon::prelude::*;

/// Operations a backend may run with kernels of its own: a dense 2-D convolution without bias
/// (`x`: `[batch, in, height, width]`, `weight`: `[out, in, kernel height, kernel width]`) and
/// batch norm in training (`x`: `[batch, channels, ...]`).
#[backend_extension(Flex, Autodiff)]
pub trait KernelOps: Backend {
    /// The convolution of `x` by `weight` with `options` (groups 1, dilation 1).
    fn kernel_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self>;

    /// The gradient of [`KernelOps::kernel_conv2d`]'s `weight` (shaped as `weight`) given its
    /// input `x` and the gradient `grad` of its output.
    fn kernel_conv2d_weight_gradient(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// Batch norm by the batch's statistics: `(x - mean) / sqrt(variance + epsilon) * gamma +
    /// beta` per channel, with the mean and (biased) variance of each channel over the batch
    /// and its pixels; returns the output, the means and the variances.
    fn kernel_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of [`KernelOps::kernel_batch_norm_train`]'s input, `gamma` and `beta` given
    /// the gradient `grad` of its output and the statistics it returned.
    fn kernel_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether `x` lies on flex (with or without autodiff).
pub fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// Batch norm in training through [`KernelOps`] (`x` on flex): the output, the batch's means
/// and variances (not differentiated).
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let (y, mean, variance) = <burn::backend::Dispatch as KernelOps>::kernel_batch_norm_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (Tensor::from_dispatch(y), Tensor::from_dispatch(mean), Tensor::from_dispatch(variance))
}

/// Whether [`convolve`] takes `x` with `options`: a tensor on flex, groups 1, no dilation.
pub fn takes(x: &Tensor<4>, options: &ConvOptions<2>) -> bool {
    on_flex(x) && options.groups == 1 && options.dilation == [1, 1]
}

/// The convolution of `x` by `weight` through [`KernelOps`] (where [`takes`] holds).
pub fn convolve(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    let y = <burn::backend::Dispatch as KernelOps>::kernel_conv2d(x.into_dispatch(), weight.into_dispatch(), options);
    Tensor::<4>::from_dispatch(y)
}

impl KernelOps for Flex {
    fn kernel_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        match flex_conv(&x, &weight, &options) {
            Some(y) => y,
            None => Flex::conv2d(x, weight, None, options),
        }
    }

    fn kernel_conv2d_weight_gradient(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match flex_weight_gradient(&x, &weight, &grad, &options) {
            Some(dw) => dw,
            None => Flex::conv2d_weight_backward(x, weight, grad, options),
        }
    }

    fn kernel_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        match flex_batch_norm_train(&x, &gamma, &beta, epsilon) {
            Some(result) => result,
            None => {
                let result = Flex::batch_norm_train(x, gamma, beta, epsilon);
                (result.output, result.mean, result.variance)
            }
        }
    }

    fn kernel_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        match flex_batch_norm_backward(&x, &gamma, &mean, &variance, epsilon, &grad) {
            Some(result) => result,
            None => {
                let result = Flex::batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
                (result.x_grad, result.gamma_grad, result.beta_grad)
            }
        }
    }
}

/// The rows of one channel in a contiguous `[batch, channels, pixels]` buffer: `(batch, channels,
/// pixels)` of `x`'s shape (at least two dimensions), none otherwise.
fn channel_rows(shape: &Shape) -> Option<(usize, usize, usize)> {
    let dims: Vec<usize> = shape.iter().copied().collect();
    let (&batch, rest) = dims.split_first()?;
    let (&channels, pixels) = rest.split_first()?;
    Some((batch, channels, pixels.iter().product()))
}

/// `f32` values of a contiguous copy of `tensor` of `len` values; none for another dtype or
/// length.
fn values(tensor: &FloatTensor<Flex>, len: usize) -> Option<FloatTensor<Flex>> {
    let tensor = contiguous(tensor);
    (tensor.dtype() == DType::F32 && tensor.as_slice::<f32>()?.len() == len).then_some(tensor)
}

/// Batch norm in training on flex: per channel (rayon's threads over the channels) its mean,
/// then its variance about it, each one pass over its rows; then the output (threads over the
/// rows). None for another dtype or mismatched shapes.
fn flex_batch_norm_train(
    x: &FloatTensor<Flex>,
    gamma: &FloatTensor<Flex>,
    beta: &FloatTensor<Flex>,
    epsilon: f64,
) -> Option<(FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>)> {
    let shape = x.shape();
    let (batch, channels, pixels) = channel_rows(&shape)?;
    let (x, gamma, beta) = (values(x, batch * channels * pixels)?, values(gamma, channels)?, values(beta, channels)?);
    let (input, gamma, beta) = (x.as_slice::<f32>()?, gamma.as_slice::<f32>()?, beta.as_slice::<f32>()?);
    if batch * pixels == 0 {
        return None;
    }
    let stats: Vec<(f32, f32)> =
        (0..channels).into_par_iter().map(|c| batch_norm::statistics(input, channels, pixels, c)).collect();
    // Per channel, `y = x * scale + shift`.
    let affine: Vec<(f32, f32)> = stats
        .iter()
        .zip(gamma.iter().zip(beta))
        .map(|(&(mean, variance), (&gamma, &beta))| {
            let scale = gamma / (variance + epsilon as f32).sqrt();
            (scale, beta - mean * scale)
        })
        .collect();
    let mut output = vec![0.0f32; input.len()];
    output.par_chunks_mut(pixels).zip(input.par_chunks(pixels)).enumerate().for_each(|(row, (out, x))| {
        let (scale, shift) = affine[row % channels];
        batch_norm::scale_shift(x, scale, shift, out);
    });
    let (means, variances): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
    Some((
        FloatTensor::<Flex>::from_data(TensorData::new(output, shape)),
        FloatTensor::<Flex>::from_data(TensorData::new(means, [channels])),
        FloatTensor::<Flex>::from_data(TensorData::new(variances, [channels])),
    ))
}

/// Batch norm's backward pass on flex: per channel the sums of the output gradient and of its
/// product with the centred input (threads over the channels), then the input gradient
/// `gamma / std * (grad - mean(grad) - normalised * mean(grad * normalised))` (threads over the
/// rows). None for another dtype or mismatched shapes.
fn flex_batch_norm_backward(
    x: &FloatTensor<Flex>,
    gamma: &FloatTensor<Flex>,
    mean: &FloatTensor<Flex>,
    variance: &FloatTensor<Flex>,
    epsilon: f64,
    grad: &FloatTensor<Flex>,
) -> Option<(FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>)> {
    let shape = x.shape();
    let (batch, channels, pixels) = channel_rows(&shape)?;
    let (len, count) = (batch * channels * pixels, batch * pixels);
    if count == 0 || grad.shape() != shape {
        return None;
    }
    let (x, grad) = (values(x, len)?, values(grad, len)?);
    let (gamma, mean, variance) = (values(gamma, channels)?, values(mean, channels)?, values(variance, channels)?);
    let (input, grad) = (x.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let (gamma, mean, variance) = (gamma.as_slice::<f32>()?, mean.as_slice::<f32>()?, variance.as_slice::<f32>()?);
    let inv_std: Vec<f32> = variance.iter().map(|&v| 1.0 / (v + epsilon as f32).sqrt()).collect();
    // Per channel: the sum of the gradient (beta's gradient) and of the gradient times the
    // normalised input (gamma's gradient).
    let sums: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let (sum, dot) = batch_norm::gradient_sums(input, grad, channels, pixels, c, mean[c]);
            (sum, dot * inv_std[c])
        })
        .collect();
    // Per channel, `dx = grad * a - x * k + shift`: `a = gamma / std`, `k = a / std * dgamma / n`,
    // `shift = -a * dbeta / n + k * mean`.
    let n = count as f32;
    let coefficients: Vec<(f32, f32, f32)> = (0..channels)
        .map(|c| {
            let a = gamma[c] * inv_std[c];
            let (dbeta, dgamma) = sums[c];
            let k = a * inv_std[c] * dgamma / n;
            (a, k, k * mean[c] - a * dbeta / n)
        })
        .collect();
    let mut dx = vec![0.0f32; len];
    dx.par_chunks_mut(pixels).zip(input.par_chunks(pixels).zip(grad.par_chunks(pixels))).enumerate().for_each(
        |(row, (out, (x, g)))| {
            let (a, k, shift) = coefficients[row % channels];
            batch_norm::input_gradient(x, g, a, k, shift, out);
        },
    );
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    Some((
        FloatTensor::<Flex>::from_data(TensorData::new(dx, shape)),
        FloatTensor::<Flex>::from_data(TensorData::new(dgamma, [channels])),
        FloatTensor::<Flex>::from_data(TensorData::new(dbeta, [channels])),
    ))
}

/// The convolution through `mekd-kernels`, images split over rayon's threads; none where the
/// kernel does not take it (another dtype, groups or dilation, a geometry it refuses).
fn flex_conv(x: &FloatTensor<Flex>, weight: &FloatTensor<Flex>, options: &ConvOptions<2>) -> Option<FloatTensor<Flex>> {
    let (batch, geometry) = geometry(x, weight, options)?;
    let weights = contiguous(weight);
    let conv = mekd_kernels::Conv2d::new(geometry, weights.as_slice::<f32>()?, None).ok()?;
    let x = contiguous(x);
    let input = x.as_slice::<f32>()?;
    let (in_len, out_len) = (geometry.input_len(), geometry.output_len());
    let mut output = vec![0.0f32; batch * out_len];
    let ran = output
        .par_chunks_mut(out_len)
        .zip(input.par_chunks(in_len))
        .try_for_each_init(Vec::new, |scratch, (out, image)| conv.run(1, image, out, scratch));
    ran.ok()?;
    let shape = [batch, geometry.out_channels, geometry.out_height(), geometry.out_width()];
    Some(FloatTensor::<Flex>::from_data(TensorData::new(output, shape)))
}

/// The batch size and the geometry of convolving `x` by `weight` with `options`; none where
/// the kernels do not take it (another dtype, groups, dilation or rank, mismatched channels, a
/// geometry the kernel refuses).
fn geometry(
    x: &FloatTensor<Flex>,
    weight: &FloatTensor<Flex>,
    options: &ConvOptions<2>,
) -> Option<(usize, mekd_kernels::Conv2dGeometry)> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || options.groups != 1 || options.dilation != [1, 1] {
        return None;
    }
    let (x_shape, w_shape) = (x.shape(), weight.shape());
    let ([batch, in_channels, in_height, in_width], [out_channels, w_in, kh, kw]) =
        (dims4(&x_shape)?, dims4(&w_shape)?);
    let geometry = mekd_kernels::Conv2dGeometry {
        in_channels,
        in_height,
        in_width,
        out_channels,
        kernel: [kh, kw],
        stride: options.stride,
        pad_before: [options.padding[0].0, options.padding[1].0],
        pad_after: [options.padding[0].1, options.padding[1].1],
    };
    (w_in == in_channels && geometry.validate().is_ok()).then_some((batch, geometry))
}

/// The weight gradient on flex, each thread its share of the images, then the threads' sums:
/// for 3x3 kernels of stride 1 on AVX-512 `mekd-kernels`' [`mekd_kernels::WeightGradient`]; otherwise, per
/// image, its output gradient `[out, outputs]` times the matrix of the input values each weight
/// met (`[in x kernel h x kernel w, outputs]`, [`mekd_kernels::Conv2dGeometry::unfold`]) by
/// `gemm`. None where the kernels do not take the geometry.
fn flex_weight_gradient(
    x: &FloatTensor<Flex>,
    weight: &FloatTensor<Flex>,
    grad: &FloatTensor<Flex>,
    options: &ConvOptions<2>,
) -> Option<FloatTensor<Flex>> {
    let (batch, g) = geometry(x, weight, options)?;
    let outputs = g.out_height() * g.out_width();
    if grad.dtype() != DType::F32 || dims4(&grad.shape())? != [batch, g.out_channels, g.out_height(), g.out_width()] {
        return None;
    }
    let (x, grad) = (contiguous(x), contiguous(grad));
    let (input, grad) = (x.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let columns = g.in_channels * g.kernel[0] * g.kernel[1];
    let (in_len, out_len) = (g.input_len(), g.output_len());
    let threads = rayon::current_num_threads().clamp(1, batch.max(1));
    let per_thread = batch.div_ceil(threads);
    // 3x3 kernels of stride 1 on AVX-512: `mekd-kernels`' own weight gradient (BENCHMARKS.md,
    // sessions 18 and 19). Its AVX2 variant (one output channel per tile in 16 registers, bound
    // by its loads) did not beat the unfold and gemm at ResNet's 16x16 and 8x8 layers.
    let direct = mekd_kernels::WeightGradient::new(g).ok().filter(|direct| direct.simd() == mekd_kernels::Simd::Avx512);
    let sums = (0..threads).into_par_iter().map(|t| {
        let mut sum = vec![0.0f32; g.out_channels * columns];
        let images = (t * per_thread).min(batch)..((t + 1) * per_thread).min(batch);
        if let Some(direct) = &direct {
            let (first, count) = (images.start, images.len());
            let (input, grad) =
                (&input[first * in_len..][..count * in_len], &grad[first * out_len..][..count * out_len]);
            direct.accumulate(count, input, grad, &mut sum, &mut Vec::new()).ok()?;
            return Some(sum);
        }
        let mut matrix = vec![0.0f32; g.unfolded_len()];
        for image in images {
            g.unfold(&input[image * in_len..][..in_len], &mut matrix).ok()?;
            let grad = &grad[image * out_len..][..out_len];
            // SAFETY: `sum` is `out_channels x columns` (row stride `columns`), `grad`
            // `out_channels x outputs` (row stride `outputs`), `matrix` read as its transpose,
            // `outputs x columns` (`matrix[column * outputs + output]`): every index the product
            // reads or writes lies in those lengths.
            unsafe {
                gemm::gemm(
                    g.out_channels,
                    columns,
                    outputs,
                    sum.as_mut_ptr(),
                    1,
                    columns as isize,
                    true,
                    grad.as_ptr(),
                    1,
                    outputs as isize,
                    matrix.as_ptr(),
                    outputs as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        }
        Some(sum)
    });
    let sums: Vec<Vec<f32>> = sums.collect::<Option<_>>()?;
    let sum = sums.into_iter().reduce(|mut a, b| {
        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
        a
    })?;
    let shape = [g.out_channels, g.in_channels, g.kernel[0], g.kernel[1]];
    Some(FloatTensor::<Flex>::from_data(TensorData::new(sum, shape)))
}

/// A tensor's four dimensions; none for another rank.
fn dims4(shape: &Shape) -> Option<[usize; 4]> {
    shape.iter().copied().collect::<Vec<_>>().try_into().ok()
}

/// `tensor` itself where contiguous, a contiguous copy otherwise.
fn contiguous(tensor: &FloatTensor<Flex>) -> FloatTensor<Flex> {
    if tensor.is_contiguous() && tensor.layout().start_offset() == 0 { tensor.clone() } else { tensor.to_contiguous() }
}

impl<B: Backend + KernelOps, C: CheckpointStrategy> KernelOps for Autodiff<B, C> {
    fn kernel_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct KernelOpsBackward;

        impl<B: Backend + KernelOps> Backward<B, 2> for KernelOpsBackward {
            type State = (NodeId, NodeId, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, weight_state, options) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
                if let Some(node) = node_x {
                    let dx = input_gradient::<B>(x.clone(), weight.clone(), grad.clone(), options.clone());
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_weight {
                    grads.register::<B>(node.id, B::kernel_conv2d_weight_gradient(x, weight, grad, options));
                }
            }
        }

        match KernelOpsBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let y = B::kernel_conv2d(x.into_primitive(), weight.into_primitive(), options.clone());
                prep.finish((x_state, weight_state, options), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::kernel_conv2d(x.into_primitive(), weight.into_primitive(), options))
            }
        }
    }

    /// Not differentiated (no second-order gradients): the inner backend's, untracked.
    fn kernel_conv2d_weight_gradient(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::kernel_conv2d_weight_gradient(
            Self::inner(x),
            Self::inner(weight),
            Self::inner(grad),
            options,
        ))
    }

    fn kernel_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl<B: Backend + KernelOps> Backward<B, 3> for BatchNormBackward {
            // The input and gamma checkpointed, the batch's statistics as the forward pass
            // computed them.
            type State = (NodeId, NodeId, B::FloatTensorPrimitive, B::FloatTensorPrimitive, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, gamma_state, mean, variance, epsilon) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
                let (dx, dgamma, dbeta) = B::kernel_batch_norm_backward(x, gamma, mean, variance, epsilon, grad);
                for (node, grad) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let (y, mean, variance) = match BatchNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let (x_state, gamma_state) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (y, mean, variance) = B::kernel_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let state = (x_state, gamma_state, mean.clone(), variance.clone(), epsilon);
                (prep.finish(state, y), mean, variance)
            }
            OpsKind::UnTracked(prep) => {
                let (y, mean, variance) = B::kernel_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (prep.finish(y), mean, variance)
            }
        };
        (y, Self::from_inner(mean), Self::from_inner(variance))
    }

    /// Not differentiated (no second-order gradients): the inner backend's, untracked.
    fn kernel_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma, dbeta) = B::kernel_batch_norm_backward(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(mean),
            Self::inner(variance),
            epsilon,
            Self::inner(grad),
        );
        (Self::from_inner(dx), Self::from_inner(dgamma), Self::from_inner(dbeta))
    }
}

/// The gradient of the convolution's input. With stride 1 it is the convolution of the output
/// gradient `grad` by the weights with input and output channels swapped and each kernel turned
/// by 180 degrees, padded by `kernel - 1 - padding` on each side ([`KernelOps`] again); burn's
/// own where a padding exceeds `kernel - 1` or the stride is larger.
fn input_gradient<B: Backend + KernelOps>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    options: ConvOptions<2>,
) -> FloatTensor<B> {
    let shape = weight.shape();
    let (kh, kw) = (shape[2], shape[3]);
    let padding = [(options.padding[0], kh), (options.padding[1], kw)].map(|((before, after), k)| {
        Some((k.checked_sub(1)?.checked_sub(before)?, k.checked_sub(1)?.checked_sub(after)?))
    });
    match padding {
        [Some(rows), Some(columns)] if options.stride == [1, 1] => {
            let turned = B::float_flip(B::float_swap_dims(weight, 0, 1), &[2, 3]);
            B::kernel_conv2d(grad, turned, ConvOptions::new_with_padding([1, 1], [rows, columns], [1, 1], 1))
        }
        _ => B::conv2d_x_backward(x, weight, grad, options),
    }
}
