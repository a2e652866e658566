//! Our direct convolution ([`mekd_kernels::Conv2d`]) inside tract's plan.
//!
//! tract lowers the students' convolutions (few channels, 32x32 and smaller images) to im2col
//! plus a matrix product and spends most of the time gathering im2col panels. After tract has
//! decluttered the graph (batch norm folded, 1x1 convolutions turned into matrix products, after
//! a downsample where strided), [`replace_convolutions`] swaps every convolution the kernel covers
//! (f32, NCHW, one group or depthwise, no dilation, constant weights and bias, known shapes) and
//! every 1x1 (a matrix product, after a downsample where strided) for a [`DirectConv`] node; tract then
//! optimises the rest as usual.

use std::cell::RefCell;
use std::sync::Arc;

use mekd_kernels::{Conv2d, Conv2dGeometry};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Downsample;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, MaxPool};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// A convolution run by [`mekd_kernels::Conv2d`], its weights packed in the op.
#[derive(Clone, Debug)]
pub struct DirectConv {
    conv: Arc<Conv2d>,
    /// Images per run; `None`: no batch axis (`[C, H, W]`, tract's form of a batch-1 graph
    /// after it dropped the axis).
    batch: Option<usize>,
    /// A 2x2, stride-2 max pooling after the convolution (and its ReLU), fused.
    pool: bool,
    /// A second input, shaped as the convolution's output, added to it before the ReLU (a
    /// residual connection), fused.
    residual: bool,
}

impl PartialEq for DirectConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.conv, &other.conv)
            && (self.batch, self.pool, self.residual) == (other.batch, other.pool, other.residual)
    }
}

impl Eq for DirectConv {}

impl DirectConv {
    /// The shape of `channels x height x width` images with this node's batch axis.
    fn shape(&self, channels: usize, height: usize, width: usize) -> TVec<usize> {
        match self.batch {
            Some(n) => tvec![n, channels, height, width],
            None => tvec![channels, height, width],
        }
    }

    /// The compiled kernel this node runs, e.g. `direct-conv/avx512/8x32`.
    pub fn kernel_name(&self) -> String {
        self.conv.kernel_name()
    }

    /// The kernel and the convolution's shape (`+ add`, `+ relu`, `+ maxpool 2x2`: what is
    /// fused).
    pub fn describe(&self) -> String {
        let add = if self.residual { " + add" } else { "" };
        let relu = if self.conv.relu() { " + relu" } else { "" };
        let pool = if self.pool { " + maxpool 2x2" } else { "" };
        format!("{}{add}{relu}{pool} on {}", self.conv.kernel_name(), self.conv.geometry())
    }

    /// Output height and width: the convolution's, halved when a pooling is fused.
    fn out_hw(&self) -> [usize; 2] {
        let g = self.conv.geometry();
        let [h, w] = [g.out_height(), g.out_width()];
        if self.pool { mekd_kernels::max_pool_2x2_shape(h, w) } else { [h, w] }
    }
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "MekdDirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.describe()])
    }

    op_as_typed_op!();
}

thread_local! {
    /// The kernel's scratch buffer (the planes of the image being convolved), reused between calls
    /// on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The convolution's output before a fused pooling, reused likewise.
    static UNPOOLED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = self.conv.geometry();
        let input = inputs[0].try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        let residual = match self.residual {
            true => Some(inputs[1].try_as_plain_ram()?),
            false => None,
        };
        let add = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
        let [out_h, out_w] = self.out_hw();
        let images = self.batch.unwrap_or(1);
        // SAFETY: f32 has no invalid bit patterns, and `Conv2d::run` (or the pooling) writes
        // every value of its output before anything reads it (their tests start from NaN).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.shape(g.out_channels, out_h, out_w))? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            SCRATCH.with_borrow_mut(|scratch| {
                if !self.pool {
                    return self.conv.run_adding(images, input, add, out, scratch);
                }
                UNPOOLED.with_borrow_mut(|unpooled| {
                    // Grown, never shrunk (the kernel writes every value it is given).
                    let needed = images * g.output_len();
                    if unpooled.len() < needed {
                        unpooled.resize(needed, 0.0);
                    }
                    let unpooled = &mut unpooled[..needed];
                    self.conv.run_adding(images, input, add, unpooled, scratch)?;
                    let planes = images * g.out_channels;
                    mekd_kernels::max_pool_2x2(planes, g.out_height(), g.out_width(), unpooled, out)
                })
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = self.conv.geometry();
        let expected = self.shape(g.in_channels, g.in_height, g.in_width);
        let unpooled = self.shape(g.out_channels, g.out_height(), g.out_width());
        let wanted = if self.residual { vec![expected, unpooled] } else { vec![expected] };
        ensure!(
            inputs.len() == wanted.len()
                && inputs.iter().zip(&wanted).all(|(fact, shape)| {
                    fact.datum_type == f32::datum_type() && fact.shape.as_concrete() == Some(&shape[..])
                }),
            "MekdDirectConv expects f32 inputs of shapes {wanted:?}, got {inputs:?}"
        );
        let [out_h, out_w] = self.out_hw();
        Ok(tvec!(f32::fact(self.shape(g.out_channels, out_h, out_w))))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), (self.batch.unwrap_or(1) * self.conv.macs()).to_dim())))
    }

    as_op!();
}

