//! tract on a model this project did not write, against ONNX Runtime's outputs on x86-64
//! (golden file): the same test runs on the ARM targets under qemu.

use std::path::{Path, PathBuf};

use mekd_contract::{Normalisation, to_model_input};
use mekd_runtime::engine::{ConvKernels, Engine, argmax_rows, inspect};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

#[test]
fn tract_matches_onnxruntime_golden_outputs() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("foreign-teacher.io.json")).unwrap()).unwrap();
    let pixels: Vec<u8> = golden["pixels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let expected: Vec<f32> = golden["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let norm = Normalisation { mean: vec![0.1307], std: vec![0.3081] };
    let input = to_model_input(&pixels, [1, 32, 32], &norm);
    for batch in [1, 3] {
        let mut engine = Engine::load(&fixture("foreign-teacher.onnx"), batch).unwrap();
        assert_eq!((engine.info().num_classes, engine.info().input_shape), (10, [1, 32, 32]));
        assert!(engine.info().normalisation.is_none());
        let actual = engine.run_many(&input).unwrap();
        for (a, b) in actual.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "batch {batch}: {a} vs {b}");
        }
        assert_eq!(argmax_rows(&actual, 10), argmax_rows(&expected, 10));
    }
}

#[test]
fn direct_convolutions_match_tracts_own() {
    // On every target (under qemu in CI): the kernel this machine picks, with the ReLU and the
    // 2x2 max pooling after each convolution fused, against tract's own convolutions, on seeded
    // inputs, within 1e-5 of the largest logit.
    let path = fixture("foreign-teacher.onnx");
    for batch in [1, 3] {
        let input: Vec<f32> = (0..batch * 1024).map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0).collect();
        let mut direct = Engine::load_with(&path, batch, ConvKernels::Direct).unwrap();
        let mut tract = Engine::load_with(&path, batch, ConvKernels::Tract).unwrap();
        let convs = direct.direct_convs();
        assert_eq!(convs.len(), 2, "both convolutions run by the direct kernel: {convs:?}");
        // The second (8 input channels) runs Winograd's F(2x2, 3x3) where the unit has vectors.
        let fused = |c: &String| c.contains("-conv/") && c.contains("+ relu + maxpool 2x2");
        assert!(convs.iter().all(fused), "{convs:?}");
        assert!(tract.direct_convs().is_empty());
        let (ours, theirs) = (direct.run(&input).unwrap(), tract.run(&input).unwrap());
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() <= 1e-5 * scale, "batch {batch}: {a} vs tract's {b} ({convs:?})");
        }
    }
}

#[test]
fn refuses_what_it_cannot_run_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07garbage").unwrap();
    let err = Engine::load(&junk, 1).err().unwrap().to_string();
    assert!(err.contains("junk.onnx"), "{err}");
    let err = Engine::load(&fixture("foreign-teacher.onnx"), 0).err().unwrap().to_string();
    assert!(err.contains("batch size must be at least 1"), "{err}");
    let mut engine = Engine::load(&fixture("foreign-teacher.onnx"), 2).unwrap();
    let err = engine.run(&[0.0; 1024]).unwrap_err().to_string();
    assert!(err.contains("needs 2048"), "{err}");
    let (info, _) = inspect(&fixture("foreign-teacher.onnx")).unwrap();
    assert_eq!(
        (info.input_name.as_str(), info.fixed_batch, info.params),
        ("image", None, 8 * 9 + 8 + 16 * 72 + 16 + 10240 + 10)
    );
}

#[test]
fn one_image_at_a_time_gives_the_batch_plans_logits() {
    let path = fixture("foreign-teacher.onnx");
    let input: Vec<f32> = (0..3 * 1024).map(|i| ((i * 4099) % 251) as f32 / 60.0 - 2.0).collect();
    let mut per_image = Engine::load_per_image(&path, 3).unwrap();
    assert!(per_image.per_image() && per_image.batch() == 3);
    let ours = per_image.run(&input).unwrap();
    // Exactly the batch-1 plan's logits, image by image.
    let mut single = Engine::load(&path, 1).unwrap();
    let expected: Vec<f32> = input.chunks(1024).flat_map(|image| single.run(image).unwrap()).collect();
    assert_eq!(ours, expected);
    // And tract's own whole-batch plan's, within 1e-5 of the largest logit.
    let theirs = Engine::load_with(&path, 3, ConvKernels::Tract).unwrap().run(&input).unwrap();
    assert!(!Engine::load_with(&path, 3, ConvKernels::Tract).unwrap().per_image());
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(ours.iter().zip(&theirs).all(|(a, b)| (a - b).abs() <= 1e-5 * scale), "{ours:?} vs {theirs:?}");
    let err = per_image.run(&input[..1024]).unwrap_err().to_string();
    assert!(err.contains("needs 3072"), "{err}");
}
