//! The student side that every method shares: a transfer set (fresh synthetic queries, or a
//! pool queried once and cached), an [`Objective`], SGD with step decay, test accuracy after
//! every epoch, and crash-safe checkpoints that a resumed run continues from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Instant;

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use mekd_contract::Usage;
use mekd_contract::{Normalisation, to_model_input};
use mekd_models::{Classifier, ClassifierSpec, Generator};
use mekd_runtime::Dataset;
use mekd_runtime::fsutil::write_atomic;

use super::MethodError;
use super::config::DistillConfig;
use super::deprivatize::to_pixels;
use crate::batches::epoch_order;
use crate::blackbox::{Responses, Teacher, TeacherError};
use crate::graph_step::{self, GraphStep, GraphStepError, HostInputs, StepInputs, Training};
use crate::rundir::RunDir;
use crate::schedule::Sgd;
use crate::teacher::train::accuracy;

/// What a method minimises on one batch, given the student's logits and the batch's targets
/// (teacher logits, one-hot hard answers, or one-hot true labels).
pub trait Objective {
    /// Names of the terms that [`Objective::loss`] returns beside the total, in order.
    fn term_names(&self) -> &'static [&'static str];
    /// The loss of one batch.
    fn loss(&self, student_logits: Tensor<2>, targets: Tensor<2>) -> BatchLoss;
}

/// One batch's loss: the tensor to differentiate, and the values to report.
pub struct BatchLoss {
    /// What the step differentiates. Its gradient is the loss's; its value need not be (MEKD
    /// attaches its image term through the gradient alone).
    pub differentiable: Tensor<1>,
    /// The loss's value.
    pub total: Tensor<1>,
    /// The named terms, in [`Objective::term_names`] order.
    pub terms: Vec<Tensor<1>>,
}

impl BatchLoss {
    /// A loss differentiated as it is: `total` with its `terms`.
    pub fn new(total: Tensor<1>, terms: Vec<Tensor<1>>) -> Self {
        Self { differentiable: total.clone(), total, terms }
    }
}

/// A fixed set of images with one target row each (teacher answers or true labels), reused for
/// every epoch: each image is queried at most once.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// `u8` CHW images back to back.
    pub pixels: Vec<u8>,
    /// `classes` values per image.
    pub targets: Vec<f32>,
    /// Image shape.
    pub shape: [usize; 3],
    /// Target width.
    pub classes: usize,
}

const POOL_MAGIC: &[u8; 8] = b"MEKDPOOL";

impl Pool {
    /// Query `teacher` once per image of `pixels`, in batches of `batch`, calling `answered`
    /// with the number of images of each batch answered.
    pub fn query(
        pixels: Vec<u8>,
        teacher: &mut dyn Teacher,
        batch: usize,
        mut answered: impl FnMut(usize),
    ) -> Result<Self, MethodError> {
        let shape = teacher.info().input_shape;
        let classes = teacher.info().num_classes;
        let per_image: usize = shape.iter().product();
        let mut targets = Vec::with_capacity(pixels.len() / per_image * classes);
        for chunk in pixels.chunks(batch.max(1) * per_image) {
            targets.extend(teacher.query(chunk)?.targets(classes));
            answered(chunk.len() / per_image);
        }
        Ok(Self { pixels, targets, shape, classes })
    }

    /// Images of `data` at `indices` with their true labels as one-hot targets (no teacher).
    pub fn labelled(data: &Dataset, indices: &[usize], classes: usize) -> Self {
        let mut pixels = Vec::with_capacity(indices.len() * data.image_len());
        let mut targets = vec![0.0; indices.len() * classes];
        for (row, &i) in indices.iter().enumerate() {
            pixels.extend_from_slice(data.image(i));
            targets[row * classes + data.labels[i] as usize] = 1.0;
        }
        Self { pixels, targets, shape: data.shape, classes }
    }

