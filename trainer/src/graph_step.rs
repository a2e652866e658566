//! Training steps recorded once as a device graph and replayed: burn 0.22's `capture` (CUDA
//! graphs on burn-cuda, one dispatch for the step's hundreds of kernels; on other backends the
//! step simply runs again). On a GPU a small network's step is bound by the host's work per
//! kernel launch, not by the kernels (BENCHMARKS.md, "Training steps on burn-cuda"); a replay
//! skips that work.
//!
//! A replay re-runs the recorded kernels on the buffers they touched when recorded, so
//! everything a step reads and changes lives in buffers that stay put: the model's parameters
//! and BatchNorm running statistics (one flat buffer each, [`Weights`]), the optimiser's state
//! (SGD's velocities, Adam's moments), and the inputs. Each step builds the model as views of
//! those buffers, computes the loss and its gradients, and writes the new values back into them
//! in place (SGD with momentum and weight decay, or Adam: the arithmetic of burn's optimisers,
//! whose returned tensors would be new buffers). Inputs are written in place before each replay
//! ([`GraphStep::set_floats`]); so is anything that changes from step to step, such as the
//! learning rate, Adam's bias corrections ([`adam_factors`]) or random draws (a draw recorded in
//! a graph would replay unchanged). Writes in place need buffers that nothing else holds; where one is shared (or the
//! backend cannot tell, as ndarray), the write goes to a new buffer, which is right when the
//! step runs again but not for a replay: with a device graph that is refused
//! ([`GraphStepError::Shared`]) rather than train on a stale copy.
//!
//! Recording runs the step on the inputs given (three warm-up runs that tune and allocate every
//! buffer, then the recorded one, which a device graph records without running), then puts the
//! model and the optimiser's state back as they were: every [`GraphStep::step`] is one step of
//! training, as the same loop without a graph would take it. [`Training`] is what a training
//! loop holds: op-by-op steps or a recorded one, and checkpoints in burn's format either way.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::kind::Basic;
use burn::tensor::{Device, Graph, Int, Tensor, TensorData, capture};

use crate::schedule::{Sgd, reference_sgd};

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

/// How [`Weights`] updates its parameters in place.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rule {
    /// SGD with momentum (no dampening) and coupled weight decay, as `schedule::reference_sgd`
    /// configures burn's optimizer: one velocity per parameter. The learning rate comes from a
    /// device input (one value), so that a new rate needs no new recording.
    Sgd {
        /// Momentum.
        momentum: f32,
        /// Weight decay.
        weight_decay: f32,
    },
    /// Adam without weight decay, burn's `Adam` term for term: two moments per parameter. Its
    /// bias corrections change every step, so they come from a device input ([`adam_factors`]).
    Adam {
        /// Learning rate.
        lr: f64,
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
    },
}

impl Rule {
    /// SGD as `sgd` configures it.
    pub(crate) fn sgd(sgd: &Sgd) -> Self {
        Rule::Sgd { momentum: sgd.momentum as f32, weight_decay: sgd.weight_decay as f32 }
    }

    /// Buffers of optimiser state per trainable parameter.
    fn state_buffers(self) -> usize {
        match self {
            Rule::Sgd { .. } => 1,
            Rule::Adam { .. } => 2,
        }
    }
}

/// Adam's bias corrections for its `time`-th step (1-based), as burn's `Adam` computes them
/// (in f32): the factor of the first moment, and the epsilon added to the second moment's
/// square root. [`Rule::Adam`] reads them from a device buffer of these two values.
pub(crate) fn adam_factors(beta_1: f32, beta_2: f32, epsilon: f32, time: usize) -> [f32; 2] {
    let time = time as i32;
    let bias_correction2_sqrt = (1.0 - beta_2.powi(time)).sqrt();
    [bias_correction2_sqrt / (1.0 - beta_1.powi(time)), epsilon * bias_correction2_sqrt]
}

/// One model tensor the step reads and rewrites: a parameter (with its optimiser's state) or a
/// running statistic (no state, `trains` false).
struct Slot {
    stable: Tensor<1>,
    state: Vec<Tensor<1>>,
    trains: bool,
}

/// Copies of every buffer of a [`Weights`], to put it back after recording.
pub(crate) struct Snapshot(Vec<Vec<Tensor<1>>>);

/// A model whose float tensors live in flat buffers that stay put, with its optimiser's state
/// beside them: what a recorded step reads and rewrites in place.
pub(crate) struct Weights<M> {
    /// The model's structure; its own tensors are never read after [`Weights::gather`].
    template: M,
    slots: Vec<Slot>,
    index: HashMap<ParamId, usize>,
    rule: Rule,
    /// The first buffer a step could not rewrite in place.
    copied: Option<String>,
}

