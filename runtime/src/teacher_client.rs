//! A blocking HTTP client for a teacher: this project's own API (`mekd teacher serve`), or any
//! model server that speaks the Open Inference Protocol (KServe v2: Triton, KServe, MLServer,
//! and `mekd teacher serve`'s v2 endpoints), chosen by the URL (`v2+http://.../v2/models/NAME`).
//! Over `https://` it trusts the system's certificate authorities, or only those of a file
//! ([`HttpClient::with_ca_cert`]); TLS is rustls (no OpenSSL).
//! Both are read as the same [`TeacherInfo`] and [`QueryResponse`], and counted the same way:
//! queries are images, bytes are the HTTP bodies that went over the wire.
//!
//! Queries survive a flaky network and a restarting server: every query carries an
//! `Idempotency-Key` (the caller's, or a fresh random one), and a query that failed in transport
//! or found the server unavailable (502, 503, 504, or 429 with `Retry-After`) is sent again
//! under the same key, with capped exponential backoff and jitter, until [`RetryPolicy::deadline`].
//! The server charges a key once, so a retry never pays twice.

use std::time::{Duration, Instant};

use crate::rng::os_random_u64;
use mekd_contract::Usage;
use mekd_contract::protocol::{self, ErrorBody, KeyUsage, QueryResponse, TeacherInfo, v2};
use mekd_contract::{Normalisation, to_model_input};
use ureq::tls::{RootCerts, TlsConfig};

/// A failed call to the teacher server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the teacher at {url}: {reason}")]
    Transport {
        /// The URL called.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The TLS handshake failed: most often a certificate the client does not trust. Not
    /// retried: sending again does not change a certificate.
    #[error(
        "TLS with the teacher at {url} failed: {reason} (for a server whose certificate a private CA signed, give --ca-cert FILE)"
    )]
    Tls {
        /// The URL called.
        url: String,
        /// The TLS error.
        reason: String,
    },
    /// The key's budget is exhausted (HTTP 429).
    #[error("the teacher's query budget is exhausted ({remaining} queries left): {message}")]
    BudgetExhausted {
        /// Queries left (fewer than the request needed).
        remaining: u64,
        /// The server's message.
        message: String,
    },
    /// The server refused the request.
    #[error("the teacher answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer was not what the protocol says.
    #[error("unexpected answer from the teacher: {0}")]
    Protocol(String),
}

/// How long and how often a failed query is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No retry starts later than this after the first attempt (zero: no retries).
    pub deadline: Duration,
    /// Wait before the first retry; doubled after each one.
    pub first_wait: Duration,
    /// Longest wait between two attempts.
    pub max_wait: Duration,
}

/// Default of [`RetryPolicy::deadline`]: long enough for a server to restart.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(60);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_RETRY_DEADLINE,
            first_wait: Duration::from_millis(100),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (0 for the first): `first_wait x 2^attempt`, capped
    /// at `max_wait`, times a random factor in [0.5, 1) (jitter: clients that failed together do
    /// not come back together).
    pub fn wait(&self, attempt: u32) -> Duration {
        let full = self.first_wait.saturating_mul(1 << attempt.min(20)).min(self.max_wait);
        full.mul_f64(0.5 + 0.5 * random_unit())
    }
}

/// A random number in [0, 1).
fn random_unit() -> f64 {
    (os_random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// An HTTP agent (keep-alive) that trusts `roots` for HTTPS.
fn agent(roots: RootCerts) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build()
        .into()
}

/// Which API the teacher speaks, from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Api {
    /// This project's own API (`http://host:port`).
    Own,
    /// The Open Inference Protocol (`v2+http://host:port/v2/models/NAME`): the model's path.
    V2 {
        /// `/v2/models/NAME` (or `/v2/models/NAME/versions/V`).
        model: String,
    },
}

/// The URL scheme prefix that selects the Open Inference Protocol (KServe v2).
pub const V2_SCHEME_PREFIX: &str = "v2+";

/// How to read a model served over the Open Inference Protocol (the own API describes itself).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct V2Options {
    /// Normalisation of pixels for a model that takes `FP32` tensors (`UINT8` models get the
    /// pixels as they are).
    pub norm: Option<Normalisation>,
    /// The output to read, when the model has several.
    pub output: Option<String>,
    /// The output holds probabilities, not logits: the client turns them into log-probabilities
    /// (logits up to a constant per image, which softmax ignores).
    pub probabilities: bool,
}

