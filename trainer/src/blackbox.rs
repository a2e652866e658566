//! The black-box contract: distillation reaches the teacher only through [`Teacher`]: send a
//! batch of `u8` images, get per-image responses (soft logits or hard labels). Every
//! implementation counts queries and bytes and enforces a client-side budget; exhausting it is
//! a clean [`TeacherError::BudgetExhausted`], which callers turn into a reported stop.

use std::path::Path;

use mekd_contract::protocol::{QueryResponse, ResponseMode, TeacherInfo};
use mekd_contract::{Normalisation, Usage, to_model_input};
use mekd_runtime::engine::argmax_rows;
use mekd_runtime::teacher_client::{ClientError, HttpClient, RetryPolicy};

use crate::teacher::onnx_model::OrtTeacherModel;
use mekd_runtime::onnxruntime::OrtClassifier;

/// Per-image answers of the teacher.
#[derive(Clone, Debug, PartialEq)]
pub enum Responses {
    /// Logits, `count * classes` values.
    Soft(Vec<f32>),
    /// Top-1 class per image.
    Hard(Vec<usize>),
}

impl Responses {
    /// Number of images answered.
    pub fn len(&self, classes: usize) -> usize {
        match self {
            Responses::Soft(l) => l.len() / classes,
            Responses::Hard(l) => l.len(),
        }
    }

    /// Whether no image was answered.
    pub fn is_empty(&self) -> bool {
        match self {
            Responses::Soft(l) => l.is_empty(),
            Responses::Hard(l) => l.is_empty(),
        }
    }

    /// Target vectors for distillation: the logits, or one-hot vectors for hard labels.
    pub fn targets(&self, classes: usize) -> Vec<f32> {
        match self {
            Responses::Soft(l) => l.clone(),
            Responses::Hard(labels) => {
                let mut out = vec![0.0; labels.len() * classes];
                for (i, &l) in labels.iter().enumerate() {
                    out[i * classes + l] = 1.0;
                }
                out
            }
        }
    }

    /// Top-1 class per image.
    pub fn labels(&self, classes: usize) -> Vec<usize> {
        match self {
            Responses::Soft(l) => argmax_rows(l, classes),
            Responses::Hard(l) => l.clone(),
        }
    }
}

/// A teacher that cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// The query budget (client's or server's) does not cover the request.
    #[error("query budget exhausted: {used} queries used, {requested} more asked, limit {limit}")]
    BudgetExhausted {
        /// Queries used so far.
        used: u64,
        /// Queries the refused request needed.
        requested: u64,
        /// The limit.
        limit: u64,
    },
    /// The images do not fit the teacher's input.
    #[error("images do not match the teacher's input: {0}")]
    Shape(String),
    /// The server or the local model failed.
    #[error(transparent)]
    Backend(#[from] anyhow::Error),
}

/// The one door to the teacher.
pub trait Teacher: Send {
    /// Input shape, classes, response mode, normalisation.
    fn info(&self) -> &TeacherInfo;
    /// Answers for `images` (`u8`, CHW, back to back, the teacher's input shape).
    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError>;
    /// [`Teacher::query`] under an idempotency key, unique to this request of this client: a
    /// teacher that charges remotely charges the key once, however often it is sent (see
    /// `mekd_contract::protocol`). Local teachers charge nobody and ignore it.
    fn query_keyed(&mut self, images: &[u8], key: &str) -> Result<Responses, TeacherError> {
        let _ = key;
        self.query(images)
    }
    /// Queries and bytes so far (prior usage included).
    fn usage(&self) -> Usage;
    /// Count `prior` as already used (a resumed run), so budgets cover the whole run.
    fn add_prior_usage(&mut self, prior: Usage);
}

/// Client-side accounting shared by the implementations.
#[derive(Clone, Debug)]
struct Meter {
    usage: Usage,
    budget: Option<u64>,
}

impl Meter {
    fn admit(&self, images: &[u8], info: &TeacherInfo) -> Result<u64, TeacherError> {
        let per_image = info.input_shape.iter().product::<usize>();
        if images.is_empty() || !images.len().is_multiple_of(per_image) {
            return Err(TeacherError::Shape(format!(
                "{} bytes is not a whole number of {:?} images",
                images.len(),
                info.input_shape
            )));
        }
        let n = (images.len() / per_image) as u64;
        if let Some(limit) = self.budget.filter(|&limit| self.usage.queries + n > limit) {
            return Err(TeacherError::BudgetExhausted { used: self.usage.queries, requested: n, limit });
        }
        Ok(n)
    }

