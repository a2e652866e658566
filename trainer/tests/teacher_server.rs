//! The teacher server on loopback: answers, keys, limits, budgets, concurrency, restarts, and a
//! model this project did not export.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use mekd_contract::Usage;
use mekd_contract::protocol::ResponseMode;
use mekd_contract::{Normalisation, to_model_input};
use mekd_models::export::ExportMetadata;
use mekd_models::{Architecture, ClassifierSpec};
use mekd_runtime::teacher_client::{ClientError, HttpClient};
use mekd_runtime::{Dataset, Split};
use mekd_trainer::blackbox::{HttpTeacher, Responses, Teacher, TeacherError};
use mekd_trainer::export::{Agreement, burn_logits, export_verified};
use mekd_trainer::teacher::server::{RunningServer, ServeConfig, start};

const KEY: &str = "key-alpha";

/// A raw HTTP/1.1 exchange, independent of the project's client: the answer's bytes.
fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    response
}

/// A raw exchange's `(status, body)`.
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    parse_answer(&exchange(addr, method, path, headers, body)).expect("an HTTP answer")
}

/// `(status, body)` of a raw HTTP answer; `None` when nothing (or no status line) came back.
fn parse_answer(response: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

fn healthy(addr: SocketAddr) {
    assert_eq!(raw(addr, "GET", "/v1/health", &[], b"").0, 200);
}

/// A LeNet-5 teacher exported to `dir`, with the burn model kept for reference logits.
fn teacher(dir: &Path) -> (PathBuf, mekd_models::Classifier) {
    let spec = ClassifierSpec { architecture: Architecture::LeNet5, in_channels: 1, num_classes: 10 };
    let device = Device::flex();
    device.seed(21);
    let model = spec.init(&device).unwrap();
    let path = dir.join("teacher.onnx");
    export_verified(&model, &spec, &ExportMetadata::symmetric(1), &path).unwrap();
    (path, model)
}

fn keys_file(dir: &Path) -> PathBuf {
    let path = dir.join("keys.txt");
    std::fs::write(&path, format!("# test keys\n{KEY}\nkey-beta\n")).unwrap();
    path
}

fn serve(model: &Path, keys: &Path, response: ResponseMode, budget: Option<u64>) -> RunningServer {
    let mut config = ServeConfig::new(model.to_path_buf(), "127.0.0.1:0", response, keys.to_path_buf());
    config.budget = budget;
    config.max_batch = 16;
    start(&config).unwrap()
}

fn mnist_images(n: usize) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-slice");
    Dataset::load(&root, Split::Test).unwrap().take(n).prepare(1, 32).unwrap().pixels
}

#[test]
fn soft_and_hard_answers_match_the_burn_model() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, model) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let images = mnist_images(12);
    let expected =
        burn_logits(&model, &to_model_input(&images, [1, 32, 32], &Normalisation::symmetric(1)), [1, 32, 32]);

    let soft = serve(&model_path, &keys, ResponseMode::Soft, None);
    let mut client = HttpTeacher::connect(&soft.url(), KEY, None).unwrap();
    assert_eq!(client.info().input_shape, [1, 32, 32]);
    assert_eq!(client.info().response, ResponseMode::Soft);
    let Responses::Soft(logits) = client.query(&images).unwrap() else { panic!("soft server gave hard answers") };
    let agreement = Agreement::of(&expected, &logits, 10);
    assert!(agreement.ok(), "{agreement:?}");
    let usage = client.usage();
    assert_eq!((usage.queries, usage.bytes_up), (12, 12 * 1024));
    assert!(usage.bytes_down > 0);
    soft.shutdown().unwrap();

    let hard = serve(&model_path, &keys, ResponseMode::Hard, None);
    let mut client = HttpTeacher::connect(&hard.url(), KEY, None).unwrap();
    let Responses::Hard(labels) = client.query(&images).unwrap() else { panic!("hard server leaked logits") };
    assert_eq!(labels, mekd_runtime::engine::argmax_rows(&expected, 10));
    // The hard answer carries nothing but the classes.
    let (status, body) =
        raw(hard.addr(), "POST", "/v1/query", &[("Authorization", &format!("Bearer {KEY}"))], &images[..1024]);
    assert_eq!(status, 200);
    assert!(!body.contains("logits"), "{body}");
}

