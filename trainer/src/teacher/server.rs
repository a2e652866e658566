//! `mekd teacher serve`: any ONNX image classifier behind an HTTP API with API keys, a
//! per-key query budget, size limits and a response mode fixed by the operator. The wire
//! protocol is documented in `mekd_contract::protocol` and the README.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

use mekd_contract::Normalisation;
use mekd_contract::protocol::{ResponseMode, v2};

use super::accounts::Accounts;
use super::batcher::Batcher;
use super::http::{Answer, Shared, api_key};
use crate::teacher::onnx_model::OrtTeacherModel;

/// Default of [`ServeConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 1024;
/// Default of [`ServeConfig::model_batch`].
pub const DEFAULT_MODEL_BATCH: usize = 256;
/// Default of [`ServeConfig::threads`].
pub const DEFAULT_THREADS: usize = 8;
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
            max_batch: DEFAULT_MAX_BATCH,
            model_batch: DEFAULT_MODEL_BATCH,
            threads: DEFAULT_THREADS,
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
    let model = OrtTeacherModel::open(&config.model, config.normalisation.clone(), config.ort_library.as_deref())?;
    let info = model.teacher_info(config.response, config.max_batch);
    let OrtTeacherModel { session, input_shape: [c, h, w], num_classes, norm, .. } = model;
    let usage_file = config.usage_file.clone().unwrap_or_else(|| {
        let mut name = config.keys.file_name().unwrap_or_default().to_os_string();
        name.push(".usage.json");
        config.keys.with_file_name(name)
    });
    let accounts = Accounts::open(&config.keys, config.budget, &usage_file)?;
    let (batcher, batcher_thread) =
        Batcher::start(session, [c, h, w], num_classes, config.model_batch.max(config.max_batch));
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

/// Route a request to the protocol its path names.
async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Answer, Infallible> {
    let key = api_key(request.headers());
    let path = request.uri().path();
    if path == v2::PREFIX || path.starts_with("/v2/") {
        return Ok(super::v2::handle(shared, key, request).await);
    }
    Ok(super::v1::handle(shared, key, request).await)
}
