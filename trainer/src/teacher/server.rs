//! `mekd teacher serve`: any ONNX image classifier behind an HTTP API with API keys, a
//! per-key query budget, size limits and a response mode fixed by the operator. The wire
//! protocol is documented in `mekd_runtime::protocol` and the README.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tiny_http::{Header, Method, Request, Response};

use mekd_runtime::data::preprocess::{Normalisation, to_model_input};
use mekd_runtime::engine::{argmax_rows, inspect};
use mekd_runtime::protocol::{self, ErrorBody, QueryResponse, ResponseMode, TeacherInfo, Usage};

use super::accounts::{Accounts, Refusal};
use super::batcher::Batcher;
use crate::onnxruntime::OrtClassifier;

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
    /// The ONNX Runtime library, if not found automatically.
    pub ort_library: Option<PathBuf>,
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
            ort_library: None,
        }
    }
}

/// State shared by the HTTP workers.
struct Shared {
    info: TeacherInfo,
    norm: Normalisation,
    accounts: Accounts,
    batcher: Batcher,
    image_bytes: usize,
}

/// A server running in background threads; [`RunningServer::shutdown`] stops it cleanly.
pub struct RunningServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    batcher: Option<JoinHandle<()>>,
    shared: Option<Arc<Shared>>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, finish the requests in flight, persist the counts.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
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
    if config.max_batch == 0 || config.model_batch == 0 || config.threads == 0 {
        bail!("max batch, model batch and threads must be at least 1");
    }
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
    let shared = Arc::new(Shared { info, norm, accounts, batcher, image_bytes: c * h * w });
    let listener =
        std::net::TcpListener::bind(&config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux): without it, a response
    // written in several segments waits ~40 ms for the client's delayed ACK (Nagle).
    socket2::SockRef::from(&listener).set_tcp_nodelay(true).context("setting TCP_NODELAY")?;
    let server = Arc::new(
        tiny_http::Server::from_listener(listener, None)
            .map_err(|e| anyhow::anyhow!("cannot serve on {}: {e}", config.listen))?,
    );
    let addr = server.server_addr().to_ip().ok_or_else(|| anyhow::anyhow!("{} is not an IP address", config.listen))?;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..config.threads)
        .map(|i| {
            let (server, shared, stop) = (server.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("teacher-http-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) {
                            handle(&shared, request);
                        }
                    }
                })
                .expect("spawn an HTTP worker")
        })
        .collect();
    Ok(RunningServer { addr, stop, workers, batcher: Some(batcher_thread), shared: Some(shared) })
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
fn api_key(request: &Request) -> Option<String> {
    request.headers().iter().find_map(|h| {
        let value = h.value.as_str().trim();
        if h.field.equiv("Authorization") {
            value.strip_prefix("Bearer ").map(|k| k.trim().to_string())
        } else if h.field.equiv("X-Api-Key") {
            Some(value.to_string())
        } else {
            None
        }
    })
}

fn json<T: Serialize>(status: u16, body: &T) -> Response<std::io::Cursor<Vec<u8>>> {
    let bytes = serde_json::to_vec(body).expect("serialisable");
    Response::from_data(bytes)
        .with_status_code(status)
        .with_header(Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("valid header"))
}

fn error(status: u16, message: impl Into<String>, remaining: Option<u64>) -> Response<std::io::Cursor<Vec<u8>>> {
    json(status, &ErrorBody { error: message.into(), remaining })
}

fn handle(shared: &Shared, mut request: Request) {
    let key = api_key(&request);
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let response = match (request.method(), path.as_str()) {
        (Method::Get, protocol::HEALTH) => json(200, &serde_json::json!({"status": "ok"})),
        (Method::Get, protocol::INFO) if shared.accounts.is_valid(key.as_deref()) => json(200, &shared.info),
        (Method::Get, protocol::USAGE) => match shared.accounts.usage(key.as_deref()) {
            Ok((used, budget, remaining)) => json(200, &Usage { used, budget, remaining }),
            Err(_) => unauthorized(),
        },
        (Method::Get, protocol::INFO) => unauthorized(),
        (Method::Post, protocol::QUERY) => query(shared, key.as_deref(), &mut request),
        (_, protocol::HEALTH | protocol::INFO | protocol::USAGE | protocol::QUERY) => {
            error(405, format!("{} does not accept {}", path, request.method()), None)
        }
        _ => error(404, format!("no endpoint {path}; see {} and {}", protocol::INFO, protocol::QUERY), None),
    };
    let _ = request.respond(response);
}

fn unauthorized() -> Response<std::io::Cursor<Vec<u8>>> {
    error(401, "missing or invalid API key (send `Authorization: Bearer KEY`)", None)
}

fn query(shared: &Shared, key: Option<&str>, request: &mut Request) -> Response<std::io::Cursor<Vec<u8>>> {
    let Some(key) = key.filter(|k| shared.accounts.is_valid(Some(k))) else {
        return unauthorized();
    };
    let max_body = shared.info.max_batch * shared.image_bytes;
    if request.body_length().is_some_and(|n| n > max_body) {
        return error(413, format!("body larger than {max_body} bytes ({} images)", shared.info.max_batch), None);
    }
    let mut body = Vec::new();
    if let Err(e) = request.as_reader().take(max_body as u64 + 1).read_to_end(&mut body) {
        return error(400, format!("cannot read the body: {e}"), None);
    }
    if body.len() > max_body {
        return error(413, format!("body larger than {max_body} bytes ({} images)", shared.info.max_batch), None);
    }
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
    let count = body.len() / shared.image_bytes;
    let remaining = match shared.accounts.reserve(Some(key), count as u64) {
        Ok(remaining) => remaining,
        Err(Refusal::BudgetExhausted { remaining }) => {
            return error(
                429,
                format!("query budget exhausted: {count} images asked, {remaining} left"),
                Some(remaining),
            );
        }
        Err(Refusal::Unauthorized) => return unauthorized(),
    };
    let input = to_model_input(&body, shared.info.input_shape, &shared.norm);
    match shared.batcher.infer(input, count) {
        Ok(logits) => {
            let answer = match shared.info.response {
                ResponseMode::Soft => QueryResponse { count, logits: Some(logits), labels: None, remaining },
                ResponseMode::Hard => QueryResponse {
                    count,
                    logits: None,
                    labels: Some(argmax_rows(&logits, shared.info.num_classes)),
                    remaining,
                },
            };
            json(200, &answer)
        }
        Err(e) => {
            shared.accounts.refund(key, count as u64);
            error(500, format!("the model failed: {e}"), None)
        }
    }
}