    /// Images of `data` at `indices`, back to back.
    pub fn gather(data: &Dataset, indices: &[usize]) -> Vec<u8> {
        indices.iter().flat_map(|&i| data.image(i).iter().copied()).collect()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.targets.len() / self.classes.max(1)
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images and targets at `picks`.
    fn batch(&self, picks: &[usize]) -> (Vec<u8>, Vec<f32>) {
        let per_image: usize = self.shape.iter().product();
        let k = self.classes;
        let pixels = picks.iter().flat_map(|&i| self.pixels[i * per_image..(i + 1) * per_image].iter().copied());
        let targets = picks.iter().flat_map(|&i| self.targets[i * k..(i + 1) * k].iter().copied());
        (pixels.collect(), targets.collect())
    }

    /// Write the pool (the cached answers) atomically, so a resumed run does not query again.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(40 + self.pixels.len() + 4 * self.targets.len());
        bytes.extend_from_slice(POOL_MAGIC);
        for v in [self.shape[0], self.shape[1], self.shape[2], self.classes, self.len()] {
            bytes.extend_from_slice(&(v as u64).to_le_bytes());
        }
        bytes.extend_from_slice(&self.pixels);
        for t in &self.targets {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        write_atomic(path, &bytes)
    }

    /// Read a pool written by [`Pool::save`].
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)?;
        let bad = || anyhow::anyhow!("{} is not a complete transfer pool", path.display());
        if bytes.len() < 48 || &bytes[..8] != POOL_MAGIC {
            return Err(bad());
        }
        let field = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes")) as usize;
        let (shape, classes, n) = ([field(0), field(1), field(2)], field(3), field(4));
        let per_image = shape.iter().product::<usize>();
        let pixel_bytes = n.checked_mul(per_image).ok_or_else(bad)?;
        let target_bytes = n.checked_mul(classes).and_then(|v| v.checked_mul(4)).ok_or_else(bad)?;
        if bytes.len() != 48 + pixel_bytes + target_bytes {
            return Err(bad());
        }
        let pixels = bytes[48..48 + pixel_bytes].to_vec();
        let targets = bytes[48 + pixel_bytes..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Self { pixels, targets, shape, classes })
    }
}

/// Where the student's batches come from.
pub enum Transfer {
    /// A new batch of synthetic images from the frozen generator every step, each queried
    /// (MEKD as the reference runs it; no query cap).
    Fresh(Box<Generator>),
    /// A fixed pool, cycled through in a seeded order per epoch.
    Pool(Pool),
}

/// How long one student epoch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochLength {
    /// This many batches of the full batch size (a pool is cycled through, wrapping around).
    Steps(usize),
    /// One pass over the pool in the epoch's order, the last batch short when the pool is not a
    /// multiple of the batch (the baselines' reference schedule: a PyTorch `DataLoader` epoch).
    OnePass,
}

impl fmt::Display for EpochLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EpochLength::Steps(_) => f.write_str("a fixed step count"),
            EpochLength::OnePass => f.write_str("one pass over the transfer set"),
        }
    }
}

impl EpochLength {
    /// The number of steps of one epoch on `transfer` with batches of `batch`.
    pub fn steps(self, transfer: &Transfer, batch: usize) -> Result<usize, MethodError> {
        match (self, transfer) {
            (EpochLength::Steps(steps), _) => Ok(steps),
            (EpochLength::OnePass, Transfer::Pool(pool)) => Ok(pool.len().div_ceil(batch.max(1))),
            (EpochLength::OnePass, Transfer::Fresh(_)) => {
                Err(MethodError::Schedule("fresh synthetic queries have no pass to make: give a step count"))
            }
        }
    }
}

/// One epoch of student training.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StudentEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean total loss.
    pub loss: f64,
    /// Mean of each named loss term.
    pub terms: BTreeMap<String, f64>,
    /// Student test accuracy (percent).
    pub test_acc: f64,
    /// Teacher queries so far (the whole run, resumed parts included).
    pub queries: u64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
}

/// A synthetic batch from the frozen generator and the teacher's answers on it (one query per
/// image): the `u8` pixels (what the API carries) and the target rows.
pub fn fresh_batch(
    generator: &Generator,
    teacher: &mut dyn Teacher,
    batch: usize,
    device: &Device,
) -> Result<(Vec<u8>, Vec<f32>), MethodError> {
    let classes = teacher.info().num_classes;
    let pixels = synthetic_pixels(generator, classes, batch, device);
    let targets = teacher.query(&pixels)?.targets(classes);
    Ok((pixels, targets))
}

/// A synthetic batch from the frozen generator (fresh noise from the device's generator), as
/// `u8` pixels.
pub fn synthetic_pixels(generator: &Generator, classes: usize, batch: usize, device: &Device) -> Vec<u8> {
    let z = Tensor::<2>::random([batch, classes], Distribution::Normal(0.0, 1.0), device);
    to_pixels(generator.forward(z))
}

