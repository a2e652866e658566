//! MEKD step 1, deprivatization: a DCGAN trained on the unlabeled edge images, with the
//! information-maximisation term that queries the teacher once per synthetic image (through
//! the black-box [`Teacher`] only).

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::rc::Rc;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Graph, Tensor, TensorData, capture};
use serde::{Deserialize, Serialize};

use mekd_contract::Usage;
use mekd_models::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
use mekd_runtime::Dataset;
use mekd_runtime::rng::SplitMix64;

use super::MethodError;
use super::losses::{ImWeight, bce_with_logits, im_weights, information_maximisation};
use crate::batches::{self, epoch_order};
use crate::blackbox::Teacher;
use crate::graph_step::{GraphStepError, Rule, Weights, adam_factors, copy_of, write, write_values};

/// Hyperparameters of deprivatization; [`GanConfig::default`] holds the reference's values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GanConfig {
    /// Epochs over the edge images (the reference takes its generator after 175 of 200).
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Adam learning rate of both networks.
    pub lr: f64,
    /// Weight of the IM term.
    pub alpha: f64,
    /// How the IM weight is read from the teacher's answer.
    pub im_weight: ImWeight,
    /// Generator width.
    pub generator_width: usize,
    /// Discriminator width.
    pub discriminator_width: usize,
    /// Cap on the teacher queries of deprivatization: the IM term is then computed on every
    /// k-th generator step only (k chosen so the cap holds, spread over the whole run) and left
    /// out of the others. `None`: every step asks (the reference).
    #[serde(default)]
    pub im_queries: Option<u64>,
    /// Seed of the noise and the batch order.
    pub seed: u64,
}

impl Default for GanConfig {
    fn default() -> Self {
        Self {
            epochs: 200,
            batch: 64,
            lr: 2e-4,
            alpha: 0.5,
            im_weight: ImWeight::MaxResponse,
            generator_width: 128,
            discriminator_width: 16,
            im_queries: None,
            seed: 0,
        }
    }
}

/// Losses of one epoch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GanEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean discriminator loss.
    pub d_loss: f64,
    /// Mean generator loss (adversarial + alpha * IM).
    pub g_loss: f64,
    /// Mean IM term.
    pub im_loss: f64,
    /// Teacher queries so far.
    pub queries: u64,
    /// How many of the epoch's queried synthetic images the teacher put in each class (its top
    /// answer): a generator that collapses onto a few classes shows here first. Empty when the
    /// epoch asked nothing.
    #[serde(default)]
    pub teacher_labels: Vec<u64>,
    /// Wall time of the epoch's steps, teacher queries included (its sample grid and checkpoint
    /// not); 0 in rows written before it was recorded.
    #[serde(default)]
    pub seconds: f64,
}

/// Images in [-1, 1] as the `u8` pixels a black-box API takes (what the teacher really sees).
pub fn to_pixels(images: Tensor<4>) -> Vec<u8> {
    let values: Vec<f32> = images.into_data().try_to_vec().expect("f32 images");
    values.iter().map(|v| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8).collect()
}

/// The two networks of deprivatization, their optimisers, and one training step.
pub struct Gan {
    nets: Nets,
    plan: QueryPlan,
    /// The host's stream of the steps' random draws ([`Draws`]).
    rng: SplitMix64,
    /// The discriminator's dropout channels per block, as a training pass draws them.
    dropout_channels: Vec<usize>,
}

/// How the step runs.
enum Nets {
    /// Op by op, with burn's Adam.
    Eager(Box<Eager>),
    /// Recorded as device graphs, one pair per batch size ([`GanGraphs`]).
    Graphs(Box<GanGraphs>),
}

/// The networks and burn's optimisers, for the op-by-op step.
struct Eager {
    generator: Generator,
    discriminator: Discriminator,
    opt_g: ModuleOptimizer,
    opt_d: ModuleOptimizer,
}

/// Which generator steps ask the teacher, and what was asked.
struct QueryPlan {
    config: GanConfig,
    classes: usize,
    hard: bool,
    needs_answers: bool,
    /// Ask the teacher on every `im_every`-th generator step.
    im_every: usize,
    steps_done: usize,
    queries_done: u64,
    /// Per class: synthetic images the teacher labelled so, since the last `take_label_counts`.
    label_counts: Vec<u64>,
}

