//! Fuzzing the inputs a stranger controls (RELIABILITY.md): dataset files, ONNX models, query
//! journals, HTTP requests to the teacher server and HTTP answers to the teacher client. Each
//! target mutates valid seeds (bit flips, extreme bytes and words, cuts, repeats, deletions; a
//! fixed SplitMix64 sequence, so a failure reproduces from its case number) and checks that the
//! code under test returns a value or a clear error: no panic, no hang, and (the process would
//! abort otherwise) no allocation of what a header claims.
//!
//! `MEKD_FUZZ_CASES` cases per target (default 300, the CI form; the long form runs 10^6 and
//! more, in shards side by side: `MEKD_FUZZ_SHARD`). Every target prints its count, its error
//! kinds and its slowest case.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use mekd_contract::Normalisation;
use mekd_contract::protocol::{ResponseMode, fnv1a};
use mekd_e2e::repo;
use mekd_runtime::{Dataset, Split};

fn cases() -> u64 {
    std::env::var("MEKD_FUZZ_CASES").map_or(300, |v| v.parse().expect("MEKD_FUZZ_CASES: a number"))
}

/// The random stream of `target`: `MEKD_FUZZ_SHARD` (default 0) picks another one, so that
/// shards run side by side try different cases.
fn rng(target: u64) -> Rng {
    let shard: u64 = std::env::var("MEKD_FUZZ_SHARD").map_or(0, |v| v.parse().expect("MEKD_FUZZ_SHARD: a number"));
    shard_rng(target, shard)
}

fn shard_rng(target: u64, shard: u64) -> Rng {
    Rng(target ^ shard.wrapping_mul(0xA076_1D64_78BD_642F))
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `seed` with one to four mutations; half of them land in the first `head` bytes (where the
/// headers, lengths and counts live).
fn mutate(seed: &[u8], rng: &mut Rng, head: usize) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len().max(1);
        let at = if rng.below(2) == 0 { rng.below(head.min(len)) } else { rng.below(len) };
        let last = bytes.len().saturating_sub(1);
        match rng.below(7) {
            0 if !bytes.is_empty() => bytes[at.min(last)] ^= 1 << rng.below(8),
            1 if !bytes.is_empty() => bytes[at.min(last)] = [0, 1, 0x7F, 0x80, 0xFF][rng.below(5)],
            2 => {
                let word = [0u32, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x0100_0000][rng.below(6)];
                let word = if rng.below(2) == 0 { word.to_be_bytes() } else { word.to_le_bytes() };
                for (i, b) in word.into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + i) {
                        *slot = b;
                    }
                }
            }
            3 => bytes.truncate(at),
            4 => {
                let end = (at + 1 + rng.below(64)).min(bytes.len());
                let chunk = bytes[at.min(end)..end].to_vec();
                bytes.splice(at.min(bytes.len())..at.min(bytes.len()), chunk);
            }
            5 => {
                let end = (at + 1 + rng.below(64)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            _ => bytes.insert(at.min(bytes.len()), rng.next() as u8),
        }
    }
    bytes
}

/// Tally of one target: cases, outcomes by kind, the slowest case.
struct Tally {
    name: &'static str,
    cases: u64,
    outcomes: std::collections::BTreeMap<String, u64>,
    slowest: (Duration, u64),
    started: Instant,
}

impl Tally {
    fn new(name: &'static str) -> Self {
        Self { name, cases: 0, outcomes: Default::default(), slowest: (Duration::ZERO, 0), started: Instant::now() }
    }

    /// Run one case: `f` must return (a short outcome label) within `limit`.
    fn case(&mut self, case: u64, limit: Duration, f: impl FnOnce() -> String) {
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| panic!("{}: case {case} panicked", self.name));
        let took = started.elapsed();
        assert!(took < limit, "{}: case {case} took {took:?} (limit {limit:?})", self.name);
        if took > self.slowest.0 {
            self.slowest = (took, case);
        }
        self.cases += 1;
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn report(&self) {
        eprintln!(
            "fuzz {}: {} cases in {:.1} s, no panic, slowest {:?} (case {}); outcomes {:?}",
            self.name,
            self.cases,
            self.started.elapsed().as_secs_f64(),
            self.slowest.0,
            self.slowest.1,
            self.outcomes
        );
    }
}