impl<M: Module> Weights<M> {
    /// Copy `model`'s tensors into buffers of their own on `plain` (the training device without
    /// autodiff), with zero optimiser state (burn's first step from zero state is its first step
    /// from none: `0 * beta + g * (1 - beta)` is `g * (1 - beta)`, and SGD's `v = 0.9 * 0 + g`).
    pub(crate) fn gather(model: M, rule: Rule, plain: &Device) -> Self {
        let running = mekd_models::running_statistics(&model);
        let mut gather = Gather {
            plain: plain.clone(),
            running,
            buffers: rule.state_buffers(),
            slots: Vec::new(),
            index: HashMap::new(),
        };
        model.visit(&mut gather);
        Self { template: model, slots: gather.slots, index: gather.index, rule, copied: None }
    }

    /// The model as views of the buffers, on the autodiff device (BatchNorm in training mode);
    /// with `train`, its parameters tracked for gradients.
    ///
    /// Every view must end in [`Weights::keep_running`], [`Weights::update`] or
    /// [`Weights::discard_running`]: burn's `RunningState` is shared by a module's clones and
    /// mapping sets its value in place, so all views of one `Weights` share their running
    /// statistics' state, and an update a forward pass leaves pending (burn merges it at the next
    /// pass or at `valid`) would otherwise replace the buffer's value in the next view's pass.
    pub(crate) fn view(&self, train: bool) -> M {
        self.template.clone().map(&mut Attach { slots: &self.slots, index: &self.index, train })
    }

    /// The model as trained so far, in inference mode, on copies of the buffers (the step's own
    /// stay unshared). Its running statistics are its own (see [`Weights::view`]).
    pub(crate) fn model(&self, plain: &Device) -> M {
        let copies: Vec<Slot> = self
            .slots
            .iter()
            .map(|slot| Slot { stable: copy_of(&slot.stable, plain), state: Vec::new(), trains: slot.trains })
            .collect();
        self.template.clone().map(&mut Attach { slots: &copies, index: &self.index, train: false }).valid()
    }

    /// Keep the running statistics that forward passes of `view` computed (`view` and whatever
    /// else holds its tensors must be dropped by now, or the writes cannot be in place).
    pub(crate) fn keep_running(&mut self, view: M) -> Result<(), GraphStepError> {
        let mut values: Vec<Option<Tensor<1>>> = vec![None; self.slots.len()];
        let valid = view.valid();
        drop(view);
        valid.visit(&mut Collect { grads: None, slots: &self.slots, index: &self.index, out: &mut values });
        drop(valid);
        self.write_all(values, "running statistic")
    }

    /// Drop the running statistics that forward passes of `view` computed (merged into the
    /// shared state, which the next view sets to the buffers again).
    pub(crate) fn discard_running(view: M) {
        drop(view.valid());
    }

