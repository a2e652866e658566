//! Real peers on the Open Inference Protocol (KServe v2), from PyPI: KServe's Python model
//! server serving `fixtures/foreign-teacher.onnx` to this project's v2 client (`mekd-edge
//! bench`, `mekd distill`, the client's logits against ONNX Runtime's golden ones), and NVIDIA's
//! `tritonclient` querying `mekd teacher serve` (answers and charged counts).
//!
//! They need a Python with `kserve`, `tritonclient[http]`, `onnxruntime` and `numpy`:
//! `scripts/test.sh` makes one (`scripts/peer-venv.sh`) and names it in `MEKD_PEER_PYTHON`. Run
//! without it, each test says so and passes, unless `MEKD_REQUIRE_PEERS=1` (as in the test
//! script and CI), where a missing peer fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mekd_contract::Normalisation;
use mekd_e2e::{binary, repo};
use mekd_runtime::teacher_client::{HttpClient, V2Options};

/// The peers' Python, or `None` (after saying why) when the peers are not installed here.
fn peer_python() -> Option<PathBuf> {
    match std::env::var_os("MEKD_PEER_PYTHON") {
        Some(python) => Some(PathBuf::from(python)),
        None if std::env::var_os("MEKD_REQUIRE_PEERS").is_some() => {
            panic!("MEKD_REQUIRE_PEERS is set but MEKD_PEER_PYTHON is not: run scripts/peer-venv.sh")
        }
        None => {
            eprintln!("skipped: no MEKD_PEER_PYTHON (scripts/test.sh sets it up)");
            None
        }
    }
}

/// A child process killed when the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// KServe serving the foreign teacher as `foreign`, ready, with its port and a v2 client of it.
/// KServe cannot report a port it picked itself, so the test picks a port that was free a moment
/// ago; when KServe exits because another process took it meanwhile, it tries another.
fn start_kserve(python: &Path) -> (Process, u16, HttpClient) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut kserve = Process(
            Command::new(python)
                .arg(repo().join("scripts/peer-kserve.py"))
                .env("MODEL", repo().join("fixtures/foreign-teacher.onnx"))
                .env("NAME", "foreign")
                .env("PORT", port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let url = format!("v2+http://127.0.0.1:{port}/v2/models/foreign");
        let norm = Normalisation { mean: vec![0.1307], std: vec![0.3081] };
        let client =
            HttpClient::new(&url, "unused").unwrap().with_v2(V2Options { norm: Some(norm), ..Default::default() });
        let started = Instant::now();
        loop {
            if let Some(status) = kserve.0.try_wait().unwrap() {
                eprintln!("KServe exited ({status}) before it was ready on port {port}; trying another port");
                break;
            }
            if client.health().is_ok() {
                return (kserve, port, client);
            }
            assert!(started.elapsed() < Duration::from_secs(120), "KServe did not become ready in 120 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    panic!("KServe exited five times before it was ready");
}

/// The golden case: `u8` images of the foreign teacher and ONNX Runtime's (Python) logits.
fn golden() -> (Vec<u8>, Vec<f32>) {
    let text = std::fs::read_to_string(repo().join("fixtures/foreign-teacher.io.json")).unwrap();
    let io: serde_json::Value = serde_json::from_str(&text).unwrap();
    let numbers = |key: &str| io[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
    (
        numbers("pixels").into_iter().map(|p| p as u8).collect(),
        numbers("logits").into_iter().map(|l| l as f32).collect(),
    )
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}\n{got:?}\n{want:?}");
    }
}

/// The foreign teacher's normalisation (the model carries none).
const MEAN: &str = "0.1307";
const STD: &str = "0.3081";

#[test]
fn kserve_serves_a_foreign_model_to_the_v2_client_bench_and_distill() {
    let Some(python) = peer_python() else { return };
    let (_kserve, port, client) = start_kserve(&python);
    let url = format!("v2+http://127.0.0.1:{port}/v2/models/foreign");
    let info = client.info().unwrap();
    assert_eq!((info.input_shape, info.num_classes), ([1, 32, 32], 10));
    let (pixels, logits) = golden();
    let (answer, cost) = client.query(&pixels, None).unwrap();
    assert_eq!(answer.count, 3);
    assert_close(&answer.logits.unwrap(), &logits);
    assert!(cost.queries == 3 && cost.bytes_up > 3 * 1024 && cost.bytes_down > 0, "{cost:?}");

    // The edge benchmark against it: tract's answers on the same file agree with ONNX Runtime's.
    let common = ["--teacher", url.as_str(), "--teacher-mean", MEAN, "--teacher-std", STD];
    let out = Command::new(binary("mekd-edge"))
        .args(["bench", "--json", "--limit", "200", "--iterations", "5", "--mean", MEAN, "--std", STD, "--model"])
        .arg(repo().join("fixtures/foreign-teacher.onnx"))
        .arg("--data")
        .arg(repo().join("data/mnist-slice"))
        .args(common)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["teacher"]["queries"], 200);
    // Two engines on one file: at most a near-tie or two may flip (measured: none of 200).
    assert!(report["teacher"]["agreement"].as_f64().unwrap() >= 99.0, "{}", report["teacher"]);

    // A short distillation from it: the run counts what it asked.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = Command::new(binary("mekd"))
        .args(["distill", "--data"])
        .arg(repo().join("data/mnist-slice"))
        .args(["--edge-fraction", "0.01", "--gan-epochs", "1", "--generator-width", "8"])
        .args(["--discriminator-width", "4", "--batch", "16", "--limit-test", "100", "--steps", "2", "--budget", "32"])
        .arg("--out")
        .arg(&run)
        .args(common)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let usage: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("usage.json")).unwrap()).unwrap();
    assert!(summary["queries"].as_u64().unwrap() > 0);
    assert_eq!(usage["queries"], summary["queries"]);
}