/// What a v2 model's metadata told the client.
#[derive(Clone, Debug)]
struct V2Model {
    input: String,
    /// `UINT8` pixels as they are, or `FP32` normalised with this.
    norm: Option<Normalisation>,
    output: String,
    /// The output holds probabilities (read as their logarithms).
    probabilities: bool,
    binary: bool,
    info: TeacherInfo,
}

/// The batch limit assumed for a v2 model whose batch dimension is dynamic (the protocol does
/// not say how large a request the server takes).
pub const V2_DEFAULT_MAX_BATCH: usize = 256;

/// A connection to one teacher server with one API key.
pub struct HttpClient {
    base: String,
    api: Api,
    v2: V2Options,
    model: std::sync::OnceLock<V2Model>,
    key: String,
    agent: ureq::Agent,
    retry: RetryPolicy,
}

/// A 200 answer's body and the v2 binary header's value.
struct Body {
    bytes: Vec<u8>,
    header_length: Option<String>,
}

impl HttpClient {
    /// A client for the teacher at `url`: `http://host:port` for this project's own API, or
    /// `v2+http://host:port/v2/models/NAME` for a model served over the Open Inference
    /// Protocol (KServe, Triton, MLServer, or `mekd teacher serve`'s v2 endpoints).
    pub fn new(url: &str, key: &str) -> Result<Self, ClientError> {
        let (base, api) = match url.strip_prefix(V2_SCHEME_PREFIX) {
            None => (url.trim_end_matches('/').to_string(), Api::Own),
            Some(rest) => {
                let at = rest.find(v2::MODELS).ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "{url}: a v2 teacher's URL names its model, e.g. v2+http://host:8000/v2/models/NAME"
                    ))
                })?;
                let model = rest[at..].trim_end_matches('/').to_string();
                if model.len() < v2::MODELS.len() {
                    return Err(ClientError::Protocol(format!("{url}: no model name after {}", v2::MODELS)));
                }
                (rest[..at].to_string(), Api::V2 { model })
            }
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Protocol(format!("{url}: the teacher's URL starts with http:// or https://")));
        }
        Ok(Self {
            base,
            api,
            v2: V2Options::default(),
            model: std::sync::OnceLock::new(),
            key: key.to_string(),
            agent: agent(RootCerts::PlatformVerifier),
            retry: RetryPolicy::default(),
        })
    }

    /// This client trusting only the certificate authorities in `pem` (PEM certificates, e.g.
    /// a private CA's) for `https://` teachers, instead of the system's.
    pub fn with_ca_cert(mut self, pem: &[u8]) -> Result<Self, ClientError> {
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert),
                Ok(_) => {}
                Err(e) => return Err(ClientError::Protocol(format!("reading the CA certificates: {e}"))),
            }
        }
        if certs.is_empty() {
            return Err(ClientError::Protocol("the CA file holds no PEM certificate".into()));
        }
        self.agent = agent(RootCerts::Specific(std::sync::Arc::new(certs)));
        Ok(self)
    }

    /// This client with another retry policy for its queries.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// This client with options for a v2 model (ignored by the own API).
    pub fn with_v2(mut self, options: V2Options) -> Self {
        self.v2 = options;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn transport(&self, path: &str, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { url: self.url(path), reason: e.to_string() }
    }

    /// A failed call: a TLS failure, or a transport error (which a query retries).
    fn call_failed(&self, path: &str, e: ureq::Error) -> ClientError {
        let reason = e.to_string();
        let tls = matches!(e, ureq::Error::Rustls(_) | ureq::Error::Tls(_))
            || ["certificate", "tls handshake", "rustls"].iter().any(|word| reason.to_lowercase().contains(word));
        if tls { ClientError::Tls { url: self.url(path), reason } } else { self.transport(path, reason) }
    }

    /// Read a response: the body on 200, a typed error otherwise.
    fn read(&self, path: &str, mut response: ureq::http::Response<ureq::Body>) -> Result<Body, ClientError> {
        let status = response.status().as_u16();
        let header_length = response.headers().get(v2::HEADER_LENGTH).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body =
            response.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| self.transport(path, e))?;
        if status == 200 {
            return Ok(Body { bytes: body, header_length });
        }
        let error: ErrorBody = serde_json::from_slice(&body)
            .unwrap_or(ErrorBody { error: String::from_utf8_lossy(&body).into_owned(), remaining: None });
        Err(match (status, error.remaining) {
            (429, Some(remaining)) => ClientError::BudgetExhausted { remaining, message: error.error },
            _ => ClientError::Status { status, message: error.error },
        })
    }

    /// `Authorization: Bearer KEY`, unless the key is empty (a v2 server that asks for none).
    fn authorization(&self) -> Option<String> {
        (!self.key.is_empty()).then(|| format!("Bearer {}", self.key))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let mut request = self.agent.get(self.url(path));
        if let Some(auth) = self.authorization() {
            request = request.header("Authorization", auth);
        }
        let response = request.call().map_err(|e| self.call_failed(path, e))?;
        let body = self.read(path, response)?;
        serde_json::from_slice(&body.bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    /// Whether the server answers: `GET /v1/health`, or `GET /v2/health/ready` for a v2 teacher.
    pub fn health(&self) -> Result<(), ClientError> {
        let path = match self.api {
            Api::Own => protocol::HEALTH,
            Api::V2 { .. } => v2::READY,
        };
        let _: serde_json::Value = self.get(path)?;
        Ok(())
    }

    /// What the teacher takes and answers: `GET /v1/info`, or a v2 model's metadata read as
    /// the same [`TeacherInfo`].
    pub fn info(&self) -> Result<TeacherInfo, ClientError> {
        match &self.api {
            Api::Own => self.get(protocol::INFO),
            Api::V2 { model } => Ok(self.v2_model(model)?.info.clone()),
        }
    }

    /// `GET /v1/usage` (this project's server, whichever protocol its queries used).
    pub fn usage(&self) -> Result<KeyUsage, ClientError> {
        self.get(protocol::USAGE)
    }

    /// Ask the teacher about `images` (`u8`, CHW, back to back), under `idempotency_key` (a
    /// fresh random one when `None`), retried as the [`RetryPolicy`] says. The transfer counts
    /// the images and the request and answer bodies of the attempts that were answered.
    pub fn query(&self, images: &[u8], idempotency_key: Option<&str>) -> Result<(QueryResponse, Usage), ClientError> {
        let fresh;
        let key = match idempotency_key {
            Some(key) => key,
            None => {
                fresh = format!("mekd-{:016x}{:016x}", os_random_u64(), os_random_u64());
                &fresh
            }
        };
        if !protocol::valid_idempotency_key(key) {
            return Err(ClientError::Protocol(format!("{key:?} is not a valid idempotency key")));
        }
        match &self.api {
            Api::Own => {
                let body = self.post(protocol::QUERY, "application/octet-stream", &[], images, key)?;
                let answer = serde_json::from_slice(&body.bytes)
                    .map_err(|e| ClientError::Protocol(format!("{}: {e}", protocol::QUERY)))?;
                let answer: QueryResponse = answer;
                let cost = Usage {
                    queries: answer.count as u64,
                    bytes_up: images.len() as u64,
                    bytes_down: body.bytes.len() as u64,
                };
                Ok((answer, cost))
            }
            Api::V2 { model } => self.v2_query(model, images, key),
        }
    }

    /// POST `body` to `path` under the idempotency `key`, sent again on transport errors, 502,
    /// 503, 504 and 429 with `Retry-After` until the policy's deadline.
    fn post(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, String)],
        body: &[u8],
        key: &str,
    ) -> Result<Body, ClientError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let mut request =
                self.agent.post(self.url(path)).header(protocol::IDEMPOTENCY_KEY, key).content_type(content_type);
            if let Some(auth) = self.authorization() {
                request = request.header("Authorization", auth);
            }
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            // What to do with this attempt: finish, or wait (at least this long) and send again.
            let (retry_after, failure) = match request.send(body) {
                Err(e) => match self.call_failed(path, e) {
                    tls @ ClientError::Tls { .. } => return Err(tls),
                    other => (None, other),
                },
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let unavailable = matches!(status, 502..=504) || (status == 429 && retry_after.is_some());
                    match self.read(path, response) {
                        Ok(body) => return Ok(body),
                        Err(e) if unavailable || matches!(e, ClientError::Transport { .. }) => (retry_after, e),
                        Err(e) => return Err(e),
                    }
                }
            };
            let wait = retry_after.unwrap_or_default().max(self.retry.wait(attempt));
            if started.elapsed() + wait > self.retry.deadline {
                return Err(failure);
            }
            eprintln!("{failure}; sending the query again in {:.1} s", wait.as_secs_f64());
            std::thread::sleep(wait);
            attempt += 1;
        }
    }

    /// The v2 model's metadata, read once.
    fn v2_model(&self, model: &str) -> Result<&V2Model, ClientError> {
        if let Some(known) = self.model.get() {
            return Ok(known);
        }
        // The binary extension is used when the server names it; a server without `GET /v2`
        // gets JSON.
        let binary = match self.get::<v2::ServerMetadata>(v2::PREFIX) {
            Ok(server) => server.extensions.iter().any(|e| e == v2::BINARY_EXTENSION),
            Err(ClientError::Status { .. } | ClientError::Protocol(_)) => false,
            Err(e) => return Err(e),
        };
        let metadata: v2::ModelMetadata = self.get(model)?;
        let resolved = read_v2_metadata(&metadata, &self.v2, binary)?;
        Ok(self.model.get_or_init(|| resolved))
    }

    /// A query over the Open Inference Protocol: one request per batch the model takes.
    fn v2_query(&self, model: &str, images: &[u8], key: &str) -> Result<(QueryResponse, Usage), ClientError> {
        let spec = self.v2_model(model)?;
        let [c, h, w] = spec.info.input_shape;
        let per_image = c * h * w;
        if images.is_empty() || !images.len().is_multiple_of(per_image) {
            return Err(ClientError::Protocol(format!(
                "{} bytes is not a whole number of {c}x{h}x{w} images",
                images.len()
            )));
        }
        let chunks: Vec<&[u8]> = images.chunks(spec.info.max_batch.max(1) * per_image).collect();
        let mut logits = Vec::with_capacity(images.len() / per_image * spec.info.num_classes);
        let mut remaining = None;
        let mut cost = Usage::default();
        for (i, chunk) in chunks.iter().enumerate() {
            // One idempotency key per request: the caller's, numbered when the query is split.
            let part_key = if chunks.len() == 1 { key.to_string() } else { format!("{key}.{i}") };
            if !protocol::valid_idempotency_key(&part_key) {
                return Err(ClientError::Protocol(format!("{part_key:?} is not a valid idempotency key")));
            }
            let n = chunk.len() / per_image;
            let (body, header) = v2_request_body(spec, chunk, n, &part_key);
            let headers: Vec<(&str, String)> =
                header.map(|len| (v2::HEADER_LENGTH, len.to_string())).into_iter().collect();
            let path = format!("{model}/infer");
            let content_type = if spec.binary { "application/octet-stream" } else { "application/json" };
            let got = self.post(&path, content_type, &headers, &body, &part_key)?;
            let (part, left) = read_v2_answer(spec, &got, n)?;
            logits.extend(part);
            remaining = left;
            cost = cost + Usage { queries: n as u64, bytes_up: body.len() as u64, bytes_down: got.bytes.len() as u64 };
        }
        let answer = QueryResponse { count: images.len() / per_image, logits: Some(logits), labels: None, remaining };
        Ok((answer, cost))
    }
}

