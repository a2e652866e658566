//! `mekd bench-train`: the time of one training step of each stage on a device, through the
//! same code the commands run: teacher training (ResNet32, batch 128), deprivatization (DCGAN
//! with the IM query to a ResNet32 teacher, batch 64), and MEKD distillation (ResNet32 teacher
//! through the in-process teacher, ResNet8 student, batch 128; optionally with the teacher
//! behind the HTTP API on loopback). Warm-up (autotuning, first allocations) is reported apart
//! from the steady state.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use mekd_contract::protocol::{ResponseMode, TeacherInfo};
use mekd_contract::{Normalisation, to_model_input};
use mekd_models::{Architecture, Classifier, ClassifierSpec};
use mekd_runtime::rng::SplitMix64;

use mekd_contract::Usage;
use mekd_contract::percentiles::nearest_rank;

use crate::blackbox::{BurnTeacher, HttpTeacher, Responses, Teacher, TeacherError};
use crate::device::DeviceKind;
use crate::graph_step::{self, StepInputs};
use crate::methods::config::DistillConfig;
use crate::methods::deprivatize::{Gan, GanConfig, freeze};
use crate::methods::losses::ImWeight;
use crate::methods::mekd::MekdObjective;
use crate::methods::student::{StudentStep, fresh_batch, synthetic_pixels, while_querying};
use crate::schedule::Sgd;

/// Timings of one kind of step.
#[derive(Clone, Debug, Serialize)]
pub struct StepTiming {
    /// What was timed.
    pub step: String,
    /// The device.
    pub device: String,
    /// Images per step.
    pub batch: usize,
    /// Warm-up steps (not in the statistics).
    pub warmup_steps: usize,
    /// Their total time (s): autotuning, kernel compilation, first allocations.
    pub warmup_s: f64,
    /// Measured steps.
    pub steps: usize,
    /// Median step time (ms).
    pub median_ms: f64,
    /// 10th percentile (ms).
    pub p10_ms: f64,
    /// 90th percentile (ms).
    pub p90_ms: f64,
    /// Images per second at the median.
    pub images_per_s: f64,
    /// Median time per step spent waiting for the teacher's answers (ms), where a step asks.
    pub teacher_ms: Option<f64>,
    /// For a step recorded as a device graph ([`crate::graph_step`]): whether it replayed one
    /// (`false`: the backend has none, and the step ran again each time).
    pub graph: Option<bool>,
}

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchTrainConfig {
    /// Device.
    pub device: DeviceKind,
    /// Steps not measured, first.
    pub warmup: usize,
    /// Steps measured.
    pub steps: usize,
    /// Also time the MEKD step against the teacher served over HTTP on loopback (needs ONNX
    /// Runtime).
    pub http: bool,
    /// Also time the teacher and MEKD steps recorded as device graphs and replayed.
    pub graphs: bool,
    /// The ONNX Runtime library, if not found automatically.
    pub ort_library: Option<std::path::PathBuf>,
}

/// A teacher wrapper that adds up the time spent in queries.
struct Timed<'a> {
    inner: &'a mut dyn Teacher,
    spent: Duration,
}

impl Teacher for Timed<'_> {
    fn info(&self) -> &TeacherInfo {
        self.inner.info()
    }

    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError> {
        let started = Instant::now();
        let answer = self.inner.query(images);
        self.spent += started.elapsed();
        answer
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }

    fn add_prior_usage(&mut self, prior: Usage) {
        self.inner.add_prior_usage(prior);
    }
}

/// Wait for `t` on the host. burn 0.22's `into_data` is lazy (the bytes are fetched when first
/// read, and a GPU backend returns at once), so a timed step must read them, or it times only
/// the launches and leaves the work to whatever syncs next.
fn read_back<const D: usize>(t: Tensor<D>) -> Result<()> {
    t.into_data().as_slice::<f32>().map_err(|e| anyhow::anyhow!("reading a result back: {e:?}"))?;
    Ok(())
}