/// A convolution found in the graph, before it becomes a [`DirectConv`]: its shape, weights
/// (`[out_channels, in_channels / groups, kh, kw]`) and bias as the graph holds them, what it
/// reads and in which layout.
struct Found {
    geometry: Conv2dGeometry,
    weights: Vec<f32>,
    bias: Vec<f32>,
    depthwise: bool,
    /// Images per run; `None`: `[C, H, W]` without a batch axis.
    batch: Option<usize>,
    input: OutletId,
    /// The input has a batch axis of one image that the output drops (`[1, C, H, W]` in,
    /// `[C, H, W]` out: where tract drops a batch-1 graph's axis at a matrix product).
    drops_batch_axis: bool,
}

impl Found {
    /// Add per-channel `values` (one, or one per output channel) to the output: into the bias.
    fn add(&mut self, values: &[f32]) {
        self.bias.iter_mut().zip(values.iter().cycle()).for_each(|(b, v)| *b += v);
    }

    /// Multiply the output by per-channel `values` (one, or one per output channel): into the
    /// weights and the bias.
    fn scale(&mut self, values: &[f32]) {
        let per_channel = self.weights.len() / self.geometry.out_channels;
        for ((w, b), &s) in self.weights.chunks_exact_mut(per_channel).zip(&mut self.bias).zip(values.iter().cycle()) {
            w.iter_mut().for_each(|w| *w *= s);
            *b *= s;
        }
    }

    /// The layout of the input and output.
    fn format(&self) -> DataFormat {
        if self.batch.is_some() { DataFormat::NCHW } else { DataFormat::CHW }
    }

    /// The op, or `None` when the kernel refuses the shape or would not be faster (it stays
    /// with tract): an unstrided 1x1 convolution pays off where the kernel reads its input in
    /// place (whole tiles of outputs; MobileNet's pointwise layers down to 4x4), not where it
    /// would copy it first (the 2x2 layers, with a tile mostly empty).
    fn build(&self) -> Option<DirectConv> {
        let kernel = if self.depthwise {
            Conv2d::depthwise(self.geometry, &self.weights, Some(&self.bias))
        } else {
            Conv2d::new(self.geometry, &self.weights, Some(&self.bias))
        };
        let kernel = kernel.ok()?;
        let g = &self.geometry;
        if g.kernel == [1, 1] && g.stride == [1, 1] && !kernel.reads_in_place() {
            return None;
        }
        let conv = Arc::new(kernel);
        Some(DirectConv { conv, batch: self.batch, pool: false, residual: false })
    }
}