/// Check a v2 model's metadata against what this client can use, and turn it into the
/// [`TeacherInfo`] every teacher kind shares.
fn read_v2_metadata(metadata: &v2::ModelMetadata, options: &V2Options, binary: bool) -> Result<V2Model, ClientError> {
    let bad = |message: String| ClientError::Protocol(format!("model {:?}: {message}", metadata.name));
    let [input] = metadata.inputs.as_slice() else {
        return Err(bad(format!("{} inputs; an image classifier has one", metadata.inputs.len())));
    };
    let (batch, input_shape) = match input.shape.as_slice() {
        &[n, c, h, w] if (n == -1 || n >= 1) && (1..=4).contains(&c) && h >= 1 && w >= 1 => {
            (n, [c as usize, h as usize, w as usize])
        }
        shape => {
            return Err(bad(format!(
                "input {:?} has shape {shape:?}; this client sends [N, C, H, W] images with 1 to 4 channels",
                input.name
            )));
        }
    };
    let norm = match input.datatype.as_str() {
        "UINT8" => None,
        "FP32" => Some(
            options
                .norm
                .as_ref()
                .ok_or_else(|| bad(format!("input {:?} takes FP32 tensors: give the teacher's mean and std (--teacher-mean, --teacher-std)", input.name)))?
                .for_channels(input_shape[0])
                .map_err(|e| bad(e.to_string()))?,
        ),
        other => return Err(bad(format!("input {:?} takes {other}; this client sends UINT8 or FP32", input.name))),
    };
    let output = match (&options.output, metadata.outputs.as_slice()) {
        (Some(name), outputs) => outputs.iter().find(|o| &o.name == name).ok_or_else(|| {
            bad(format!("no output {name:?}; it has {:?}", outputs.iter().map(|o| &o.name).collect::<Vec<_>>()))
        })?,
        (None, [only]) => only,
        (None, outputs) => {
            return Err(bad(format!(
                "outputs {:?}: choose one with --teacher-output",
                outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
            )));
        }
    };
    let num_classes = match (output.datatype.as_str(), output.shape.last()) {
        ("FP32" | "FP16" | "FP64", Some(&k)) if k >= 2 => k as usize,
        ("FP32" | "FP16" | "FP64", _) => {
            return Err(bad(format!(
                "output {:?} has shape {:?}: the class count (its last dimension) must be known and at least 2",
                output.name, output.shape
            )));
        }
        (other, _) => {
            return Err(bad(format!(
                "output {:?} is {other}; this client reads class scores (FP32, FP16 or FP64 logits or probabilities)",
                output.name
            )));
        }
    };
    let info = TeacherInfo {
        input_shape,
        num_classes,
        class_names: None,
        response: protocol::ResponseMode::Soft,
        mean: norm.as_ref().map(|n| n.mean.clone()).unwrap_or_default(),
        std: norm.as_ref().map(|n| n.std.clone()).unwrap_or_default(),
        max_batch: if batch == -1 { V2_DEFAULT_MAX_BATCH } else { batch as usize },
    };
    Ok(V2Model {
        input: input.name.clone(),
        norm,
        output: output.name.clone(),
        probabilities: options.probabilities,
        binary,
        info,
    })
}

