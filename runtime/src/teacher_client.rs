//! A blocking HTTP client for the teacher server (keep-alive, no TLS: the API is meant to sit
//! behind a TLS-terminating proxy in production, and on loopback in tests).
//!
//! Queries survive a flaky network and a restarting server: every query carries an
//! `Idempotency-Key` (the caller's, or a fresh random one), and a query that failed in transport
//! or found the server unavailable (502, 503, 504, or 429 with `Retry-After`) is sent again
//! under the same key, with capped exponential backoff and jitter, until [`RetryPolicy::deadline`].
//! The server charges a key once, so a retry never pays twice.

use std::time::{Duration, Instant};

use crate::protocol::{self, ErrorBody, QueryResponse, TeacherInfo, Usage};
use crate::rng::os_random_u64;

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

/// A connection to one teacher server with one API key.
pub struct HttpClient {
    base: String,
    key: String,
    agent: ureq::Agent,
    retry: RetryPolicy,
}

/// Bytes that crossed the wire for one call (HTTP bodies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Request body bytes.
    pub up: u64,
    /// Response body bytes.
    pub down: u64,
}

impl HttpClient {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base_url: &str, key: &str) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            key: key.to_string(),
            agent: config.into(),
            retry: RetryPolicy::default(),
        }
    }

    /// This client with another retry policy for its queries.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn transport(&self, path: &str, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { url: self.url(path), reason: e.to_string() }
    }

    /// Read a response: JSON `T` on 200, a typed error otherwise.
    fn finish<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> Result<(T, u64), ClientError> {
        let status = response.status().as_u16();
        let body =
            response.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| self.transport(path, e))?;
        let down = body.len() as u64;
        if status == 200 {
            let value = serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))?;
            return Ok((value, down));
        }
        let error: ErrorBody = serde_json::from_slice(&body)
            .unwrap_or(ErrorBody { error: String::from_utf8_lossy(&body).into_owned(), remaining: None });
        Err(match (status, error.remaining) {
            (429, Some(remaining)) => ClientError::BudgetExhausted { remaining, message: error.error },
            _ => ClientError::Status { status, message: error.error },
        })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.key))
            .call()
            .map_err(|e| self.transport(path, e))?;
        Ok(self.finish(path, response)?.0)
    }

    /// `GET /v1/health`: whether the server answers.
    pub fn health(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.get(protocol::HEALTH)?;
        Ok(())
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Result<TeacherInfo, ClientError> {
        self.get(protocol::INFO)
    }

    /// `GET /v1/usage`.
    pub fn usage(&self) -> Result<Usage, ClientError> {
        self.get(protocol::USAGE)
    }

    /// `POST /v1/query` with `images` (`u8`, CHW, back to back), under `idempotency_key` (a
    /// fresh random one when `None`), retried as the [`RetryPolicy`] says. The transfer counts
    /// the attempt that was answered.
    pub fn query(
        &self,
        images: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<(QueryResponse, Transfer), ClientError> {
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
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let sent = self
                .agent
                .post(self.url(protocol::QUERY))
                .header("Authorization", format!("Bearer {}", self.key))
                .header(protocol::IDEMPOTENCY_KEY, key)
                .content_type("application/octet-stream")
                .send(images);
            // What to do with this attempt: finish, or wait (at least this long) and send again.
            let (retry_after, failure) = match sent {
                Err(e) => (None, self.transport(protocol::QUERY, e)),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let unavailable = matches!(status, 502..=504) || (status == 429 && retry_after.is_some());
                    match self.finish::<QueryResponse>(protocol::QUERY, response) {
                        Ok((answer, down)) => return Ok((answer, Transfer { up: images.len() as u64, down })),
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
}