#[test]
fn rejections_are_clear_and_leave_the_server_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, Some(20));
    let addr = server.addr();
    let bearer = format!("Bearer {KEY}");
    let auth = [("Authorization", bearer.as_str())];
    let image = vec![0u8; 1024];

    let (status, body) = raw(addr, "POST", "/v1/query", &[], &image);
    assert_eq!(status, 401, "{body}");
    healthy(addr);
    let (status, _) = raw(addr, "POST", "/v1/query", &[("Authorization", "Bearer nope")], &image);
    assert_eq!(status, 401);
    assert_eq!(raw(addr, "GET", "/v1/info", &[("X-Api-Key", "nope")], b"").0, 401);
    healthy(addr);
    // Oversized batch: 17 images, limit 16.
    let (status, body) = raw(addr, "POST", "/v1/query", &auth, &vec![0u8; 17 * 1024]);
    assert_eq!(status, 413, "{body}");
    healthy(addr);
    // Malformed bodies: empty, and images of the wrong shape (28x28 instead of 32x32).
    let (status, body) = raw(addr, "POST", "/v1/query", &auth, b"");
    assert_eq!(status, 400, "{body}");
    let (status, body) = raw(addr, "POST", "/v1/query", &auth, &vec![0u8; 3 * 784]);
    assert_eq!(status, 400);
    assert!(body.contains("1x32x32"), "{body}");
    healthy(addr);
    assert_eq!(raw(addr, "GET", "/v1/query", &auth, b"").0, 405);
    assert_eq!(raw(addr, "GET", "/v2/anything", &auth, b"").0, 404);
    // None of the rejected requests was counted.
    let client = HttpClient::new(&server.url(), KEY).unwrap();
    assert_eq!(client.usage().unwrap().used, 0);

    // Budget exhaustion on the server: 20 queries, then 429 with what is left.
    let (status, _) = raw(addr, "POST", "/v1/query", &[("X-Api-Key", KEY)], &vec![0u8; 16 * 1024]);
    assert_eq!(status, 200);
    match client.query(&vec![0u8; 5 * 1024], None) {
        Err(ClientError::BudgetExhausted { remaining, .. }) => assert_eq!(remaining, 4),
        other => panic!("expected budget exhaustion, got {other:?}"),
    }
    let mut teacher = HttpTeacher::connect(&server.url(), KEY, None).unwrap();
    match teacher.query(&vec![0u8; 5 * 1024]) {
        Err(TeacherError::BudgetExhausted { requested, .. }) => assert_eq!(requested, 5),
        other => panic!("expected budget exhaustion, got {:?}", other.map(|_| ())),
    }
    assert!(teacher.query(&vec![0u8; 4 * 1024]).is_ok());
    healthy(addr);
    assert_eq!(client.usage().unwrap().remaining, Some(0));

    // Budget exhaustion on the client: refused before anything is sent.
    let mut budgeted = HttpTeacher::connect(&server.url(), "key-beta", Some(3)).unwrap();
    assert!(budgeted.query(&vec![0u8; 2 * 1024]).is_ok());
    assert!(matches!(
        budgeted.query(&vec![0u8; 2 * 1024]),
        Err(TeacherError::BudgetExhausted { used: 2, requested: 2, limit: 3 })
    ));
    assert_eq!(HttpClient::new(&server.url(), "key-beta").unwrap().usage().unwrap().used, 2);
}