/// `tritonclient` (HTTP, binary tensors both ways, as it sends by default) asks `mekd teacher
/// serve` for the golden images: metadata, the logits of ONNX Runtime, the charged count.
#[test]
fn tritonclient_queries_this_projects_server() {
    let Some(python) = peer_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "triton-key\n").unwrap();
    let mut server = Process(
        Command::new(binary("mekd"))
            .args(["teacher", "serve", "--listen", "127.0.0.1:0", "--budget", "10", "--model-name", "foreign"])
            .args(["--mean", MEAN, "--std", STD, "--model"])
            .arg(repo().join("fixtures/foreign-teacher.onnx"))
            .arg("--keys")
            .arg(&keys)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stderr.take().unwrap()).lines();
    let line = lines.find_map(|l| l.ok().filter(|l| l.starts_with("serving "))).expect("the server's first line");
    std::thread::spawn(move || lines.for_each(drop));
    let base = line.split(" on ").nth(1).and_then(|r| r.split(' ').next()).unwrap().to_string();
    let (pixels, logits) = golden();
    let script = r#"
import json, sys
import numpy as np
import tritonclient.http as http
host, pixels = sys.argv[1], json.loads(sys.argv[2])
headers = {"Authorization": "Bearer triton-key"}
client = http.InferenceServerClient(url=host)
assert client.is_server_live() and client.is_model_ready("foreign")
meta = client.get_model_metadata("foreign", headers=headers)
x = np.array(pixels, dtype=np.uint8).reshape(3, 1, 32, 32)
inp = http.InferInput(meta["inputs"][0]["name"], list(x.shape), "UINT8")
inp.set_data_from_numpy(x)
result = client.infer("foreign", [inp], headers=headers)
print(json.dumps({"meta": meta, "logits": result.as_numpy(meta["outputs"][0]["name"]).ravel().tolist(),
                  "remaining": (result.get_response().get("parameters") or {}).get("remaining")}))
"#;
    let host = base.trim_start_matches("http://");
    let out =
        Command::new(&python).args(["-c", script, host, &serde_json::to_string(&pixels).unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["meta"]["inputs"][0]["datatype"], "UINT8");
    let answer: Vec<f32> = got["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_close(&answer, &logits);
    assert_eq!(got["remaining"], 7);
    let usage = HttpClient::new(&base, "triton-key").unwrap().usage().unwrap();
    assert_eq!((usage.used, usage.remaining), (3, Some(7)));
}
