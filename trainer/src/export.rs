//! Export a zoo classifier to ONNX and prove the file right with the engine the board uses.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use mekd_models::export::{ExportMetadata, export_classifier, host_copy};
use mekd_models::{Classifier, ClassifierSpec};
use mekd_runtime::engine::{Engine, argmax_rows};
use mekd_runtime::rng::SplitMix64;

/// Tolerance of every engine comparison: |a - b| <= TOLERANCE * (1 + |b|).
pub const TOLERANCE: f32 = 1e-4;

/// How two sets of logits compare.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Agreement {
    /// Largest |a - b|.
    pub max_abs_diff: f32,
    /// Whether every value is within [`TOLERANCE`].
    pub within_tolerance: bool,
    /// Whether every row has the same argmax.
    pub same_argmax: bool,
}

impl Agreement {
    /// Compare `actual` against the reference `expected`, rows of `k` logits.
    pub fn of(expected: &[f32], actual: &[f32], k: usize) -> Self {
        if expected.len() != actual.len() {
            return Self { max_abs_diff: f32::INFINITY, within_tolerance: false, same_argmax: false };
        }
        let mut max_abs_diff = 0f32;
        let mut within_tolerance = true;
        for (&b, &a) in expected.iter().zip(actual) {
            let d = (a - b).abs();
            max_abs_diff = max_abs_diff.max(d);
            within_tolerance &= d <= TOLERANCE * (1.0 + b.abs());
        }
        let same_argmax = argmax_rows(expected, k) == argmax_rows(actual, k);
        Self { max_abs_diff, within_tolerance, same_argmax }
    }

    /// Both criteria hold.
    pub fn ok(&self) -> bool {
        self.within_tolerance && self.same_argmax
    }
}

/// What the export check measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportCheck {
    /// Size of the ONNX file in bytes.
    pub bytes: usize,
    /// Images in the probe batch.
    pub probe_images: usize,
    /// burn versus tract on the probe batch.
    pub agreement: Agreement,
}

/// Why an export was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExportFailure {
    /// The exporter failed.
    #[error(transparent)]
    Model(#[from] mekd_models::ModelError),
    /// tract could not load the written file.
    #[error("the exported file does not load in tract: {0}")]
    Engine(#[from] mekd_runtime::EngineError),
    /// Writing the file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// tract disagrees with burn beyond the tolerance.
    #[error("tract disagrees with burn on the exported model: {0:?}")]
    Mismatch(Agreement),
}

/// A seeded batch of `n` images with values uniform in [-1, 1].
pub fn probe_batch(n: usize, shape: [usize; 3], seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n * shape.iter().product::<usize>()).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
}

/// Logits of the burn model (in inference mode) for `images` of `shape`.
pub fn burn_logits(model: &Classifier, images: &[f32], shape: [usize; 3]) -> Vec<f32> {
    let [c, h, w] = shape;
    let n = images.len() / (c * h * w);
    let model = model.valid();
    let device = model.devices().into_iter().next().unwrap_or_default();
    let input = Tensor::<4>::from_data(TensorData::new(images.to_vec(), [n, c, h, w]), &device);
    model.forward(input).into_data().try_to_vec::<f32>().expect("logits are f32")
}

/// Export `model` to `path`, then load the file in tract and check that its logits on a seeded
/// probe batch equal burn's (on the exporter's CPU copy) within [`TOLERANCE`] with the same argmax. The file appears at
/// `path` only once it passed (written next to it first, then renamed).
pub fn export_verified(
    model: &Classifier,
    spec: &ClassifierSpec,
    metadata: &ExportMetadata,
    path: &Path,
) -> Result<ExportCheck, ExportFailure> {
    let probe_images = 4;
    let shape = spec.image_shape();
    let probe = probe_batch(probe_images, shape, 0x5eed);
    // burn's own answer on the CPU copy the exporter writes out: a GPU trained in TF32 would
    // differ from tract by its rounding, not by an export fault.
    let expected = burn_logits(&host_copy(model, spec)?, &probe, shape);
    let bytes = export_classifier(model, spec, metadata)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unverified = path.with_file_name(format!(".{name}.unverified"));
    mekd_runtime::fsutil::write_atomic(&unverified, &bytes)
        .map_err(|source| ExportFailure::Write { path: unverified.clone(), source })?;
    let verdict = Engine::load(&unverified, probe_images)
        .and_then(|mut engine| engine.run(&probe))
        .map_err(ExportFailure::from)
        .and_then(|actual| {
            let agreement = Agreement::of(&expected, &actual, spec.num_classes);
            if agreement.ok() { Ok(agreement) } else { Err(ExportFailure::Mismatch(agreement)) }
        });
    match verdict {
        Ok(agreement) => {
            std::fs::rename(&unverified, path)
                .map_err(|source| ExportFailure::Write { path: path.to_path_buf(), source })?;
            Ok(ExportCheck { bytes: bytes.len(), probe_images, agreement })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&unverified);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_tolerance_is_relative() {
        let a = Agreement::of(&[100.0, 1.0], &[100.009, 1.0], 2);
        assert!(a.within_tolerance && a.same_argmax);
        let b = Agreement::of(&[1.0, 0.0], &[1.001, 0.0], 2);
        assert!(!b.within_tolerance);
        let c = Agreement::of(&[1.0, 0.0], &[0.0, 1.0], 2);
        assert!(!c.same_argmax);
    }
}
