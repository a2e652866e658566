//! ONNX classifier inference with tract: load, read metadata, pin the batch size, optimise once,
//! and run many times on one reusable state.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use mekd_contract::Normalisation;
use mekd_contract::metadata as keys;

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file could not be read or is not ONNX.
    #[error("cannot read ONNX model {path}: {reason}")]
    Parse {
        /// The model file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The graph is not an image classifier `[N, C, H, W] -> [N, classes]`.
    #[error("{path} is not an image classifier this runtime can run: {reason}")]
    NotAClassifier {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// tract could not type or optimise the graph (e.g. an unsupported operator).
    #[error("tract cannot prepare {path}: {reason}")]
    Unsupported {
        /// The model file.
        path: PathBuf,
        /// tract's error chain.
        reason: String,
    },
    /// The input given to [`Engine::run`] does not match the model.
    #[error("input has {actual} values, the model needs {expected} ({detail})")]
    InputSize {
        /// Values given.
        actual: usize,
        /// Values needed.
        expected: usize,
        /// The shape in words.
        detail: String,
    },
    /// Inference failed.
    #[error("inference failed: {0}")]
    Run(String),
}

/// What a classifier file says about itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// The model file.
    pub path: PathBuf,
    /// Name of the image input.
    pub input_name: String,
    /// `[C, H, W]` of one image.
    pub input_shape: [usize; 3],
    /// Batch size fixed in the file, if any (`None`: dynamic).
    pub fixed_batch: Option<usize>,
    /// Number of classes.
    pub num_classes: usize,
    /// Zoo architecture, when exported by this project.
    pub architecture: Option<String>,
    /// Normalisation from the metadata, when present.
    pub normalisation: Option<Normalisation>,
    /// Class names from the metadata, when present.
    pub class_names: Option<Vec<String>>,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Number of stored float weights (elements of all float initializers, including
    /// BatchNorm running statistics).
    pub params: u64,
}

impl ModelInfo {
    /// Whether the model can run `batch` images at a time: at least one, and the batch size
    /// fixed in the file, if it fixes one.
    pub fn check_batch(&self, batch: usize) -> Result<(), EngineError> {
        let refuse = |reason: String| Err(EngineError::NotAClassifier { path: self.path.clone(), reason });
        if batch == 0 {
            return refuse("batch size must be at least 1".into());
        }
        match self.fixed_batch.filter(|&f| f != batch) {
            Some(fixed) => refuse(format!("its batch size is fixed to {fixed} in the file; cannot run batch {batch}")),
            None => Ok(()),
        }
    }

    /// Whether `input` holds exactly `batch` images of the model's input shape.
    pub fn check_input(&self, batch: usize, input: &[f32]) -> Result<(), EngineError> {
        let [c, h, w] = self.input_shape;
        let expected = batch * c * h * w;
        if input.len() == expected {
            return Ok(());
        }
        Err(EngineError::InputSize { actual: input.len(), expected, detail: format!("[{batch}, {c}, {h}, {w}]") })
    }
}

fn parse_floats(text: &str) -> Option<Vec<f32>> {
    text.split(',').map(|v| v.trim().parse::<f32>().ok()).collect()
}

/// Static dims of a value's tensor type (`None` for symbolic dims), or why there are none.
fn dims_of(value: &pb::ValueInfoProto) -> Result<Vec<Option<usize>>, String> {
    let Some(pb::type_proto::Value::TensorType(t)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(format!("`{}` is not a tensor", value.name));
    };
    if t.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(format!("`{}` has element type {} (need float32)", value.name, t.elem_type));
    }
    let shape = t.shape.as_ref().ok_or_else(|| format!("`{}` has no shape", value.name))?;
    Ok(shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
            _ => None,
        })
        .collect())
}