#[test]
fn concurrent_clients_are_counted_exactly_and_counts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, None);
    let url = server.url();
    let images = mnist_images(5);
    let sent: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|client| {
                let (url, images) = (url.clone(), images.clone());
                scope.spawn(move || {
                    let mut teacher = HttpTeacher::connect(&url, KEY, None).unwrap();
                    let mut sent = 0;
                    for step in 0..20 {
                        let n = 1 + (client + step) % 5;
                        let Responses::Soft(logits) = teacher.query(&images[..n * 1024]).unwrap() else { panic!() };
                        assert_eq!(logits.len(), n * 10);
                        sent += n as u64;
                    }
                    assert_eq!(teacher.usage().queries, sent);
                    sent
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let client = HttpClient::new(&url, KEY).unwrap();
    assert_eq!(client.usage().unwrap().used, sent);
    server.shutdown().unwrap();

    let restarted = serve(&model_path, &keys, ResponseMode::Soft, Some(sent + 2));
    let client = HttpClient::new(&restarted.url(), KEY).unwrap();
    let usage = client.usage().unwrap();
    assert_eq!((usage.used, usage.remaining), (sent, Some(2)));
    assert!(client.query(&images[..3 * 1024], None).is_err());
}

/// A raw query's `(status, head lower-cased, body)`.
fn raw_with_headers(addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(&exchange(addr, "POST", "/v1/query", headers, body)).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

#[test]
fn a_query_sent_again_is_charged_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, Some(10));
    let images = mnist_images(3);
    let bearer = format!("Bearer {KEY}");
    let keyed = |k: &'static str| [("Authorization", bearer.clone()), ("Idempotency-Key", k.to_string())];
    let send = |addr, headers: &[(&str, String)], body: &[u8]| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        raw_with_headers(addr, &headers, body)
    };
    let (status, head, first) = send(server.addr(), &keyed("req-1"), &images);
    assert_eq!(status, 200, "{first}");
    assert!(!head.contains("idempotent-replayed"), "{head}");
    let (status, head, again) = send(server.addr(), &keyed("req-1"), &images);
    assert_eq!(status, 200);
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    let logits = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["logits"].clone();
    assert_eq!(logits(&again), logits(&first), "the repeat is answered, and alike");
    let client = HttpClient::new(&server.url(), KEY).unwrap();
    assert_eq!(client.usage().unwrap().used, 3, "charged once");
    // The same key with another body is refused; a malformed key too; neither is charged.
    assert_eq!(send(server.addr(), &keyed("req-1"), &images[..1024]).0, 422);
    assert_eq!(send(server.addr(), &keyed("with space"), &images).0, 400);
    assert_eq!(client.usage().unwrap().used, 3);
    // After a restart the key is still known: charged once.
    server.shutdown().unwrap();
    let restarted = serve(&model_path, &keys, ResponseMode::Soft, Some(10));
    let (status, head, _) = send(restarted.addr(), &keyed("req-1"), &images);
    assert!(status == 200 && head.contains("idempotent-replayed: true"), "{head}");
    let client = HttpClient::new(&restarted.url(), KEY).unwrap();
    assert_eq!(client.usage().unwrap().used, 3);
    // The client sends a fresh key per query: two queries are two charges.
    client.query(&images[..1024], None).unwrap();
    client.query(&images[..1024], None).unwrap();
    assert_eq!(client.usage().unwrap().used, 5);
    // Its own key, twice: one charge.
    client.query(&images[..1024], Some("mine-1")).unwrap();
    client.query(&images[..1024], Some("mine-1")).unwrap();
    assert_eq!(client.usage().unwrap().used, 6);
}

#[test]
fn a_query_to_a_server_that_is_down_is_sent_again_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, None);
    let addr = server.addr();
    let mut teacher = HttpTeacher::connect(&server.url(), KEY, None).unwrap();
    server.shutdown().unwrap();
    // Down for about a second, then back on the same address.
    let restarter = std::thread::spawn({
        let (model_path, keys) = (model_path.clone(), keys.clone());
        move || {
            std::thread::sleep(std::time::Duration::from_millis(1000));
            let mut config = ServeConfig::new(model_path, &addr.to_string(), ResponseMode::Soft, keys);
            config.max_batch = 16;
            start(&config).unwrap()
        }
    });
    let images = mnist_images(2);
    let Responses::Soft(logits) = teacher.query(&images).unwrap() else { panic!("a soft server") };
    assert_eq!(logits.len(), 20);
    let server = restarter.join().unwrap();
    assert_eq!(HttpClient::new(&server.url(), KEY).unwrap().usage().unwrap().used, 2);
    assert_eq!(teacher.usage().queries, 2);
    // With no time to retry, a dead server is an error at once.
    server.shutdown().unwrap();
    let quick = HttpClient::new(&format!("http://{addr}"), KEY).unwrap().with_retry(
        mekd_runtime::teacher_client::RetryPolicy { deadline: std::time::Duration::ZERO, ..Default::default() },
    );
    assert!(matches!(quick.query(&images, None), Err(ClientError::Transport { .. })));
}

