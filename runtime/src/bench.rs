//! `mekd-edge bench`: load time, batch-1 latency percentiles, batched throughput, peak memory,
//! size, accuracy, and, against a teacher (HTTP API or local ONNX), accuracy, agreement and
//! round-trip time per query.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::Instant;

use serde::Serialize;

use crate::data::Dataset;
use crate::engine::{Engine, EngineError, argmax_rows};
use crate::runner::{EngineKind, Runner, RunnerError};
use crate::teacher_client::HttpClient;
use mekd_contract::{Normalisation, Percentiles, to_model_input};

/// The teacher to compare with.
pub enum TeacherSource {
    /// A teacher over HTTP (the own API, or the Open Inference Protocol).
    Http {
        /// Where it is, for the report.
        url: String,
        /// Its client.
        client: Box<HttpClient>,
    },
    /// A local ONNX teacher run with tract.
    Onnx {
        /// The model file.
        path: PathBuf,
        /// Normalisation for a model without metadata.
        norm: Option<Normalisation>,
    },
}

/// How long to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Untimed runs before the latency measurement.
    pub warmup: usize,
    /// Timed batch-1 runs.
    pub iterations: usize,
    /// Batch size of the throughput measurement (and of the accuracy pass).
    pub batch: usize,
    /// Batch-1 teacher requests timed for the round-trip latency.
    pub teacher_rtt_queries: usize,
    /// The engine that runs the student.
    pub engine: EngineKind,
    /// Threads of the parallel throughput run (each its own state over one loaded model,
    /// batch 1, `iterations` runs each); 1: no parallel run.
    pub threads: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            warmup: 20,
            iterations: 300,
            batch: 64,
            teacher_rtt_queries: 50,
            engine: EngineKind::default(),
            threads: 1,
        }
    }
}

/// Batch-1 throughput over several cores: independent run states over one loaded model, one
/// per thread, all running at once.
#[derive(Clone, Debug, Serialize)]
pub struct ParallelReport {
    /// Threads, each with its own state.
    pub threads: usize,
    /// Batch-1 runs timed, all threads together.
    pub runs: usize,
    /// Images per second, all threads together: runs over the time from the first thread's
    /// start to the last thread's end (each thread's own clock, after a common barrier).
    pub throughput_ips: f64,
    /// Latency of each run while all threads run (ms).
    pub latency_ms: Percentiles,
}

/// The teacher's figures.
#[derive(Clone, Debug, Serialize)]
pub struct TeacherReport {
    /// Where the teacher is.
    pub source: String,
    /// Teacher top-1 accuracy on the same images (percent).
    pub accuracy: f64,
    /// Share of images where student and teacher agree on the top-1 class (percent).
    pub agreement: f64,
    /// Round trip of one single-image query (ms).
    pub rtt_ms: Percentiles,
    /// Queries spent by the benchmark.
    pub queries: u64,
}

