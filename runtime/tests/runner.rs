//! The benchmark's engines and threads: forked tract states give the original's logits in
//! other threads, `--threads` times every run, and ONNX Runtime (feature `ort`) gives the golden
//! outputs through the same interface. Runs on every target (under qemu in CI; ONNX Runtime on
//! x86-64 and aarch64).

use std::path::{Path, PathBuf};

use mekd_contract::{Normalisation, to_model_input};
use mekd_runtime::bench::{self, BenchOptions};
use mekd_runtime::engine::Engine;
use mekd_runtime::runner::{self, EngineKind};
use mekd_runtime::{Dataset, Split};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The golden file's images (as model input) and ONNX Runtime's logits for them on x86-64.
fn golden() -> (Vec<f32>, Vec<f32>) {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("fixtures/foreign-teacher.io.json")).unwrap()).unwrap();
    let pixels: Vec<u8> = golden["pixels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let expected: Vec<f32> = golden["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let norm = Normalisation { mean: vec![0.1307], std: vec![0.3081] };
    (to_model_input(&pixels, [1, 32, 32], &norm), expected)
}

#[test]
fn forked_states_in_other_threads_give_the_same_logits() {
    let (input, _) = golden();
    let mut engine = Engine::load(&repo("fixtures/foreign-teacher.onnx"), 1).unwrap();
    let expected: Vec<Vec<f32>> = input.chunks(1024).map(|image| engine.run(image).unwrap()).collect();
    let forks: Vec<Engine> = (0..3).map(|_| engine.fork().unwrap()).collect();
    std::thread::scope(|scope| {
        for mut fork in forks {
            let (input, expected) = (&input, &expected);
            scope.spawn(move || {
                // Each state runs every image, in its own order: no state leaks between runs.
                for round in 0..2 {
                    for (i, image) in input.chunks(1024).enumerate().rev() {
                        assert_eq!(fork.run(image).unwrap(), expected[i], "image {i}, round {round}");
                    }
                }
            });
        }
    });
}

#[test]
fn threads_time_every_run_and_one_thread_times_none() {
    let data = Dataset::load(&repo("data/mnist-slice"), Split::Test).unwrap().take(20);
    let norm = Some(Normalisation { mean: vec![0.1307], std: vec![0.3081] });
    let model = repo("fixtures/foreign-teacher.onnx");
    let options = BenchOptions { warmup: 2, iterations: 7, batch: 8, threads: 3, ..BenchOptions::default() };
    let report = bench::run(&model, &data, norm.clone(), &options, None).unwrap();
    let parallel = report.parallel.expect("a parallel run with --threads 3");
    assert_eq!((parallel.threads, parallel.runs, parallel.latency_ms.samples), (3, 21, 21));
    assert!(parallel.throughput_ips > 0.0 && parallel.latency_ms.p50 > 0.0);
    assert_eq!(report.engine, EngineKind::Tract);
    let single = bench::run(&model, &data, norm, &BenchOptions { threads: 1, ..options }, None).unwrap();
    assert!(single.parallel.is_none());
    assert_eq!(single.accuracy, report.accuracy);
}

#[cfg(feature = "ort")]
#[test]
fn onnxruntime_runs_the_golden_images_through_the_same_interface() {
    let (input, expected) = golden();
    let model = repo("fixtures/foreign-teacher.onnx");
    for batch in [1, 3] {
        let mut ort = runner::load(EngineKind::Ort, &model, batch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((ort.info().num_classes, ort.info().input_shape, ort.batch()), (10, [1, 32, 32], batch));
        let actual = ort.run_many(&input).unwrap();
        assert_eq!(actual.len(), expected.len());
        for (a, b) in actual.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "batch {batch}: {a} vs {b}");
        }
        assert_eq!(mekd_runtime::engine::argmax_rows(&actual, 10), mekd_runtime::engine::argmax_rows(&expected, 10));
        let mut fork = ort.fork().unwrap();
        assert_eq!(fork.run_many(&input).unwrap(), actual);
        let err = ort.run(&input[..1024 * batch - 1]).unwrap_err().to_string();
        assert!(err.contains(&format!("needs {}", 1024 * batch)), "{err}");
        assert!(ort.kernels()[0].starts_with("onnxruntime CPU provider (libonnxruntime.so"), "{:?}", ort.kernels());
    }
}

#[cfg(not(feature = "ort"))]
#[test]
fn onnxruntime_asked_of_a_build_without_it_says_how_to_get_it() {
    let err = runner::load(EngineKind::Ort, &repo("fixtures/foreign-teacher.onnx"), 1).err().unwrap().to_string();
    assert!(err.contains("--features ort"), "{err}");
}
