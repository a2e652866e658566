//! The teacher's own API (`/v1/...`, [`mekd_contract::protocol`]): health, info, usage and
//! queries of raw `u8` images.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request};
use mekd_contract::protocol::{self, KeyUsage, QueryResponse, ResponseMode};
use mekd_runtime::engine::argmax_rows;

use super::http::{Answer, Answered, Shared, charge_and_run, error, json, read_chargeable, replayed_if, unauthorized};

/// Answer a request to a `/v1/` path (or an unknown one) with `key`, the request's API key.
pub(super) async fn handle(shared: Arc<Shared>, key: Option<String>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, protocol::HEALTH) => json(200, &serde_json::json!({"status": "ok"})),
        (&Method::GET, protocol::INFO) if shared.accounts.is_valid(key.as_deref()) => json(200, &shared.info),
        (&Method::GET, protocol::USAGE) => match shared.accounts.usage(key.as_deref()) {
            Ok((used, budget, remaining)) => json(200, &KeyUsage { used, budget, remaining }),
            Err(_) => unauthorized(),
        },
        (&Method::GET, protocol::INFO) => unauthorized(),
        (&Method::POST, protocol::QUERY) => query(shared, key, request).await,
        (_, protocol::HEALTH | protocol::INFO | protocol::USAGE | protocol::QUERY) => {
            error(405, format!("{path} does not accept {method}"), None)
        }
        _ => error(404, format!("no endpoint {path}; see {} and {}", protocol::INFO, protocol::QUERY), None),
    }
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