/// Read a model's interface and metadata without preparing it for inference.
pub fn inspect(path: &Path) -> Result<(ModelInfo, pb::ModelProto), EngineError> {
    let file_bytes =
        std::fs::metadata(path).map_err(|e| EngineError::Parse { path: path.into(), reason: e.to_string() })?.len();
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| EngineError::Parse { path: path.into(), reason: format!("{e:#}") })?;
    let not_classifier = |reason: String| EngineError::NotAClassifier { path: path.into(), reason };
    let graph = proto.graph.as_ref().ok_or_else(|| not_classifier("the file has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> =
        graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).collect();
    let [input] = inputs[..] else {
        return Err(not_classifier(format!(
            "it has {} inputs, a classifier has exactly one image input",
            inputs.len()
        )));
    };
    let dims = dims_of(input).map_err(not_classifier)?;
    let [batch, Some(c), Some(h), Some(w)] = dims[..] else {
        return Err(not_classifier(format!(
            "input `{}` has shape {dims:?}; need rank 4 [N, C, H, W] with static C, H, W",
            input.name
        )));
    };
    if graph.output.len() != 1 {
        return Err(not_classifier(format!("it has {} outputs, need one logits output", graph.output.len())));
    }
    let out_dims = dims_of(&graph.output[0]).unwrap_or_default();
    let meta: std::collections::HashMap<&str, &str> =
        proto.metadata_props.iter().map(|p| (p.key.as_str(), p.value.as_str())).collect();
    let meta_classes = meta.get(keys::NUM_CLASSES).and_then(|v| v.parse::<usize>().ok());
    let num_classes = match (out_dims.as_slice(), meta_classes) {
        ([_, Some(k)], _) => *k,
        (_, Some(k)) => k,
        (dims, None) if dims.len() != 2 && !dims.is_empty() => {
            return Err(not_classifier(format!("output has rank {} (need [N, classes])", dims.len())));
        }
        _ => 0, // resolved from the typed model when loading
    };
    let normalisation =
        match (meta.get(keys::MEAN).and_then(|m| parse_floats(m)), meta.get(keys::STD).and_then(|s| parse_floats(s))) {
            (Some(mean), Some(std)) => Some(Normalisation { mean, std }),
            _ => None,
        };
    // Dimensions come from the file: a crafted one overflows their product (found by fuzzing).
    let params = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
        .map(|t| t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?)))
        .try_fold(0u64, |sum, n| sum.checked_add(n?))
        .ok_or_else(|| not_classifier("an initializer's dimensions are negative or overflow".into()))?;
    let info = ModelInfo {
        path: path.into(),
        input_name: input.name.clone(),
        input_shape: [c, h, w],
        fixed_batch: batch,
        num_classes,
        architecture: meta.get(keys::ARCHITECTURE).map(|s| s.to_string()),
        normalisation,
        class_names: meta.get(keys::CLASS_NAMES).map(|s| s.split(',').map(String::from).collect()),
        file_bytes,
        params,
    };
    Ok((info, proto))
}

/// Run `work` (tract on a model), turning a panic inside tract into the error `on_panic` makes
/// of its message. (Only where panics unwind: the size-optimised `release-edge` profile aborts.)
fn guard<T>(
    work: impl FnOnce() -> Result<T, EngineError>,
    on_panic: impl FnOnce(String) -> EngineError,
) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(on_panic(message))
    })
}

/// The error of a tract panic while preparing the graph of `path`.
fn malformed(path: &Path) -> impl FnOnce(String) -> EngineError + '_ {
    move |message| EngineError::Unsupported {
        path: path.into(),
        reason: format!("tract failed on the graph ({message}); the file is malformed"),
    }
}

/// Which code runs the convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvKernels {
    /// This project's direct convolution ([`mekd_kernels::Conv2d`]) wherever it covers the
    /// shape, tract's own elsewhere.
    #[default]
    Direct,
    /// tract's own lowering (im2col and matrix products) everywhere.
    Tract,
}

/// Parse, type, declutter, swap in the direct convolutions, and optimise `proto` for `batch`
/// images; check that it outputs `[batch, classes]` (the classes agreeing with `info`'s, if
/// known) and return the optimised model and the class count.
fn compile(
    path: &Path,
    proto: &pb::ModelProto,
    info: &ModelInfo,
    batch: usize,
    kernels: ConvKernels,
) -> Result<(TypedModel, usize), EngineError> {
    let unsupported = |e: TractError| EngineError::Unsupported { path: path.into(), reason: format!("{e:#}") };
    let [c, h, w] = info.input_shape;
    // tract indexes some malformed graphs without checking (an output naming no node,
    // padding lists shorter than the kernel's rank: found by fuzzing); its panic becomes this
    // file's error.
    let model = guard(
        || {
            let mut model = tract_onnx::onnx()
                .model_for_proto_model(proto)
                .map_err(unsupported)?
                .with_input_fact(0, f32::fact([batch, c, h, w]).into())
                .map_err(unsupported)?
                .into_typed()
                .map_err(unsupported)?
                .into_decluttered()
                .map_err(unsupported)?;
            if kernels == ConvKernels::Direct {
                crate::direct_conv::replace_convolutions(&mut model).map_err(unsupported)?;
            }
            model.into_optimized().map_err(unsupported)
        },
        malformed(path),
    )?;
    let out_fact = model.output_fact(0).map_err(unsupported)?.clone();
    let out_shape: Option<Vec<usize>> = out_fact.shape.as_concrete().map(|s| s.to_vec());
    match out_shape.as_deref() {
        Some([n, k]) if *n == batch && *k >= 2 => {
            if info.num_classes != 0 && info.num_classes != *k {
                return Err(EngineError::NotAClassifier {
                    path: path.into(),
                    reason: format!("metadata says {} classes, the graph outputs {k}", info.num_classes),
                });
            }
            Ok((model, *k))
        }
        other => Err(EngineError::NotAClassifier {
            path: path.into(),
            reason: format!("output shape for batch {batch} is {other:?}, need [{batch}, classes]"),
        }),
    }
}

