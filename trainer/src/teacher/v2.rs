//! The server's Open Inference Protocol (KServe v2) endpoints: the same model, keys, budgets,
//! idempotency keys, limits and counts as the own API (`mekd_contract::protocol`), for standard
//! clients (`tritonclient`, KServe's and MLServer's clients, `curl`).
//!
//! The model has one input, [`INPUT`]: `UINT8` pixels `[N, C, H, W]` that the server normalises
//! as for the own API; and one output: [`LOGITS`] (`FP32 [N, K]`) in soft mode, [`LABEL`]
//! (`INT64 [N]`, the top-1 class) in hard mode. A request is charged `N` queries.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use mekd_contract::protocol::v2::{
    self, Data, InferRequest, InferResponse, ModelMetadata, ServerMetadata, Tensor, TensorMetadata, Values,
};
use mekd_contract::protocol::{self, ResponseMode};
use mekd_runtime::engine::argmax_rows;

use super::http::{
    Answer, Answered, Reject, Shared, charge_and_run, error, json, read_chargeable, replayed_if, unauthorized,
};

/// The model's input tensor.
pub const INPUT: &str = "images";
/// The model's output in soft mode: logits, `FP32 [N, K]`.
pub const LOGITS: &str = "logits";
/// The model's output in hard mode: the top-1 class, `INT64 [N]`.
pub const LABEL: &str = "label";
/// The one version the model is served as.
const VERSION: &str = "1";
/// Most JSON bytes per pixel an infer body may spend (`"255, "` and nesting brackets): the
/// body limit is the own API's times this, plus [`JSON_SLACK`] for the rest of the request.
const JSON_BYTES_PER_PIXEL: usize = 6;
/// Bytes of an infer body beyond its pixels (names, shape, parameters).
const JSON_SLACK: usize = 64 * 1024;

/// Answer a request under `/v2`.
pub(super) async fn handle(shared: Arc<Shared>, key: Option<String>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_string();
    let get = request.method() == Method::GET;
    let post = request.method() == Method::POST;
    let not_allowed = || error(405, format!("{path} does not accept {}", request.method()), None);
    match path.as_str() {
        v2::LIVE if get => json(200, &serde_json::json!({"live": true})),
        v2::READY if get => json(200, &serde_json::json!({"ready": true})),
        v2::PREFIX if get => json(
            200,
            &ServerMetadata {
                name: "mekd-teacher".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: vec![v2::BINARY_EXTENSION.into()],
            },
        ),
        v2::LIVE | v2::READY | v2::PREFIX => not_allowed(),
        _ => {
            let Some(rest) = path.strip_prefix(v2::MODELS) else {
                return error(404, format!("no endpoint {path}; see {}{}", v2::MODELS, shared.model_name), None);
            };
            let (name, action) = rest.split_once('/').unwrap_or((rest, ""));
            if name != shared.model_name {
                return error(404, format!("no model {name:?}; this server serves {:?}", shared.model_name), None);
            }
            let action = match action.strip_prefix("versions/") {
                None => action,
                Some(versioned) => match versioned.split_once('/').unwrap_or((versioned, "")) {
                    (VERSION, action) => action,
                    (other, _) => return error(404, format!("no version {other:?}; the model has {VERSION:?}"), None),
                },
            };
            match action {
                "" if get && shared.accounts.is_valid(key.as_deref()) => json(200, &metadata(&shared)),
                "" if get => unauthorized(),
                "ready" if get => json(200, &serde_json::json!({"name": shared.model_name, "ready": true})),
                "infer" if post => infer(shared, key, request).await,
                "" | "ready" | "infer" => not_allowed(),
                _ => error(404, format!("no endpoint {path}"), None),
            }
        }
    }
}

/// `GET /v2/models/{name}`.
fn metadata(shared: &Shared) -> ModelMetadata {
    let [c, h, w] = shared.info.input_shape;
    let output = match shared.info.response {
        ResponseMode::Soft => TensorMetadata {
            name: LOGITS.into(),
            datatype: "FP32".into(),
            shape: vec![-1, shared.info.num_classes as i64],
        },
        ResponseMode::Hard => TensorMetadata { name: LABEL.into(), datatype: "INT64".into(), shape: vec![-1] },
    };
    ModelMetadata {
        name: shared.model_name.clone(),
        versions: Some(vec![VERSION.into()]),
        platform: "onnxruntime_onnx".into(),
        inputs: vec![TensorMetadata {
            name: INPUT.into(),
            datatype: "UINT8".into(),
            shape: vec![-1, c as i64, h as i64, w as i64],
        }],
        outputs: vec![output],
    }
}

async fn infer(shared: Arc<Shared>, key: Option<String>, request: Request<Incoming>) -> Answer {
    let max_body = shared.info.max_batch * shared.image_bytes * JSON_BYTES_PER_PIXEL + JSON_SLACK;
    let too_large = format!("body larger than {max_body} bytes (at most {} images per request)", shared.info.max_batch);
    let (parts, key, idempotency, body) = match read_chargeable(&shared, key, request, max_body, &too_large).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    // The accounts and the model block: off the connection threads.
    tokio::task::spawn_blocking(move || {
        answer(&shared, &key, idempotency.as_deref(), &parts.headers, &body).unwrap_or_else(Reject::answer)
    })
    .await
    .unwrap_or_else(|e| error(500, format!("the request's worker failed: {e}"), None))
}

