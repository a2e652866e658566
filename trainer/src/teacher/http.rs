//! What both protocols of the teacher server share: the handlers' state, the API key of a
//! request, JSON answers and refusals, reading a chargeable request within its limits, and the
//! one charging rule ([`charge_and_run`]).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use mekd_contract::protocol::{self, ErrorBody, TeacherInfo};
use mekd_contract::{Normalisation, to_model_input};
use serde::Serialize;

use super::accounts::{Accounts, Idempotency, Refusal};
use super::batcher::Batcher;

/// State shared by the HTTP handlers.
pub(super) struct Shared {
    pub(super) info: TeacherInfo,
    pub(super) model_name: String,
    pub(super) norm: Normalisation,
    pub(super) accounts: Accounts,
    pub(super) batcher: Batcher,
    pub(super) image_bytes: usize,
    pub(super) read_timeout: Duration,
}

/// The API key of a request: `Authorization: Bearer KEY` or `X-Api-Key: KEY`.
pub(super) fn api_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()?.trim().strip_prefix("Bearer "));
    if let Some(key) = bearer {
        return Some(key.trim().to_string());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string())
}

/// An HTTP answer.
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
