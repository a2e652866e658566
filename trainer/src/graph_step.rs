//! Training steps recorded once as a device graph and replayed: burn 0.22's `capture` (CUDA
//! graphs on burn-cuda, one dispatch for the step's hundreds of kernels; on other backends the
//! step simply runs again). On a GPU a small network's step is bound by the host's work per
//! kernel launch, not by the kernels (BENCHMARKS.md, "Training steps on burn-cuda"); a replay
//! skips that work.
//!
//! A replay re-runs the recorded kernels on the buffers they touched when recorded, so
//! everything a step reads and changes lives in buffers that stay put: the model's parameters
//! and BatchNorm running statistics (one flat buffer each), SGD's velocities, and the inputs.
//! Each step builds the model as views of those buffers, computes the loss and its gradients,
//! and writes the new values back into them in place (SGD with momentum and weight decay, the
//! arithmetic of burn's `Sgd`, whose returned tensors would be new buffers). Inputs are written
//! in place before each replay ([`GraphStep::set_floats`]). Writes in place need buffers that
//! nothing else holds; where one is shared (or the backend cannot tell, as ndarray), the write
//! goes to a new buffer, which is right when the step runs again but not for a replay: with a
//! device graph that is refused ([`GraphStepError::Shared`]) rather than train on a stale copy.
//!
//! The learning rate is part of the recording: a new rate needs a new [`GraphStep`].
//! Recording runs the step on the inputs given (three warm-up runs that tune and allocate every
//! buffer, then the recorded one, which a device graph records without running), then puts the
//! model and the velocities back as they were: every [`GraphStep::step`] is one step of
//! training, as the same loop without a graph would take it.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::kind::Basic;
use burn::tensor::{Device, Graph, Int, Tensor, TensorData, capture};

use crate::schedule::Sgd;

/// Why a graph step cannot run.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GraphStepError {
    /// A buffer the step rewrites in place is also held elsewhere.
    #[error(
        "{0} is shared with another tensor, so the step cannot rewrite it in place (a replay would \
         keep reading the old values)"
    )]
    Shared(String),
    /// New input values of the wrong length.
    #[error("input {name}: {got} values for a buffer of {expected}")]
    InputSize {
        /// Which input.
        name: String,
        /// Its buffer's length.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// The step has no such input.
    #[error("the step has no {0}")]
    NoInput(String),
    /// The step's loss function produced no gradient for a trainable parameter.
    #[error("no gradient for a trainable parameter of the model ({0})")]
    NoGradient(String),
}

/// The inputs of a step: flat buffers the loss function reshapes (views, no copies).
#[derive(Clone, Debug)]
pub struct StepInputs {
    /// Float inputs (images, targets).
    pub floats: Vec<Tensor<1>>,
    /// Integer inputs (labels).
    pub ints: Vec<Tensor<1, Int>>,
}

/// One model tensor the step reads and rewrites: a parameter (with its SGD velocity) or a
/// running statistic.
struct Slot {
    stable: Tensor<1>,
    velocity: Option<Tensor<1>>,
}

/// What the recorded closure and the caller share.
struct State<M> {
    /// The model's structure; its own tensors are never read after [`record`].
    template: M,
    slots: Vec<Slot>,
    index: HashMap<ParamId, usize>,
    inputs: StepInputs,
    sgd: InPlaceSgd,
    /// The first buffer a step could not rewrite in place.
    copied: Option<String>,
}

/// SGD with momentum (no dampening) and coupled weight decay, as `schedule::reference_sgd`
/// configures burn's optimizer.
#[derive(Clone, Copy, Debug)]
struct InPlaceSgd {
    lr: f64,
    momentum: f32,
    weight_decay: f32,
}

/// A training step recorded as a device graph.
pub struct GraphStep<M, F: FnMut() -> Result<Tensor<1>, GraphStepError>> {
    state: Rc<RefCell<State<M>>>,
    graph: Graph<Result<Tensor<1>, GraphStepError>, F>,
    plain: Device,
}