/// A classifier prepared by tract for one batch size, with a reusable run state.
pub struct Engine {
    info: ModelInfo,
    batch: usize,
    /// The plan: of batch `batch`, or of batch 1 when `per_image`.
    plan: Arc<TypedSimplePlan>,
    state: TypedSimpleState,
    /// Run a batch one image at a time.
    per_image: bool,
}

impl Engine {
    /// Load `path`, pin its batch axis to `batch`, optimise, and make it runnable, with the
    /// default convolution kernels.
    pub fn load(path: &Path, batch: usize) -> Result<Self, EngineError> {
        Self::load_with(path, batch, ConvKernels::default())
    }

    /// [`Engine::load`] with a choice of convolution kernels. With the direct ones and a batch
    /// above 1, the batch is run either by a plan of that batch or one image at a time by a
    /// plan of batch 1, whichever ran one batch of zeros faster here at load time
    /// ([`Engine::per_image`]).
    pub fn load_with(path: &Path, batch: usize, kernels: ConvKernels) -> Result<Self, EngineError> {
        Self::load_as(path, batch, kernels, None)
    }

    /// [`Engine::load`] that always runs a batch one image at a time through a plan of batch 1
    /// (to compare the two ways; [`Engine::load`] picks the faster).
    pub fn load_per_image(path: &Path, batch: usize) -> Result<Self, EngineError> {
        Self::load_as(path, batch, ConvKernels::Direct, Some(true))
    }

    /// Load with `per_image` forced, or (`None`) chosen as [`Engine::load_with`] says.
    fn load_as(path: &Path, batch: usize, kernels: ConvKernels, per_image: Option<bool>) -> Result<Self, EngineError> {
        keep_activation_memory();
        let (mut info, proto) = inspect(path)?;
        info.check_batch(batch)?;
        if per_image == Some(true) && batch > 1 {
            let (plan, classes) = compile(path, &proto, &info, 1, kernels)?;
            info.num_classes = classes;
            return Self::with_plan(path, info, batch, plan, true);
        }
        let (plan, classes) = compile(path, &proto, &info, batch, kernels)?;
        info.num_classes = classes;
        let mut batched = Self::with_plan(path, info.clone(), batch, plan, false)?;
        if batch == 1 || kernels != ConvKernels::Direct || info.fixed_batch.is_some() || per_image.is_some() {
            return Ok(batched);
        }
        // With the direct kernels, one image at a time through the batch-1 plan is often faster
        // than the batch plan (its activations stay in the cache): time both, keep the faster.
        let Ok((plan, _)) = compile(path, &proto, &info, 1, kernels) else { return Ok(batched) };
        let mut per_image = Self::with_plan(path, info, batch, plan, true)?;
        Ok(if per_image.time_one_batch()? < batched.time_one_batch()? { per_image } else { batched })
    }

    /// An engine around a compiled plan (of batch 1 when `per_image`).
    fn with_plan(
        path: &Path,
        info: ModelInfo,
        batch: usize,
        plan: TypedModel,
        per_image: bool,
    ) -> Result<Self, EngineError> {
        let unsupported = |e: TractError| EngineError::Unsupported { path: path.into(), reason: format!("{e:#}") };
        let (plan, state) = guard(
            || {
                let plan = plan.into_runnable().map_err(unsupported)?;
                let state = plan.spawn().map_err(unsupported)?;
                Ok((plan, state))
            },
            malformed(path),
        )?;
        Ok(Self { info, batch, plan, state, per_image })
    }

    /// The best of two timed runs of one batch of zeros, after one untimed.
    fn time_one_batch(&mut self) -> Result<std::time::Duration, EngineError> {
        let zeros = vec![0f32; self.batch * self.image_len()];
        self.run(&zeros)?;
        let mut best = std::time::Duration::MAX;
        for _ in 0..2 {
            let started = std::time::Instant::now();
            self.run(&zeros)?;
            best = best.min(started.elapsed());
        }
        Ok(best)
    }

    /// Whether a batch runs one image at a time through a batch-1 plan (chosen at load time
    /// as the faster way; see [`Engine::load_with`]).
    pub fn per_image(&self) -> bool {
        self.per_image
    }

