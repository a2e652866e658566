//! Our direct convolution ([`mekd_kernels::Conv2d`]) inside tract's plan.
//!
//! tract lowers the students' convolutions (few channels, 32x32 and smaller images) to im2col
//! plus a matrix product and spends most of the time gathering im2col panels. After tract has
//! decluttered the graph (batch norm folded, strided 1x1 convolutions split into a downsample and
//! a plain 1x1), [`replace_convolutions`] swaps every convolution the kernel covers (f32, NCHW,
//! one group, no dilation, constant weights and bias, known shapes) for a [`DirectConv`] node;
//! tract then optimises the rest as usual.

use std::cell::RefCell;
use std::sync::Arc;

use mekd_kernels::{Conv2d, Conv2dGeometry};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// A convolution run by [`mekd_kernels::Conv2d`], its weights packed in the op.
#[derive(Clone, Debug)]
pub struct DirectConv {
    conv: Arc<Conv2d>,
    batch: usize,
}

impl PartialEq for DirectConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.conv, &other.conv) && self.batch == other.batch
    }
}

impl Eq for DirectConv {}

impl DirectConv {
    /// The compiled kernel this node runs, e.g. `direct-conv/avx512/8x2x16`.
    pub fn kernel_name(&self) -> String {
        self.conv.kernel_name()
    }

    /// The kernel and the convolution's shape (`+ relu`: the ReLU after it is fused).
    pub fn describe(&self) -> String {
        let relu = if self.conv.relu() { " + relu" } else { "" };
        format!("{}{relu} on {}", self.conv.kernel_name(), self.conv.geometry())
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
    /// The phase planes of the image being convolved, reused between calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = self.conv.geometry();
        let input = inputs[0].try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and `Conv2d::run` writes every value of its
        // output before anything reads it (its tests start from a NaN-filled buffer).
        let mut output =
            unsafe { Tensor::uninitialized::<f32>(&[self.batch, g.out_channels, g.out_height(), g.out_width()])? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            SCRATCH.with_borrow_mut(|scratch| self.conv.run(self.batch, input, out, scratch))?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = self.conv.geometry();
        let expected = [self.batch, g.in_channels, g.in_height, g.in_width];
        ensure!(
            inputs.len() == 1
                && inputs[0].datum_type == f32::datum_type()
                && inputs[0].shape.as_concrete() == Some(&expected[..]),
            "MekdDirectConv expects one f32 input of shape {expected:?}, got {inputs:?}"
        );
        Ok(tvec!(f32::fact([self.batch, g.out_channels, g.out_height(), g.out_width()])))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), (self.batch * self.conv.geometry().macs()).to_dim())))
    }

    as_op!();
}

/// The [`DirectConv`] that computes `node`, or `None` when the kernel does not cover it.
fn direct_conv_for(model: &TypedModel, node: &TypedNode) -> TractResult<Option<DirectConv>> {
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
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
    let Some(&[batch, in_channels, in_height, in_width]) = facts[0].shape.as_concrete() else { return Ok(None) };
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
    let weights = weights.try_as_plain_ram()?;
    let weights = weights.as_slice::<f32>()?;
    let bias = bias.try_as_plain_ram()?;
    let bias = bias.as_slice::<f32>()?;
    let bias: Vec<f32> = match bias.len() {
        0 => vec![0.0; geometry.out_channels],
        1 => vec![bias[0]; geometry.out_channels],
        _ => bias.to_vec(),
    };
    match Conv2d::new(geometry, weights, Some(&bias)) {
        Ok(kernel) => Ok(Some(DirectConv { conv: Arc::new(kernel), batch })),
        // A shape the kernel refuses stays with tract.
        Err(_) => Ok(None),
    }
}

/// The ReLU that alone reads convolution `id`'s output, if there is one: tract's decluttered
/// form of ONNX `Relu` (a `Clip` with min 0) is `Max` with a constant zero.
fn relu_after(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let outlet = OutletId::new(id, 0);
    let successors = model.outlet_successors(outlet);
    if successors.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let next = model.node(successors[0].node);
    let is_max = next.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Max");
    if !is_max || next.inputs.len() != 2 {
        return Ok(None);
    }
    let other = next.inputs[1 - successors[0].slot];
    let zero = model.outlet_fact(other)?.konst.as_ref().is_some_and(|k| {
        k.datum_type() == f32::datum_type()
            && k.len() == 1
            && k.try_as_plain_ram().ok().and_then(|v| v.as_slice::<f32>().ok().map(|s| s[0] == 0.0)) == Some(true)
    });
    Ok(zero.then_some(next.id))
}

/// Replace every convolution of a decluttered `model` that [`DirectConv`] covers, with the ReLU
/// that follows it fused where there is one.
pub fn replace_convolutions(model: &mut TypedModel) -> TractResult<()> {
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(mut op) = direct_conv_for(model, node)? else { continue };
        let relu = relu_after(model, id)?;
        if relu.is_some() {
            op.conv = Arc::new((*op.conv).clone().with_relu());
        }
        let mut patch = TypedModelPatch::new("mekd-direct-conv");
        let input = patch.tap_model(model, node.inputs[0])?;
        let output = patch.wire_node(&node.name, op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(relu.unwrap_or(id), 0), output)?;
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