/// One SGD step of a `spec` student on `pixels` (`u8`, as the teacher saw them) and `targets`;
/// returns the updated student, the loss and its terms (still on the device).
pub struct StudentStep<'a> {
    /// The student's architecture (input shape, classes).
    pub spec: &'a ClassifierSpec,
    /// What it minimises.
    pub objective: &'a dyn Objective,
    /// The device.
    pub device: &'a Device,
}

impl<'a> StudentStep<'a> {
    /// The batch as the student takes it: normalised images `[b, c, h, w]` and target rows
    /// `[b, classes]`, flat, on `device`.
    fn batch(&self, pixels: &[u8], targets: Vec<f32>, device: &Device) -> (Tensor<1>, Tensor<1>) {
        let x = self.images(pixels);
        let (n, m) = (x.len(), targets.len());
        (Tensor::from_data(TensorData::new(x, [n]), device), Tensor::from_data(TensorData::new(targets, [m]), device))
    }

    /// `u8` images as the student's normalised input, flat.
    fn images(&self, pixels: &[u8]) -> Vec<f32> {
        let shape = self.spec.image_shape();
        to_model_input(pixels, shape, &Normalisation::symmetric(shape[0]))
    }

    /// The loss of the student on flat batch tensors (any batch size).
    fn loss(&self, student: &Classifier, x: Tensor<1>, t: Tensor<1>) -> BatchLoss {
        let [c, h, w] = self.spec.image_shape();
        let classes = self.spec.num_classes;
        let b = t.dims()[0] / classes;
        self.objective.loss(student.forward(x.reshape([b, c, h, w])), t.reshape([b, classes]))
    }

    /// Run the step at learning rate `lr`.
    pub fn run(
        &self,
        student: Classifier,
        optim: &mut ModuleOptimizer,
        pixels: &[u8],
        targets: Vec<f32>,
        lr: f64,
    ) -> (Classifier, Tensor<1>, Vec<Tensor<1>>) {
        let (x, t) = self.batch(pixels, targets, self.device);
        let loss = self.loss(&student, x, t);
        let grads = GradientsParams::from_grads(loss.differentiable.backward(), &student);
        let student = optim.step(lr, student, grads);
        (student, loss.total, loss.terms)
    }

    /// The step's inputs for [`StudentStep::record`] (`plain`: the device without autodiff).
    pub fn inputs(&self, pixels: &[u8], targets: Vec<f32>, plain: &Device) -> StepInputs {
        let (x, t) = self.batch(pixels, targets, plain);
        StepInputs { floats: vec![x, t], ints: Vec::new() }
    }

    /// The step's host inputs for [`Training::step`].
    fn host_inputs(&self, pixels: &[u8], targets: Vec<f32>) -> HostInputs {
        (vec![self.images(pixels), targets], Vec::new())
    }

    /// The step's loss on inputs as [`StudentStep::inputs`] makes them: the tensor to
    /// differentiate, and the loss's value followed by its terms.
    fn input_loss(&self) -> impl FnMut(&Classifier, &StepInputs) -> (Tensor<1>, Tensor<1>) + 'a {
        let step = StudentStep { spec: self.spec, objective: self.objective, device: self.device };
        move |student: &Classifier, inputs: &StepInputs| {
            let [x, t] = [0, 1].map(|i| inputs.floats[i].clone().autodiff());
            let loss = step.loss(student, x, t);
            let values = Tensor::cat(std::iter::once(loss.total).chain(loss.terms).collect(), 0);
            (loss.differentiable, values.detach())
        }
    }

    /// The step recorded as a device graph ([`crate::graph_step`]) on `inputs`: its values are
    /// the loss and then its terms.
    pub fn record(
        &self,
        student: Classifier,
        sgd: &Sgd,
        lr: f64,
        inputs: StepInputs,
        plain: &Device,
    ) -> Result<GraphStep<'a, Classifier>, GraphStepError> {
        graph_step::record(student, sgd, lr, inputs, plain, self.input_loss())
    }
}

/// `step` while `teacher` answers `next` on another thread: what fresh-mode distillation does,
/// so a remote teacher's latency hides behind the step.
pub fn while_querying<T>(
    teacher: &mut dyn Teacher,
    next: &[u8],
    step: impl FnOnce() -> T,
) -> (T, Result<Responses, TeacherError>) {
    std::thread::scope(|scope| {
        let query = scope.spawn(|| teacher.query(next));
        let out = step();
        let answer = query.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (out, answer)
    })
}