    /// Turn a local model's logits into the answer the server would give in `info.response`
    /// mode, counting the bytes the HTTP API would carry for it: the u8 images up, the JSON
    /// answer down ([`QueryResponse::wire_len`]).
    fn answer_locally(&mut self, logits: Vec<f32>, info: &TeacherInfo, n: u64, image_bytes: usize) -> Responses {
        let count = n as usize;
        let (responses, down) = match info.response {
            ResponseMode::Soft => {
                let body = QueryResponse { count, logits: Some(logits), labels: None, remaining: None };
                let down = body.wire_len();
                (Responses::Soft(body.logits.unwrap_or_default()), down)
            }
            ResponseMode::Hard => {
                let labels = Some(argmax_rows(&logits, info.num_classes));
                let body = QueryResponse { count, logits: None, labels, remaining: None };
                let down = body.wire_len();
                (Responses::Hard(body.labels.unwrap_or_default()), down)
            }
        };
        self.record(n, image_bytes as u64, down);
        responses
    }

    fn add(&mut self, prior: Usage) {
        self.usage = self.usage + prior;
    }

    fn record(&mut self, n: u64, up: u64, down: u64) {
        self.add(Usage { queries: n, bytes_up: up, bytes_down: down });
    }
}

/// A teacher behind HTTP: this project's API (`mekd teacher serve`) or a model server speaking
/// the Open Inference Protocol (KServe v2).
pub struct HttpTeacher {
    client: HttpClient,
    info: TeacherInfo,
    meter: Meter,
}

impl HttpTeacher {
    /// Connect to `url` with `key`, with an optional client-side `budget`.
    pub fn connect(url: &str, key: &str, budget: Option<u64>) -> Result<Self, TeacherError> {
        Self::from_client(HttpClient::new(url, key).map_err(|e| TeacherError::Backend(e.into()))?, budget)
    }

    /// The teacher behind `client` (either protocol), with an optional client-side `budget`.
    pub fn from_client(client: HttpClient, budget: Option<u64>) -> Result<Self, TeacherError> {
        let info = client.info().map_err(|e| TeacherError::Backend(e.into()))?;
        Ok(Self { client, info, meter: Meter { usage: Usage::default(), budget } })
    }

    /// This teacher with another retry policy for its queries.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.client = self.client.with_retry(retry);
        self
    }
}

impl Teacher for HttpTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError> {
        self.ask(images, None)
    }

    fn query_keyed(&mut self, images: &[u8], key: &str) -> Result<Responses, TeacherError> {
        self.ask(images, Some(key))
    }

    fn usage(&self) -> Usage {
        self.meter.usage
    }

    fn add_prior_usage(&mut self, prior: Usage) {
        self.meter.add(prior);
    }
}

impl HttpTeacher {
    fn ask(&mut self, images: &[u8], key: Option<&str>) -> Result<Responses, TeacherError> {
        let n = self.meter.admit(images, &self.info)?;
        let (answer, transfer) = self.client.query(images, key).map_err(|e| match e {
            ClientError::BudgetExhausted { remaining, .. } => TeacherError::BudgetExhausted {
                used: self.meter.usage.queries,
                requested: n,
                limit: self.meter.usage.queries + remaining,
            },
            other => TeacherError::Backend(other.into()),
        })?;
        self.meter.record(n, transfer.bytes_up, transfer.bytes_down);
        let k = self.info.num_classes;
        match (answer.logits, answer.labels) {
            (Some(logits), _) if logits.len() == n as usize * k => Ok(Responses::Soft(logits)),
            (None, Some(labels)) if labels.len() == n as usize && labels.iter().all(|&l| l < k) => {
                Ok(Responses::Hard(labels))
            }
            _ => Err(TeacherError::Backend(anyhow::anyhow!("the server's answer does not hold {n} responses"))),
        }
    }
}

/// A local ONNX teacher run with ONNX Runtime (no server), for experiments. Bytes are counted
/// as the HTTP API would carry them (u8 images up; f32 logits or u32 labels down).
pub struct OnnxTeacher {
    model: OrtClassifier,
    info: TeacherInfo,
    norm: Normalisation,
    meter: Meter,
}

impl OnnxTeacher {
    /// Open `path`; `norm` is needed when the model carries no normalisation metadata.
    pub fn open(
        path: &Path,
        response: ResponseMode,
        norm: Option<Normalisation>,
        budget: Option<u64>,
    ) -> Result<Self, TeacherError> {
        let opened = OrtTeacherModel::open(path, norm, None).map_err(|e| TeacherError::Backend(e.into()))?;
        let info = opened.teacher_info(response, usize::MAX);
        let OrtTeacherModel { session: model, norm, .. } = opened;
        Ok(Self { model, info, norm, meter: Meter { usage: Usage::default(), budget } })
    }
}