/// Record a training step of `model` (on a training device) with `sgd`'s momentum and weight
/// decay at learning rate `lr`. `loss` computes, from the model and the inputs, the tensor to
/// differentiate and the loss's value (reported by each step). `plain` is the training device
/// without autodiff. Runs the step on `inputs` while recording, then puts the model back as it
/// was (see the module's notes).
pub fn record<M, L>(
    model: M,
    sgd: &Sgd,
    lr: f64,
    inputs: StepInputs,
    plain: &Device,
    mut loss: L,
) -> Result<GraphStep<M, impl FnMut() -> Result<Tensor<1>, GraphStepError> + use<M, L>>, GraphStepError>
where
    M: Module,
    L: FnMut(&M, &StepInputs) -> (Tensor<1>, Tensor<1>),
{
    let running = mekd_models::running_statistics(&model);
    let mut gather = Gather { plain: plain.clone(), running, slots: Vec::new(), index: HashMap::new() };
    model.visit(&mut gather);
    let sgd = InPlaceSgd { lr, momentum: sgd.momentum as f32, weight_decay: sgd.weight_decay as f32 };
    let state = Rc::new(RefCell::new(State {
        template: model,
        slots: gather.slots,
        index: gather.index,
        inputs,
        sgd,
        copied: None,
    }));
    let copy = |t: &Tensor<1>| copy_of(t, plain);
    let before: Vec<(Tensor<1>, Option<Tensor<1>>)> =
        state.borrow().slots.iter().map(|slot| (copy(&slot.stable), slot.velocity.as_ref().map(copy))).collect();
    let shared = state.clone();
    let graph = capture(plain, move || step(&mut shared.borrow_mut(), &mut loss));
    if let Err(e) = graph.output() {
        return Err(e.clone());
    }
    let hardware = graph.is_hardware();
    let mut restored = state.borrow_mut();
    if let (true, Some(name)) = (hardware, restored.copied.take()) {
        return Err(GraphStepError::Shared(name));
    }
    for (i, (slot, (stable, velocity))) in restored.slots.iter_mut().zip(before).enumerate() {
        write(&mut slot.stable, stable, &format!("tensor {i}"), hardware)?;
        if let (Some(target), Some(velocity)) = (&mut slot.velocity, velocity) {
            write(target, velocity, &format!("velocity {i}"), hardware)?;
        }
    }
    drop(restored);
    Ok(GraphStep { state, graph, plain: plain.clone() })
}

impl<M: Module, F: FnMut() -> Result<Tensor<1>, GraphStepError>> GraphStep<M, F> {
    /// Run one step on the inputs' current values; returns its loss.
    pub fn step(&mut self) -> Result<Tensor<1>, GraphStepError> {
        // SAFETY: the recorded kernels read and write the state's buffers (parameters,
        // velocities, running statistics, inputs), which `self.state` owns and only rewrites
        // in place (a write that cannot be in place is refused, GraphStepError::Shared), the
        // loss's buffer, which the graph owns, and buffers the recording allocated, which cubecl
        // keeps reserved while the graph lives. One thread issues everything, on one stream.
        unsafe { self.graph.replay() }.clone()
    }

    /// Whether steps replay a recorded device graph (`false`: each step runs again, on a
    /// backend without graphs).
    pub fn is_graph(&self) -> bool {
        self.graph.is_hardware()
    }

    /// The first of the step's buffers that a step could not rewrite in place (harmless when the
    /// step runs again; with a device graph, recording refuses it).
    pub fn copied(&self) -> Option<String> {
        self.state.borrow().copied.clone()
    }

    /// Write new values into float input `i` (its length must stay the same).
    pub fn set_floats(&mut self, i: usize, values: Vec<f32>) -> Result<(), GraphStepError> {
        let name = format!("float input {i}");
        let mut state = self.state.borrow_mut();
        let target = state.inputs.floats.get_mut(i).ok_or_else(|| GraphStepError::NoInput(name.clone()))?;
        let n = values.len();
        write(
            target,
            Tensor::<1>::from_data(TensorData::new(values, [n]), &self.plain),
            &name,
            self.graph.is_hardware(),
        )
    }

    /// Write new values into integer input `i` (its length must stay the same).
    pub fn set_ints(&mut self, i: usize, values: Vec<i64>) -> Result<(), GraphStepError> {
        let name = format!("integer input {i}");
        let mut state = self.state.borrow_mut();
        let target = state.inputs.ints.get_mut(i).ok_or_else(|| GraphStepError::NoInput(name.clone()))?;
        let n = values.len();
        let fresh = Tensor::<1, Int>::from_data(TensorData::new(values, [n]), &self.plain);
        write(target, fresh, &name, self.graph.is_hardware())
    }

    /// The model as trained so far, in inference mode, on copies of the step's buffers (the
    /// step's own stay unshared).
    pub fn model(&self) -> M {
        let state = self.state.borrow();
        let copies: Vec<Slot> = state
            .slots
            .iter()
            .map(|slot| Slot { stable: copy_of(&slot.stable, &self.plain), velocity: None })
            .collect();
        state.template.clone().map(&mut Attach { slots: &copies, index: &state.index }).valid()
    }
}