/// Everything [`train_student`] needs besides the transfer set and the objective.
pub struct StudentJob<'a> {
    /// Student architecture.
    pub spec: &'a ClassifierSpec,
    /// Schedule and seed.
    pub config: &'a DistillConfig,
    /// How long an epoch is (the method's [`super::DistillMethod::reference_epoch_length`]
    /// unless a step count is given).
    pub epoch_length: EpochLength,
    /// Scored after every epoch.
    pub test: &'a Dataset,
    /// Training device (with autodiff).
    pub device: &'a Device,
    /// Checkpoints (`checkpoints/`) and `metrics.jsonl` go here; an existing checkpoint is resumed.
    pub run: &'a RunDir,
    /// Replay the steps as a recorded device graph ([`crate::graph_step`]; see
    /// [`crate::device::DeviceKind::records_graphs`]).
    pub graphs: bool,
}

/// Train a fresh student (or resume the one checkpointed in `job.run`) for `config.epochs`,
/// calling `on_epoch` (with the teacher's usage) after each epoch's checkpoint is committed. Returns the student in
/// inference mode and every epoch's row.
pub fn train_student(
    objective: &dyn Objective,
    transfer: &Transfer,
    teacher: &mut dyn Teacher,
    job: &StudentJob,
    mut on_epoch: impl FnMut(&StudentEpoch, Usage) -> anyhow::Result<()>,
) -> Result<(Classifier, Vec<StudentEpoch>), MethodError> {
    let StudentJob { spec, config, epoch_length, test, device, run, .. } = *job;
    let steps_per_epoch = epoch_length.steps(transfer, config.batch)?;
    let stepper = StudentStep { spec, objective, device };
    device.seed(config.seed);
    let mut student = spec.init(device)?;
    let mut optim = config.sgd.optimizer();
    let mut rows: Vec<StudentEpoch> = Vec::new();
    let mut start = 0;
    let checkpoint = run.load_checkpoint(student.clone(), optim.clone()).map_err(MethodError::Callback)?;
    if let Some(checkpoint) = checkpoint {
        (start, student, optim, rows) = (checkpoint.epochs_done, checkpoint.model, checkpoint.optim, checkpoint.rows);
        eprintln!("resuming the student after epoch {start}");
    }
    let plain = device.clone().inner();
    let mut steps = Training::new(student, optim, &config.sgd, job.graphs, &plain, stepper.input_loss());

    for epoch in start..config.epochs {
        let started = Instant::now();
        // Seeded per epoch, so a resumed run draws the same noise as an uninterrupted one.
        device.seed(config.seed.wrapping_add(1_000_003 * (epoch as u64 + 1)));
        let lr = config.sgd.lr_at(epoch);
        let order = match transfer {
            Transfer::Pool(pool) => epoch_order(pool.len(), config.seed, epoch),
            Transfer::Fresh(_) => Vec::new(),
        };
        // Sums stay on the device: no host round trip per step beyond the teacher's.
        let mut sums: Option<(Tensor<1>, Vec<Tensor<1>>)> = None;
        // Fresh mode: the teacher answers the next batch on a thread while the student steps on
        // this one (a remote teacher's latency then hides behind the step). Deterministic: this
        // thread draws all the noise, in a fixed order; the teacher's thread draws none.
        let mut prefetched: Option<(Vec<u8>, Vec<f32>)> = None;
        for step in 0..steps_per_epoch {
            let (pixels, targets) = match (transfer, prefetched.take()) {
                (Transfer::Pool(pool), _) => pool.batch(&epoch_picks(&order, step, config.batch, epoch_length)),
                (Transfer::Fresh(_), Some(batch)) => batch,
                (Transfer::Fresh(generator), None) => fresh_batch(generator, teacher, config.batch, device)?,
            };
            let (loss, terms) = match transfer {
                Transfer::Fresh(generator) if step + 1 < steps_per_epoch => {
                    let classes = teacher.info().num_classes;
                    let next = synthetic_pixels(generator, classes, config.batch, device);
                    let (done, answer) =
                        while_querying(teacher, &next, || student_step(&mut steps, &stepper, &pixels, targets, lr));
                    prefetched = Some((next, answer?.targets(classes)));
                    done?
                }
                _ => student_step(&mut steps, &stepper, &pixels, targets, lr)?,
            };
            let terms: Vec<Tensor<1>> = terms.into_iter().map(|t| t.detach()).collect();
            sums = Some(match sums {
                None => (loss.detach(), terms),
                Some((total, parts)) => {
                    (total + loss.detach(), parts.into_iter().zip(terms).map(|(a, b)| a + b).collect())
                }
            });
        }
        let steps_done = steps_per_epoch.max(1) as f64;
        let mean = |t: Tensor<1>| t.into_scalar::<f32>() as f64 / steps_done;
        let (loss, terms) = match sums {
            Some((total, parts)) => (
                mean(total),
                objective.term_names().iter().zip(parts).map(|(name, t)| (name.to_string(), mean(t))).collect(),
            ),
            None => (0.0, BTreeMap::new()),
        };
        if !loss.is_finite() {
            return Err(MethodError::Diverged { epoch: epoch + 1, loss, lr });
        }
        let row = StudentEpoch {
            epoch: epoch + 1,
            lr,
            loss,
            terms,
            test_acc: accuracy(&steps.model(), test, device),
            queries: teacher.usage().queries,
            seconds: started.elapsed().as_secs_f64(),
        };
        rows.push(row.clone());
        let (student, optim) = steps.checkpoint();
        run.save_checkpoint(epoch + 1, &student, &optim, &rows).map_err(MethodError::Callback)?;
        on_epoch(&row, teacher.usage()).map_err(MethodError::Callback)?;
    }
    Ok((steps.model(), rows))
}

