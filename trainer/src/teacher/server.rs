//! `mekd teacher serve`: any ONNX image classifier behind an HTTP API with API keys, a
//! per-key query budget, size limits and a response mode fixed by the operator. The wire
//! protocol is documented in `mekd_runtime::protocol` and the README.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use mekd_runtime::data::preprocess::{Normalisation, to_model_input};
use mekd_runtime::engine::{argmax_rows, inspect};
use mekd_runtime::protocol::{self, ErrorBody, QueryResponse, ResponseMode, TeacherInfo, Usage, v2};

use super::accounts::{Accounts, Idempotency, Refusal};
use super::batcher::Batcher;
use crate::onnxruntime::OrtClassifier;

/// Default of [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of [`ServeConfig::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (request line and headers) the server reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How to serve a teacher.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The ONNX classifier.
    pub model: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Soft (logits) or hard (top-1 class) answers.
    pub response: ResponseMode,
    /// File with one API key per line.
    pub keys: PathBuf,
    /// Queries (images) each key may make; `None`: unlimited.
    pub budget: Option<u64>,
    /// Where per-key counts persist (default: the keys file + `.usage.json`).
    pub usage_file: Option<PathBuf>,
    /// Normalisation for models without metadata.
    pub normalisation: Option<Normalisation>,
    /// Most images per request.
    pub max_batch: usize,
    /// Most images per model call (requests are merged up to this).
    pub model_batch: usize,
    /// HTTP worker threads.
    pub threads: usize,
    /// Most open connections; a connection over the cap is closed at once, so a flood of idle
    /// or slow clients cannot take every slot of a server that answers the others.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and then its body; a slower
    /// client's connection is closed (slow-loris clients hold no slot for long).
    pub read_timeout: Duration,
    /// The ONNX Runtime library, if not found automatically.
    pub ort_library: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain and private key (PEM files); plain HTTP without.
    pub tls: Option<TlsFiles>,
    /// The model's name on the v2 endpoints (`/v2/models/NAME`); default: the model file's
    /// name without its extension.
    pub model_name: Option<String>,
}

impl ServeConfig {
    /// Defaults for everything but the essentials.
    pub fn new(model: PathBuf, listen: &str, response: ResponseMode, keys: PathBuf) -> Self {
        Self {
            model,
            listen: listen.to_string(),
            response,
            keys,
            budget: None,
            usage_file: None,
            normalisation: None,
            max_batch: 1024,
            model_batch: 256,
            threads: 8,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            read_timeout: DEFAULT_READ_TIMEOUT,
            ort_library: None,
            model_name: None,
            tls: None,
        }
    }
}

/// The server's certificate chain and private key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain, the server's own first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The TLS acceptor for these files, with clear errors for missing or malformed ones.
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading the certificate chain {}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading the private key {}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(|| {
                format!("{} and {} do not make a certificate and its key", self.cert.display(), self.key.display())
            })?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// State shared by the HTTP handlers.
pub(super) struct Shared {
    pub(super) info: TeacherInfo,
    pub(super) model_name: String,
    norm: Normalisation,
    pub(super) accounts: Accounts,
    batcher: Batcher,
    pub(super) image_bytes: usize,
    read_timeout: Duration,
}

