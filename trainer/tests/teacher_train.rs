//! `mekd teacher train` on the embedded MNIST slice: it learns, its export agrees with tract on
//! the whole test slice, and a run killed mid-epoch resumes to the same result.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mekd_contract::protocol::ResponseMode;
use mekd_trainer::blackbox::{BurnTeacher, HttpTeacher, OnnxTeacher, Responses, Teacher};
use mekd_trainer::export::Agreement;
use mekd_trainer::teacher::server::{ServeConfig, start};
use mekd_trainer::teacher::train::EpochMetrics;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn train_args(out: &Path, epochs: usize) -> Vec<String> {
    let data = repo().join("data/mnist-slice");
    [
        "teacher",
        "train",
        "--arch",
        "lenet5",
        "--epochs",
        &epochs.to_string(),
        "--batch",
        "64",
        "--lr",
        "0.05",
        "--milestones",
        "2",
        "--limit-train",
        "3000",
        "--limit-test",
        "500",
        "--seed",
        "5",
        "--data",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([data.display().to_string(), "--out".into(), out.display().to_string()])
    .collect()
}

fn metrics(dir: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn teacher_learns_exports_and_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mekd = env!("CARGO_BIN_EXE_mekd");

    // 1. An uninterrupted run.
    let straight = dir.path().join("straight");
    let out = Command::new(mekd).args(train_args(&straight, 3)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = metrics(&straight);
    assert_eq!(rows.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2, 3]);
    let final_acc = rows[2].test_acc;
    // Measured over seeds 0-9 with `scripts/seed-spread.sh teacher` (this run's settings): 94.48%
    // +- 0.73 on an AVX2 machine, 94.52% +- 0.67 on an AVX-512 one (min 93.2): the bound sits
    // six standard deviations under the mean.
    assert!(final_acc > 90.0, "LeNet-5 on 3,000 MNIST images should pass 90% after 3 epochs, got {final_acc}");
    assert!(straight.join("teacher.onnx").is_file());

    // 2. tract on the exported file gives the same test accuracy as burn did.
    let mut engine = mekd_runtime::Engine::load(&straight.join("teacher.onnx"), 100).unwrap();
    let test = mekd_runtime::Dataset::load(&repo().join("data/mnist-slice"), mekd_runtime::Split::Test)
        .unwrap()
        .take(500)
        .prepare(1, 32)
        .unwrap();
    let norm = engine.info().normalisation.clone().unwrap();
    let input = mekd_contract::to_model_input(&test.pixels, test.shape, &norm);
    let predicted = mekd_runtime::engine::argmax_rows(&engine.run_many(&input).unwrap(), 10);
    let correct = predicted.iter().zip(&test.labels).filter(|(p, l)| **p == **l as usize).count();
    let tract_acc = 100.0 * correct as f64 / 500.0;
    assert!((tract_acc - final_acc).abs() <= 0.2 + 1e-9, "tract {tract_acc}% vs burn {final_acc}%");

    // 3. The trained teacher answers the same through every door of the black-box contract:
    //    burn in-process, ONNX Runtime locally, and the HTTP server.
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "k\n").unwrap();
    let server =
        start(&ServeConfig::new(straight.join("teacher.onnx"), "127.0.0.1:0", ResponseMode::Soft, keys)).unwrap();
    let mut doors: Vec<Box<dyn Teacher>> = vec![
        Box::new(BurnTeacher::from_run(&straight, &burn::tensor::Device::flex(), ResponseMode::Soft, None).unwrap()),
        Box::new(OnnxTeacher::open(&straight.join("teacher.onnx"), ResponseMode::Soft, None, None).unwrap()),
        Box::new(HttpTeacher::connect(&server.url(), "k", None).unwrap()),
    ];
    let images = &test.pixels[..64 * 1024];
    let answers: Vec<Vec<f32>> = doors
        .iter_mut()
        .map(|t| match t.query(images).unwrap() {
            Responses::Soft(logits) => logits,
            Responses::Hard(_) => panic!("soft expected"),
        })
        .collect();
    for other in &answers[1..] {
        let agreement = Agreement::of(&answers[0], other, 10);
        assert!(agreement.ok(), "{agreement:?}");
    }
    assert!(doors.iter().all(|t| t.usage().queries == 64 && t.usage().bytes_up == 64 * 1024));
    // One byte rule for every kind of teacher: bytes down are the JSON body the HTTP API carries
    // for that answer (written here by hand, not through the crate's rule).
    for (door, logits) in doors.iter().zip(&answers) {
        let numbers: Vec<String> = logits.iter().map(|v| serde_json::to_string(v).unwrap()).collect();
        let body = format!("{{\"count\":64,\"logits\":[{}],\"remaining\":null}}", numbers.join(","));
        assert_eq!(door.usage().bytes_down, body.len() as u64, "{body}");
    }
    server.shutdown().unwrap();

    // 4. Kill a second run during epoch 2, then resume it.
    let killed = dir.path().join("killed");
    let mut child = Command::new(mekd).args(train_args(&killed, 3)).stderr(Stdio::null()).spawn().unwrap();
    let latest = killed.join("checkpoints/latest.json");
    let started = Instant::now();
    while !latest.exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after 120 s");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("teacher.onnx").exists(), "the run was not interrupted");

    // Resuming without --resume is refused; with it, the run completes.
    let out = Command::new(mekd).args(train_args(&killed, 3)).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let mut args = train_args(&killed, 3);
    args.push("--resume".into());
    let out = Command::new(mekd).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    let resumed = metrics(&killed);
    assert_eq!(resumed.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(killed.join("teacher.onnx").is_file());
    // Same seed, same batch order, same checkpointed model and optimizer state: the resumed run
    // reproduces the uninterrupted one (flex is deterministic on one machine).
    for (a, b) in resumed.iter().zip(&rows) {
        assert_eq!((a.epoch, a.lr, a.test_acc), (b.epoch, b.lr, b.test_acc));
        assert!((a.train_loss - b.train_loss).abs() <= 1e-6 * b.train_loss, "epoch {}: {a:?} vs {b:?}", a.epoch);
    }
}