/// The convolution `node` computes, if the kernel covers it: f32, NCHW or CHW, one group or
/// depthwise, no dilation, constant weights and bias, known shapes.
fn conv_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Found>> {
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || !matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        || spec.rank() != 2
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts: Vec<&TypedFact> = node.inputs.iter().map(|&i| model.outlet_fact(i)).collect::<TractResult<_>>()?;
    if facts.iter().any(|f| f.datum_type != f32::datum_type()) {
        return Ok(None);
    }
    let (batch, [in_channels, in_height, in_width]) = match facts[0].shape.as_concrete() {
        Some(&[n, c, h, w]) if spec.data_format == DataFormat::NCHW => (Some(n), [c, h, w]),
        Some(&[c, h, w]) if spec.data_format == DataFormat::CHW => (None, [c, h, w]),
        _ => return Ok(None),
    };
    // One group, or depthwise: one group per channel, as many outputs as inputs.
    let depthwise = conv.group != 1;
    if depthwise && (conv.group != in_channels || conv.output_channels() != in_channels) {
        return Ok(None);
    }
    let (Some(weights), Some(bias)) = (&facts[1].konst, &facts[2].konst) else { return Ok(None) };
    let padding = spec.computed_padding(&[in_height, in_width]);
    let geometry = Conv2dGeometry {
        in_channels,
        in_height,
        in_width,
        out_channels: conv.output_channels(),
        kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
        stride: [spec.stride(0), spec.stride(1)],
        pad_before: [padding[0].pad_before, padding[1].pad_before],
        pad_after: [padding[0].pad_after, padding[1].pad_after],
    };
    let weights = weights.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = bias.try_as_plain_ram()?;
    let bias = bias.as_slice::<f32>()?;
    let bias: Vec<f32> = match bias.len() {
        0 => vec![0.0; geometry.out_channels],
        1 => vec![bias[0]; geometry.out_channels],
        n if n == geometry.out_channels => bias.to_vec(),
        _ => return Ok(None),
    };
    Ok(Some(Found { geometry, weights, bias, depthwise, batch, input: node.inputs[0], drops_batch_axis: false }))
}

/// The 1x1 convolution `node` computes, if it is one as tract leaves it after decluttering:
/// an `EinSum` `NIHW,OI->NOHW` (or `IHW,OI->OHW`, or `NIHW,OI->OHW` over one image: tract's
/// batch-1 graph drops its batch axis there) of f32 values with constant `[O, I]` weights,
/// reading the input directly (MobileNet's pointwise layers) or through the `Downsample`s of
/// the height and width axes (ResNet's strided shortcuts).
fn pointwise_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Found>> {
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let (inputs, outputs) = einsum.axes.to_strs();
    let [x, w] = [&inputs[0], &inputs[1]].map(|s| s.chars().collect::<Vec<char>>());
    let Some(y) = outputs.first().map(|s| s.chars().collect::<Vec<char>>()) else { return Ok(None) };
    // A first input axis that neither the weights nor the output have: summed over, a batch of
    // one image (checked on the shape below), dropped.
    let drops_batch_axis = x.len() == 4 && y.len() == 3 && !y.contains(&x[0]) && !w.contains(&x[0]);
    let x = &x[usize::from(drops_batch_axis)..];
    let rank = x.len();
    if !(rank == 3 || rank == 4) || y.len() != rank || w.len() != 2 || outputs.len() != 1 {
        return Ok(None);
    }
    // x: [N,] I, H, W; w: O, I; y: [N,] O, H, W; the channel axis sums, the others pass.
    let c = rank - 3;
    let (o, i) = (w[0], w[1]);
    let passes = x[..c] == y[..c] && x[c + 1..] == y[c + 1..];
    if x[c] != i || y[c] != o || o == i || !passes || x.contains(&o) || y.contains(&i) {
        return Ok(None);
    }
    let weights_fact = model.outlet_fact(node.inputs[1])?;
    let Some(weights) = weights_fact.konst.as_ref().filter(|k| k.datum_type() == f32::datum_type()) else {
        return Ok(None);
    };
    // The input's channel axis.
    let c_in = c + usize::from(drops_batch_axis);
    // Walk back through the downsamples of a stride, each read by this chain alone.
    let mut input = node.inputs[0];
    let mut stride = [1, 1];
    while let Some(down) = model.node(input.node).op_as::<Downsample>() {
        let axis = down.axis.wrapping_sub(c_in + 1);
        let alone = model.outlet_successors(input).len() == 1;
        if axis > 1 || down.modulo != 0 || down.stride < 1 || !alone || stride[axis] != 1 {
            break;
        }
        stride[axis] = down.stride as usize;
        input = model.node(input.node).inputs[0];
    }
    let in_fact = model.outlet_fact(input)?;
    let Some(shape) = in_fact.shape.as_concrete() else { return Ok(None) };
    if in_fact.datum_type != f32::datum_type() || shape.len() != c_in + 3 || (drops_batch_axis && shape[0] != 1) {
        return Ok(None);
    }
    let [in_channels, in_height, in_width] = [shape[c_in], shape[c_in + 1], shape[c_in + 2]];
    let out_channels = weights.shape()[0];
    if weights.shape() != [out_channels, in_channels] {
        return Ok(None);
    }
    let geometry = Conv2dGeometry {
        in_channels,
        in_height,
        in_width,
        out_channels,
        kernel: [1, 1],
        stride,
        pad_before: [0, 0],
        pad_after: [0, 0],
    };
    let weights = weights.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let batch = (rank == 4).then(|| shape[0]);
    let bias = vec![0.0; out_channels];
    Ok(Some(Found { geometry, weights, bias, depthwise: false, batch, input, drops_batch_axis }))
}