impl Teacher for OnnxTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError> {
        let n = self.meter.admit(images, &self.info)?;
        let input = to_model_input(images, self.info.input_shape, &self.norm);
        let logits = self.model.run(&input, self.info.input_shape).map_err(|e| TeacherError::Backend(e.into()))?;
        Ok(self.meter.answer_locally(logits, &self.info, n, images.len()))
    }

    fn usage(&self) -> Usage {
        self.meter.usage
    }

    fn add_prior_usage(&mut self, prior: Usage) {
        self.meter.add(prior);
    }
}

/// A teacher checkpoint run in-process with burn on the training device (so GPU experiments
/// are not bound by a CPU teacher). Still reachable only through [`Teacher`]; bytes are counted
/// as the HTTP API would carry them.
pub struct BurnTeacher {
    model: mekd_models::Classifier,
    device: burn::tensor::Device,
    info: TeacherInfo,
    meter: Meter,
    /// With [`BurnTeacher::with_graphs`]: the forward pass recorded as a device graph, per batch
    /// size.
    graphs: Option<std::collections::HashMap<usize, crate::graph_step::GraphForward>>,
}

impl BurnTeacher {
    /// Load the last checkpoint of a `mekd teacher train` run directory onto `device`.
    pub fn from_run(
        run_dir: &Path,
        device: &burn::tensor::Device,
        response: ResponseMode,
        budget: Option<u64>,
    ) -> Result<Self, TeacherError> {
        let run = crate::rundir::RunDir::open(run_dir)?;
        let config: crate::teacher::train::TrainConfig = run.read_json("config.json")?;
        let summary: crate::teacher::train::TrainSummary = run.read_json("summary.json")?;
        let (_, folder) =
            run.latest_checkpoint()?.ok_or_else(|| anyhow::anyhow!("{} holds no checkpoint", run_dir.display()))?;
        let spec = mekd_models::ClassifierSpec {
            architecture: config.arch,
            in_channels: config.channels,
            num_classes: summary.classes.len(),
        };
        let model = spec.load(&folder.join("model.bpk"), device).map_err(anyhow::Error::from)?;
        Ok(Self::from_model(model, &spec, device, response, Some(summary.classes), budget))
    }

    /// Serve `model` (a `spec` classifier on `device`, inputs scaled to [-1, 1]) as a teacher.
    pub fn from_model(
        model: mekd_models::Classifier,
        spec: &mekd_models::ClassifierSpec,
        device: &burn::tensor::Device,
        response: ResponseMode,
        class_names: Option<Vec<String>>,
        budget: Option<u64>,
    ) -> Self {
        use burn::module::Module;
        let norm = Normalisation::symmetric(spec.in_channels);
        let info = TeacherInfo {
            input_shape: spec.image_shape(),
            num_classes: spec.num_classes,
            class_names,
            response,
            mean: norm.mean,
            std: norm.std,
            max_batch: usize::MAX,
        };
        let meter = Meter { usage: Usage::default(), budget };
        Self { model: model.valid(), device: device.clone(), info, meter, graphs: None }
    }

    /// Answer through forward passes recorded as device graphs (one per batch size, recorded on
    /// its first query: [`crate::graph_step::GraphForward`]); on a backend without graphs the
    /// forward pass runs as before.
    pub fn with_graphs(mut self) -> Self {
        self.graphs = Some(std::collections::HashMap::new());
        self
    }
}

impl Teacher for BurnTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError> {
        use burn::tensor::{Tensor, TensorData};
        let n = self.meter.admit(images, &self.info)?;
        let [c, h, w] = self.info.input_shape;
        let values = to_model_input(images, self.info.input_shape, &Normalisation::symmetric(c));
        let shape = [n as usize, c, h, w];
        let logits = match &mut self.graphs {
            Some(graphs) => {
                let graph = graphs.entry(shape[0]).or_insert_with(|| {
                    let model = self.model.clone();
                    crate::graph_step::GraphForward::record(values.clone(), &self.device, move |x| {
                        model.forward(x.reshape(shape))
                    })
                });
                graph.run(values).map_err(|e| TeacherError::Backend(e.into()))?
            }
            None => self.model.forward(Tensor::<4>::from_data(TensorData::new(values, shape), &self.device)),
        };
        let logits: Vec<f32> =
            logits.into_data().try_to_vec().map_err(|e| TeacherError::Backend(anyhow::anyhow!("{e:?}")))?;
        Ok(self.meter.answer_locally(logits, &self.info, n, images.len()))
    }

    fn usage(&self) -> Usage {
        self.meter.usage
    }

    fn add_prior_usage(&mut self, prior: Usage) {
        self.meter.add(prior);
    }
}