    /// Differentiate `loss` (computed from `view`) and update the trainable parameters in place
    /// by the rule (`factors`: SGD's learning rate, or Adam's bias corrections,
    /// [`adam_factors`]); with
    /// `running`, keep the running statistics of `view`'s forward passes too.
    pub(crate) fn update(
        &mut self,
        view: M,
        loss: Tensor<1>,
        factors: Option<&Tensor<1>>,
        running: bool,
    ) -> Result<(), GraphStepError> {
        let mut grads = GradientsParams::from_grads(loss.backward(), &view);
        drop(loss);
        let mut updates: Vec<Option<Tensor<1>>> = vec![None; self.slots.len()];
        view.visit(&mut Collect { grads: Some(&mut grads), slots: &self.slots, index: &self.index, out: &mut updates });
        drop(grads);
        if running {
            self.keep_running(view)?;
        } else {
            Self::discard_running(view);
        }
        let mut values: Vec<Option<Tensor<1>>> = vec![None; self.slots.len()];
        let mut states: Vec<Vec<Tensor<1>>> = vec![Vec::new(); self.slots.len()];
        for (i, update) in updates.into_iter().enumerate() {
            let slot = &self.slots[i];
            if !slot.trains {
                continue;
            }
            let grad = update.ok_or_else(|| GraphStepError::NoGradient(format!("tensor {i} in visiting order")))?;
            let (value, state) = (slot.stable.clone(), &slot.state);
            let (new_value, new_state) = match self.rule {
                // burn's Sgd::step with WeightDecay and Momentum, term for term.
                Rule::Sgd { momentum, weight_decay } => {
                    let lr = factors.ok_or_else(|| GraphStepError::NoInput("the learning rate".into()))?;
                    let grad = value.clone().mul_scalar(weight_decay).add(grad);
                    let velocity = grad.mul_scalar(1.0).add(state[0].clone().mul_scalar(momentum));
                    (value - velocity.clone().mul(lr.clone()), vec![velocity])
                }
                // burn's Adam::step (AdaptiveMomentum::transform), term for term.
                Rule::Adam { lr, beta_1, beta_2 } => {
                    let factors = factors.ok_or_else(|| GraphStepError::NoInput("Adam's bias corrections".into()))?;
                    let m1 = state[0].clone().mul_scalar(beta_1).add(grad.clone().mul_scalar(1.0 - beta_1));
                    let m2 = state[1].clone().mul_scalar(beta_2).add(grad.square().mul_scalar(1.0 - beta_2));
                    let [combined, epsilon] = [factors.clone().slice(0..1), factors.clone().slice(1..2)];
                    let delta = m1.clone().mul(combined).div(m2.clone().sqrt().add(epsilon));
                    (value - delta.mul_scalar(lr), vec![m1, m2])
                }
            };
            values[i] = Some(new_value);
            states[i] = new_state;
        }
        for (i, state) in states.into_iter().enumerate() {
            for (k, new) in state.into_iter().enumerate() {
                let name = format!("optimiser state {i}.{k}");
                if !write_any(&mut self.slots[i].state[k], new, &name)? {
                    self.copied.get_or_insert(name);
                }
            }
        }
        self.write_all(values, "parameter")
    }

    /// Write each `Some` value into its slot's tensor.
    fn write_all(&mut self, values: Vec<Option<Tensor<1>>>, what: &str) -> Result<(), GraphStepError> {
        for (i, value) in values.into_iter().enumerate() {
            let Some(value) = value else { continue };
            let name = format!("{what} {i}");
            if !write_any(&mut self.slots[i].stable, value, &name)? {
                self.copied.get_or_insert(name);
            }
        }
        Ok(())
    }

    /// Copies of every buffer.
    pub(crate) fn snapshot(&self, plain: &Device) -> Snapshot {
        Snapshot(
            self.slots
                .iter()
                .map(|slot| std::iter::once(&slot.stable).chain(&slot.state).map(|t| copy_of(t, plain)).collect())
                .collect(),
        )
    }

    /// After recording with `graph` (a device graph was recorded): refuse a write that was not in
    /// place, then put every buffer back as `before` holds it.
    pub(crate) fn restore(&mut self, before: Snapshot, graph: bool) -> Result<(), GraphStepError> {
        if let (true, Some(name)) = (graph, self.copied.take()) {
            return Err(GraphStepError::Shared(name));
        }
        for (i, (slot, saved)) in self.slots.iter_mut().zip(before.0).enumerate() {
            let targets = std::iter::once(&mut slot.stable).chain(&mut slot.state);
            for (target, value) in targets.zip(saved) {
                write(target, value, &format!("tensor {i}"), graph)?;
            }
        }
        Ok(())
    }

    /// The first of the buffers that a step could not rewrite in place.
    pub(crate) fn copied(&self) -> Option<String> {
        self.copied.clone()
    }
}

/// What the recorded closure and the caller share.
struct State<M> {
    weights: Weights<M>,
    inputs: StepInputs,
    /// The learning rate (one value), read by the step from the device.
    lr: Tensor<1>,
}

/// A step's loss function: from the model and the inputs, the tensor to differentiate and the
/// loss's value (any values the step reports, as one flat tensor).
pub type LossFn<'a, M> = Box<dyn FnMut(&M, &StepInputs) -> (Tensor<1>, Tensor<1>) + 'a>;

type StepFn<'a> = Box<dyn FnMut() -> Result<Tensor<1>, GraphStepError> + 'a>;

/// A training step of SGD with momentum and weight decay, recorded as a device graph.
pub struct GraphStep<'a, M> {
    state: Rc<RefCell<State<M>>>,
    loss: Rc<RefCell<LossFn<'a, M>>>,
    graph: Graph<Result<Tensor<1>, GraphStepError>, StepFn<'a>>,
    plain: Device,
}