/// The first words of an error message's last part, numbers and paths left out, as an outcome
/// label.
fn kind(error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let text = text.rsplit(": ").next().unwrap_or(&text);
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| !w.contains('/') && !w.chars().any(|c| c.is_ascii_digit()))
        .take(4)
        .collect();
    words.join(" ")
}

fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[test]
fn fuzz_dataset_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng(1);
    let pixels: Vec<u8> = (0..16 * 28 * 28).map(|_| rng.next() as u8).collect();
    let labels: Vec<u8> = (0..16).map(|i| i % 10).collect();
    let images_seed = idx(0x0803, &[16, 28, 28], &pixels);
    let labels_seed = idx(0x0801, &[16], &labels);
    let cifar_seed: Vec<u8> = (0..4).flat_map(|i| std::iter::once(i as u8).chain((0..3072).map(|p| p as u8))).collect();
    let (idx_dir, cifar_dir) = (dir.path().join("idx"), dir.path().join("cifar"));
    std::fs::create_dir_all(&idx_dir).unwrap();
    std::fs::create_dir_all(&cifar_dir).unwrap();
    let mut tally = Tally::new("dataset readers (IDX, CIFAR binary)");
    for case in 0..cases() {
        let which = rng.below(3);
        let (target, files): (&Path, Vec<(&str, Vec<u8>)>) = match which {
            0 => (
                &idx_dir,
                vec![
                    ("test-images-idx3-ubyte", mutate(&images_seed, &mut rng, 16)),
                    ("test-labels-idx1-ubyte", labels_seed.clone()),
                ],
            ),
            1 => (
                &idx_dir,
                vec![
                    ("test-images-idx3-ubyte", images_seed.clone()),
                    ("test-labels-idx1-ubyte", mutate(&labels_seed, &mut rng, 8)),
                ],
            ),
            _ => (&cifar_dir, vec![("test_batch.bin", mutate(&cifar_seed, &mut rng, 8))]),
        };
        for (name, bytes) in &files {
            std::fs::write(target.join(name), bytes).unwrap();
        }
        tally.case(case, Duration::from_secs(10), || match Dataset::load(target, Split::Test) {
            Ok(data) => {
                assert_eq!(data.pixels.len(), data.len() * data.image_len());
                assert!(data.labels.iter().all(|&l| (l as usize) < data.classes.len()));
                "ok".into()
            }
            Err(e) => kind(e),
        });
    }
    tally.report();
}