/// The node that alone reads node `id`'s output (which is not a model output), and the slot
/// it reads it on.
fn sole_reader(model: &TypedModel, id: usize) -> TractResult<Option<(&TypedNode, usize)>> {
    let outlet = OutletId::new(id, 0);
    let successors = model.outlet_successors(outlet);
    if successors.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    Ok(Some((model.node(successors[0].node), successors[0].slot)))
}

/// The binary `op_name` (`Add`, `Max`, `Mul`) that alone reads node `id`'s output, and its
/// other operand.
fn binary_after(model: &TypedModel, id: usize, op_name: &str) -> TractResult<Option<(usize, OutletId)>> {
    let Some((next, slot)) = sole_reader(model, id)? else { return Ok(None) };
    if next.inputs.len() != 2 || next.op_as::<TypedBinOp>().is_none_or(|op| op.0.name() != op_name) {
        return Ok(None);
    }
    Ok(Some((next.id, next.inputs[1 - slot])))
}

/// The binary `op_name` (`Max`, `Mul`) that alone reads node `id`'s output, if its other side
/// is an f32 constant that leaves the output's shape as it is: that node and the constant.
fn binary_with_constant_after(
    model: &TypedModel,
    id: usize,
    op_name: &str,
) -> TractResult<Option<(usize, Arc<Tensor>)>> {
    let Some((next, other)) = binary_after(model, id, op_name)? else { return Ok(None) };
    let Some(konst) = model.outlet_fact(other)?.konst.clone().filter(|k| k.datum_type() == f32::datum_type()) else {
        return Ok(None);
    };
    let unchanged = model.outlet_fact(OutletId::new(next, 0))?.shape == model.outlet_fact(OutletId::new(id, 0))?.shape;
    Ok(unchanged.then_some((next, konst)))
}

/// The addition that alone reads node `id`'s output, if its other operand is computed (a
/// residual connection) and shaped as that output: the addition and that operand.
fn residual_add_after(model: &TypedModel, id: usize) -> TractResult<Option<(usize, OutletId)>> {
    let Some((add, other)) = binary_after(model, id, "Add")? else { return Ok(None) };
    let (ours, theirs) = (model.outlet_fact(OutletId::new(id, 0))?, model.outlet_fact(other)?);
    let fits = theirs.konst.is_none()
        && theirs.datum_type == f32::datum_type()
        && theirs.shape.as_concrete().is_some()
        && theirs.shape == ours.shape;
    Ok(fits.then_some((add, other)))
}

/// The ReLU that alone reads node `id`'s output, if there is one: tract's decluttered form of
/// ONNX `Relu` (a `Clip` with min 0) is `Max` with a constant zero.
fn relu_after(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let Some((max, konst)) = binary_with_constant_after(model, id, "Max")? else { return Ok(None) };
    let zero = konst.try_as_plain_ram()?.as_slice::<f32>()? == [0.0];
    Ok(zero.then_some(max))
}