/// Everything `mekd-edge bench` measures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The model file.
    pub model: String,
    /// Architecture from the metadata, if any.
    pub architecture: Option<String>,
    /// The engine that ran the student.
    pub engine: EngineKind,
    /// File size.
    pub model_bytes: u64,
    /// Stored float weights.
    pub params: u64,
    /// Parse + optimise + make runnable, batch 1 (ms).
    pub load_ms: f64,
    /// The same for the throughput run's batch size (ms).
    pub batch_load_ms: f64,
    /// Batch-1 latency after warm-up.
    pub latency_ms: Percentiles,
    /// Images per second at `throughput_batch`, over all images, after one untimed batch.
    pub throughput_ips: f64,
    /// Batch size of the throughput run.
    pub throughput_batch: usize,
    /// How the engine ran the throughput run's batches, where it chooses (tract: the faster
    /// of a whole-batch plan and one image at a time, timed at load).
    pub batch_execution: Option<String>,
    /// Batch-1 throughput over several threads, when asked for (`--threads N`, N > 1).
    pub parallel: Option<ParallelReport>,
    /// Peak resident memory of the process up to the end of the student's runs, before any
    /// teacher pass (bytes; Linux `VmHWM`): the engine, both plans and the prepared images.
    pub peak_rss_bytes: Option<u64>,
    /// Top-1 accuracy (percent).
    pub accuracy: f64,
    /// Images evaluated.
    pub images: usize,
    /// CPU features tract detected.
    pub isa: String,
    /// Kernels the plan runs (distinct): with tract, this project's direct convolutions, then
    /// the matrix-multiply kernels tract picked; with ONNX Runtime, its release and provider.
    pub kernels: Vec<String>,
    /// Teacher figures, when a teacher was given.
    pub teacher: Option<TeacherReport>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The model, read by tract.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model, in the engine that runs it.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The data.
    #[error(transparent)]
    Data(#[from] crate::DataError),
    /// The teacher.
    #[error("teacher: {0}")]
    Teacher(String),
    /// Something the user must supply.
    #[error("{0}")]
    Usage(String),
    /// The normalisation cannot apply to the model.
    #[error(transparent)]
    Normalisation(#[from] mekd_contract::NormalisationError),
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU and the features tract detected.
pub fn isa() -> String {
    let isa = tract_linalg::isa::native();
    format!("{} [{}]", isa.nickname(), isa.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "))
}

/// The distinct kernels of a tract plan: this project's direct convolutions, then tract's
/// matmul kernels.
pub fn kernels(engine: &Engine) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for node in engine.plan().model().nodes() {
        if let Some(conv) = node.op_as::<crate::direct_conv::DirectConv>() {
            let name = conv.kernel_name();
            if !found.contains(&name) {
                found.push(name);
            }
        }
    }
    for node in engine.plan().model().nodes() {
        if node.op.name() == "OptMatMul" {
            for line in node.op.info().unwrap_or_default() {
                for word in line.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                    if (word.contains("mmm") || word.contains("mmv")) && !found.iter().any(|k| k == word) {
                        found.push(word.to_string());
                    }
                }
            }
        }
    }
    found
}

/// Benchmark `model` on `data` (labeled, any size; converted to the model's input).
pub fn run(
    model: &Path,
    data: &Dataset,
    norm: Option<Normalisation>,
    options: &BenchOptions,
    teacher: Option<&TeacherSource>,
) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    let mut single = crate::runner::load(options.engine, model, 1)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = single.info().clone();
    let [c, h, w] = info.input_shape;
    if h != w {
        return Err(BenchError::Usage(format!("model input {h}x{w} is not square")));
    }
    let norm = Normalisation::choose(norm, info.normalisation.as_ref(), c, model)?;
    let images = data.prepare(c, h)?;
    let input = to_model_input(&images.pixels, images.shape, &norm);
    let per_image = c * h * w;
    let n = images.len();
    let image = |i: usize| &input[(i % n) * per_image..(i % n + 1) * per_image];

    for i in 0..options.warmup {
        single.run(image(i))?;
    }
    let mut times = Vec::with_capacity(options.iterations);
    for i in 0..options.iterations {
        let x = image(i);
        let t = Instant::now();
        single.run(x)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let kernels = single.kernels();
    let parallel = match options.threads {
        0 | 1 => None,
        threads => Some(run_parallel(single.as_ref(), &image, threads, options)?),
    };
    drop(single);

    let t = Instant::now();
    let mut batched = crate::runner::load(options.engine, model, options.batch)?;
    let batch_load_ms = t.elapsed().as_secs_f64() * 1e3;
    let batch_execution = batched.batch_execution().map(String::from);
    // One untimed batch first, as the latency runs have their warm-up.
    batched.run_many(&input[..per_image * n.min(options.batch)])?;
    let t = Instant::now();
    let logits = batched.run_many(&input)?;
    let batched_s = t.elapsed().as_secs_f64();
    drop(batched);
    // Before the teacher pass: a local teacher's engine is not the student's memory.
    let peak_rss = peak_rss_bytes();
    let predictions = argmax_rows(&logits, info.num_classes);
    let correct = images.correct(&predictions);
    let accuracy = 100.0 * correct as f64 / n as f64;

    let teacher = match teacher {
        None => None,
        Some(source) => Some(compare_teacher(source, data, &predictions, options)?),
    };
    Ok(BenchReport {
        model: model.display().to_string(),
        architecture: info.architecture.clone(),
        engine: options.engine,
        model_bytes: info.file_bytes,
        params: info.params,
        load_ms,
        batch_load_ms,
        latency_ms: Percentiles::of(times),
        throughput_ips: n as f64 / batched_s,
        throughput_batch: options.batch,
        batch_execution,
        parallel,
        peak_rss_bytes: peak_rss,
        accuracy,
        images: n,
        isa: isa(),
        kernels,
        teacher,
    })
}

/// `threads` forks of `runner`, each warmed up, then all started together on batch-1 runs
/// of `image(i)`, `options.iterations` each.
fn run_parallel<'a>(
    runner: &dyn Runner,
    image: &(dyn Fn(usize) -> &'a [f32] + Sync),
    threads: usize,
    options: &BenchOptions,
) -> Result<ParallelReport, BenchError> {
    let runners = (0..threads).map(|_| runner.fork()).collect::<Result<Vec<_>, _>>()?;
    let start = Barrier::new(threads + 1);
    let iterations = options.iterations;
    let per_thread = std::thread::scope(|scope| {
        let handles: Vec<_> = runners
            .into_iter()
            .enumerate()
            .map(|(t, mut runner)| {
                let start = &start;
                scope.spawn(move || {
                    let first = t * iterations;
                    let warmed = (0..options.warmup).try_for_each(|i| runner.run(image(first + i)).map(drop));
                    // Every thread reaches the barrier, failed or not, so that none waits forever.
                    start.wait();
                    warmed?;
                    // Each thread's own clock: the main thread may be scheduled late.
                    let began = Instant::now();
                    let mut times = Vec::with_capacity(iterations);
                    for i in 0..iterations {
                        let t = Instant::now();
                        runner.run(image(first + i))?;
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok::<_, RunnerError>((began, Instant::now(), times))
                })
            })
            .collect();
        start.wait();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    let mut times = Vec::with_capacity(threads * iterations);
    let (mut began, mut ended) = (None::<Instant>, None::<Instant>);
    for result in per_thread {
        let (start, end, thread_times) =
            result.map_err(|_| BenchError::Usage("a benchmark thread panicked".into()))?.map_err(BenchError::from)?;
        began = Some(began.map_or(start, |b| b.min(start)));
        ended = Some(ended.map_or(end, |e| e.max(end)));
        times.extend(thread_times);
    }
    let wall_s = match (began, ended) {
        (Some(b), Some(e)) => e.duration_since(b).as_secs_f64(),
        _ => 0.0,
    };
    Ok(ParallelReport {
        threads,
        runs: times.len(),
        throughput_ips: times.len() as f64 / wall_s.max(f64::MIN_POSITIVE),
        latency_ms: Percentiles::of(times),
    })
}

fn compare_teacher(
    source: &TeacherSource,
    data: &Dataset,
    student: &[usize],
    options: &BenchOptions,
) -> Result<TeacherReport, BenchError> {
    let teacher_error = |e: &dyn std::fmt::Display| BenchError::Teacher(e.to_string());
    let (labels, rtt, queries, name) = match source {
        TeacherSource::Http { url, client } => {
            let info = client.info().map_err(|e| teacher_error(&e))?;
            let [c, h, w] = info.input_shape;
            if h != w {
                return Err(BenchError::Usage(format!("teacher input {h}x{w} is not square")));
            }
            let images = data.prepare(c, h)?;
            let per_image = c * h * w;
            let answer_labels = |r: mekd_contract::protocol::QueryResponse| -> Vec<usize> {
                r.labels.unwrap_or_else(|| argmax_rows(&r.logits.unwrap_or_default(), info.num_classes))
            };
            let mut rtt = Vec::new();
            let mut labels = Vec::with_capacity(images.len());
            let timed = options.teacher_rtt_queries.min(images.len());
            for i in 0..timed {
                let t = Instant::now();
                let (answer, _) = client
                    .query(&images.pixels[i * per_image..(i + 1) * per_image], None)
                    .map_err(|e| teacher_error(&e))?;
                rtt.push(t.elapsed().as_secs_f64() * 1e3);
                labels.extend(answer_labels(answer));
            }
            let step = info.max_batch.clamp(1, 256);
            for chunk in images.pixels[timed * per_image..].chunks(step * per_image) {
                let (answer, _) = client.query(chunk, None).map_err(|e| teacher_error(&e))?;
                labels.extend(answer_labels(answer));
            }
            (labels, rtt, images.len() as u64, url.clone())
        }
        TeacherSource::Onnx { path, norm } => {
            let mut engine = Engine::load(path, 1)?;
            let info = engine.info().clone();
            let [c, h, _] = info.input_shape;
            let norm = Normalisation::choose(norm.clone(), info.normalisation.as_ref(), c, path)?;
            let images = data.prepare(c, h)?;
            let input = to_model_input(&images.pixels, images.shape, &norm);
            let per_image = input.len() / images.len();
            let mut rtt = Vec::new();
            let mut labels = Vec::with_capacity(images.len());
            for x in input.chunks(per_image) {
                let t = Instant::now();
                let logits = engine.run(x)?;
                rtt.push(t.elapsed().as_secs_f64() * 1e3);
                labels.extend(argmax_rows(&logits, info.num_classes));
            }
            (labels, rtt, images.len() as u64, path.display().to_string())
        }
    };
    let n = labels.len().max(1) as f64;
    let correct = data.correct(&labels);
    let agree = labels.iter().zip(student).filter(|(a, b)| a == b).count();
    Ok(TeacherReport {
        source: name,
        accuracy: 100.0 * correct as f64 / n,
        agreement: 100.0 * agree as f64 / n,
        rtt_ms: Percentiles::of(rtt),
        queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 1 << 20);
        }
    }
}
