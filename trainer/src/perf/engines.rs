//! tract (the board's engine; with this project's direct convolutions and with its own) against
//! ONNX Runtime on the same ONNX file and inputs (`mekd bench-engines`): median and spread of the
//! time per call, batch by batch.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use mekd_contract::Percentiles;
use mekd_runtime::engine::{ConvKernels, Engine, inspect};
use serde::Serialize;

use crate::export::{Agreement, probe_batch};
use mekd_runtime::onnxruntime::OrtClassifier;

/// One model at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct EngineRow {
    /// The model file.
    pub model: String,
    /// Batch size.
    pub batch: usize,
    /// tract with this project's direct convolutions (the runtime's default), time per call (ms).
    pub tract_ms: Percentiles,
    /// tract with its own convolutions (im2col and matrix products), time per call (ms).
    pub tract_im2col_ms: Percentiles,
    /// ONNX Runtime time per call (ms), one intra-op thread.
    pub ort_ms: Percentiles,
    /// tract median / ONNX Runtime median.
    pub ratio: f64,
    /// tract's outputs (direct convolutions) against ONNX Runtime's on the benchmark input.
    pub agreement: Agreement,
    /// The convolutions the direct kernel ran, with the kernel chosen.
    pub direct_convs: Vec<String>,
    /// Whether tract (direct convolutions) ran the batch one image at a time, the faster way
    /// at load time ([`mekd_runtime::Engine::per_image`]).
    pub tract_per_image: bool,
}

/// One engine's inference on the benchmark input.
type Call<'a> = dyn FnMut() -> Result<()> + 'a;

/// Time `iterations` calls of each engine per batch size, rotating the engines in rounds so that
/// machine noise hits all alike.
pub fn compare(model: &Path, batches: &[usize], iterations: usize) -> Result<Vec<EngineRow>> {
    let (info, _) = inspect(model)?;
    let shape = info.input_shape;
    let mut rows = Vec::new();
    for &batch in batches {
        if batch == 0 {
            bail!("batch sizes must be at least 1");
        }
        let input = probe_batch(batch, shape, batch as u64);
        let mut direct = Engine::load_with(model, batch, ConvKernels::Direct)?;
        let mut im2col = Engine::load_with(model, batch, ConvKernels::Tract)?;
        let mut ort = OrtClassifier::open(model, None)?;
        let expected = ort.run(&input, shape)?;
        let agreement = Agreement::of(&expected, &direct.run(&input)?, direct.info().num_classes);
        let mut calls: [(&mut Call, Vec<f64>); 3] = [
            (&mut || direct.run(&input).map(drop).map_err(Into::into), Vec::new()),
            (&mut || im2col.run(&input).map(drop).map_err(Into::into), Vec::new()),
            (&mut || ort.run(&input, shape).map(drop).map_err(Into::into), Vec::new()),
        ];
        for (call, _) in calls.iter_mut() {
            for _ in 0..iterations.div_ceil(10) {
                call()?;
            }
        }
        let round = 50.min(iterations.max(1));
        while calls[0].1.len() < iterations {
            for (call, times) in calls.iter_mut() {
                for _ in 0..round {
                    let t = Instant::now();
                    call()?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let [tract_ms, tract_im2col_ms, ort_ms] = calls.map(|(_, times)| Percentiles::of(times));
        rows.push(EngineRow {
            model: model.display().to_string(),
            batch,
            ratio: tract_ms.p50 / ort_ms.p50,
            tract_ms,
            tract_im2col_ms,
            ort_ms,
            agreement,
            direct_convs: direct.direct_convs(),
            tract_per_image: direct.per_image(),
        });
    }
    Ok(rows)
}