/// A 400 refusal.
fn bad(message: impl Into<String>) -> Reject {
    Reject::new(400, message)
}

/// Read, charge and answer one inference request.
fn answer(
    shared: &Shared,
    key: &str,
    idempotency: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Answer, Reject> {
    let header_length = match headers.get(v2::HEADER_LENGTH).map(|v| v.to_str()) {
        None => None,
        Some(Ok(text)) => Some(text),
        Some(Err(_)) => return Err(bad(format!("{} must be a byte count", v2::HEADER_LENGTH))),
    };
    let (json_part, binary) = v2::split_body(body, header_length).map_err(bad)?;
    let request: InferRequest<Values> =
        serde_json::from_slice(json_part).map_err(|e| bad(format!("not an inference request: {e}")))?;
    let pixels = pixels(shared, &request, binary)?;
    let output_name = match shared.info.response {
        ResponseMode::Soft => LOGITS,
        ResponseMode::Hard => LABEL,
    };
    let mut binary_output = v2::flag(request.parameters.as_ref(), v2::BINARY_DATA_OUTPUT);
    for wanted in request.outputs.iter().flatten() {
        if wanted.name != output_name {
            return Err(bad(format!("no output {:?}; this model answers {output_name:?}", wanted.name)));
        }
        binary_output |= v2::flag(wanted.parameters.as_ref(), v2::BINARY_DATA);
    }
    let Answered { count, logits, remaining, replayed } =
        charge_and_run(shared, key, idempotency, protocol::fnv1a(body), &pixels)?;
    let (shape, data) = match shared.info.response {
        ResponseMode::Soft => (vec![count as u64, shared.info.num_classes as u64], Data::F32(logits)),
        ResponseMode::Hard => {
            let labels = argmax_rows(&logits, shared.info.num_classes).into_iter().map(|l| l as i64).collect();
            (vec![count as u64], Data::I64(labels))
        }
    };
    let (output, tail) = Tensor::carrying(output_name, shape, data, binary_output);
    let answer = InferResponse {
        model_name: shared.model_name.clone(),
        model_version: Some(VERSION.into()),
        id: request.id,
        parameters: remaining.map(|r| v2::parameter(v2::REMAINING, r)),
        outputs: vec![output],
    };
    let response = if binary_output {
        let head = serde_json::to_vec(&answer).expect("serialisable");
        let mut response = Response::new(Full::new(Bytes::from(v2::with_binary(&head, &tail))));
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        headers.insert(v2::HEADER_LENGTH, HeaderValue::from(head.len()));
        response
    } else {
        json(200, &answer)
    };
    Ok(replayed_if(response, replayed))
}

/// The request's images as `u8` CHW pixels, back to back, after checking the input against the
/// model's metadata; an error names what does not match.
fn pixels(shared: &Shared, request: &InferRequest<Values>, binary: &[u8]) -> Result<Vec<u8>, Reject> {
    let [c, h, w] = shared.info.input_shape;
    let expected = format!("one input {INPUT:?}, UINT8 [N, {c}, {h}, {w}]");
    let [input] = request.inputs.as_slice() else {
        return Err(bad(format!("{} inputs; the model takes {expected}", request.inputs.len())));
    };
    if input.name != INPUT || input.datatype != "UINT8" {
        return Err(bad(format!("input {:?} {}; the model takes {expected}", input.name, input.datatype)));
    }
    let n = match input.shape.as_slice() {
        &[n, ic, ih, iw] if n >= 1 && [ic, ih, iw] == [c as u64, h as u64, w as u64] => n,
        shape => return Err(bad(format!("input shape {shape:?}; the model takes {expected}, N >= 1"))),
    };
    if n > shared.info.max_batch as u64 {
        return Err(Reject::new(413, format!("{n} images; at most {} per request", shared.info.max_batch)));
    }
    let len = n as usize * shared.image_bytes;
    match (input.binary_size(), &input.data) {
        (Some(size), None) if size == len as u64 && binary.len() == len => Ok(binary.to_vec()),
        (Some(size), None) => Err(bad(format!(
            "binary data of {size} bytes declared, {} sent after the JSON; the shape needs {len}",
            binary.len()
        ))),
        (None, Some(Values(values))) if binary.is_empty() => {
            if values.len() != len {
                return Err(bad(format!("{} values; shape {:?} needs {len}", values.len(), input.shape)));
            }
            values
                .iter()
                .map(|&v| if v.fract() == 0.0 && (0.0..=255.0).contains(&v) { Ok(v as u8) } else { Err(v) })
                .collect::<Result<_, _>>()
                .map_err(|v| bad(format!("{v} is not a UINT8 pixel (0 to 255)")))
        }
        _ => Err(bad(format!(
            "the input needs either \"data\" or \"parameters\": {{\"{}\": {len}}} with the bytes after the JSON",
            v2::BINARY_DATA_SIZE
        ))),
    }
}