/// A forward pass (inference: nothing changes but the output) recorded as a device graph, for
/// inputs of one size: write the input, replay, read the output.
pub struct GraphForward {
    input: Arc<Mutex<Tensor<1>>>,
    graph: Graph<Tensor<2>, Box<dyn FnMut() -> Tensor<2> + Send>>,
    plain: Device,
}

impl GraphForward {
    /// Record `forward` of an input buffer holding `input` (flat; `forward` reshapes it) on
    /// `plain` (a device without autodiff). Runs `forward` three times, unrecorded, first.
    pub fn record(
        input: Vec<f32>,
        plain: &Device,
        mut forward: impl FnMut(Tensor<1>) -> Tensor<2> + Send + 'static,
    ) -> Self {
        let n = input.len();
        let input = Arc::new(Mutex::new(Tensor::<1>::from_data(TensorData::new(input, [n]), plain)));
        let shared = input.clone();
        let closure: Box<dyn FnMut() -> Tensor<2> + Send> =
            Box::new(move || forward(shared.lock().unwrap_or_else(PoisonError::into_inner).clone()));
        Self { input, graph: capture(plain, closure), plain: plain.clone() }
    }

    /// The output for `input` (of the recorded length).
    pub fn run(&mut self, input: Vec<f32>) -> Result<Tensor<2>, GraphStepError> {
        let n = input.len();
        let fresh = Tensor::<1>::from_data(TensorData::new(input, [n]), &self.plain);
        let mut input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
        write(&mut input, fresh, "the forward pass's input", self.graph.is_hardware())?;
        drop(input);
        // SAFETY: the recorded kernels read the input buffer, which `self.input` owns and which
        // is only rewritten in place (refused otherwise, above), the model's weights, which the
        // recorded closure owns, and buffers the recording allocated (kept reserved while the
        // graph lives); one thread issues everything, on one stream.
        Ok(unsafe { self.graph.replay() }.clone())
    }

    /// Whether a device graph replays (`false`: the forward pass runs again each time).
    pub fn is_graph(&self) -> bool {
        self.graph.is_hardware()
    }
}

/// One step: the model as views of the state's buffers, the loss and its gradients, and the new
/// values written back in place.
fn step<M, L>(state: &mut State<M>, loss: &mut L) -> Result<Tensor<1>, GraphStepError>
where
    M: Module,
    L: FnMut(&M, &StepInputs) -> (Tensor<1>, Tensor<1>),
{
    let model = state.template.clone().map(&mut Attach { slots: &state.slots, index: &state.index });
    let (differentiable, value) = loss(&model, &state.inputs);
    let mut grads = GradientsParams::from_grads(differentiable.backward(), &model);
    let mut updates: Vec<Option<Tensor<1>>> = vec![None; state.slots.len()];
    model.visit(&mut Collect { grads: Some(&mut grads), index: &state.index, out: &mut updates });
    // The running statistics' updates become their values when the model is made valid.
    let valid = model.valid();
    valid.visit(&mut Collect { grads: None, index: &state.index, out: &mut updates });
    drop((valid, model, grads));

    let sgd = state.sgd;
    for (i, (slot, update)) in state.slots.iter_mut().zip(updates).enumerate() {
        let Some(update) = update else {
            return Err(GraphStepError::NoGradient(format!("tensor {i} in visiting order")));
        };
        match &mut slot.velocity {
            // burn's Sgd::step with WeightDecay and Momentum, term for term.
            Some(velocity) => {
                let grad = slot.stable.clone().mul_scalar(sgd.weight_decay).add(update);
                let new_velocity = grad.mul_scalar(1.0).add(velocity.clone().mul_scalar(sgd.momentum));
                let new_value = slot.stable.clone() - new_velocity.clone().mul_scalar(sgd.lr);
                let names = [format!("velocity {i}"), format!("parameter {i}")];
                if !write_any(velocity, new_velocity, &names[0])? {
                    state.copied.get_or_insert_with(|| names[0].clone());
                }
                if !write_any(&mut slot.stable, new_value, &names[1])? {
                    state.copied.get_or_insert_with(|| names[1].clone());
                }
            }
            None => {
                let name = format!("running statistic {i}");
                if !write_any(&mut slot.stable, update, &name)? {
                    state.copied.get_or_insert(name);
                }
            }
        }
    }
    Ok(value)
}