/// Record a training step of `model` (on a training device) with `sgd`'s momentum and weight
/// decay at learning rate `lr` ([`GraphStep::set_lr`] changes it). `loss` computes, from the
/// model and the inputs, the tensor to differentiate and the values each step reports. `plain`
/// is the training device without autodiff. Runs the step on `inputs` while recording, then puts
/// the model back as it was (see the module's notes).
pub fn record<'a, M: Module + 'a>(
    model: M,
    sgd: &Sgd,
    lr: f64,
    inputs: StepInputs,
    plain: &Device,
    loss: impl FnMut(&M, &StepInputs) -> (Tensor<1>, Tensor<1>) + 'a,
) -> Result<GraphStep<'a, M>, GraphStepError> {
    let weights = Weights::gather(model, Rule::sgd(sgd), plain);
    let before = weights.snapshot(plain);
    let lr = Tensor::<1>::from_data(TensorData::new(vec![lr as f32], [1]), plain);
    let state = Rc::new(RefCell::new(State { weights, inputs, lr }));
    let loss: Rc<RefCell<LossFn<'a, M>>> = Rc::new(RefCell::new(Box::new(loss)));
    let (shared, shared_loss) = (state.clone(), loss.clone());
    let closure: StepFn<'a> = Box::new(move || {
        let State { weights, inputs, lr } = &mut *shared.borrow_mut();
        sgd_step(weights, lr, inputs, &mut *shared_loss.borrow_mut())
    });
    let graph = capture(plain, closure);
    if let Err(e) = graph.output() {
        return Err(e.clone());
    }
    state.borrow_mut().weights.restore(before, graph.is_hardware())?;
    Ok(GraphStep { state, loss, graph, plain: plain.clone() })
}

/// One step: the model as views of the buffers, the loss and its gradients, the new values
/// written back in place.
fn sgd_step<M: Module>(
    weights: &mut Weights<M>,
    lr: &Tensor<1>,
    inputs: &StepInputs,
    loss: &mut LossFn<'_, M>,
) -> Result<Tensor<1>, GraphStepError> {
    let model = weights.view(true);
    let (differentiable, value) = loss(&model, inputs);
    weights.update(model, differentiable, Some(lr), true)?;
    Ok(value)
}