#[test]
fn serves_a_model_from_another_producer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("fixtures/foreign-teacher.onnx");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("fixtures/foreign-teacher.io.json")).unwrap()).unwrap();
    let pixels: Vec<u8> = golden["pixels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let expected: Vec<f32> = golden["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path());

    // Without normalisation metadata or flags the server refuses to guess.
    let config = ServeConfig::new(model.clone(), "127.0.0.1:0", ResponseMode::Soft, keys.clone());
    let err = start(&config).err().expect("no normalisation").to_string();
    assert!(err.contains("--mean and --std"), "{err}");

    let mut config = ServeConfig::new(model, "127.0.0.1:0", ResponseMode::Soft, keys);
    config.normalisation = Some(Normalisation { mean: vec![0.1307], std: vec![0.3081] });
    let server = start(&config).unwrap();
    let mut teacher = HttpTeacher::connect(&server.url(), KEY, None).unwrap();
    assert_eq!(teacher.info().num_classes, 10);
    let Responses::Soft(logits) = teacher.query(&pixels).unwrap() else { panic!() };
    let agreement = Agreement::of(&expected, &logits, 10);
    assert!(agreement.ok(), "{agreement:?}");
}

/// Send `head` (request line and headers, no body) and read the answer, if any: `(status, body)`.
fn raw_head(addr: SocketAddr, head: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse_answer(&response)
}

/// Regression: a declared body of 99,999,999,999 bytes (none sent) used to abort the whole
/// process (tiny_http allocated the declared length to read it away), with or without a key.
#[test]
fn a_huge_declared_length_is_refused_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, None);
    let addr = server.addr();
    for (key, expected) in [("", 401), (&*format!("Authorization: Bearer {KEY}\r\n"), 413)] {
        let head = format!("POST /v1/query HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 99999999999\r\n\r\n");
        let (status, body) = raw_head(addr, &head).expect("an answer");
        assert_eq!(status, expected, "{body}");
    }
    healthy(addr);
    let mut client = HttpTeacher::connect(&server.url(), KEY, None).unwrap();
    assert!(client.query(&mnist_images(2)).is_ok());
    server.shutdown().unwrap();
}

/// Slow clients (headers or body never finished) are cut off after the read timeout, idle
/// connections past the cap are closed at once, and other clients are answered throughout.
#[test]
fn slow_and_surplus_connections_do_not_block_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let mut config = ServeConfig::new(model_path, "127.0.0.1:0", ResponseMode::Soft, keys);
    config.read_timeout = std::time::Duration::from_millis(600);
    config.max_connections = 4;
    let server = start(&config).unwrap();
    let addr = server.addr();

    // A body that never comes: 408 after the timeout.
    let slow_body = format!("POST /v1/query HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: 1024\r\n\r\n");
    let started = std::time::Instant::now();
    assert_eq!(raw_head(addr, &slow_body).map(|r| r.0), Some(408));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // Headers that never end: the connection is closed, with no request answered.
    let started = std::time::Instant::now();
    let answer = raw_head(addr, "GET /v1/health HTTP/1.1\r\nHost: x\r\n");
    assert!(answer.as_ref().is_none_or(|(status, _)| *status == 408), "{answer:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // Four idle connections fill the cap; a fifth is closed at once, unanswered.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut surplus = TcpStream::connect(addr).unwrap();
    surplus.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let _ = surplus.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut got = Vec::new();
    let _ = surplus.read_to_end(&mut got);
    assert!(got.is_empty(), "a connection over the cap was served: {}", String::from_utf8_lossy(&got));
    // The idle ones are cut off by the header timeout, and the server answers again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    healthy(addr);
    drop(idle);
    server.shutdown().unwrap();
}