/// A copy of `t` in a buffer of its own (through the host: recording and reading the model only).
fn copy_of(t: &Tensor<1>, plain: &Device) -> Tensor<1> {
    Tensor::from_data(t.to_data(), plain)
}

/// Write `value` into `target`'s buffer; with `graph` (a device graph reads that buffer), a
/// buffer that cannot be rewritten in place is refused.
fn write<K: Basic>(
    target: &mut Tensor<1, K>,
    value: Tensor<1, K>,
    name: &str,
    graph: bool,
) -> Result<(), GraphStepError> {
    if graph && !target.can_mut() {
        return Err(GraphStepError::Shared(name.to_string()));
    }
    write_any(target, value, name).map(|_| ())
}

/// Write `value` into `target`: in place where nothing else holds its buffer (returns `true`),
/// else into a new buffer that `target` then holds (`false`).
fn write_any<K: Basic>(target: &mut Tensor<1, K>, value: Tensor<1, K>, name: &str) -> Result<bool, GraphStepError> {
    let (expected, got) = (target.dims()[0], value.dims()[0]);
    if expected != got {
        return Err(GraphStepError::InputSize { name: name.to_string(), expected, got });
    }
    let in_place = target.can_mut();
    target.inplace(|t| t.slice_assign(0..expected, value));
    Ok(in_place)
}

/// Copies every float tensor of a model into a flat buffer of its own; parameters that train
/// get a zero velocity (burn's first momentum step, `v = g`, is `0.9 * 0 + g`).
struct Gather {
    plain: Device,
    running: HashSet<ParamId>,
    slots: Vec<Slot>,
    index: HashMap<ParamId, usize>,
}

impl ModuleVisitor for Gather {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let trainable = !self.running.contains(&param.id);
        let n = tensor.shape().num_elements();
        let stable = Tensor::<D>::from_data(tensor.into_data(), &self.plain).reshape([n]);
        let velocity = trainable.then(|| Tensor::zeros([n], &self.plain));
        self.index.insert(param.id, self.slots.len());
        self.slots.push(Slot { stable, velocity });
    }
}

/// Gives every float tensor of a model the value of its slot (a view), tracked for gradients
/// where the slot trains.
struct Attach<'a> {
    slots: &'a [Slot],
    index: &'a HashMap<ParamId, usize>,
}

impl ModuleMapper for Attach<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        drop(tensor);
        let slot = &self.slots[self.index[&id]];
        let view = slot.stable.clone().reshape(shape).autodiff();
        let view = if slot.velocity.is_some() { view.require_grad() } else { view };
        Param::from_mapped_value(id, view, mapper)
    }
}