impl<M: Module> GraphStep<'_, M> {
    /// Run one step on the inputs' current values; returns its values.
    pub fn step(&mut self) -> Result<Tensor<1>, GraphStepError> {
        // SAFETY: the recorded kernels read and write the state's buffers (parameters,
        // velocities, running statistics, inputs, learning rate), which `self.state` owns and
        // only rewrites in place (a write that cannot be in place is refused,
        // GraphStepError::Shared), the output's buffer, which the graph owns, and buffers the
        // recording allocated, which cubecl keeps reserved while the graph lives. One thread
        // issues everything, on one stream.
        unsafe { self.graph.replay() }.clone()
    }

    /// The same step on other inputs (e.g. a batch of another size), run op by op on the same
    /// buffers (so the recorded graph then continues from it).
    pub fn step_with(&mut self, inputs: &StepInputs) -> Result<Tensor<1>, GraphStepError> {
        let mut state = self.state.borrow_mut();
        let State { weights, lr, .. } = &mut *state;
        let value = sgd_step(weights, lr, inputs, &mut *self.loss.borrow_mut())?;
        match weights.copied() {
            Some(name) if self.graph.is_hardware() => Err(GraphStepError::Shared(name)),
            _ => Ok(value),
        }
    }

    /// Whether steps replay a recorded device graph (`false`: each step runs again, on a
    /// backend without graphs).
    pub fn is_graph(&self) -> bool {
        self.graph.is_hardware()
    }

    /// The first of the step's buffers that a step could not rewrite in place (harmless when the
    /// step runs again; with a device graph, recording refuses it).
    pub fn copied(&self) -> Option<String> {
        self.state.borrow().weights.copied()
    }

    /// Set the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), GraphStepError> {
        let hardware = self.graph.is_hardware();
        write_values(&mut self.state.borrow_mut().lr, vec![lr as f32], "the learning rate", &self.plain, hardware)
    }

    /// Write new values into float input `i` (its length must stay the same).
    pub fn set_floats(&mut self, i: usize, values: Vec<f32>) -> Result<(), GraphStepError> {
        let name = format!("float input {i}");
        let mut state = self.state.borrow_mut();
        let target = state.inputs.floats.get_mut(i).ok_or_else(|| GraphStepError::NoInput(name.clone()))?;
        write_values(target, values, &name, &self.plain, self.graph.is_hardware())
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
        self.state.borrow().weights.model(&self.plain)
    }

    /// burn's optimizer for `sgd` holding the step's velocities, exactly: for a checkpoint that
    /// any backend resumes ([`GraphStep::load_optimizer`], or burn's optimizer itself). burn's
    /// first momentum step from no state sets the velocity to the gradient; with the velocities
    /// as the gradients, no weight decay and a learning rate of 0 it does only that (and its
    /// state then moves to an optimizer of `sgd`'s settings).
    pub fn optimizer(&self, sgd: &Sgd) -> ModuleOptimizer {
        let state = self.state.borrow();
        let weights = &state.weights;
        let mut grads = GradientsParams::new();
        weights.template.visit(&mut Register { weights, grads: &mut grads, zeros: false });
        let mut conversion = reference_sgd(sgd.momentum, 0.0);
        let _ = conversion.step(0.0, weights.model(&self.plain).train(), grads);
        sgd.optimizer().load_record(conversion.to_record())
    }

    /// Take the velocities of `optim` (burn's optimizer, as [`GraphStep::optimizer`] or a
    /// checkpoint of burn's own steps holds them; ids of the recorded model's parameters),
    /// exactly: a momentum-1 step without dampening and weight decay, from zero gradients, keeps
    /// each velocity as it is, and its step of learning rate -1 from zero parameters sets each
    /// parameter to its velocity (`0 - (-1 * v)` is `v`). A parameter without state gets zero.
    pub fn load_optimizer(&mut self, optim: &ModuleOptimizer) -> Result<(), GraphStepError> {
        let mut state = self.state.borrow_mut();
        let weights = &mut state.weights;
        let mut grads = GradientsParams::new();
        weights.template.visit(&mut Register { weights, grads: &mut grads, zeros: true });
        let zeros: Vec<Slot> = (weights.slots.iter())
            .map(|slot| Slot { stable: slot.stable.zeros_like(), state: Vec::new(), trains: slot.trains })
            .collect();
        let zero = weights.template.clone().map(&mut Attach { slots: &zeros, index: &weights.index, train: false });
        let velocities = reference_sgd(1.0, 0.0).load_record(optim.to_record()).step(-1.0, zero, grads);
        let mut values = Values { index: &weights.index, out: vec![None; weights.slots.len()] };
        velocities.visit(&mut values);
        drop(velocities);
        for (i, value) in values.out.into_iter().enumerate() {
            if let (Some(value), true) = (value, weights.slots[i].trains) {
                let name = format!("velocity {i}");
                write(&mut weights.slots[i].state[0], value, &name, self.graph.is_hardware())?;
            }
        }
        Ok(())
    }
}

/// A model's training steps as a training loop takes them: op by op with burn's optimizer, or
/// (`graphs`) recorded at the first step as a device graph and replayed ([`GraphStep`]; a batch
/// of another size runs op by op on the graph's buffers). The same loss function and inputs
/// either way; checkpoints hold burn's model and optimizer either way, so a run resumes in
/// either mode.
pub struct Training<'a, M> {
    /// `None` only during a step.
    mode: Option<Mode<'a, M>>,
    sgd: Sgd,
    plain: Device,
}

enum Mode<'a, M> {
    Eager {
        model: M,
        optim: ModuleOptimizer,
        loss: LossFn<'a, M>,
    },
    Unrecorded {
        model: M,
        optim: ModuleOptimizer,
        loss: LossFn<'a, M>,
    },
    Graph {
        step: Box<GraphStep<'a, M>>,
        lengths: (Vec<usize>, Vec<usize>),
    },
    /// The recording failed (its error was returned): the model as it was, no more steps.
    Failed {
        model: M,
        optim: ModuleOptimizer,
    },
}

/// Host values of a step's inputs: float buffers, then integer buffers.
pub type HostInputs = (Vec<Vec<f32>>, Vec<Vec<i64>>);