/// A TCP proxy that records the bytes going each way (client to server, server to client),
/// recording each chunk before passing it on.
fn recording_proxy(target: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<[Vec<u8>; 2]>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new([Vec::new(), Vec::new()]));
    let record = log.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let server = TcpStream::connect(target).unwrap();
            let ways = [(client.try_clone().unwrap(), server.try_clone().unwrap(), 0), (server, client, 1)];
            for (mut from, mut to, way) in ways {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1 << 16];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        record.lock().unwrap()[way].extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, log)
}

/// The body bytes of each whole HTTP/1.1 message in `stream` (by their Content-Length).
fn body_lengths(stream: &[u8]) -> Vec<u64> {
    let mut lengths = Vec::new();
    let mut rest = stream;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let length: usize =
            head.lines().find_map(|line| line.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
        lengths.push(length as u64);
        rest = &rest[(end + 4 + length).min(rest.len())..];
    }
    lengths
}

/// The same images asked through both protocols: the same answers, the same charge, and the
/// bytes each client counts are the request and answer bodies an observer on the wire saw.
#[test]
fn both_protocols_answer_charge_and_count_bytes_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, None);
    let (proxy, log) = recording_proxy(server.addr());
    let own = HttpClient::new(&format!("http://{proxy}"), KEY).unwrap();
    let v2 = HttpClient::new(&format!("v2+http://{proxy}/v2/models/teacher"), KEY).unwrap();
    let (own_info, v2_info) = (own.info().unwrap(), v2.info().unwrap());
    assert_eq!((v2_info.input_shape, v2_info.num_classes), (own_info.input_shape, own_info.num_classes));
    assert_eq!(v2_info.response, ResponseMode::Soft);
    let images = mnist_images(5);
    let mut answers = Vec::new();
    for client in [&own, &v2] {
        let before = log.lock().unwrap().clone().map(|way| body_lengths(&way).len());
        let (answer, cost) = client.query(&images, None).unwrap();
        let seen = log.lock().unwrap().clone().map(|way| body_lengths(&way));
        // One request and its answer crossed the wire for this query.
        assert_eq!([seen[0].len() - before[0], seen[1].len() - before[1]], [1, 1]);
        assert_eq!(cost, Usage { queries: 5, bytes_up: seen[0][before[0]], bytes_down: seen[1][before[1]] });
        assert_eq!(answer.count, 5);
        answers.push(answer.logits.unwrap());
    }
    assert_eq!(answers[0], answers[1], "the binary v2 answer carries the same f32 logits");
    assert_eq!(own.usage().unwrap().used, 10, "5 images per protocol");
}