/// The binary `op_name` (`Add`, `Mul`) that alone reads node `id`'s output with a constant of
/// one value, or one per output channel laid out `[C, 1, 1]` (with a leading 1 where the output
/// has a batch axis): that node and the values. Batch norm's shift and scale, which tract folds
/// into a convolution of one group but leaves after a depthwise one or a 1x1 one.
fn per_channel_after(
    model: &TypedModel,
    id: usize,
    op_name: &str,
    channels: usize,
) -> TractResult<Option<(usize, Vec<f32>)>> {
    let Some((next, konst)) = binary_with_constant_after(model, id, op_name)? else { return Ok(None) };
    let values = konst.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let shape = konst.shape();
    let per_channel = shape.len() >= 3
        && shape[shape.len() - 3] == channels
        && shape[shape.len() - 2..] == [1, 1]
        && shape[..shape.len() - 3].iter().all(|&d| d == 1);
    Ok((values.len() == 1 || per_channel).then_some((next, values)))
}

/// The 2x2, stride-2, unpadded max pooling that alone reads node `id`'s output, if there is
/// one, in `format` (the convolution's layout).
fn max_pool_after(model: &TypedModel, id: usize, format: DataFormat) -> TractResult<Option<usize>> {
    let Some((next, _)) = sole_reader(model, id)? else { return Ok(None) };
    let Some(pool) = next.op_as::<MaxPool>() else { return Ok(None) };
    let spec = &pool.pool_spec;
    let Some(shape) = model.outlet_fact(OutletId::new(id, 0))?.shape.as_concrete().map(|s| s.to_vec()) else {
        return Ok(None);
    };
    let hw = &shape[shape.len().saturating_sub(2)..];
    let unpadded = spec.computed_padding(hw).iter().all(|p| p.pad_before == 0 && p.pad_after == 0);
    let fits = pool.with_index_outputs.is_none()
        && spec.data_format == format
        && spec.rank() == 2
        && spec.kernel_shape[..] == [2, 2]
        && spec.strides()[..] == [2, 2]
        && spec.dilations().iter().all(|&d| d == 1)
        && unpadded;
    Ok(fits.then_some(next.id))
}

/// Replace every convolution of a decluttered `model` that [`DirectConv`] covers, with what
/// follows it fused where it can be: a per-channel scale (into the weights), a residual
/// addition and a ReLU (into the kernel's store), then a 2x2 max pooling (after the kernel, in
/// the same op).
pub fn replace_convolutions(model: &mut TypedModel) -> TractResult<()> {
    for id in model.eval_order()? {
        let node = model.node(id);
        let found = match conv_node(model, node)? {
            Some(found) => Some(found),
            None => pointwise_node(model, node)?,
        };
        let Some(mut found) = found else { continue };
        let channels = found.geometry.out_channels;
        // Batch norm's shift and scale where tract left them, in whatever order: into the
        // weights and the bias.
        let mut last = id;
        loop {
            if let Some((add, values)) = per_channel_after(model, last, "Add", channels)? {
                found.add(&values);
                last = add;
            } else if let Some((mul, values)) = per_channel_after(model, last, "Mul", channels)? {
                found.scale(&values);
                last = mul;
            } else {
                break;
            }
        }
        let Some(mut op) = found.build() else { continue };
        let residual = residual_add_after(model, last)?;
        let last = residual.map_or(last, |(add, _)| add);
        op.residual = residual.is_some();
        let relu = relu_after(model, last)?;
        if relu.is_some() {
            op.conv = Arc::new((*op.conv).clone().with_relu());
        }
        let last = relu.unwrap_or(last);
        let pool = max_pool_after(model, last, found.format())?;
        op.pool = pool.is_some();
        let mut patch = TypedModelPatch::new("mekd-direct-conv");
        let mut inputs = vec![patch.tap_model(model, found.input)?];
        if found.drops_batch_axis {
            let name = format!("{}.drop-batch-axis", model.node(id).name);
            inputs[0] = patch.wire_node(name, AxisOp::Rm(0), &inputs)?[0];
        }
        if let Some((_, other)) = residual {
            inputs.push(patch.tap_model(model, other)?);
        }
        let output = patch.wire_node(&model.node(id).name, op, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(pool.unwrap_or(last), 0), output)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The [`DirectConv`] nodes of an optimised plan, described (for `--verbose` output and tests).
pub fn direct_convs(model: &TypedModel) -> Vec<String> {
    model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<DirectConv>().map(|op| format!("{}: {}", n.name, op.describe())))
        .collect()
}