impl<'a, M: Module + 'a> Training<'a, M> {
    /// Steps of `model` (on the training device; `plain` is that device without autodiff) with
    /// `sgd`'s momentum and weight decay, from `optim`'s state (fresh, or a checkpoint's), on
    /// the loss `loss` computes from the model and the inputs (on `plain`: move them to the
    /// autodiff device) as the tensor to differentiate and the values a step reports.
    pub fn new(
        model: M,
        optim: ModuleOptimizer,
        sgd: &Sgd,
        graphs: bool,
        plain: &Device,
        loss: impl FnMut(&M, &StepInputs) -> (Tensor<1>, Tensor<1>) + 'a,
    ) -> Self {
        let loss: LossFn<'a, M> = Box::new(loss);
        let mode = if graphs { Mode::Unrecorded { model, optim, loss } } else { Mode::Eager { model, optim, loss } };
        Self { mode: Some(mode), sgd: sgd.clone(), plain: plain.clone() }
    }

    /// One step on `inputs` at learning rate `lr`; returns its values.
    pub fn step(&mut self, inputs: HostInputs, lr: f64) -> Result<Tensor<1>, GraphStepError> {
        let lengths = (inputs.0.iter().map(Vec::len).collect(), inputs.1.iter().map(Vec::len).collect());
        let mode = self.mode.take().ok_or_else(|| GraphStepError::NoInput("a model (a step panicked)".into()))?;
        let (mode, values) = match mode {
            Mode::Eager { model, mut optim, mut loss } => {
                let (differentiable, values) = loss(&model, &self.tensors(inputs));
                let grads = GradientsParams::from_grads(differentiable.backward(), &model);
                let model = optim.step(lr, model, grads);
                (Mode::Eager { model, optim, loss }, Ok(values))
            }
            Mode::Unrecorded { model, optim, loss } => {
                let kept = model.clone();
                let recorded = record(model, &self.sgd, lr, self.tensors(inputs), &self.plain, loss)
                    .and_then(|mut step| step.load_optimizer(&optim).map(|()| step));
                match recorded {
                    Ok(mut step) => {
                        let values = step.step();
                        (Mode::Graph { step: Box::new(step), lengths }, values)
                    }
                    Err(e) => (Mode::Failed { model: kept, optim }, Err(e)),
                }
            }
            Mode::Graph { mut step, lengths: recorded } => {
                let values = Self::replay(&mut step, inputs, lr, lengths == recorded, &self.plain);
                (Mode::Graph { step, lengths: recorded }, values)
            }
            Mode::Failed { model, optim } => (
                Mode::Failed { model, optim },
                Err(GraphStepError::NoInput("a recorded step (its recording failed)".into())),
            ),
        };
        self.mode = Some(mode);
        values
    }

    /// A step of a recorded graph: replayed on `inputs` where they have the recorded lengths
    /// (`same`), else run op by op on the graph's buffers.
    fn replay(
        step: &mut GraphStep<'a, M>,
        inputs: HostInputs,
        lr: f64,
        same: bool,
        plain: &Device,
    ) -> Result<Tensor<1>, GraphStepError> {
        step.set_lr(lr)?;
        if !same {
            return step.step_with(&tensors(inputs, plain));
        }
        let (floats, ints) = inputs;
        for (i, values) in floats.into_iter().enumerate() {
            step.set_floats(i, values)?;
        }
        for (i, values) in ints.into_iter().enumerate() {
            step.set_ints(i, values)?;
        }
        step.step()
    }

    fn tensors(&self, inputs: HostInputs) -> StepInputs {
        tensors(inputs, &self.plain)
    }

    /// The model as trained so far, in inference mode.
    pub fn model(&self) -> M {
        match &self.mode {
            Some(Mode::Eager { model, .. } | Mode::Unrecorded { model, .. } | Mode::Failed { model, .. }) => {
                model.valid()
            }
            Some(Mode::Graph { step, .. }) => step.model(),
            None => unreachable!("the mode is back after every step"),
        }
    }

    /// What a checkpoint holds: the model (in training mode) and burn's optimizer.
    pub fn checkpoint(&self) -> (M, ModuleOptimizer) {
        match &self.mode {
            Some(
                Mode::Eager { model, optim, .. }
                | Mode::Unrecorded { model, optim, .. }
                | Mode::Failed { model, optim },
            ) => {
                // A record reads BatchNorm's running statistics without the update the last
                // forward pass left pending; `valid` merges it (into the state clones share).
                drop(model.valid());
                (model.clone(), optim.clone())
            }
            Some(Mode::Graph { step, .. }) => (step.model().train(), step.optimizer(&self.sgd)),
            None => unreachable!("the mode is back after every step"),
        }
    }

    /// Whether steps replay a recorded device graph.
    pub fn is_graph(&self) -> bool {
        matches!(&self.mode, Some(Mode::Graph { step, .. }) if step.is_graph())
    }
}

/// Host values as tensors on `plain`.
fn tensors((floats, ints): HostInputs, plain: &Device) -> StepInputs {
    StepInputs {
        floats: floats.into_iter().map(|v| Tensor::from_data(flat(v), plain)).collect(),
        ints: ints.into_iter().map(|v| Tensor::from_data(flat(v), plain)).collect(),
    }
}