/// The v2 endpoints as a standard client meets them (plain HTTP, JSON or binary tensors): the
/// answers, the refusals and the idempotency keys of the own API.
#[test]
fn the_v2_endpoints_answer_check_and_charge_like_the_own_api() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let server = serve(&model_path, &keys, ResponseMode::Soft, Some(20));
    let addr = server.addr();
    let images = mnist_images(2);
    let bearer = format!("Bearer {KEY}");
    let auth = [("Authorization", bearer.as_str())];
    let (_, own) = raw(addr, "POST", "/v1/query", &auth, &images);
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let own_logits = floats(&serde_json::from_str::<serde_json::Value>(&own).unwrap()["logits"]);

    for path in ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/teacher/ready"] {
        assert_eq!(raw(addr, "GET", path, &[], b"").0, 200, "{path} needs no key");
    }
    assert_eq!(raw(addr, "GET", "/v2/models/teacher", &[], b"").0, 401);
    let (status, metadata) = raw(addr, "GET", "/v2/models/teacher/versions/1", &auth, b"");
    assert_eq!(status, 200);
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["inputs"][0]["shape"], serde_json::json!([-1, 1, 32, 32]));
    assert_eq!(metadata["outputs"][0], serde_json::json!({"name": "logits", "datatype": "FP32", "shape": [-1, 10]}));
    assert_eq!(raw(addr, "GET", "/v2/models/other", &auth, b"").0, 404);
    assert_eq!(raw(addr, "GET", "/v2/models/teacher/versions/2", &auth, b"").0, 404);
    assert_eq!(raw(addr, "GET", "/v2/models/teacher/infer", &auth, b"").0, 405);

    // JSON, nested row by row, as curl users write it.
    let rows: Vec<Vec<u8>> = images.chunks(32).map(<[u8]>::to_vec).collect();
    let request = |data: serde_json::Value, datatype: &str, shape: serde_json::Value| {
        serde_json::json!({"id": "r1", "inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}]})
            .to_string()
    };
    let good = request(serde_json::json!(rows), "UINT8", serde_json::json!([2, 1, 32, 32]));
    let infer = "/v2/models/teacher/infer";
    let (status, body) = raw(addr, "POST", infer, &auth, good.as_bytes());
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((answer["id"].as_str(), answer["parameters"]["remaining"].as_u64()), (Some("r1"), Some(16)));
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([2, 10]));
    assert_eq!(floats(&answer["outputs"][0]["data"]), own_logits);

    // Refusals: each clear, none charged.
    let flat = serde_json::json!(images);
    let refusals = [
        ("no key", vec![], good.clone(), 401, "API key"),
        ("FP32", auth.to_vec(), request(flat.clone(), "FP32", serde_json::json!([2, 1, 32, 32])), 400, "UINT8"),
        ("shape", auth.to_vec(), request(flat.clone(), "UINT8", serde_json::json!([2, 3, 32, 32])), 400, "shape"),
        ("count", auth.to_vec(), request(flat.clone(), "UINT8", serde_json::json!([3, 1, 32, 32])), 400, "values"),
        ("batch", auth.to_vec(), request(flat, "UINT8", serde_json::json!([17, 1, 32, 32])), 413, "at most 16"),
        (
            "pixel",
            auth.to_vec(),
            request(serde_json::json!(vec![256; 1024]), "UINT8", serde_json::json!([1, 1, 32, 32])),
            400,
            "256",
        ),
        ("not JSON", auth.to_vec(), "{\"inputs\": [".into(), 400, "inference request"),
        (
            "output",
            auth.to_vec(),
            good.replacen("\"inputs\"", "\"outputs\": [{\"name\": \"probs\"}], \"inputs\"", 1),
            400,
            "probs",
        ),
    ];
    for (what, headers, body, status, says) in refusals {
        let (got, text) = raw(addr, "POST", infer, &headers, body.as_bytes());
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }
    assert_eq!(HttpClient::new(&server.url(), KEY).unwrap().usage().unwrap().used, 4, "the refusals cost nothing");

    // Binary tensors both ways, under an idempotency key: the repeat is answered free.
    let head = serde_json::json!({
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 1, 32, 32], "parameters": {"binary_data_size": 2048}}],
        "parameters": {"binary_data_output": true}
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&images);
    let length = head.len().to_string();
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Inference-Header-Content-Length", &length),
        ("Idempotency-Key", "v2-req-1"),
    ];
    for round in 0..2 {
        let answer = exchange(addr, "POST", infer, &headers, &body);
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(head.contains("idempotent-replayed: true"), round == 1, "{head}");
        let json_len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("inference-header-content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let tail = &answer[split + json_len..];
        let logits: Vec<f32> = tail.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(logits, own_logits);
    }
    assert_eq!(HttpClient::new(&server.url(), KEY).unwrap().usage().unwrap().used, 6, "charged once");
    // A declared binary size that does not match what follows is refused.
    let short = [("Authorization", bearer.as_str()), ("Inference-Header-Content-Length", &length)];
    let (status, text) = raw(addr, "POST", infer, &short, &body[..body.len() - 1]);
    assert!(status == 400 && text.contains("binary data"), "{status} {text}");
}