/// The body of a v2 request for `n` images (its `id`: the request's idempotency key, which
/// some servers require and log), and the JSON part's length when the tensor travels as binary
/// data.
fn v2_request_body(spec: &V2Model, images: &[u8], n: usize, id: &str) -> (Vec<u8>, Option<usize>) {
    let [c, h, w] = spec.info.input_shape;
    let data = match &spec.norm {
        None => v2::Data::U8(images.to_vec()),
        Some(norm) => v2::Data::F32(to_model_input(images, spec.info.input_shape, norm)),
    };
    let shape = vec![n as u64, c as u64, h as u64, w as u64];
    let (input, tail) = v2::Tensor::carrying(&spec.input, shape, data, spec.binary);
    let outputs = Some(vec![v2::RequestedOutput {
        name: spec.output.clone(),
        parameters: spec.binary.then(|| v2::parameter(v2::BINARY_DATA, true)),
    }]);
    let request = v2::InferRequest { id: Some(id.to_string()), parameters: None, inputs: vec![input], outputs };
    let json = serde_json::to_vec(&request).expect("serialisable");
    if spec.binary { (v2::with_binary(&json, &tail), Some(json.len())) } else { (json, None) }
}

/// The logits (`n x K`) and the key's remaining queries (this project's server) in a v2 answer.
fn read_v2_answer(spec: &V2Model, body: &Body, n: usize) -> Result<(Vec<f32>, Option<u64>), ClientError> {
    let bad = |message: String| ClientError::Protocol(format!("v2 answer: {message}"));
    let (json, mut binary) = v2::split_body(&body.bytes, body.header_length.as_deref()).map_err(bad)?;
    let answer: v2::InferResponse<v2::Values> = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    // Binary sections follow the JSON in the order of the outputs that have one.
    let mut values = None;
    for output in &answer.outputs {
        let data = match (output.binary_size(), &output.data) {
            (Some(size), _) => {
                let size = usize::try_from(size).ok().filter(|&s| s <= binary.len()).ok_or_else(|| {
                    bad(format!("output {:?} declares {size} binary bytes; {} remain", output.name, binary.len()))
                })?;
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                v2::decode_binary(&output.datatype, mine).ok_or_else(|| {
                    bad(format!("output {:?}: {size} bytes of {} cannot be read", output.name, output.datatype))
                })?
            }
            (None, Some(v2::Values(data))) => data.clone(),
            (None, None) => return Err(bad(format!("output {:?} carries no data", output.name))),
        };
        if output.name == spec.output {
            values = Some(data);
        }
    }
    let values = values.ok_or_else(|| bad(format!("no output {:?}", spec.output)))?;
    let k = spec.info.num_classes;
    if values.len() != n * k {
        return Err(bad(format!("{} values for {n} images of {k} classes", values.len())));
    }
    let logits = values
        .into_iter()
        .map(|v| if spec.probabilities { v.max(f64::MIN_POSITIVE).ln() as f32 } else { v as f32 })
        .collect();
    let remaining = answer.parameters.as_ref().and_then(|p| p.get(v2::REMAINING)?.as_u64());
    Ok((logits, remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, datatype: &str, shape: &[i64]) -> v2::TensorMetadata {
        v2::TensorMetadata { name: name.into(), datatype: datatype.into(), shape: shape.to_vec() }
    }

    fn model(input: v2::TensorMetadata, outputs: Vec<v2::TensorMetadata>) -> v2::ModelMetadata {
        v2::ModelMetadata { name: "m".into(), versions: None, platform: String::new(), inputs: vec![input], outputs }
    }

    #[test]
    fn urls_choose_the_protocol() {
        let own = HttpClient::new("http://h:1/", "k").unwrap();
        assert_eq!((own.base.as_str(), &own.api), ("http://h:1", &Api::Own));
        let v2 = HttpClient::new("v2+https://h:1/v2/models/resnet/versions/2/", "k").unwrap();
        assert_eq!(v2.base, "https://h:1");
        assert_eq!(v2.api, Api::V2 { model: "/v2/models/resnet/versions/2".into() });
        for bad in ["v2+http://h:1", "v2+http://h:1/v2/models/", "ftp://h", "h:1"] {
            assert!(matches!(HttpClient::new(bad, "k"), Err(ClientError::Protocol(_))), "{bad}");
        }
    }

    #[test]
    fn metadata_picks_input_output_and_normalisation() {
        let norm = Normalisation { mean: vec![0.5], std: vec![0.25] };
        let options = V2Options { norm: Some(norm.clone()), ..Default::default() };
        let fp32 = model(tensor("x", "FP32", &[-1, 1, 4, 4]), vec![tensor("y", "FP32", &[-1, 10])]);
        let read = read_v2_metadata(&fp32, &options, true).unwrap();
        assert_eq!((read.info.input_shape, read.info.num_classes), ([1, 4, 4], 10));
        assert_eq!((read.input.as_str(), read.output.as_str()), ("x", "y"));
        assert_eq!((read.norm, read.info.max_batch), (Some(norm), V2_DEFAULT_MAX_BATCH));
        // FP32 without a normalisation, a fixed batch, several outputs, integer outputs.
        let err = read_v2_metadata(&fp32, &V2Options::default(), false).unwrap_err().to_string();
        assert!(err.contains("--teacher-mean"), "{err}");
        let u8_fixed = model(tensor("x", "UINT8", &[8, 3, 2, 2]), vec![tensor("a", "FP32", &[8, 5])]);
        let read = read_v2_metadata(&u8_fixed, &V2Options::default(), false).unwrap();
        assert_eq!((read.norm, read.info.max_batch, read.info.num_classes), (None, 8, 5));
        let two = model(
            tensor("x", "UINT8", &[-1, 1, 2, 2]),
            vec![tensor("a", "FP32", &[-1, 3]), tensor("b", "FP32", &[-1, 4])],
        );
        let err = read_v2_metadata(&two, &V2Options::default(), false).unwrap_err().to_string();
        assert!(err.contains("--teacher-output"), "{err}");
        let pick = V2Options { output: Some("b".into()), ..Default::default() };
        assert_eq!(read_v2_metadata(&two, &pick, false).unwrap().info.num_classes, 4);
        let labels = model(tensor("x", "UINT8", &[-1, 1, 2, 2]), vec![tensor("l", "INT64", &[-1])]);
        assert!(read_v2_metadata(&labels, &V2Options::default(), false).is_err());
        let nhwc = model(tensor("x", "UINT8", &[-1, 32, 32, 3]), vec![tensor("y", "FP32", &[-1, 10])]);
        assert!(read_v2_metadata(&nhwc, &V2Options::default(), false).is_err());
    }

    /// A request body built by the client, read back as the server reads it, and an answer in
    /// both encodings read by the client: the values survive, probabilities become logarithms.
    #[test]
    fn requests_and_answers_round_trip_in_json_and_binary() {
        let norm = Normalisation { mean: vec![0.5], std: vec![0.5] };
        let meta = model(tensor("x", "FP32", &[-1, 1, 1, 2]), vec![tensor("y", "FP32", &[-1, 2])]);
        let images = [0u8, 255, 51, 102];
        for binary in [false, true] {
            let spec =
                read_v2_metadata(&meta, &V2Options { norm: Some(norm.clone()), ..Default::default() }, binary).unwrap();
            let (body, header) = v2_request_body(&spec, &images, 2, "q-1");
            let header = header.map(|n| n.to_string());
            let (json, tail) = v2::split_body(&body, header.as_deref()).unwrap();
            let request: v2::InferRequest<v2::Values> = serde_json::from_slice(json).unwrap();
            let input = &request.inputs[0];
            assert_eq!(
                (input.name.as_str(), input.datatype.as_str(), input.shape.as_slice()),
                ("x", "FP32", &[2, 1, 1, 2][..])
            );
            let sent = match input.binary_size() {
                Some(_) => v2::decode_binary("FP32", tail).unwrap(),
                None => input.data.clone().unwrap().0,
            };
            let sent: Vec<f32> = sent.into_iter().map(|v| v as f32).collect();
            assert_eq!(sent, to_model_input(&images, [1, 1, 2], &norm), "binary {binary}");
            assert_eq!(request.outputs.unwrap()[0].name, "y");

            let logits = [0.25f32, -1.5, 3.0, 0.125];
            let (answer, header_length) = if binary {
                let bytes = v2::Data::F32(logits.to_vec()).to_le_bytes();
                let size = v2::parameter(v2::BINARY_DATA_SIZE, bytes.len());
                let out = v2::Tensor::<v2::Data> {
                    name: "y".into(),
                    shape: vec![2, 2],
                    datatype: "FP32".into(),
                    parameters: Some(size),
                    data: None,
                };
                let head = serde_json::to_vec(&v2::InferResponse {
                    model_name: "m".into(),
                    model_version: None,
                    id: None,
                    parameters: None,
                    outputs: vec![out],
                })
                .unwrap();
                (v2::with_binary(&head, &bytes), Some(head.len().to_string()))
            } else {
                let out = serde_json::json!({"model_name": "m", "parameters": {"remaining": 7},
                    "outputs": [{"name": "y", "shape": [2, 2], "datatype": "FP32", "data": [[0.25, -1.5], [3.0, 0.125]]}]});
                (serde_json::to_vec(&out).unwrap(), None)
            };
            let body = Body { bytes: answer, header_length };
            let (read, remaining) = read_v2_answer(&spec, &body, 2).unwrap();
            assert_eq!(read, logits);
            assert_eq!(remaining, (!binary).then_some(7));
            assert!(read_v2_answer(&spec, &body, 3).is_err(), "a count mismatch is an error");
            let probs = V2Model { probabilities: true, ..spec.clone() };
            let (read, _) = read_v2_answer(&probs, &body, 2).unwrap();
            assert_eq!(read[0], 0.25f64.ln() as f32);
            assert!(read[1].is_finite() && read[1] < -700.0, "a non-positive probability reads as a very small one");
        }
    }
}