/// Host values as one flat tensor's data.
fn flat<E: burn::tensor::Element>(values: Vec<E>) -> TensorData {
    let n = values.len();
    TensorData::new(values, [n])
}

/// Collects, flat and by slot, the value of every float tensor of a model (on the plain device).
struct Values<'a> {
    index: &'a HashMap<ParamId, usize>,
    out: Vec<Option<Tensor<1>>>,
}

impl ModuleVisitor for Values<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(&i) = self.index.get(&param.id) {
            let value = param.val().inner();
            let n = value.shape().num_elements();
            self.out[i] = Some(value.reshape([n]));
        }
    }
}

/// Registers, for every trainable parameter, its velocity (or zeros) as its gradient.
struct Register<'a, M> {
    weights: &'a Weights<M>,
    grads: &'a mut GradientsParams,
    zeros: bool,
}

impl<M> ModuleVisitor for Register<'_, M> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(&i) = self.weights.index.get(&param.id) else { return };
        let slot = &self.weights.slots[i];
        if !slot.trains {
            return;
        }
        let velocity =
            if self.zeros { slot.stable.zeros_like() } else { copy_of(&slot.state[0], &slot.stable.device()) };
        self.grads.register::<D>(param.id, velocity.reshape(param.lazy_shape()));
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
        let mut buffer = self.input.lock().unwrap_or_else(PoisonError::into_inner);
        write_values(&mut buffer, input, "the forward pass's input", &self.plain, self.graph.is_hardware())?;
        drop(buffer);
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

/// A copy of `t` in a buffer of its own (through the host: recording and reading the model only).
pub(crate) fn copy_of(t: &Tensor<1>, plain: &Device) -> Tensor<1> {
    Tensor::from_data(t.to_data(), plain)
}

/// Write host `values` into `target`'s buffer (see [`write`]).
pub(crate) fn write_values(
    target: &mut Tensor<1>,
    values: Vec<f32>,
    name: &str,
    plain: &Device,
    graph: bool,
) -> Result<(), GraphStepError> {
    let n = values.len();
    write(target, Tensor::<1>::from_data(TensorData::new(values, [n]), plain), name, graph)
}

/// Write `value` into `target`'s buffer; with `graph` (a device graph reads that buffer), a
/// buffer that cannot be rewritten in place is refused.
pub(crate) fn write<K: Basic>(
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
/// get `buffers` zero buffers of optimiser state.
struct Gather {
    plain: Device,
    running: HashSet<ParamId>,
    buffers: usize,
    slots: Vec<Slot>,
    index: HashMap<ParamId, usize>,
}

impl ModuleVisitor for Gather {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let trains = !self.running.contains(&param.id);
        let n = tensor.shape().num_elements();
        let stable = Tensor::<D>::from_data(tensor.into_data(), &self.plain).reshape([n]);
        let buffers = if trains { self.buffers } else { 0 };
        let state = (0..buffers).map(|_| Tensor::zeros([n], &self.plain)).collect();
        self.index.insert(param.id, self.slots.len());
        self.slots.push(Slot { stable, state, trains });
    }
}

/// Gives every float tensor of a model the value of its slot (a view on the autodiff device),
/// tracked for gradients where the slot trains and `train` is set.
struct Attach<'a> {
    slots: &'a [Slot],
    index: &'a HashMap<ParamId, usize>,
    train: bool,
}

impl ModuleMapper for Attach<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        drop(tensor);
        let slot = &self.slots[self.index[&id]];
        let view = slot.stable.clone().reshape(shape).autodiff();
        let view = if self.train && slot.trains { view.require_grad() } else { view };
        Param::from_mapped_value(id, view, mapper)
    }
}