/// A server running in background threads; [`RunningServer::shutdown`] stops it cleanly.
pub struct RunningServer {
    addr: SocketAddr,
    https: bool,
    stop: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    batcher: Option<JoinHandle<()>>,
    shared: Option<Arc<Shared>>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:8080` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.addr)
    }

    /// Stop accepting, finish the requests in flight, persist the counts.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(http) = self.http.take() {
            let _ = http.join();
        }
        let shared = self.shared.take();
        let flushed = shared.as_ref().map(|s| s.accounts.flush());
        drop(shared); // drops the last batcher handle: its thread ends
        if let Some(batcher) = self.batcher.take() {
            let _ = batcher.join();
        }
        if let Some(Err(e)) = flushed {
            bail!("persisting the query counts: {e}");
        }
        Ok(())
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Load the model and the keys, bind, and start serving in background threads.
pub fn start(config: &ServeConfig) -> Result<RunningServer> {
    if config.max_batch == 0 || config.model_batch == 0 || config.threads == 0 || config.max_connections == 0 {
        bail!("max batch, model batch, threads and max connections must be at least 1");
    }
    if config.read_timeout.is_zero() {
        bail!("the read timeout must be longer than zero");
    }
    let tls = config.tls.as_ref().map(TlsFiles::acceptor).transpose()?;
    let (model_info, _) = inspect(&config.model)?;
    let [c, h, w] = model_info.input_shape;
    let norm = match (&config.normalisation, &model_info.normalisation) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => bail!(
            "{} carries no normalisation metadata: give --mean and --std (per channel, on pixels in [0, 1])",
            config.model.display()
        ),
    }
    .for_channels(c)?;
    let mut session = OrtClassifier::open(&config.model, config.ort_library.as_deref())?;
    let logits = session.run(&vec![0.0; c * h * w], [c, h, w]).context("running the model on a blank image")?;
    let num_classes = logits.len();
    if num_classes < 2 || (model_info.num_classes != 0 && model_info.num_classes != num_classes) {
        bail!("{} answers {} values per image; not a classifier", config.model.display(), num_classes);
    }
    let usage_file = config.usage_file.clone().unwrap_or_else(|| {
        let mut name = config.keys.file_name().unwrap_or_default().to_os_string();
        name.push(".usage.json");
        config.keys.with_file_name(name)
    });
    let accounts = Accounts::open(&config.keys, config.budget, &usage_file)?;
    let (batcher, batcher_thread) =
        Batcher::start(session, [c, h, w], num_classes, config.model_batch.max(config.max_batch));
    let info = TeacherInfo {
        input_shape: [c, h, w],
        num_classes,
        class_names: model_info.class_names.clone(),
        response: config.response,
        mean: norm.mean.clone(),
        std: norm.std.clone(),
        max_batch: config.max_batch,
    };
    let model_name = match &config.model_name {
        Some(name) => name.clone(),
        None => config.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
    };
    if model_name.is_empty() || !model_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("the model name {model_name:?} must be letters, digits, '-', '_' or '.' (it is part of the v2 paths)");
    }
    let shared = Arc::new(Shared {
        info,
        model_name,
        norm,
        accounts,
        batcher,
        image_bytes: c * h * w,
        read_timeout: config.read_timeout,
    });
    let listener =
        std::net::TcpListener::bind(&config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    listener.set_nonblocking(true).context("setting the listener non-blocking")?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .thread_name("teacher-http")
        .enable_io()
        .enable_time()
        .build()
        .context("starting the HTTP runtime")?;
    let (stop, stopped) = watch::channel(false);
    let limits = Arc::new(Semaphore::new(config.max_connections));
    let accept_shared = shared.clone();
    let https = tls.is_some();
    let http = std::thread::Builder::new()
        .name("teacher-accept".into())
        .spawn(move || runtime.block_on(accept_loop(listener, accept_shared, tls, limits, stopped)))
        .context("starting the HTTP thread")?;
    Ok(RunningServer { addr, https, stop, http: Some(http), batcher: Some(batcher_thread), shared: Some(shared) })
}

/// Accept connections until `stop` turns true, then wait (up to [`SHUTDOWN_GRACE`]) for the
/// requests in flight; each connection holds one permit of `limits`. With `tls`, each
/// connection's handshake must end within the read timeout.
async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        // Forget the connections that ended (a JoinSet keeps every finished task until joined:
        // without this a long-running server grew by about 1 KB per connection ever made).
        while connections.try_join_next().is_some() {}
        // Accept errors (a peer that reset, too many open files) concern one connection.
        let Ok((stream, _)) = accepted else { continue };
        let Ok(permit) = limits.clone().try_acquire_owned() else { continue }; // over the cap: closed
        // Without TCP_NODELAY a response written in several segments waits ~40 ms for the
        // client's delayed ACK (Nagle).
        let _ = stream.set_nodelay(true);
        let (shared, stop, tls) = (shared.clone(), stop.clone(), tls.clone());
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(TokioIo::new(stream), shared, stop).await,
                Some(tls) => {
                    // A failed or too slow handshake (a plain-HTTP client, a wrong certificate on
                    // the client's side) ends this connection only.
                    let handshake = tokio::time::timeout(shared.read_timeout, tls.accept(stream)).await;
                    if let Ok(Ok(stream)) = handshake {
                        serve_connection(TokioIo::new(stream), shared, stop).await;
                    }
                }
            }
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
}

/// Serve the requests of one connection (plain or TLS) until it closes or the server stops.
async fn serve_connection<I>(io: I, shared: Arc<Shared>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = shared.read_timeout;
    let service = hyper::service::service_fn(move |request| handle(shared.clone(), request));
    // half_close: a client that shuts its writing side after the request (as `nc -N` does)
    // still gets its answer.
    let connection = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.changed() => {
            // Finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Serve until SIGINT or SIGTERM, then shut down gracefully.
pub fn serve(config: &ServeConfig) -> Result<()> {
    let server = start(config)?;
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the signal handler")?;
    eprintln!(
        "serving {} on {} ({} responses{}); Ctrl-C to stop",
        config.model.display(),
        server.url(),
        config.response,
        config.budget.map(|b| format!(", budget {b} queries per key")).unwrap_or_default()
    );
    let _ = rx.recv();
    eprintln!("shutting down: finishing requests in flight, saving query counts");
    server.shutdown()
}

/// The API key of a request: `Authorization: Bearer KEY` or `X-Api-Key: KEY`.
fn api_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()?.trim().strip_prefix("Bearer "));
    if let Some(key) = bearer {
        return Some(key.trim().to_string());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string())
}

pub(super) type Answer = Response<Full<Bytes>>;

pub(super) fn json<T: Serialize>(status: u16, body: &T) -> Answer {
    let bytes = serde_json::to_vec(body).expect("serialisable");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(super) fn error(status: u16, message: impl Into<String>, remaining: Option<u64>) -> Answer {
    json(status, &ErrorBody { error: message.into(), remaining })
}

/// An error after which the connection is closed: the request's body was not read (too large,
/// too slow, or broken), so the bytes that follow on the connection are not a request.
pub(super) fn closing(mut response: Answer) -> Answer {
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What a request without a valid API key is told.
const UNAUTHORIZED: &str = "missing or invalid API key (send `Authorization: Bearer KEY`)";

pub(super) fn unauthorized() -> Answer {
    error(401, UNAUTHORIZED, None)
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Answer, Infallible> {
    let key = api_key(request.headers());
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if path == v2::PREFIX || path.starts_with("/v2/") {
        return Ok(super::v2::handle(shared, key, request).await);
    }
    let response = match (&method, path.as_str()) {
        (&Method::GET, protocol::HEALTH) => json(200, &serde_json::json!({"status": "ok"})),
        (&Method::GET, protocol::INFO) if shared.accounts.is_valid(key.as_deref()) => json(200, &shared.info),
        (&Method::GET, protocol::USAGE) => match shared.accounts.usage(key.as_deref()) {
            Ok((used, budget, remaining)) => json(200, &Usage { used, budget, remaining }),
            Err(_) => unauthorized(),
        },
        (&Method::GET, protocol::INFO) => unauthorized(),
        (&Method::POST, protocol::QUERY) => query(shared, key, request).await,
        (_, protocol::HEALTH | protocol::INFO | protocol::USAGE | protocol::QUERY) => {
            error(405, format!("{path} does not accept {method}"), None)
        }
        _ => error(404, format!("no endpoint {path}; see {} and {}", protocol::INFO, protocol::QUERY), None),
    };
    Ok(response)
}

async fn query(shared: Arc<Shared>, key: Option<String>, request: Request<Incoming>) -> Answer {
    let max_body = shared.info.max_batch * shared.image_bytes;
    let too_large = format!("body larger than {max_body} bytes ({} images)", shared.info.max_batch);
    let (_, key, idempotency, body) = match read_chargeable(&shared, key, request, max_body, &too_large).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    // The accounts and the model block: off the connection threads.
    tokio::task::spawn_blocking(move || answer(&shared, &key, idempotency.as_deref(), &body))
        .await
        .unwrap_or_else(|e| error(500, format!("the request's worker failed: {e}"), None))
}

/// A request to be charged, checked and read within limits: its head, API key (a valid one),
/// idempotency key and body. Every refusal closes the connection (its body was not read).
pub(super) async fn read_chargeable(
    shared: &Shared,
    key: Option<String>,
    request: Request<Incoming>,
    max_body: usize,
    too_large: &str,
) -> Result<(hyper::http::request::Parts, String, Option<String>, Bytes), Answer> {
    let Some(key) = key.filter(|k| shared.accounts.is_valid(Some(k))) else {
        return Err(closing(unauthorized()));
    };
    let idempotency = match request.headers().get(protocol::IDEMPOTENCY_KEY).map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if protocol::valid_idempotency_key(k) => Some(k.to_string()),
        Some(_) => {
            return Err(closing(error(
                400,
                format!("Idempotency-Key must be 1 to {} visible ASCII characters", protocol::MAX_IDEMPOTENCY_KEY_LEN),
                None,
            )));
        }
    };
    // A declared length over the limit is refused before a byte of the body is read (and
    // nothing is allocated from the claim).
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return Err(closing(error(413, too_large, None)));
    }
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(shared.read_timeout, Limited::new(body, max_body).collect()).await;
    match read {
        Err(_) => Err(closing(error(408, format!("the body took longer than {:?}", shared.read_timeout), None))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(closing(error(413, too_large, None))),
        Ok(Err(e)) => Err(closing(error(400, format!("cannot read the body: {e}"), None))),
        Ok(Ok(collected)) => Ok((parts, key, idempotency, collected.to_bytes())),
    }
}

/// Charge `key` for the images in `body` (unless `idempotency` names a request it was charged for
/// already) and answer them.
fn answer(shared: &Shared, key: &str, idempotency: Option<&str>, body: &[u8]) -> Answer {
    let [c, h, w] = shared.info.input_shape;
    if body.is_empty() || !body.len().is_multiple_of(shared.image_bytes) {
        return error(
            400,
            format!(
                "body has {} bytes: send N images of {c}x{h}x{w} u8 pixels ({} bytes each), back to back",
                body.len(),
                shared.image_bytes
            ),
            None,
        );
    }
    let answered = match charge_and_run(shared, key, idempotency, protocol::fnv1a(body), body) {
        Ok(answered) => answered,
        Err(refused) => return refused.answer(),
    };
    let Answered { count, logits, remaining, replayed } = answered;
    let answer = match shared.info.response {
        ResponseMode::Soft => QueryResponse { count, logits: Some(logits), labels: None, remaining },
        ResponseMode::Hard => QueryResponse {
            count,
            logits: None,
            labels: Some(argmax_rows(&logits, shared.info.num_classes)),
            remaining,
        },
    };
    replayed_if(json(200, &answer), replayed)
}

/// A request refused: its status, message and (on 429) the queries left.
pub(super) struct Reject {
    status: u16,
    message: String,
    remaining: Option<u64>,
}

impl Reject {
    /// A refusal with `status` and `message`.
    pub(super) fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), remaining: None }
    }

    /// The answer that says it.
    pub(super) fn answer(self) -> Answer {
        error(self.status, self.message, self.remaining)
    }
}

/// Mark the answer to a repeated idempotency key.
pub(super) fn replayed_if(mut response: Answer, replayed: bool) -> Answer {
    if replayed {
        response.headers_mut().insert(protocol::IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// The model's answer to a charged request.
pub(super) struct Answered {
    /// Images answered.
    pub count: usize,
    /// Their logits, row by row.
    pub logits: Vec<f32>,
    /// Queries left for the key.
    pub remaining: Option<u64>,
    /// The request was charged before under its idempotency key (and not now).
    pub replayed: bool,
}

/// The one charging rule of both protocols: charge `key` for the images in `pixels` (whole
/// `u8` CHW images, back to back) unless `idempotency` names a request with this `body_hash`
/// that was charged already, run the model, and refund the charge if the model fails. `Err` is
/// the refusal to send.
pub(super) fn charge_and_run(
    shared: &Shared,
    key: &str,
    idempotency: Option<&str>,
    body_hash: u64,
    pixels: &[u8],
) -> Result<Answered, Reject> {
    let count = pixels.len() / shared.image_bytes;
    let asked = idempotency.map(|k| Idempotency { key: k, body_hash });
    let grant = match shared.accounts.reserve(Some(key), count as u64, asked) {
        Ok(grant) => grant,
        Err(Refusal::BudgetExhausted { remaining }) => {
            let message = format!("query budget exhausted: {count} images asked, {remaining} left");
            return Err(Reject { status: 429, message, remaining: Some(remaining) });
        }
        Err(Refusal::Unauthorized) => return Err(Reject::new(401, UNAUTHORIZED)),
        Err(Refusal::IdempotencyMismatch) => {
            return Err(Reject::new(422, "this Idempotency-Key was used for another request body"));
        }
    };
    let input = to_model_input(pixels, shared.info.input_shape, &shared.norm);
    match shared.batcher.infer(input, count) {
        Ok(logits) => Ok(Answered { count, logits, remaining: grant.remaining, replayed: grant.replayed }),
        Err(e) => {
            if !grant.replayed {
                shared.accounts.refund(key, count as u64, idempotency);
            }
            Err(Reject::new(500, format!("the model failed: {e}")))
        }
    }
}
