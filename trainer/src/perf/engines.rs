//! tract (the board's engine) against ONNX Runtime on the same ONNX file and inputs
//! (`mekd bench-engines`): median and spread of the time per call, batch by batch.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use mekd_contract::Percentiles;
use mekd_runtime::engine::{Engine, inspect};
use serde::Serialize;

use crate::export::{Agreement, probe_batch};
use crate::onnxruntime::OrtClassifier;

/// One model at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct EngineRow {
    /// The model file.
    pub model: String,
    /// Batch size.
    pub batch: usize,
    /// tract time per call (ms).
    pub tract_ms: Percentiles,
    /// ONNX Runtime time per call (ms), one intra-op thread.
    pub ort_ms: Percentiles,
    /// tract median / ONNX Runtime median.
    pub ratio: f64,
    /// The two engines' outputs on the benchmark input.
    pub agreement: Agreement,
}

/// Time `iterations` calls of each engine per batch size, alternating engines in rounds so that
/// machine noise hits both alike.
pub fn compare(model: &Path, batches: &[usize], iterations: usize) -> Result<Vec<EngineRow>> {
    let (info, _) = inspect(model)?;
    let shape = info.input_shape;
    let mut rows = Vec::new();
    for &batch in batches {
        if batch == 0 {
            bail!("batch sizes must be at least 1");
        }
        let input = probe_batch(batch, shape, batch as u64);
        let mut tract = Engine::load(model, batch)?;
        let mut ort = OrtClassifier::open(model, None)?;
        let expected = ort.run(&input, shape)?;
        let agreement = Agreement::of(&expected, &tract.run(&input)?, tract.info().num_classes);
        for _ in 0..iterations.div_ceil(10) {
            tract.run(&input)?;
            ort.run(&input, shape)?;
        }
        let (mut t_times, mut o_times) = (Vec::new(), Vec::new());
        let round = 50.min(iterations.max(1));
        while t_times.len() < iterations {
            for _ in 0..round {
                let t = Instant::now();
                tract.run(&input)?;
                t_times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            for _ in 0..round {
                let t = Instant::now();
                ort.run(&input, shape)?;
                o_times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (tract_ms, ort_ms) = (Percentiles::of(t_times), Percentiles::of(o_times));
        rows.push(EngineRow {
            model: model.display().to_string(),
            batch,
            ratio: tract_ms.p50 / ort_ms.p50,
            tract_ms,
            ort_ms,
            agreement,
        });
    }
    Ok(rows)
}