/// Run `step` `warmup + steps` times; each call returns the time it waited for the teacher.
/// The step must end with a host read of its result's values (`read_back`, `into_scalar`), so
/// that its time is complete.
fn time_steps(
    name: &str,
    config: &BenchTrainConfig,
    batch: usize,
    mut step: impl FnMut() -> Result<Duration>,
) -> Result<StepTiming> {
    let started = Instant::now();
    for _ in 0..config.warmup {
        step()?;
    }
    let warmup_s = started.elapsed().as_secs_f64();
    let (mut times, mut waits) = (Vec::with_capacity(config.steps), Vec::with_capacity(config.steps));
    for _ in 0..config.steps {
        let t0 = Instant::now();
        let waited = step()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        waits.push(waited.as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    waits.sort_by(f64::total_cmp);
    let median_ms = nearest_rank(&times, 0.5);
    let teacher_ms = nearest_rank(&waits, 0.5);
    let row = StepTiming {
        step: name.to_string(),
        device: config.device.to_string(),
        batch,
        warmup_steps: config.warmup,
        warmup_s,
        steps: config.steps,
        median_ms,
        p10_ms: nearest_rank(&times, 0.1),
        p90_ms: nearest_rank(&times, 0.9),
        images_per_s: batch as f64 / (median_ms / 1e3),
        teacher_ms: (teacher_ms > 0.0).then_some(teacher_ms),
        graph: None,
    };
    eprintln!(
        "{name:<34} median {:>8.2} ms (p10 {:.2}, p90 {:.2}), {:>8.0} images/s, warm-up {:.1} s{}",
        row.median_ms,
        row.p10_ms,
        row.p90_ms,
        row.images_per_s,
        row.warmup_s,
        row.teacher_ms.map_or(String::new(), |t| format!(", teacher {t:.2} ms"))
    );
    Ok(row)
}

/// `row` of a step recorded as a device graph: says whether it replayed one.
fn replayed(row: StepTiming, graph: bool) -> StepTiming {
    if !graph {
        eprintln!("  (this backend records no device graphs: the step above ran again each time)");
    }
    StepTiming { graph: Some(graph), ..row }
}

fn random_pixels(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// Time the three steps (four with `http`) on `config.device`.
pub fn bench_train(config: &BenchTrainConfig) -> Result<Vec<StepTiming>> {
    let device = config.device.training_device()?;
    let plain = config.device.device()?;
    let teacher_spec = ClassifierSpec { architecture: Architecture::ResNet32, in_channels: 1, num_classes: 10 };
    let student_spec = ClassifierSpec { architecture: Architecture::ResNet8, in_channels: 1, num_classes: 10 };
    let shape = teacher_spec.image_shape();
    let per_image: usize = shape.iter().product();
    let norm = Normalisation::symmetric(1);
    let mut rows = Vec::new();

    // 1. Teacher training: ResNet32, batch 128, cross-entropy, reference SGD; the batch comes
    // from host u8 pixels each step, as in `mekd teacher train`.
    device.seed(0);
    let mut model = teacher_spec.init(&device)?;
    let mut optim = Sgd::reference(1).optimizer();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let pixels = random_pixels(128 * per_image, 1);
    let labels: Vec<i64> = (0..128).map(|i| i % 10).collect();
    rows.push(time_steps("teacher step (resnet32, b128)", config, 128, || {
        let x =
            Tensor::<4>::from_data(TensorData::new(to_model_input(&pixels, shape, &norm), [128, 1, 32, 32]), &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [128]), &device);
        let loss = loss_fn.forward(model.forward(x), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.1, model.clone(), grads);
        loss.into_scalar::<f32>();
        Ok(Duration::ZERO)
    })?);
    if config.graphs {
        // The same step recorded as a device graph: the batch is written into the recorded
        // input buffers, then the step replays.
        device.seed(0);
        let model = teacher_spec.init(&device)?;
        let inputs = StepInputs {
            floats: vec![Tensor::from_data(
                TensorData::new(to_model_input(&pixels, shape, &norm), [128 * per_image]),
                &plain,
            )],
            ints: vec![Tensor::from_data(TensorData::new(labels.clone(), [128]), &plain)],
        };
        let mut graph =
            graph_step::record(model, &Sgd::reference(1), 0.1, inputs, &plain, |model: &Classifier, inputs| {
                let x = inputs.floats[0].clone().reshape([128, 1, 32, 32]).autodiff();
                let loss = loss_fn.forward(model.forward(x), inputs.ints[0].clone());
                (loss.clone(), loss.detach().without_autodiff())
            })?;
        let row = time_steps("teacher step, graph (resnet32, b128)", config, 128, || {
            graph.set_floats(0, to_model_input(&pixels, shape, &norm))?;
            graph.set_ints(0, labels.clone())?;
            graph.step()?.into_scalar::<f32>();
            Ok(Duration::ZERO)
        })?;
        rows.push(replayed(row, graph.is_graph()));
    }

    // The in-process teacher: a ResNet32 on the same device (inference mode).
    let teacher_model = teacher_spec.init(&plain)?;
    let mut teacher =
        BurnTeacher::from_model(teacher_model.clone(), &teacher_spec, &plain, ResponseMode::Soft, None, None);

    // 2. Deprivatization: D and G steps, batch 64, one query per synthetic image (the reference
    // code's class-index IM weight, so the answer is needed).
    let gan_config = GanConfig { im_weight: ImWeight::ClassIndex, ..GanConfig::default() };
    let real_pixels = random_pixels(64 * per_image, 2);
    let gan_step = |gan: &mut Gan, teacher: &mut dyn Teacher, name: &str| {
        time_steps(name, config, 64, || {
            let real = Tensor::<4>::from_data(
                TensorData::new(to_model_input(&real_pixels, shape, &norm), [64, 1, 32, 32]),
                &device,
            );
            let mut timed = Timed { inner: teacher, spent: Duration::ZERO };
            let [d, g, _] = gan.step(real, &mut timed)?;
            // Both losses: the second graph (the generator's step) must have finished too.
            d.into_scalar::<f32>();
            g.into_scalar::<f32>();
            Ok(timed.spent)
        })
    };
    let mut gan = Gan::new(&gan_config, 10, 1, false, &device, false)?;
    rows.push(gan_step(&mut gan, &mut teacher, "gan step (b64, resnet32 teacher)")?);
    if config.graphs {
        // The same step as two recorded graphs around the query (the teacher's forward pass
        // recorded as a graph of its own).
        let mut teacher =
            BurnTeacher::from_model(teacher_model.clone(), &teacher_spec, &plain, ResponseMode::Soft, None, None)
                .with_graphs();
        let mut gan = Gan::new(&gan_config, 10, 1, false, &device, true)?;
        let row = gan_step(&mut gan, &mut teacher, "gan step, graph (b64)")?;
        rows.push(replayed(row, gan.is_graph()));
    }

    // 3. MEKD distillation: fresh synthetic batch, teacher query, student step, batch 128.
    let generator = freeze(&gan.generator());
    let distill = DistillConfig::default();
    let objective = MekdObjective { generator: generator.clone(), config: &distill };
    let stepper = StudentStep { spec: &student_spec, objective: &objective, device: &device };
    let mekd_step = |teacher: &mut dyn Teacher, name: &str| -> Result<StepTiming> {
        let mut student = student_spec.init(&device)?;
        let mut optim = Sgd::reference(1).optimizer();
        time_steps(name, config, 128, || {
            let mut timed = Timed { inner: teacher, spent: Duration::ZERO };
            let (pixels, targets) = fresh_batch(&generator, &mut timed, 128, &device)?;
            let (next, loss, _) = stepper.run(student.clone(), &mut optim, &pixels, targets, 0.1);
            student = next;
            loss.into_scalar::<f32>();
            Ok(timed.spent)
        })
    };
    rows.push(mekd_step(&mut teacher, "mekd step (resnet32 -> resnet8, b128)")?);
    if config.graphs {
        // The student's step recorded as a device graph; the fresh batch (generator, teacher)
        // runs outside it, the teacher's forward pass recorded as a graph of its own.
        let mut teacher =
            BurnTeacher::from_model(teacher_model.clone(), &teacher_spec, &plain, ResponseMode::Soft, None, None)
                .with_graphs();
        let mut timed = Timed { inner: &mut teacher, spent: Duration::ZERO };
        let (pixels, targets) = fresh_batch(&generator, &mut timed, 128, &device)?;
        let inputs = stepper.inputs(&pixels, targets, &plain);
        let mut graph = stepper.record(student_spec.init(&device)?, &Sgd::reference(1), 0.1, inputs, &plain)?;
        let row = time_steps("mekd step, graph (resnet32 -> resnet8)", config, 128, || {
            let mut timed = Timed { inner: &mut teacher, spent: Duration::ZERO };
            let (pixels, targets) = fresh_batch(&generator, &mut timed, 128, &device)?;
            graph.set_floats(0, to_model_input(&pixels, shape, &norm))?;
            graph.set_floats(1, targets)?;
            read_back(graph.step()?)?;
            Ok(timed.spent)
        })?;
        rows.push(replayed(row, graph.is_graph()));
    }

    // Where the MEKD step's time goes: its parts alone.
    let noise = |n: usize, device: &burn::tensor::Device| {
        Tensor::<2>::random([n, 10], burn::tensor::Distribution::Normal(0.0, 1.0), device)
    };
    rows.push(time_steps("  part: generator forward (b128)", config, 128, || {
        read_back(generator.forward(noise(128, &device)))?;
        Ok(Duration::ZERO)
    })?);
    // The MEKD loss's two generator computations alone: the forward pass over student and
    // teacher latents stacked (256), and the hand VJP over the student's 128 rows.
    rows.push(time_steps("  part: generator traced forward (b256)", config, 256, || {
        read_back(generator.forward_traced(noise(256, &plain)).images().clone())?;
        Ok(Duration::ZERO)
    })?);
    let trace = generator.forward_traced(noise(128, &plain));
    let images_grad = trace.images().clone().sign().div_scalar(128.0 * per_image as f64);
    rows.push(time_steps("  part: generator latent gradient (b128)", config, 128, || {
        read_back(generator.latent_grad(&trace, images_grad.clone()))?;
        Ok(Duration::ZERO)
    })?);
    // The loss's generator work, by the loss's own function (latents from the host, new every
    // step), without its autodiff side: compared with the loss below, it shows what the loss
    // adds to the generator passes.
    let mut rng = SplitMix64::new(3);
    rows.push(time_steps("  part: loss's generator work (fwd b256 + VJP b128)", config, 128, || {
        let z: Vec<f32> = (0..256 * 10).map(|_| rng.below(20_001) as f32 / 5_000.0 - 2.0).collect();
        let latents = Tensor::<2>::from_data(TensorData::new(z, [256, 10]), &plain);
        let (_, latent_grad) = crate::methods::mekd::image_term(&generator, latents, distill.distance);
        read_back(latent_grad)?;
        Ok(Duration::ZERO)
    })?);
    let logits = || Tensor::<2>::random([128, 10], burn::tensor::Distribution::Normal(0.0, 3.0), &device);
    rows.push(time_steps("  part: mekd loss, value only (b128)", config, 128, || {
        read_back(crate::methods::mekd::mekd_loss(&generator, logits().require_grad(), logits(), &distill).total)?;
        Ok(Duration::ZERO)
    })?);
    rows.push(time_steps("  part: mekd loss + its gradient (b128)", config, 128, || {
        let s = logits().require_grad();
        let loss = crate::methods::mekd::mekd_loss(&generator, s.clone(), logits(), &distill);
        read_back(s.grad(&loss.differentiable.backward()).context("no gradient for the logits")?)?;
        Ok(Duration::ZERO)
    })?);
    let synthetic = crate::methods::deprivatize::to_pixels(generator.forward(noise(128, &device)));
    rows.push(time_steps("  part: teacher forward (resnet32, b128)", config, 128, || {
        teacher.query(&synthetic)?;
        Ok(Duration::ZERO)
    })?);
    let kd = crate::methods::baselines::kd::KdObjective { tau: 5.0 };
    let kd_stepper = StudentStep { spec: &student_spec, objective: &kd, device: &device };
    let targets: Vec<f32> = teacher.query(&synthetic)?.targets(10);
    let mut student = student_spec.init(&device)?;
    let mut optim = Sgd::reference(1).optimizer();
    rows.push(time_steps("  part: student kd step, no generator", config, 128, || {
        let (next, loss, _) = kd_stepper.run(student.clone(), &mut optim, &synthetic, targets.clone(), 0.1);
        student = next;
        loss.into_scalar::<f32>();
        Ok(Duration::ZERO)
    })?);

    // 4. The same step against the teacher behind the HTTP API (ONNX Runtime on the CPU).
    if config.http {
        let dir = tempfile::tempdir()?;
        let onnx = dir.path().join("teacher.onnx");
        let metadata = mekd_models::export::ExportMetadata::symmetric(1);
        crate::export::export_verified(&teacher_model.valid(), &teacher_spec, &metadata, &onnx)
            .context("exporting the benchmark teacher")?;
        let keys = dir.path().join("keys.txt");
        std::fs::write(&keys, "bench-key\n")?;
        let mut serve = crate::teacher::server::ServeConfig::new(onnx, "127.0.0.1:0", ResponseMode::Soft, keys);
        serve.ort_library = config.ort_library.clone();
        serve.max_batch = 128;
        let server = crate::teacher::server::start(&serve).context("starting the loopback teacher (ONNX Runtime)")?;
        let mut http = HttpTeacher::connect(&server.url(), "bench-key", None)?;
        rows.push(mekd_step(&mut http, "mekd step, http teacher (loopback)")?);
        // As `mekd distill` runs it: the next batch's answers come on a thread during the step
        // (`teacher_ms` is then the query's own time, spent beside the step).
        let mut student = student_spec.init(&device)?;
        let mut optim = Sgd::reference(1).optimizer();
        let mut batch = fresh_batch(&generator, &mut http, 128, &device)?;
        rows.push(time_steps("mekd step, http teacher, overlapped", config, 128, || {
            let mut timed = Timed { inner: &mut http, spent: Duration::ZERO };
            let next = synthetic_pixels(&generator, 10, 128, &device);
            let (pixels, targets) = std::mem::take(&mut batch);
            let ((next_student, loss, _), answer) =
                while_querying(&mut timed, &next, || stepper.run(student.clone(), &mut optim, &pixels, targets, 0.1));
            student = next_student;
            batch = (next, answer?.targets(10));
            loss.into_scalar::<f32>();
            Ok(timed.spent)
        })?);
        server.shutdown()?;
    }
    Ok(rows)
}