/// Collects, flat and by slot, each trainable parameter's gradient (with `grads`) or each
/// running statistic's value (without).
struct Collect<'a> {
    grads: Option<&'a mut GradientsParams>,
    slots: &'a [Slot],
    index: &'a HashMap<ParamId, usize>,
    out: &'a mut [Option<Tensor<1>>],
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(&i) = self.index.get(&param.id) else { return };
        let value = match &mut self.grads {
            Some(grads) if self.slots[i].trains => grads.remove::<D>(param.id),
            None if !self.slots[i].trains => Some(param.val().inner()),
            _ => None,
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

    /// A training loop's steps (`Training`) are the same op by op and recorded (on flex the
    /// recorded step runs again): over batches of two sizes (the short one runs op by op on the
    /// graph's buffers) and a learning-rate change. A checkpoint of either mode resumes in the
    /// other exactly: the velocities go through burn's optimizer and back unchanged.
    #[test]
    fn training_modes_agree_and_checkpoints_carry_over() {
        let (device, plain) = (Device::flex().autodiff(), Device::flex());
        device.seed(8);
        let spec = ClassifierSpec { architecture: Architecture::ResNet8, in_channels: 1, num_classes: 10 };
        let model = spec.init(&device).unwrap();
        mekd_models::initialise(&model);
        let copy = || spec.init(&device).unwrap().load_record(model.clone().into_record());
        let ce = CrossEntropyLossConfig::new().init(&device);
        let loss = |model: &Classifier, inputs: &StepInputs| {
            let y = inputs.ints[0].clone();
            let b = y.dims()[0];
            let loss = ce.forward(model.forward(inputs.floats[0].clone().reshape([b, 1, 32, 32]).autodiff()), y);
            (loss.clone(), loss.detach())
        };
        let sgd = Sgd::reference(1);
        let schedule: Vec<(HostInputs, f64)> = [(4, 0.1), (3, 0.1), (4, 0.01), (4, 0.01), (3, 0.01), (4, 0.01)]
            .into_iter()
            .enumerate()
            .map(|(i, (b, lr))| {
                let (x, y) = batch(10 + i as u64);
                ((vec![x[..b * 1024].to_vec()], vec![y[..b].to_vec()]), lr)
            })
            .collect();
        let run = |training: &mut Training<Classifier>, steps: &[(HostInputs, f64)]| -> Vec<f32> {
            steps.iter().flat_map(|(inputs, lr)| values(training.step(inputs.clone(), *lr).unwrap())).collect()
        };
        let probe = Tensor::<4>::from_data(TensorData::new(batch(1).0, [B, 1, 32, 32]), &plain);
        let logits = |training: &Training<Classifier>| values(training.model().forward(probe.clone()));

        let mut eager = Training::new(copy(), sgd.optimizer(), &sgd, false, &plain, loss);
        let mut graph = Training::new(copy(), sgd.optimizer(), &sgd, true, &plain, loss);
        let (ours, theirs) = (run(&mut graph, &schedule[..3]), run(&mut eager, &schedule[..3]));
        assert!(relative_difference(&ours, &theirs) < 1e-6, "{ours:?} vs {theirs:?}");
        assert!(!graph.is_graph());

        // Each mode resumes from the other's checkpoint.
        let (graph_model, graph_optim) = graph.checkpoint();
        let (eager_model, eager_optim) = eager.checkpoint();
        let reload = |m: Classifier| spec.init(&device).unwrap().load_record(m.into_record());
        let mut eager_from_graph = Training::new(reload(graph_model), graph_optim, &sgd, false, &plain, loss);
        let mut graph_from_eager = Training::new(reload(eager_model), eager_optim, &sgd, true, &plain, loss);
        let rest = &schedule[3..];
        let (a, b) = (run(&mut eager_from_graph, rest), run(&mut graph_from_eager, rest));
        let (c, d) = (run(&mut eager, rest), run(&mut graph, rest));
        for (name, got) in [("eager from graph", &a), ("graph from eager", &b), ("graph", &d)] {
            assert!(relative_difference(got, &c) < 1e-6, "{name}: {got:?} vs {c:?}");
        }
        let reference = logits(&eager);
        for (name, got) in [("eager from graph", &eager_from_graph), ("graph from eager", &graph_from_eager)] {
            assert!(relative_difference(&logits(got), &reference) < 1e-5, "{name}");
        }

        // The velocities' round trip through burn's optimizer is exact.
        let (model, optim) = graph.checkpoint();
        let mut again = Training::new(reload(model), optim, &sgd, true, &plain, loss);
        run(&mut again, &schedule[..1]);
        let Some(Mode::Graph { step, .. }) = &again.mode else { panic!("recorded") };
        let velocities = |step: &GraphStep<Classifier>| -> Vec<Vec<f32>> {
            step.state.borrow().weights.slots.iter().filter_map(|s| s.state.first().cloned()).map(values).collect()
        };
        let before = velocities(step);
        let (model, optim) = again.checkpoint();
        let mut round = Training::new(reload(model), optim, &sgd, true, &plain, loss);
        let Some(Mode::Unrecorded { model, optim, .. }) = round.mode.take() else { panic!("unrecorded") };
        let mut step = record(model, &sgd, 0.1, tensors(schedule[0].0.clone(), &plain), &plain, loss).unwrap();
        step.load_optimizer(&optim).unwrap();
        assert_eq!(velocities(&step), before);
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