impl QueryPlan {
    /// Count a step of `b` images; whether it asks the teacher.
    fn next(&mut self, b: usize) -> bool {
        let cap = self.config.im_queries.unwrap_or(u64::MAX);
        let ask = self.steps_done.is_multiple_of(self.im_every) && self.queries_done + b as u64 <= cap;
        self.steps_done += 1;
        ask
    }

    /// The IM weights of a generator step of `b` images: from the teacher's answers to `fake`
    /// where the step asks and the answers matter.
    fn weights(
        &mut self,
        ask: bool,
        b: usize,
        fake: impl FnOnce() -> Tensor<4>,
        teacher: &mut dyn Teacher,
    ) -> Result<Vec<f32>, MethodError> {
        if !self.needs_answers {
            return Ok(vec![1.0; b]);
        }
        if !ask {
            // Over the query cap: the IM term is left out of this step.
            return Ok(vec![0.0; b]);
        }
        let responses = teacher.query(&to_pixels(fake()))?;
        self.queries_done += b as u64;
        let (targets, labels) = (responses.targets(self.classes), responses.labels(self.classes));
        for &label in &labels {
            self.label_counts[label] += 1;
        }
        Ok(im_weights(&targets, &labels, self.classes, self.hard, self.config.im_weight))
    }
}

/// Mixed into the seed of the steps' random draws, so that they are not the batch order's stream.
const DRAWS_STREAM: u64 = 0x6761_6e5f_6472_6177;

/// Adam's beta 1, beta 2 and epsilon for both networks (the reference's).
const ADAM: [f32; 3] = [0.5, 0.999, 1e-8];

/// burn's Adam with [`ADAM`].
fn adam() -> AdamConfig {
    let [beta_1, beta_2, epsilon] = ADAM;
    AdamConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon)
}

impl Gan {
    /// Fresh networks for a teacher with `classes` classes answering `hard` or soft, for images
    /// with `channels` channels (seeded by `config.seed`). With `graphs`, each step replays two
    /// recorded device graphs ([`GanGraphs`]); worth it on a GPU (burn-cuda), where the step is
    /// bound by kernel launches; elsewhere the step runs op by op.
    pub fn new(
        config: &GanConfig,
        classes: usize,
        channels: usize,
        hard: bool,
        device: &Device,
        graphs: bool,
    ) -> Result<Self, MethodError> {
        device.seed(config.seed);
        let generator = GeneratorConfig::new(classes, channels).with_width(config.generator_width).init(device)?;
        let discriminator = DiscriminatorConfig::new(channels).with_width(config.discriminator_width).init(device)?;
        Ok(Self::with_networks(generator, discriminator, config, classes, hard, graphs))
    }

    /// [`Gan::new`] with the networks given (on the training device; their widths are theirs,
    /// not `config`'s).
    pub fn with_networks(
        generator: Generator,
        discriminator: Discriminator,
        config: &GanConfig,
        classes: usize,
        hard: bool,
        graphs: bool,
    ) -> Self {
        // Both modes draw the same initial values, whichever pass reads them first.
        mekd_models::initialise(&generator);
        mekd_models::initialise(&discriminator);
        let dropout_channels = discriminator.dropout_channels(&discriminator.devices()[0]);
        let nets = if graphs {
            Nets::Graphs(Box::new(GanGraphs::new(generator, discriminator, config)))
        } else {
            Nets::Eager(Box::new(Eager { generator, discriminator, opt_g: adam().init(), opt_d: adam().init() }))
        };
        let plan = QueryPlan {
            config: config.clone(),
            classes,
            hard,
            // The paper's IM weight of a hard answer is 1 whatever the answer, so asking is
            // pointless (and so is asking when the IM term is off).
            needs_answers: config.alpha != 0.0 && !(hard && config.im_weight == ImWeight::MaxResponse),
            im_every: 1,
            steps_done: 0,
            queries_done: 0,
            label_counts: vec![0; classes],
        };
        Self { nets, plan, rng: SplitMix64::new(config.seed ^ DRAWS_STREAM), dropout_channels }
    }

    /// Spread `config.im_queries` over a run of `images` synthetic images in total (epochs times
    /// edge images): the IM term is computed on every k-th step.
    pub fn plan_queries(&mut self, images: u64) {
        if let Some(cap) = self.plan.config.im_queries {
            self.plan.im_every = if cap == 0 { usize::MAX } else { images.div_ceil(cap).max(1) as usize };
        }
    }