/// One step of the student through `training` on `pixels` and `targets` at `lr`: the loss and
/// its terms.
fn student_step(
    training: &mut Training<Classifier>,
    stepper: &StudentStep,
    pixels: &[u8],
    targets: Vec<f32>,
    lr: f64,
) -> Result<(Tensor<1>, Vec<Tensor<1>>), MethodError> {
    let values = training.step(stepper.host_inputs(pixels, targets), lr)?;
    let terms = (1..=stepper.objective.term_names().len()).map(|i| values.clone().slice(i..i + 1)).collect();
    Ok((values.slice(0..1), terms))
}

/// The pool positions of step `step` of an epoch whose shuffled order is `order`: with
/// [`EpochLength::Steps`], `batch` positions from `step * batch` on, wrapping around the pool;
/// with [`EpochLength::OnePass`], the `step`-th slice of `batch` (the last one short).
fn epoch_picks(order: &[usize], step: usize, batch: usize, length: EpochLength) -> Vec<usize> {
    let n = order.len();
    match length {
        EpochLength::OnePass => order[(step * batch).min(n)..((step + 1) * batch).min(n)].to_vec(),
        EpochLength::Steps(_) => {
            let first = (step * batch) % n.max(1);
            (0..batch.min(n)).map(|i| order[(first + i) % n]).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_covers_the_pool_once_and_steps_wrap_around() {
        let order: Vec<usize> = (0..10).rev().collect();
        let pass: Vec<Vec<usize>> =
            (0..10usize.div_ceil(4)).map(|s| epoch_picks(&order, s, 4, EpochLength::OnePass)).collect();
        assert_eq!(pass, vec![vec![9, 8, 7, 6], vec![5, 4, 3, 2], vec![1, 0]]);
        assert_eq!(epoch_picks(&order, 2, 4, EpochLength::Steps(5)), vec![1, 0, 9, 8]);
        assert_eq!(epoch_picks(&order, 0, 16, EpochLength::Steps(1)), order);
        let pool = Pool { pixels: vec![0; 10], targets: vec![0.0; 10], shape: [1, 1, 1], classes: 1 };
        assert_eq!(EpochLength::OnePass.steps(&Transfer::Pool(pool), 4).unwrap(), 3);
    }

    #[test]
    fn pool_round_trips_and_rejects_truncation() {
        let pool = Pool {
            pixels: (0..2 * 3 * 2 * 2).map(|v| v as u8).collect(),
            targets: vec![0.5, -1.0, 2.0, 0.25],
            shape: [3, 2, 2],
            classes: 2,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.bin");
        pool.save(&path).unwrap();
        assert_eq!(Pool::load(&path).unwrap(), pool);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Pool::load(&path).unwrap_err().to_string().contains("not a complete transfer pool"));
        let (pixels, targets) = pool.batch(&[1]);
        assert_eq!(pixels, (12..24).map(|v| v as u8).collect::<Vec<_>>());
        assert_eq!(targets, vec![2.0, 0.25]);
    }
}
