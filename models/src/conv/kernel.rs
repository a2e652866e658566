//! `mekd-kernels`' convolution inside burn's CPU backend (flex), through a backend extension
//! ([`KernelConv`]): one implementation for flex, one for flex under autodiff.
//!
//! - Forward: `mekd-kernels`' convolution, the images split over rayon's threads.
//! - Input gradient: with stride 1, the same kernel over the output gradient (weights with
//!   input and output channels swapped, each kernel turned by 180 degrees); burn's otherwise.
//! - Weight gradient: per image, the output gradient times the matrix of input values each
//!   weight met (rows copied, not gathered value by value), by the `gemm` crate flex uses.
//!
//! Each falls back to burn's own where the kernel does not take the geometry.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchDevice, Flex, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

/// A dense 2-D convolution without bias (`x`: `[batch, in, height, width]`, `weight`: `[out,
/// in, kernel height, kernel width]`) that a backend may run with a kernel of its own.
#[backend_extension(Flex, Autodiff)]
pub trait KernelConv: Backend {
    /// The convolution of `x` by `weight` with `options` (groups 1, dilation 1).
    fn kernel_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self>;

    /// The gradient of [`KernelConv::kernel_conv2d`]'s `weight` (shaped as `weight`) given its
    /// input `x` and the gradient `grad` of its output.
    fn kernel_conv2d_weight_gradient(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
}

/// Whether [`convolve`] takes `x` with `options`: a tensor on flex, groups 1, no dilation.
pub fn takes(x: &Tensor<4>, options: &ConvOptions<2>) -> bool {
    let on_flex = matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_));
    on_flex && options.groups == 1 && options.dilation == [1, 1]
}

/// The convolution of `x` by `weight` through [`KernelConv`] (where [`takes`] holds).
pub fn convolve(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    let y = <burn::backend::Dispatch as KernelConv>::kernel_conv2d(x.into_dispatch(), weight.into_dispatch(), options);
    Tensor::<4>::from_dispatch(y)
}

impl KernelConv for Flex {
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

/// The weight gradient on flex: for each image, its output gradient `[out, outputs]` times the
/// matrix of the input values each weight met (`[in x kernel h x kernel w, outputs]`, built
/// by copying rows), summed over the images (each thread its share, then the threads' sums); none
/// where the kernels do not take the geometry.
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
    let sums = (0..threads).into_par_iter().map(|t| {
        let mut sum = vec![0.0f32; g.out_channels * columns];
        let mut matrix = vec![0.0f32; columns * outputs];
        for image in (t * per_thread..batch).take(per_thread) {
            unfold(&g, &input[image * in_len..][..in_len], &mut matrix);
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
        sum
    });
    let sum = sums.reduce_with(|mut a, b| {
        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
        a
    })?;
    let shape = [g.out_channels, g.in_channels, g.kernel[0], g.kernel[1]];
    Some(FloatTensor::<Flex>::from_data(TensorData::new(sum, shape)))
}

/// Write into `matrix` (`[in x kernel h x kernel w, outputs]`) the input value each weight
/// meets at each output of one image (`input`: `[in, height, width]`), zero where it falls in
/// the padding: row `(c, ky, kx)`'s value at output `(oy, ox)` is the input's `(c, oy * sy + ky -
/// top, ox * sx + kx - left)`.
fn unfold(g: &mekd_kernels::Conv2dGeometry, input: &[f32], matrix: &mut [f32]) {
    let ([kh, kw], [sy, sx], [top, left]) = (g.kernel, g.stride, g.pad_before);
    let (h, w, out_h, out_w) = (g.in_height, g.in_width, g.out_height(), g.out_width());
    let mut rows = matrix.chunks_exact_mut(out_h * out_w);
    for channel in input.chunks_exact(h * w) {
        for ky in 0..kh {
            for kx in 0..kw {
                let Some(row) = rows.next() else { return };
                // The outputs whose column falls in the image: `ox * sx + kx` in `[left, left + w)`.
                let first = left.saturating_sub(kx).div_ceil(sx).min(out_w);
                let end = (left + w).saturating_sub(kx).div_ceil(sx).clamp(first, out_w);
                for (oy, out) in row.chunks_exact_mut(out_w).enumerate() {
                    let iy = (oy * sy + ky).checked_sub(top).filter(|&iy| iy < h);
                    let Some(iy) = iy else {
                        out.fill(0.0);
                        continue;
                    };
                    let from = &channel[iy * w..][..w];
                    out[..first].fill(0.0);
                    out[end..].fill(0.0);
                    if first == end {
                        continue;
                    }
                    let x0 = first * sx + kx - left;
                    if sx == 1 {
                        out[first..end].copy_from_slice(&from[x0..][..end - first]);
                    } else {
                        for (value, x) in out[first..end].iter_mut().zip((x0..).step_by(sx)) {
                            *value = from[x];
                        }
                    }
                }
            }
        }
    }
}

/// A tensor's four dimensions; none for another rank.
fn dims4(shape: &Shape) -> Option<[usize; 4]> {
    shape.iter().copied().collect::<Vec<_>>().try_into().ok()
}

/// `tensor` itself where contiguous, a contiguous copy otherwise.
fn contiguous(tensor: &FloatTensor<Flex>) -> FloatTensor<Flex> {
    if tensor.is_contiguous() && tensor.layout().start_offset() == 0 { tensor.clone() } else { tensor.to_contiguous() }
}

impl<B: Backend + KernelConv, C: CheckpointStrategy> KernelConv for Autodiff<B, C> {
    fn kernel_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct KernelConvBackward;

        impl<B: Backend + KernelConv> Backward<B, 2> for KernelConvBackward {
            type State = (burn::backend::autodiff::NodeId, burn::backend::autodiff::NodeId, ConvOptions<2>);

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

        match KernelConvBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
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

    /// Not differentiated again (no second-order gradients): the autodiff backend's own.
    fn kernel_conv2d_weight_gradient(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, grad, options)
    }
}

/// The gradient of the convolution's input. With stride 1 it is the convolution of the output
/// gradient `grad` by the weights with input and output channels swapped and each kernel turned
/// by 180 degrees, padded by `kernel - 1 - padding` on each side ([`KernelConv`] again); burn's
/// own where a padding exceeds `kernel - 1` or the stride is larger.
fn input_gradient<B: Backend + KernelConv>(
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