#[test]
fn fuzz_onnx_loader() {
    let seed = std::fs::read(repo().join("fixtures/foreign-teacher.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let mut rng = rng(2);
    let mut tally = Tally::new("ONNX loader (inspect, tract load and run)");
    for case in 0..cases() {
        std::fs::write(&path, mutate(&seed, &mut rng, 512)).unwrap();
        tally.case(case, Duration::from_secs(30), || {
            if let Err(e) = mekd_runtime::engine::inspect(&path) {
                return format!("inspect: {}", kind(e));
            }
            match mekd_runtime::engine::Engine::load(&path, 1) {
                Ok(mut engine) => {
                    let input = vec![0.5; engine.image_len()];
                    match engine.run(&input) {
                        Ok(_) => "ran".into(),
                        Err(e) => format!("run: {}", kind(e)),
                    }
                }
                Err(e) => format!("load: {}", kind(e)),
            }
        });
    }
    tally.report();
}

/// Regression: models that once panicked: tract 0.23.9 while preparing the graph (an output
/// naming no node, padding lists shorter than the kernel's rank) and `inspect` summing
/// parameters (dimensions whose product overflows), found by the long form; each is now a clear
/// error. Their mutations are replayed from the fuzzer's stream (shard, case).
#[test]
fn models_that_once_panicked_are_clear_errors() {
    let seed = std::fs::read(repo().join("fixtures/foreign-teacher.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    for (shard, wanted, says) in
        [(2u64, 29u64, "tract failed on the graph"), (1, 370, "tract failed on the graph"), (10, 229, "overflow")]
    {
        let mut rng = shard_rng(2, shard);
        let mut bytes = Vec::new();
        for _ in 0..=wanted {
            bytes = mutate(&seed, &mut rng, 512);
        }
        std::fs::write(&path, &bytes).unwrap();
        let error = mekd_runtime::engine::Engine::load(&path, 1).err().expect("a malformed model").to_string();
        assert!(error.contains(says), "shard {shard} case {wanted}: {error}");
    }
}

/// A journal of three records in the documented layout (trainer/src/journal.rs).
fn journal_seed() -> Vec<u8> {
    let mut bytes = b"MEKDQJ02".to_vec();
    bytes.extend_from_slice(&0x1234_u128.to_le_bytes());
    for v in [5u64, 50, 500] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for (request, kind, values) in [(1u64, 0u8, vec![0.5f32.to_bits(), 2]), (2, 1, vec![7]), (1, 0, vec![3, 4])] {
        let mut payload = Vec::new();
        for v in [request, 2, 6, 80] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        payload.push(kind);
        payload.extend_from_slice(&(values.len() as u32).to_le_bytes());
        for v in values {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&fnv1a(&payload).to_le_bytes());
    }
    bytes
}

#[test]
fn fuzz_query_journal() {
    use mekd_contract::Usage;
    use mekd_trainer::journal::Journal;
    let seed = journal_seed();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queries.journal");
    std::fs::write(&path, &seed).unwrap();
    let whole = Journal::open(&path, Usage::default()).unwrap();
    assert_eq!((whole.total().queries, whole.unreplayed()), (11, 3), "the seed is a valid journal");
    let mut rng = rng(3);
    let mut tally = Tally::new("query journal");
    for case in 0..cases() {
        let bytes = mutate(&seed, &mut rng, 48);
        std::fs::write(&path, &bytes).unwrap();
        tally.case(case, Duration::from_secs(5), || match Journal::open(&path, Usage::default()) {
            Ok(journal) => {
                // Whatever survives is whole records: never more than the seed held.
                assert!(journal.unreplayed() <= 3 + bytes.len() / 49, "case {case}");
                format!("opened with {} records", journal.unreplayed())
            }
            Err(e) => kind(e),
        });
    }
    tally.report();
}

/// A raw exchange: write `request`, close the writing side, read the answer (at most 2 s).
fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn fuzz_server_requests() {
    use mekd_trainer::teacher::server::{ServeConfig, start};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "fuzz-key\n").unwrap();
    #[cfg(unix)]
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut config =
        ServeConfig::new(repo().join("fixtures/foreign-teacher.onnx"), "127.0.0.1:0", ResponseMode::Soft, keys);
    config.normalisation = Some(Normalisation { mean: vec![0.1307], std: vec![0.3081] });
    config.max_batch = 4;
    config.read_timeout = Duration::from_secs(1);
    let server = start(&config).unwrap();
    let addr = server.addr();
    let mut query = b"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fuzz-key\r\nIdempotency-Key: k-1\r\n\
Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n"
        .to_vec();
    query.extend((0..1024).map(|i| i as u8));
    // The Open Inference Protocol's infer, as JSON (nested rows) and as binary tensor data.
    let v2 = |headers: &str, body: &[u8]| {
        let mut request = format!(
            "POST /v2/models/foreign-teacher/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fuzz-key\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    let rows: Vec<Vec<u8>> = (0..32).map(|r| (0..32).map(|c| (r * 32 + c) as u8).collect()).collect();
    let json = serde_json::json!({"id": "f", "inputs": [{"name": "images", "datatype": "UINT8",
        "shape": [1, 1, 32, 32], "data": rows}], "outputs": [{"name": "logits"}]})
    .to_string();
    let head = r#"{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,1,32,32],"parameters":{"binary_data_size":1024}}],"parameters":{"binary_data_output":true}}"#;
    let mut binary = head.as_bytes().to_vec();
    binary.extend((0..1024).map(|i| (i * 7) as u8));
    let seeds = [
        query,
        b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Api-Key: fuzz-key\r\n\r\n".to_vec(),
        b"GET /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fuzz-key\r\n\r\n".to_vec(),
        v2("Content-Type: application/json\r\n", json.as_bytes()),
        v2(&format!("Inference-Header-Content-Length: {}\r\n", head.len()), &binary),
        b"GET /v2/models/foreign-teacher HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fuzz-key\r\n\r\n".to_vec(),
    ];
    let mut rng = rng(4);
    let rss_before = resident_bytes();
    let mut tally = Tally::new("server request handling");
    for case in 0..cases() {
        let request = mutate(&seeds[rng.below(seeds.len())], &mut rng, 160);
        tally.case(case, Duration::from_secs(5), || {
            let answer = exchange(addr, &request);
            if answer.is_empty() {
                return "closed without an answer".into();
            }
            let text = String::from_utf8_lossy(&answer);
            // HTTP/1.0 to a request that says 1.0.
            let status: u16 = ["HTTP/1.1 ", "HTTP/1.0 "]
                .iter()
                .find_map(|v| text.strip_prefix(v))
                .and_then(|rest| rest.get(..3)?.parse().ok())
                .unwrap_or_else(|| panic!("case {case}: not an HTTP answer: {text:?}"));
            assert!(status < 500, "case {case}: {status} to {request:?}: {text}");
            status.to_string()
        });
        if case % 50 == 0 {
            let health = exchange(addr, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(health.starts_with(b"HTTP/1.1 200"), "case {case}: the server stopped answering");
        }
    }
    let growth = resident_bytes().saturating_sub(rss_before);
    server.shutdown().unwrap();
    tally.report();
    eprintln!("fuzz server request handling: resident memory grew {:.1} MB", growth as f64 / 1e6);
    // The server once kept every finished connection's task: about 1 KB per connection, 1 GB
    // per million cases.
    assert!(growth < 100_000_000, "the server's memory grew by {growth} bytes");
}

/// This process's resident memory (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// An HTTP server on loopback that answers requests whose head starts with one of `fixed`'s
/// prefixes (lower case) with its answer, and every other request with the next answer sent
/// on the returned channel.
fn scripted_server(fixed: Vec<(&'static str, Vec<u8>)>) -> (String, std::sync::mpsc::Sender<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (send, answers) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            // Read the request head and body (Content-Length).
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let head_end = loop {
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(end + 4);
                }
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0);
            while request.len() < head_end + length {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let reply = match fixed.iter().find(|(prefix, _)| head.starts_with(prefix)) {
                Some((_, answer)) => answer.clone(),
                None => answers.recv().unwrap(),
            };
            let _ = stream.write_all(&reply);
        }
    });
    (url, send)
}

#[test]
fn fuzz_client_answers() {
    use mekd_runtime::teacher_client::{HttpClient, RetryPolicy};
    use mekd_trainer::blackbox::{HttpTeacher, Teacher};
    let info = serde_json::json!({
        "input_shape": [1, 32, 32], "num_classes": 10, "class_names": null, "response": "soft",
        "mean": [0.5], "std": [0.5], "max_batch": 16
    })
    .to_string();
    let answer = |status: &str, body: &str, extra: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let logits: Vec<String> = (0..10).map(|i| format!("{}.5", i - 5)).collect();
    let seeds = [
        answer("200 OK", &format!(r#"{{"count":1,"logits":[{}],"remaining":null}}"#, logits.join(",")), ""),
        answer("200 OK", r#"{"count":1,"labels":[3],"remaining":7}"#, ""),
        answer("429 Too Many Requests", r#"{"error":"query budget exhausted","remaining":0}"#, ""),
        answer("503 Service Unavailable", r#"{"error":"busy"}"#, "Retry-After: 0\r\n"),
        answer("400 Bad Request", r#"{"error":"bad"}"#, ""),
    ];
    let (url, send) = scripted_server(vec![("get /v1/info", answer("200 OK", &info, ""))]);
    let mut teacher = HttpTeacher::connect(&url, "k", None)
        .unwrap()
        .with_retry(RetryPolicy { deadline: Duration::ZERO, ..Default::default() });
    let client =
        HttpClient::new(&url, "k").unwrap().with_retry(RetryPolicy { deadline: Duration::ZERO, ..Default::default() });
    let image = vec![0u8; 1024];
    let mut rng = rng(5);
    let mut tally = Tally::new("client parsing of answers");
    for case in 0..cases() {
        let reply = mutate(&seeds[rng.below(seeds.len())], &mut rng, 120);
        send.send(reply).unwrap();
        let through_teacher = rng.below(2) == 0;
        tally.case(case, Duration::from_secs(10), || {
            if through_teacher {
                match teacher.query(&image) {
                    Ok(r) => format!("teacher ok ({} answers)", r.len(10)),
                    Err(e) => format!("teacher: {}", kind(e)),
                }
            } else {
                match client.query(&image, None) {
                    Ok((a, _)) => format!("client ok (count {})", a.count),
                    Err(e) => format!("client: {}", kind(e)),
                }
            }
        });
    }
    tally.report();
}

/// Hostile answers to the v2 client's queries (JSON and binary tensor data, mutated): an error
/// or an answer of the right size, never a panic.
#[test]
fn fuzz_client_v2_answers() {
    use mekd_runtime::teacher_client::{HttpClient, RetryPolicy};
    let answer = |extra: &str, body: &[u8]| {
        let mut reply = format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        reply.extend_from_slice(body);
        reply
    };
    let server = answer("", br#"{"name":"s","version":"1","extensions":["binary_tensor_data"]}"#);
    let metadata = answer(
        "",
        br#"{"name":"m","versions":null,"platform":"","inputs":[{"name":"x","datatype":"UINT8","shape":[-1,1,32,32]}],"outputs":[{"name":"y","datatype":"FP32","shape":[-1,10]}]}"#,
    );
    let (url, send) = scripted_server(vec![("get /v2/models/m", metadata), ("get /v2", server)]);
    let logits: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
    let json = serde_json::json!({"model_name": "m", "outputs": [{"name": "y", "shape": [1, 10],
        "datatype": "FP32", "data": logits}], "parameters": {"remaining": 3}})
    .to_string();
    let head = r#"{"model_name":"m","outputs":[{"name":"y","shape":[1,10],"datatype":"FP32","parameters":{"binary_data_size":40}}]}"#;
    let mut binary = head.as_bytes().to_vec();
    binary.extend(logits.iter().flat_map(|v| v.to_le_bytes()));
    let seeds = [
        answer("Content-Type: application/json\r\n", json.as_bytes()),
        answer(&format!("Inference-Header-Content-Length: {}\r\n", head.len()), &binary),
    ];
    let client = HttpClient::new(&format!("v2+{url}/v2/models/m"), "k")
        .unwrap()
        .with_retry(RetryPolicy { deadline: Duration::ZERO, ..Default::default() });
    assert_eq!(client.info().unwrap().num_classes, 10);
    let image = vec![0u8; 1024];
    let mut rng = rng(6);
    let mut tally = Tally::new("v2 client parsing of answers");
    for case in 0..cases() {
        send.send(mutate(&seeds[rng.below(seeds.len())], &mut rng, 200)).unwrap();
        tally.case(case, Duration::from_secs(10), || match client.query(&image, None) {
            Ok((a, _)) => {
                assert_eq!(a.logits.map(|l| l.len()), Some(10), "case {case}");
                "ok".into()
            }
            Err(e) => format!("error: {}", kind(e)),
        });
    }
    tally.report();
}