    /// The teacher's top answers counted per class since the last call (empty if none).
    pub fn take_label_counts(&mut self) -> Vec<u64> {
        let counts = std::mem::replace(&mut self.plan.label_counts, vec![0; self.plan.classes]);
        if counts.iter().all(|&n| n == 0) { Vec::new() } else { counts }
    }

    /// The generator as trained so far, in inference mode.
    pub fn generator(&self) -> Generator {
        match &self.nets {
            Nets::Eager(eager) => eager.generator.valid(),
            Nets::Graphs(graphs) => graphs.generator(),
        }
    }

    /// Whether steps replay recorded device graphs (`false`: op by op, or a backend without
    /// graphs, where the recorded steps run again).
    pub fn is_graph(&self) -> bool {
        matches!(&self.nets, Nets::Graphs(graphs) if graphs.is_graph())
    }

    /// One discriminator step on `real` images and one generator step with fresh noise, asking
    /// the teacher once per synthetic image (when its answer matters). Returns the
    /// discriminator loss, the generator loss and the IM term, still on the device.
    pub fn step(&mut self, real: Tensor<4>, teacher: &mut dyn Teacher) -> Result<[Tensor<1>; 3], MethodError> {
        let [b, _, _, _] = real.dims();
        let time = self.plan.steps_done + 1;
        let ask = self.plan.next(b);
        let draws = Draws { batch: b, classes: self.plan.classes, channels: self.dropout_channels.clone() };
        let values = draws.draw(&mut self.rng);
        match &mut self.nets {
            Nets::Eager(eager) => {
                let flat = Tensor::<1>::from_data(TensorData::new(values, [draws.len()]), &real.device());
                eager.step(real, &draws, flat, ask, &mut self.plan, teacher)
            }
            Nets::Graphs(graphs) => graphs.step(real, draws, values, time, ask, &mut self.plan, teacher),
        }
    }
}

impl Eager {
    fn step(
        &mut self,
        real: Tensor<4>,
        draws: &Draws,
        flat: Tensor<1>,
        ask: bool,
        plan: &mut QueryPlan,
        teacher: &mut dyn Teacher,
    ) -> Result<[Tensor<1>; 3], MethodError> {
        let [b, _, _, _] = real.dims();
        let lr = plan.config.lr;
        let fake = self.generator.forward(draws.latents(&flat, 0)).detach();
        let d_loss = discriminator_loss(&self.discriminator, real, fake, draws, &flat);
        let grads = GradientsParams::from_grads(d_loss.backward(), &self.discriminator);
        self.discriminator = self.opt_d.step(lr, self.discriminator.clone(), grads);

        let fake = self.generator.forward(draws.latents(&flat, 1));
        let weights = plan.weights(ask, b, || fake.clone().detach(), teacher)?;
        let weights = Tensor::<1>::from_data(TensorData::new(weights, [b]), &fake.device());
        let (g_loss, im) = generator_loss(&self.discriminator, fake, weights, plan.config.alpha, draws, &flat);
        let grads = GradientsParams::from_grads(g_loss.backward(), &self.generator);
        self.generator = self.opt_g.step(lr, self.generator.clone(), grads);
        Ok([d_loss.detach(), g_loss.detach(), im.detach()])
    }
}

/// The discriminator's loss on `real` images (as real) and generated ones (as fake), with the
/// dropout draws of its two passes in `flat`.
fn discriminator_loss(
    d: &Discriminator,
    real: Tensor<4>,
    fake: Tensor<4>,
    draws: &Draws,
    flat: &Tensor<1>,
) -> Tensor<1> {
    bce_with_logits(d.forward_logits_drawn(real, &draws.masks(flat, 0)), 1.0)
        + bce_with_logits(d.forward_logits_drawn(fake, &draws.masks(flat, 1)), 0.0)
}

/// The generator's loss (adversarial + `alpha` times the IM term, weighted per image by
/// `weights`) and its IM term, through the discriminator with the dropout draws of its pass in
/// `flat`.
fn generator_loss(
    d: &Discriminator,
    fake: Tensor<4>,
    weights: Tensor<1>,
    alpha: f64,
    draws: &Draws,
    flat: &Tensor<1>,
) -> (Tensor<1>, Tensor<1>) {
    let d_fake = d.forward_logits_drawn(fake, &draws.masks(flat, 2));
    let im = information_maximisation(sigmoid(d_fake.clone()), weights);
    (bce_with_logits(d_fake, 1.0) + im.clone().mul_scalar(alpha), im)
}