/// Collects, flat and by slot, each trainable parameter's gradient (with `grads`) or each
/// running statistic's value (without).
struct Collect<'a> {
    grads: Option<&'a mut GradientsParams>,
    index: &'a HashMap<ParamId, usize>,
    out: &'a mut [Option<Tensor<1>>],
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(&i) = self.index.get(&param.id) else { return };
        let value = match &mut self.grads {
            Some(grads) => grads.remove::<D>(param.id),
            None if self.out[i].is_none() => Some(param.val().inner()),
            None => None,
        };
        if let Some(value) = value {
            let n = value.shape().num_elements();
            self.out[i] = Some(value.reshape([n]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::self_test::values;
    use burn::nn::loss::CrossEntropyLossConfig;
    use mekd_models::{Architecture, Classifier, ClassifierSpec};
    use mekd_runtime::rng::SplitMix64;

    const B: usize = 4;

    fn batch(seed: u64) -> (Vec<f32>, Vec<i64>) {
        let mut rng = SplitMix64::new(seed);
        let x = (0..B * 32 * 32).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
        let y = (0..B).map(|_| rng.below(10) as i64).collect();
        (x, y)
    }

    fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
    }

    /// On flex (no device graphs: each step runs again) the recorded step is burn's SGD step
    /// with momentum and weight decay, term for term: the same losses step by step, and the
    /// same model after (its BatchNorm running statistics included, through the inference
    /// forward pass), within f32 rounding.
    #[test]
    fn steps_match_burns_sgd() {
        let (device, plain) = (Device::flex().autodiff(), Device::flex());
        device.seed(5);
        let spec = ClassifierSpec { architecture: Architecture::ResNet8, in_channels: 1, num_classes: 10 };
        let model = spec.init(&device).unwrap();
        // A copy of its own: clones of a module share its BatchNorm running statistics.
        let theirs_start = spec.init(&device).unwrap().load_record(model.clone().into_record());
        let ce = CrossEntropyLossConfig::new().init(&device);
        let batches: Vec<_> = (0..3).map(batch).collect();
        let x = |v: &[f32], d: &Device| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [B * 32 * 32]), d);
        let y = |v: &[i64], d: &Device| Tensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [B]), d);

        // burn's optimizer, one step on each batch.
        let sgd = Sgd::reference(1);
        let mut optim = sgd.optimizer();
        let mut theirs = theirs_start;
        let mut their_losses = Vec::new();
        for (bx, by) in &batches {
            let loss = ce.forward(theirs.forward(x(bx, &device).reshape([B, 1, 32, 32])), y(by, &device));
            their_losses.push(values(loss.clone())[0]);
            let grads = GradientsParams::from_grads(loss.backward(), &theirs);
            theirs = optim.step(0.1, theirs, grads);
        }

        let inputs = StepInputs { floats: vec![x(&batches[0].0, &plain)], ints: vec![y(&batches[0].1, &plain)] };
        let mut ours = record(model, &sgd, 0.1, inputs, &plain, |model: &Classifier, inputs| {
            let loss = ce.forward(
                model.forward(inputs.floats[0].clone().reshape([B, 1, 32, 32]).autodiff()),
                inputs.ints[0].clone(),
            );
            (loss.clone(), loss.detach().without_autodiff())
        })
        .unwrap();
        assert!(!ours.is_graph());
        assert_eq!(ours.copied(), None, "flex tells shared buffers apart: every write must be in place");
        let mut our_losses = Vec::new();
        for (bx, by) in &batches {
            ours.set_floats(0, bx.clone()).unwrap();
            ours.set_ints(0, by.clone()).unwrap();
            our_losses.push(values(ours.step().unwrap())[0]);
        }
        assert!(relative_difference(&our_losses, &their_losses) < 1e-6, "{our_losses:?} vs {their_losses:?}");
        assert_eq!(ours.copied(), None);

        let probe = x(&batches[0].0, &plain).reshape([B, 1, 32, 32]);
        let ours = values(ours.model().forward(probe.clone()));
        let theirs = values(theirs.valid().forward(probe));
        assert!(relative_difference(&ours, &theirs) < 1e-5, "{ours:?} vs {theirs:?}");
    }

    /// Inputs of another length, or that the step does not have, are refused with a clear
    /// error; one held elsewhere is written to a new buffer without a device graph (the step
    /// runs again and sees it) and refused with one (a replay would read the old buffer).
    #[test]
    fn refuses_wrong_or_shared_inputs() {
        let (device, plain) = (Device::flex().autodiff(), Device::flex());
        device.seed(6);
        let spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: 10 };
        let (bx, _) = batch(1);
        let input = Tensor::<1>::from_data(TensorData::new(bx.clone(), [B * 32 * 32]), &plain);
        let kept = input.clone();
        let inputs = StepInputs { floats: vec![input], ints: Vec::new() };
        let mut step = record(
            spec.init(&device).unwrap(),
            &Sgd::reference(1),
            0.1,
            inputs,
            &plain,
            |model: &Classifier, inputs| {
                let loss =
                    model.forward(inputs.floats[0].clone().reshape([B, 1, 32, 32]).autodiff()).powi_scalar(2).mean();
                (loss.clone(), loss.detach().without_autodiff())
            },
        )
        .unwrap();
        step.set_floats(0, bx.iter().map(|v| -v).collect()).unwrap();
        assert_eq!(values(kept.clone()), bx, "the holder keeps its values");
        let fresh = Tensor::<1>::from_data(TensorData::new(bx.clone(), [bx.len()]), &plain);
        let mut shared = kept.clone();
        let refused = write(&mut shared, fresh.clone(), "a shared buffer", true);
        assert!(matches!(refused, Err(GraphStepError::Shared(_))), "{refused:?}");
        drop(kept);
        assert!(write_any(&mut shared, fresh, "a buffer of its own").unwrap());
        step.set_floats(0, bx.clone()).unwrap();
        let short = step.set_floats(0, bx[1..].to_vec());
        assert!(matches!(short, Err(GraphStepError::InputSize { expected: 4096, got: 4095, .. })), "{short:?}");
        assert!(matches!(step.set_ints(0, vec![1; B]), Err(GraphStepError::NoInput(_))));
        step.step().unwrap();
    }
}