    /// What the model file says about itself.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The pinned batch size.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The optimised tract plan (for introspection, e.g. the kernels chosen).
    pub fn plan(&self) -> &Arc<TypedSimplePlan> {
        &self.plan
    }

    /// The convolutions this project's kernel runs, each with its kernel and shape.
    pub fn direct_convs(&self) -> Vec<String> {
        crate::direct_conv::direct_convs(self.plan.model())
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.info.input_shape.iter().product()
    }

    /// Logits for exactly one batch (`batch * C * H * W` values), `batch * classes` values out.
    pub fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, EngineError> {
        self.info.check_input(self.batch, input)?;
        if !self.per_image {
            return self.run_plan(input, self.batch);
        }
        let mut logits = Vec::with_capacity(self.batch * self.info.num_classes);
        for image in input.chunks_exact(self.image_len()) {
            logits.extend(self.run_plan(image, 1)?);
        }
        Ok(logits)
    }

    /// The plan on `images` images (its batch size).
    fn run_plan(&mut self, input: &[f32], images: usize) -> Result<Vec<f32>, EngineError> {
        let [c, h, w] = self.info.input_shape;
        let run_error = |e: TractError| EngineError::Run(format!("{e:#}"));
        let tensor = Tensor::from_shape(&[images, c, h, w], input).map_err(run_error)?;
        let state = &mut self.state;
        let outputs = guard(
            || state.run(tvec!(tensor.into_tvalue())).map_err(run_error),
            |message| EngineError::Run(format!("tract failed ({message})")),
        )?;
        let logits = outputs[0].to_plain_array_view::<f32>().map_err(run_error)?.iter().copied().collect();
        Ok(logits)
    }

    /// Logits for any number of images: runs full batches and zero-pads the last one.
    pub fn run_many(&mut self, input: &[f32]) -> Result<Vec<f32>, EngineError> {
        let (batch, per_image, classes) = (self.batch, self.image_len(), self.info.num_classes);
        run_in_batches(input, batch, per_image, classes, |chunk| self.run(chunk))
    }

    /// Another run state over the same optimised plan (nothing is parsed or optimised again),
    /// for another thread: `mekd-edge bench --threads N` runs N of them.
    pub fn fork(&self) -> Result<Self, EngineError> {
        let state = self.plan.spawn().map_err(|e| EngineError::Run(format!("{e:#}")))?;
        Ok(Self {
            info: self.info.clone(),
            batch: self.batch,
            plan: self.plan.clone(),
            state,
            per_image: self.per_image,
        })
    }
}

/// Logits of `classes` values for each image of `input` (`per_image` values each), by `run` on
/// whole batches of `batch` images: the last one is zero-padded and its padding's logits dropped.
pub(crate) fn run_in_batches<E: From<EngineError>>(
    input: &[f32],
    batch: usize,
    per_image: usize,
    classes: usize,
    mut run: impl FnMut(&[f32]) -> Result<Vec<f32>, E>,
) -> Result<Vec<f32>, E> {
    if !input.len().is_multiple_of(per_image) {
        return Err(EngineError::InputSize {
            actual: input.len(),
            expected: per_image,
            detail: "a multiple of one image".into(),
        }
        .into());
    }
    let n = input.len() / per_image;
    let mut out = Vec::with_capacity(n * classes);
    let mut padded = vec![0f32; batch * per_image];
    for chunk in input.chunks(batch * per_image) {
        let images = chunk.len() / per_image;
        let logits = if images == batch {
            run(chunk)?
        } else {
            padded[..chunk.len()].copy_from_slice(chunk);
            padded[chunk.len()..].fill(0.0);
            run(&padded)?
        };
        out.extend_from_slice(&logits[..images * classes]);
    }
    Ok(out)
}

/// Index of the largest value of each row of `k` logits.
pub fn argmax_rows(logits: &[f32], k: usize) -> Vec<usize> {
    logits
        .chunks_exact(k)
        .map(|row| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }))
        .collect()
}

/// Keep freed activations' memory in the process (glibc): every inference allocates its
/// activations afresh and frees them, and glibc maps a block above its threshold (128 KiB at
/// first) anew each time, so the kernel zeroes fresh pages on every inference (`clear_page`
/// among the top entries of MobileNet's profile at batch 1 without this). Raises the mmap and trim
/// thresholds to 64 and 128 MiB, once per process; elsewhere a no-op (ONNX Runtime keeps its
/// own arena for the same reason).
fn keep_activation_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: `mallopt` only sets allocator parameters; a refusal (0) leaves them as
            // they were, which is still correct.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
            }
        });
    }
}