/// The random draws of one GAN step, made on the host from the run's seed (a recorded graph
/// cannot draw: its draws would replay unchanged; and the host's draws are the same on every
/// backend and in both modes), in one flat buffer: the discriminator step's latents
/// (`[batch, classes]`, N(0, 1)) and its two passes' dropout draws (U(0, 1) per image and map of
/// each block, [`Discriminator::dropout_channels`]), then the generator step's latents and its
/// pass's dropout draws.
struct Draws {
    batch: usize,
    classes: usize,
    channels: Vec<usize>,
}

impl Draws {
    /// Values of one pass's dropout draws.
    fn pass_len(&self) -> usize {
        self.batch * self.channels.iter().sum::<usize>()
    }

    /// Values of a step's draws.
    fn len(&self) -> usize {
        2 * self.batch * self.classes + 3 * self.pass_len()
    }

    /// Where latents `i` (0: the discriminator step's, 1: the generator step's) start.
    fn latents_start(&self, i: usize) -> usize {
        i * (self.batch * self.classes + 2 * self.pass_len())
    }

    /// Where the dropout draws of pass `pass` (0, 1: the discriminator step's on the real and
    /// the generated images; 2: the generator step's) start.
    fn pass_start(&self, pass: usize) -> usize {
        let z = self.batch * self.classes;
        match pass {
            0 | 1 => z + pass * self.pass_len(),
            _ => 2 * z + 2 * self.pass_len(),
        }
    }

    /// A step's draws, in the buffer's order.
    fn draw(&self, rng: &mut SplitMix64) -> Vec<f32> {
        let mut values = Vec::with_capacity(self.len());
        for i in 0..2 {
            values.extend((0..self.batch * self.classes).map(|_| standard_normal(rng)));
            let passes = if i == 0 { 2 } else { 1 };
            values.extend((0..passes * self.pass_len()).map(|_| rng.next_f64() as f32));
        }
        values
    }

    /// Latents `i` in `flat` (on the autodiff device).
    fn latents(&self, flat: &Tensor<1>, i: usize) -> Tensor<2> {
        let start = self.latents_start(i);
        flat.clone().slice(start..start + self.batch * self.classes).reshape([self.batch, self.classes]).autodiff()
    }

    /// Pass `pass`'s dropout draws in `flat`, one tensor per block (on the autodiff device).
    fn masks(&self, flat: &Tensor<1>, pass: usize) -> Vec<Tensor<4>> {
        let mut start = self.pass_start(pass);
        let mut masks = Vec::with_capacity(self.channels.len());
        for &c in &self.channels {
            let n = self.batch * c;
            masks.push(flat.clone().slice(start..start + n).reshape([self.batch, c, 1, 1]).autodiff());
            start += n;
        }
        masks
    }
}

