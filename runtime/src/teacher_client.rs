//! A blocking HTTP client for the teacher server (keep-alive, no TLS: the API is meant to sit
//! behind a TLS-terminating proxy in production, and on loopback in tests).

use std::time::Duration;

use crate::protocol::{self, ErrorBody, QueryResponse, TeacherInfo, Usage};

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

/// A connection to one teacher server with one API key.
pub struct HttpClient {
    base: String,
    key: String,
    agent: ureq::Agent,
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
        Self { base: base_url.trim_end_matches('/').to_string(), key: key.to_string(), agent: config.into() }
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

    /// `POST /v1/query` with `images` (`u8`, CHW, back to back).
    pub fn query(&self, images: &[u8]) -> Result<(QueryResponse, Transfer), ClientError> {
        let response = self
            .agent
            .post(self.url(protocol::QUERY))
            .header("Authorization", format!("Bearer {}", self.key))
            .content_type("application/octet-stream")
            .send(images)
            .map_err(|e| self.transport(protocol::QUERY, e))?;
        let (answer, down): (QueryResponse, u64) = self.finish(protocol::QUERY, response)?;
        Ok((answer, Transfer { up: images.len() as u64, down }))
    }
}
