//! `mekd-edge bench`: load time, batch-1 latency percentiles, batched throughput, peak memory,
//! size, accuracy, and, against a teacher (HTTP API or local ONNX), accuracy, agreement and
//! round-trip time per query.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::data::Dataset;
use crate::data::preprocess::{Normalisation, to_model_input};
use crate::engine::{Engine, EngineError, argmax_rows};
use crate::teacher_client::{HttpClient, V2Options};

/// p50/p90/p99 and mean of a set of durations, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of `ms` (nearest rank).
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            samples: ms.len(),
        }
    }
}

/// The teacher to compare with.
#[derive(Clone, Debug)]
pub enum TeacherSource {
    /// A teacher over HTTP at `url` (the own API, or `v2+http://...` for the Open Inference
    /// Protocol), with `key`.
    Http {
        /// The teacher's URL.
        url: String,
        /// API key.
        key: String,
        /// How to read a v2 teacher.
        v2: V2Options,
        /// PEM certificate authorities to trust instead of the system's, for `https://`.
        ca_cert: Option<Vec<u8>>,
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
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { warmup: 20, iterations: 300, batch: 64, teacher_rtt_queries: 50 }
    }
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
    /// File size.
    pub model_bytes: u64,
    /// Stored float weights.
    pub params: u64,
    /// Parse + optimise + make runnable, batch 1 (ms).
    pub load_ms: f64,
    /// Batch-1 latency after warm-up.
    pub latency_ms: Percentiles,
    /// Images per second at `throughput_batch`.
    pub throughput_ips: f64,
    /// Batch size of the throughput run.
    pub throughput_batch: usize,
    /// Peak resident memory of the process (bytes; Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// Top-1 accuracy (percent).
    pub accuracy: f64,
    /// Images evaluated.
    pub images: usize,
    /// CPU features tract detected.
    pub isa: String,
    /// Matrix-multiply kernels tract picked (distinct).
    pub kernels: Vec<String>,
    /// Teacher figures, when a teacher was given.
    pub teacher: Option<TeacherReport>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The data.
    #[error(transparent)]
    Data(#[from] crate::DataError),
    /// The teacher.
    #[error("teacher: {0}")]
    Teacher(String),
    /// Something the user must supply.
    #[error("{0}")]
    Usage(String),
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The ISA tract detected and the distinct matmul kernels of a plan.
pub fn kernels(engine: &Engine) -> (String, Vec<String>) {
    let isa = tract_linalg::isa::native();
    let isa_text = format!("{} [{}]", isa.nickname(), isa.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
    let mut found: Vec<String> = Vec::new();
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
    (isa_text, found)
}

/// Normalisation to use: flags first, then the model's metadata.
pub fn resolve_norm(
    flag: Option<Normalisation>,
    meta: Option<&Normalisation>,
    model: &Path,
    channels: usize,
) -> Result<Normalisation, BenchError> {
    let norm = flag.or_else(|| meta.cloned()).ok_or_else(|| {
        BenchError::Usage(format!("{} carries no normalisation metadata: give --mean and --std", model.display()))
    })?;
    Ok(norm.for_channels(channels)?)
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
    let mut single = Engine::load(model, 1)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = single.info().clone();
    let [c, h, w] = info.input_shape;
    if h != w {
        return Err(BenchError::Usage(format!("model input {h}x{w} is not square")));
    }
    let norm = resolve_norm(norm, info.normalisation.as_ref(), model, c)?;
    let images = data.prepare(c, h)?;
    let input = to_model_input(&images.pixels, images.shape, &norm);
    let per_image = c * h * w;
    let n = images.len();

    for i in 0..options.warmup {
        single.run(&input[(i % n) * per_image..(i % n + 1) * per_image])?;
    }
    let mut times = Vec::with_capacity(options.iterations);
    for i in 0..options.iterations {
        let x = &input[(i % n) * per_image..(i % n + 1) * per_image];
        let t = Instant::now();
        single.run(x)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (isa, kernels) = kernels(&single);
    drop(single);

    let mut batched = Engine::load(model, options.batch)?;
    let t = Instant::now();
    let logits = batched.run_many(&input)?;
    let batched_s = t.elapsed().as_secs_f64();
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
        model_bytes: info.file_bytes,
        params: info.params,
        load_ms,
        latency_ms: Percentiles::of(times),
        throughput_ips: n as f64 / batched_s,
        throughput_batch: options.batch,
        peak_rss_bytes: peak_rss_bytes(),
        accuracy,
        images: n,
        isa,
        kernels,
        teacher,
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
        TeacherSource::Http { url, key, v2, ca_cert } => {
            let mut client = HttpClient::new(url, key).map_err(|e| teacher_error(&e))?.with_v2(v2.clone());
            if let Some(pem) = ca_cert {
                client = client.with_ca_cert(pem).map_err(|e| teacher_error(&e))?;
            }
            let info = client.info().map_err(|e| teacher_error(&e))?;
            let [c, h, w] = info.input_shape;
            if h != w {
                return Err(BenchError::Usage(format!("teacher input {h}x{w} is not square")));
            }
            let images = data.prepare(c, h)?;
            let per_image = c * h * w;
            let answer_labels = |r: crate::protocol::QueryResponse| -> Vec<usize> {
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
            let norm = resolve_norm(norm.clone(), info.normalisation.as_ref(), path, c)?;
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
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.samples), (50.0, 90.0, 99.0, 100));
        assert!((p.mean - 50.5).abs() < 1e-12);
        assert_eq!(Percentiles::of(vec![]).samples, 0);
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 1 << 20);
        }
    }
}
