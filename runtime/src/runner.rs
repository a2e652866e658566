//! Which engine runs the student in `mekd-edge bench`: tract (the default: pure Rust, every
//! target, this project's direct convolutions) or ONNX Runtime (feature `ort`, aarch64 and
//! x86-64: the engine a deployer would otherwise pick, timed on the same board and file).

use std::path::Path;

use crate::engine::{Engine, EngineError, ModelInfo, run_in_batches};

/// The engine that runs the student.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract, with this project's direct convolutions where they apply.
    #[default]
    Tract,
    /// ONNX Runtime's CPU provider, one intra-op thread per session, the shared library loaded
    /// at run time (this binary's feature `ort`; the library from the PyPI `onnxruntime`
    /// wheel, or `ORT_DYLIB_PATH`).
    Ort,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tract => "tract",
            Self::Ort => "ort",
        })
    }
}

/// Why a runner cannot be made or run.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// tract, or a model tract's reader refuses.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// ONNX Runtime.
    #[cfg(feature = "ort")]
    #[error(transparent)]
    Ort(#[from] crate::onnxruntime::OrtError),
    /// `--engine ort` in a binary built without it.
    #[error(
        "this mekd-edge was built without ONNX Runtime: rebuild it with `--features ort` \
         (aarch64 and x86-64; PyPI has no 32-bit ARM onnxruntime wheel)"
    )]
    OrtNotBuilt,
}

/// A student loaded by one engine for one batch size, with its own run state.
pub trait Runner: Send {
    /// What the model file says about itself, the class count resolved.
    fn info(&self) -> &ModelInfo;

    /// The batch size it runs.
    fn batch(&self) -> usize;

    /// Logits for exactly one batch.
    fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, RunnerError>;

    /// Another runner of the same model and batch with a state of its own, for another thread.
    fn fork(&self) -> Result<Box<dyn Runner>, RunnerError>;

    /// The kernels it runs, as far as the engine says.
    fn kernels(&self) -> Vec<String>;

    /// How a batch runs, where the engine chooses: "whole batch" or "one image at a time".
    fn batch_execution(&self) -> Option<&'static str> {
        None
    }

    /// Logits for any number of images: whole batches, the last one zero-padded.
    fn run_many(&mut self, input: &[f32]) -> Result<Vec<f32>, RunnerError> {
        let (batch, classes) = (self.batch(), self.info().num_classes);
        let per_image = self.info().input_shape.iter().product();
        run_in_batches(input, batch, per_image, classes, |chunk| self.run(chunk))
    }
}

/// Load `model` with `kind` for `batch` images per run.
pub fn load(kind: EngineKind, model: &Path, batch: usize) -> Result<Box<dyn Runner>, RunnerError> {
    match kind {
        EngineKind::Tract => Ok(Box::new(Engine::load(model, batch)?)),
        #[cfg(feature = "ort")]
        EngineKind::Ort => Ok(Box::new(OrtRunner::open(model, batch)?)),
        #[cfg(not(feature = "ort"))]
        EngineKind::Ort => Err(RunnerError::OrtNotBuilt),
    }
}

impl Runner for Engine {
    fn info(&self) -> &ModelInfo {
        Engine::info(self)
    }

    fn batch(&self) -> usize {
        Engine::batch(self)
    }

    fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, RunnerError> {
        Ok(Engine::run(self, input)?)
    }

    fn fork(&self) -> Result<Box<dyn Runner>, RunnerError> {
        Ok(Box::new(Engine::fork(self)?))
    }

    fn kernels(&self) -> Vec<String> {
        crate::bench::kernels(self)
    }

    fn batch_execution(&self) -> Option<&'static str> {
        Some(if self.per_image() { "one image at a time" } else { "whole batch" })
    }
}

/// A student run by ONNX Runtime: one session, batch fixed by this runner (the session takes
/// any), the input checked as tract's engine checks it.
#[cfg(feature = "ort")]
struct OrtRunner {
    session: crate::onnxruntime::OrtClassifier,
    info: ModelInfo,
    batch: usize,
    path: std::path::PathBuf,
}

#[cfg(feature = "ort")]
impl OrtRunner {
    fn open(path: &Path, batch: usize) -> Result<Self, RunnerError> {
        let (session, info) = crate::onnxruntime::OrtClassifier::open_classifier(path, None)?;
        info.check_batch(batch)?;
        Ok(Self { session, info, batch, path: path.to_path_buf() })
    }
}

#[cfg(feature = "ort")]
impl Runner for OrtRunner {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn batch(&self) -> usize {
        self.batch
    }

    fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, RunnerError> {
        self.info.check_input(self.batch, input)?;
        Ok(self.session.run(input, self.info.input_shape)?)
    }

    fn fork(&self) -> Result<Box<dyn Runner>, RunnerError> {
        Ok(Box::new(Self::open(&self.path, self.batch)?))
    }

    fn kernels(&self) -> Vec<String> {
        let library = crate::onnxruntime::loaded_library().and_then(Path::file_name);
        vec![format!("onnxruntime CPU provider ({})", library.unwrap_or_default().to_string_lossy())]
    }
}
