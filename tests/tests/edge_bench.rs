//! `mekd-edge bench` end to end: every figure of its JSON, a teacher served on loopback, and a
//! model from another producer whose accuracy is checked against ONNX Runtime.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use mekd_e2e::{binary, repo};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The URL a `mekd teacher serve` started on port 0 says it serves on (no port is picked and
/// released beforehand, so no other process can take it in between).
fn served_url(server: &mut Child) -> String {
    let stderr = server.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let line = lines.find_map(|line| line.ok().filter(|l| l.starts_with("serving "))).expect("the server's first line");
    // Keep draining its log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let url = line.split(" on ").nth(1).and_then(|rest| rest.split(' ').next()).expect("serving ... on URL");
    url.to_string()
}

#[test]
fn bench_json_reports_every_figure_with_a_loopback_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let student = dir.path().join("student.onnx");
    for (arch, path) in [("lenet5", &teacher), ("lenet5-half", &student)] {
        let out = Command::new(binary("mekd")).args(["export", "--arch", arch, "--out"]).arg(path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "edge-key\n").unwrap();
    let mut server = Server(
        Command::new(binary("mekd"))
            .args(["teacher", "serve", "--response", "hard", "--listen", "127.0.0.1:0", "--model"])
            .arg(&teacher)
            .arg("--keys")
            .arg(&keys)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let url = served_url(&mut server.0);
    let png = dir.path().join("screen.png");
    let out = Command::new(binary("mekd-edge"))
        .args(["bench", "--json", "--limit", "200", "--iterations", "50", "--teacher", &url, "--model"])
        .arg(&student)
        .arg("--data")
        .arg(repo().join("data/mnist-slice"))
        .arg("--png")
        .arg(&png)
        .env("MEKD_API_KEY", "edge-key")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["throughput_ips", "peak_rss_bytes", "load_ms", "batch_load_ms"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {}", r[key]);
    }
    assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap());
    assert_eq!(r["model_bytes"].as_u64().unwrap(), std::fs::metadata(&student).unwrap().len());
    assert_eq!(r["images"], 200);
    let t = &r["teacher"];
    assert_eq!(t["queries"], 200);
    assert!(t["rtt_ms"]["p50"].as_f64().unwrap() > 0.0);
    // The server counted exactly the queries the benchmark reports.
    let client = mekd_runtime::teacher_client::HttpClient::new(&url, "edge-key").unwrap();
    assert_eq!(client.usage().unwrap().used, 200);
    assert!(png.is_file());
    // The accuracies and the agreement, recomputed here from the student's predictions (tract,
    // as the bench) and the teacher's answers to the same 200 test images.
    let data = repo().join("data/mnist-slice");
    let test = mekd_runtime::Dataset::load(&data, mekd_runtime::Split::Test).unwrap().take(200).prepare(1, 32).unwrap();
    let input = mekd_contract::to_model_input(&test.pixels, test.shape, &mekd_contract::Normalisation::symmetric(1));
    let mut engine = mekd_runtime::Engine::load(&student, 200).unwrap();
    let predicted = mekd_runtime::engine::argmax_rows(&engine.run(&input).unwrap(), 10);
    let taught = client.query(&test.pixels, None).unwrap().0.labels.unwrap();
    let percent = |hits: usize| 100.0 * hits as f64 / 200.0;
    let correct = |labels: &[usize]| labels.iter().zip(&test.labels).filter(|(p, l)| **p == **l as usize).count();
    let agree = predicted.iter().zip(&taught).filter(|(s, t)| s == t).count();
    assert_eq!(r["accuracy"].as_f64().unwrap(), percent(correct(&predicted)));
    assert_eq!(t["accuracy"].as_f64().unwrap(), percent(correct(&taught)));
    assert_eq!(t["agreement"].as_f64().unwrap(), percent(agree));

    // A wrong key is a clear error.
    let out = Command::new(binary("mekd-edge"))
        .args(["bench", "--limit", "10", "--iterations", "5", "--teacher", &url, "--api-key", "nope", "--model"])
        .arg(&student)
        .arg("--data")
        .arg(repo().join("data/mnist-slice"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bench_runs_a_foreign_model_with_flag_normalisation() {
    let model = repo().join("fixtures/foreign-teacher.onnx");
    let data = repo().join("data/mnist-slice");
    let run = |extra: &[&str]| {
        Command::new(binary("mekd-edge"))
            .args(["bench", "--json", "--limit", "300", "--iterations", "20", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mean and --std"));
    let out = run(&["--mean", "0.1307", "--std", "0.3081"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // Independent computation of the same accuracy with ONNX Runtime.
    let test = mekd_runtime::Dataset::load(&data, mekd_runtime::Split::Test).unwrap().take(300).prepare(1, 32).unwrap();
    let norm = mekd_contract::Normalisation { mean: vec![0.1307], std: vec![0.3081] };
    let input = mekd_contract::to_model_input(&test.pixels, test.shape, &norm);
    let mut ort = mekd_runtime::onnxruntime::OrtClassifier::open(&model, None).unwrap_or_else(|e| panic!("{e}"));
    let logits = ort.run(&input, [1, 32, 32]).unwrap();
    let predicted = mekd_runtime::engine::argmax_rows(&logits, 10);
    let correct = predicted.iter().zip(&test.labels).filter(|(p, l)| **p == **l as usize).count();
    let expected = 100.0 * correct as f64 / 300.0;
    assert!((r["accuracy"].as_f64().unwrap() - expected).abs() < 1e-9, "{} vs {expected}", r["accuracy"]);
}