/// HTTPS with a certificate made here: both protocols over TLS with the certificate trusted
/// (`--ca-cert`), a clear and immediate refusal when it is not, and clear errors for bad files.
#[test]
fn https_serves_both_protocols_and_untrusted_certificates_are_refused_at_once() {
    use mekd_trainer::teacher::server::TlsFiles;
    let dir = tempfile::tempdir().unwrap();
    let (model_path, _) = teacher(dir.path());
    let keys = keys_file(dir.path());
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let mut config = ServeConfig::new(model_path.clone(), "127.0.0.1:0", ResponseMode::Soft, keys.clone());
    config.tls = Some(TlsFiles { cert: cert.clone(), key: key.clone() });
    let server = start(&config).unwrap();
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let images = mnist_images(2);
    let pem = issued.cert.pem().into_bytes();
    let own = HttpClient::new(&server.url(), KEY).unwrap().with_ca_cert(&pem).unwrap();
    let v2_url = format!("v2+{}/v2/models/teacher", server.url());
    let v2 = HttpClient::new(&v2_url, KEY).unwrap().with_ca_cert(&pem).unwrap();
    let (a, _) = own.query(&images, None).unwrap();
    let (b, _) = v2.query(&images, None).unwrap();
    assert_eq!(a.logits, b.logits);
    assert_eq!(own.usage().unwrap().used, 4);

    // The command line: `mekd distill --ca-cert` over HTTPS.
    let run = dir.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mekd"))
        .args(["distill", "--teacher", &server.url(), "--ca-cert"])
        .arg(&cert)
        .arg("--data")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-slice"))
        .args(["--edge-fraction", "0.01", "--gan-epochs", "1", "--generator-width", "8", "--discriminator-width", "4"])
        .args(["--batch", "16", "--limit-test", "20", "--steps", "1", "--epochs", "1", "--budget", "16", "--out"])
        .arg(&run)
        .env("MEKD_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let charged = summary["queries"].as_u64().unwrap();
    assert_eq!(own.usage().unwrap().used, 4 + charged);

    // Not trusted (the system's roots; another CA): refused at once, not retried for a minute.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let started = std::time::Instant::now();
    for client in [
        HttpClient::new(&server.url(), KEY).unwrap(),
        HttpClient::new(&server.url(), KEY).unwrap().with_ca_cert(other.cert.pem().as_bytes()).unwrap(),
    ] {
        let err = client.query(&images, None).unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("--ca-cert"), "{err}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    // Plain HTTP to the TLS port gets nothing; the server serves on.
    let plain = exchange(server.addr(), "GET", "/v1/health", &[], b"");
    assert!(!plain.starts_with(b"HTTP/1.1 200"));
    assert_eq!(own.usage().unwrap().used, 4 + charged);
    assert!(HttpClient::new(&server.url(), KEY).unwrap().with_ca_cert(b"not a certificate").is_err());
    server.shutdown().unwrap();

    // Missing or mismatched files: the server says which and does not start.
    for (files, says) in [
        (TlsFiles { cert: dir.path().join("none.pem"), key: key.clone() }, "certificate chain"),
        (TlsFiles { cert: cert.clone(), key: dir.path().join("none.pem") }, "private key"),
        (TlsFiles { cert: key.clone(), key: key.clone() }, "no PEM certificate"),
    ] {
        let mut config = ServeConfig::new(model_path.clone(), "127.0.0.1:0", ResponseMode::Soft, keys.clone());
        config.tls = Some(files);
        let err = format!("{:#}", start(&config).err().unwrap());
        assert!(err.contains(says), "{err}");
    }
    let mut config = ServeConfig::new(model_path, "127.0.0.1:0", ResponseMode::Soft, keys);
    let foreign_key = dir.path().join("other-key.pem");
    std::fs::write(&foreign_key, other.signing_key.serialize_pem()).unwrap();
    config.tls = Some(TlsFiles { cert, key: foreign_key });
    let err = format!("{:#}", start(&config).err().unwrap());
    assert!(err.contains("do not make a certificate and its key"), "{err}");
}