/// A draw of N(0, 1) (Box-Muller, one of the pair).
fn standard_normal(rng: &mut SplitMix64) -> f32 {
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// The step's inputs for one batch size, in buffers the graphs read.
struct GanInputs {
    /// `[batch, channels, height, width]`.
    shape: [usize; 4],
    real: Tensor<1>,
    draws: Draws,
    /// The step's draws ([`Draws`]).
    flat: Tensor<1>,
    /// The IM term's weights (the teacher's answers), written between the two graphs.
    weights: Tensor<1>,
}

impl GanInputs {
    fn images(&self) -> Tensor<4> {
        self.real.clone().reshape(self.shape).autodiff()
    }
}

/// What both graphs of every batch size read and rewrite: the networks with Adam's moments, and
/// Adam's bias corrections of the current step.
struct GanWeights {
    generator: Weights<Generator>,
    discriminator: Weights<Discriminator>,
    factors: Tensor<1>,
}

type FirstFn = Box<dyn FnMut() -> Result<(Tensor<1>, Tensor<4>), GraphStepError>>;
type SecondFn = Box<dyn FnMut() -> Result<[Tensor<1>; 2], GraphStepError>>;

/// The two graphs of one batch size and their inputs.
struct Recorded {
    inputs: Rc<RefCell<GanInputs>>,
    first: Graph<Result<(Tensor<1>, Tensor<4>), GraphStepError>, FirstFn>,
    second: Graph<Result<[Tensor<1>; 2], GraphStepError>, SecondFn>,
}

/// The GAN step as two recorded device graphs around the teacher's query ([`crate::graph_step`]):
/// the first runs the discriminator's step and generates the batch the teacher is asked about;
/// the second, once the answers are written in, runs the generator's step (generating that
/// batch again, the cost of not holding an autodiff graph across the query). Adam runs in place
/// (bias corrections written in per step), and the random draws ([`Draws`]) are written in. The generator's running
/// statistics are kept from the first graph's passes, as the op-by-op step's two passes leave
/// them. Test: `graph_steps_match_the_eager_steps`.
struct GanGraphs {
    weights: Rc<RefCell<GanWeights>>,
    sizes: HashMap<usize, Recorded>,
    plain: Device,
    alpha: f64,
}

impl GanGraphs {
    fn new(generator: Generator, discriminator: Discriminator, config: &GanConfig) -> Self {
        let plain = generator.devices()[0].clone().inner();
        let [beta_1, beta_2, _] = ADAM;
        let rule = Rule::Adam { lr: config.lr, beta_1, beta_2 };
        let weights = GanWeights {
            generator: Weights::gather(generator, rule, &plain),
            discriminator: Weights::gather(discriminator, rule, &plain),
            factors: Tensor::zeros([2], &plain),
        };
        Self { weights: Rc::new(RefCell::new(weights)), sizes: HashMap::new(), plain, alpha: config.alpha }
    }

    fn generator(&self) -> Generator {
        self.weights.borrow().generator.model(&self.plain)
    }

    fn is_graph(&self) -> bool {
        self.sizes.values().any(|recorded| recorded.first.is_hardware())
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        real: Tensor<4>,
        draws: Draws,
        values: Vec<f32>,
        time: usize,
        ask: bool,
        plan: &mut QueryPlan,
        teacher: &mut dyn Teacher,
    ) -> Result<[Tensor<1>; 3], MethodError> {
        let shape = real.dims();
        let b = shape[0];
        let n: usize = shape.iter().product();
        let real = real.without_autodiff().reshape([n]);
        let [beta_1, beta_2, epsilon] = ADAM;
        let factors = adam_factors(beta_1, beta_2, epsilon, time).to_vec();
        let hardware = self.is_graph();
        write_values(
            &mut self.weights.borrow_mut().factors,
            factors,
            "Adam's bias corrections",
            &self.plain,
            hardware,
        )?;
        let recorded = match self.sizes.entry(b) {
            Entry::Occupied(entry) => {
                let recorded = entry.into_mut();
                let graph = recorded.first.is_hardware();
                let mut inputs = recorded.inputs.borrow_mut();
                write(&mut inputs.real, real, "the real images", graph)?;
                write_values(&mut inputs.flat, values, "the random draws", &self.plain, graph)?;
                drop(inputs);
                recorded
            }
            Entry::Vacant(entry) => {
                let flat = Tensor::<1>::from_data(TensorData::new(values, [draws.len()]), &self.plain);
                let weights = Tensor::zeros([b], &self.plain);
                let inputs = GanInputs { shape, real: copy_of(&real, &self.plain), draws, flat, weights };
                entry.insert(record(&self.weights, inputs, self.alpha, &self.plain)?)
            }
        };
        // SAFETY (both replays): the recorded kernels read and write the networks' buffers, Adam's
        // state and factors (owned by `self.weights`), the inputs (owned by `recorded.inputs`),
        // all rewritten in place only (refused otherwise, GraphStepError::Shared), the outputs,
        // which the graphs own, and buffers the recording allocated, which cubecl keeps reserved
        // while the graphs live. One thread issues everything, on one stream.
        let (d_loss, fake) = unsafe { recorded.first.replay() }.clone()?;
        let weights = plan.weights(ask, b, || fake, teacher)?;
        let graph = recorded.first.is_hardware();
        write_values(&mut recorded.inputs.borrow_mut().weights, weights, "the IM weights", &self.plain, graph)?;
        let [g_loss, im] = unsafe { recorded.second.replay() }.clone()?;
        Ok([d_loss, g_loss, im])
    }
}

/// Record the two graphs of one batch size (see [`GanGraphs`]), then put the networks back as
/// they were.
fn record(
    weights: &Rc<RefCell<GanWeights>>,
    inputs: GanInputs,
    alpha: f64,
    plain: &Device,
) -> Result<Recorded, GraphStepError> {
    let inputs = Rc::new(RefCell::new(inputs));
    let before = {
        let w = weights.borrow();
        (w.generator.snapshot(plain), w.discriminator.snapshot(plain))
    };
    let (nets, ins) = (weights.clone(), inputs.clone());
    let first: FirstFn = Box::new(move || {
        let mut nets = nets.borrow_mut();
        let GanWeights { generator, discriminator, factors } = &mut *nets;
        let ins = ins.borrow();
        let (draws, flat) = (&ins.draws, &ins.flat);
        let g = generator.view(false);
        let fake = g.forward(draws.latents(flat, 0)).detach();
        let d = discriminator.view(true);
        let d_loss = discriminator_loss(&d, ins.images(), fake, draws, flat);
        let value = d_loss.clone().detach().without_autodiff();
        discriminator.update(d, d_loss, Some(&*factors), true)?;
        let fake = g.forward(draws.latents(flat, 1)).detach().without_autodiff();
        generator.keep_running(g)?;
        Ok((value, fake))
    });
    let (nets, ins) = (weights.clone(), inputs.clone());
    let second: SecondFn = Box::new(move || {
        let mut nets = nets.borrow_mut();
        let GanWeights { generator, discriminator, factors } = &mut *nets;
        let ins = ins.borrow();
        let (draws, flat) = (&ins.draws, &ins.flat);
        let g = generator.view(true);
        let fake = g.forward(draws.latents(flat, 1));
        let d = discriminator.view(false);
        let (g_loss, im) = generator_loss(&d, fake, ins.weights.clone().autodiff(), alpha, draws, flat);
        let values = [g_loss.clone().detach().without_autodiff(), im.detach().without_autodiff()];
        // The generator's running statistics come from the first graph's pass over these latents.
        generator.update(g, g_loss, Some(&*factors), false)?;
        discriminator.keep_running(d)?;
        Ok(values)
    });
    let first = capture(plain, first);
    if let Err(e) = first.output() {
        return Err(e.clone());
    }
    let second = capture(plain, second);
    if let Err(e) = second.output() {
        return Err(e.clone());
    }
    let graph = first.is_hardware() || second.is_hardware();
    let mut w = weights.borrow_mut();
    w.generator.restore(before.0, graph)?;
    w.discriminator.restore(before.1, graph)?;
    drop(w);
    Ok(Recorded { inputs, first, second })
}

/// Train the generator on `edge` (unlabeled images at the teacher's input shape), calling
/// `on_epoch` after every epoch (for checkpoints and sample grids) with the teacher's usage.
/// The teacher is asked once per synthetic image of each generator step, except when its
/// answer cannot change the IM weight (hard answers with the paper's form, or `alpha` = 0).
/// With `graphs`, the steps replay recorded device graphs ([`Gan::new`]).
pub fn deprivatize(
    edge: &Dataset,
    teacher: &mut dyn Teacher,
    config: &GanConfig,
    device: &Device,
    graphs: bool,
    mut on_epoch: impl FnMut(&GanEpoch, &Generator, Usage) -> anyhow::Result<()>,
) -> Result<Generator, MethodError> {
    let hard = teacher.info().response == mekd_contract::protocol::ResponseMode::Hard;
    let mut gan = Gan::new(config, teacher.info().num_classes, edge.shape[0], hard, device, graphs)?;
    gan.plan_queries((config.epochs * edge.len()) as u64);
    for epoch in 0..config.epochs {
        let started = std::time::Instant::now();
        let order = epoch_order(edge.len(), config.seed, epoch);
        // Loss sums stay on the device: the only host round trip of a step is the teacher's.
        let mut sums: Option<[Tensor<1>; 3]> = None;
        let mut steps = 0usize;
        for chunk in order.chunks(config.batch) {
            let values = gan.step(batches::images(edge, chunk, device), teacher)?;
            sums = Some(match sums {
                None => values,
                Some([a, b, c]) => {
                    let [x, y, z] = values;
                    [a + x, b + y, c + z]
                }
            });
            steps += 1;
        }
        let [d_loss, g_loss, im_loss] =
            sums.map_or([0.0; 3], |sums| sums.map(|t| t.into_scalar::<f32>() as f64 / steps.max(1) as f64));
        let row = GanEpoch {
            epoch: epoch + 1,
            d_loss,
            g_loss,
            im_loss,
            queries: teacher.usage().queries,
            teacher_labels: gan.take_label_counts(),
            seconds: started.elapsed().as_secs_f64(),
        };
        on_epoch(&row, &gan.generator(), teacher.usage()).map_err(MethodError::Callback)?;
    }
    Ok(gan.generator())
}

/// The frozen generator for distillation: inference BatchNorm, no parameter gradients.
pub fn freeze(generator: &Generator) -> Generator {
    generator.valid().no_grad()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blackbox::BurnTeacher;
    use crate::self_test::values;
    use burn::tensor::Distribution;
    use mekd_contract::protocol::ResponseMode;
    use mekd_models::{Architecture, ClassifierSpec};

    /// On flex (no device graphs: the recorded steps run again) the GAN step of two recorded
    /// graphs is the op-by-op step: Adam in place, the draws written in, the generator's batch
    /// generated again after the query. The same losses step by step, the same teacher answers
    /// and queries, and the same generator after (its running statistics included, through the
    /// frozen forward pass), for two batch sizes (a graph pair each).
    #[test]
    fn graph_steps_match_the_eager_steps() {
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: 10 };
        plain.seed(3);
        let teacher_model = spec.init(&plain).unwrap();
        let teacher = || BurnTeacher::from_model(teacher_model.clone(), &spec, &plain, ResponseMode::Soft, None, None);
        // burn initialises parameters when first read: the teacher's now, from the seed above,
        // not from whatever the device's generator holds at the first run's first query.
        teacher().query(&[0; 1024]).unwrap();
        let config = GanConfig { generator_width: 8, discriminator_width: 4, seed: 9, ..GanConfig::default() };
        let batches: Vec<Vec<f32>> = [5, 5, 3, 5]
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let mut rng = mekd_runtime::rng::SplitMix64::new(i as u64);
                (0..b * 1024).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect()
            })
            .collect();
        let run = |graphs: bool| {
            let mut gan = Gan::new(&config, 10, 1, false, &device, graphs).unwrap();
            assert_eq!(gan.dropout_channels, [4, 8, 16, 32], "the discriminator's dropout is drawn");
            let mut teacher = teacher();
            let mut losses = Vec::new();
            for batch in &batches {
                let real =
                    Tensor::<4>::from_data(TensorData::new(batch.clone(), [batch.len() / 1024, 1, 32, 32]), &device);
                let step = gan.step(real, &mut teacher).unwrap();
                losses.extend(step.into_iter().map(|t| values(t)[0]));
            }
            device.seed(1);
            let z = Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 1.0), &device);
            let images = values(freeze(&gan.generator()).forward(z.clone()));
            assert!(!gan.is_graph());
            (losses, images, gan.take_label_counts(), teacher.usage().queries)
        };
        let (eager, graphs) = (run(false), run(true));
        let close = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
        };
        assert!(close(&graphs.0, &eager.0), "losses {:?} vs {:?}", graphs.0, eager.0);
        assert!(close(&graphs.1, &eager.1), "generated images differ: {:?} vs {:?}", &graphs.1[..8], &eager.1[..8]);
        assert_eq!((graphs.2, graphs.3), (eager.2, eager.3), "teacher answers and queries");
        assert_eq!(eager.3, 18);
    }

    #[test]
    fn the_frozen_generator_is_a_pure_function_even_of_autodiff_inputs() {
        let train = Device::flex().autodiff();
        train.seed(2);
        let generator = GeneratorConfig::new(10, 1).with_width(8).init(&train).unwrap();
        let frozen = freeze(&generator);
        let z = Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 1.0), &train);
        let first: Vec<f32> = frozen.forward(z.clone()).into_data().try_to_vec().unwrap();
        let other = Tensor::<2>::random([64, 10], Distribution::Normal(0.0, 3.0), &train);
        let _ = frozen.forward(other);
        let again: Vec<f32> = frozen.forward(z.clone()).into_data().try_to_vec().unwrap();
        assert_eq!(first, again, "a frozen generator's output may not depend on earlier batches");
        let single: Vec<f32> = frozen.forward(z.slice([0..1, 0..10])).into_data().try_to_vec().unwrap();
        assert_eq!(&first[..1024], &single[..], "nor on the rest of its batch (inference BatchNorm)");
    }
}
