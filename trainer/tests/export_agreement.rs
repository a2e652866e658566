//! The export is right: burn, tract and ONNX Runtime agree on every zoo classifier.

use burn::module::Module;
use burn::tensor::Device;
use mekd_models::export::{ExportMetadata, export_classifier};
use mekd_models::{Architecture, ClassifierSpec};
use mekd_runtime::engine::{ConvKernels, Engine, inspect};
use mekd_runtime::onnxruntime::OrtClassifier;
use mekd_trainer::export::{Agreement, burn_logits, export_verified, probe_batch};

/// A trained-looking model: fresh weights, then BatchNorm statistics that are not the identity
/// (a few training-mode forward passes), so the export of running stats is exercised too.
fn model_with_running_stats(spec: &ClassifierSpec, seed: u64) -> mekd_models::Classifier {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let model = spec.init(&device).unwrap();
    let shape = spec.image_shape();
    for step in 0..2 {
        let x = probe_batch(8, shape, seed + step);
        let _ = burn_logits_train(&model, &x, shape);
    }
    model.valid()
}

fn burn_logits_train(model: &mekd_models::Classifier, images: &[f32], shape: [usize; 3]) -> Vec<f32> {
    use burn::tensor::{Tensor, TensorData};
    let [c, h, w] = shape;
    let n = images.len() / (c * h * w);
    let device = Device::flex().autodiff();
    let x = Tensor::<4>::from_data(TensorData::new(images.to_vec(), [n, c, h, w]), &device);
    model.forward(x).into_data().try_to_vec().unwrap()
}

#[test]
fn burn_tract_and_onnxruntime_agree_on_every_classifier() {
    let dir = tempfile::tempdir().unwrap();
    for (i, arch) in Architecture::classifiers().enumerate() {
        let channels = if i % 2 == 0 { 1 } else { 3 };
        let spec = ClassifierSpec { architecture: arch, in_channels: channels, num_classes: 10 };
        let model = model_with_running_stats(&spec, 100 + i as u64);
        let shape = spec.image_shape();
        let images = probe_batch(5, shape, 7 + i as u64);
        let expected = burn_logits(&model, &images, shape);

        let path = dir.path().join(format!("{arch}.onnx"));
        std::fs::write(&path, export_classifier(&model, &spec, &ExportMetadata::symmetric(channels)).unwrap()).unwrap();

        let mut tract = Engine::load(&path, 5).unwrap();
        let tract_logits = tract.run(&images).unwrap();
        let mut ort = OrtClassifier::open(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let ort_logits = ort.run(&images, shape).unwrap();

        for (engine, logits) in [("tract", &tract_logits), ("onnxruntime", &ort_logits)] {
            let agreement = Agreement::of(&expected, logits, 10);
            assert!(agreement.ok(), "{arch}: burn vs {engine}: {agreement:?}");
        }
        // The direct convolutions (with what is fused into them) against tract's own, within
        // 1e-5 of the largest logit, at batch 5 and at batch 1 (where tract drops the batch
        // axis and the convolutions see [C, H, W]).
        let first_image = &images[..shape.iter().product()];
        let mut single = Engine::load(&path, 1).unwrap();
        let first = single.run(first_image).unwrap();
        for (batch, ours, input) in [(5, &tract_logits, &images[..]), (1, &first, first_image)] {
            let mut own = Engine::load_with(&path, batch, ConvKernels::Tract).unwrap();
            let own_logits = own.run(input).unwrap();
            let scale = own_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
            let gap = ours.iter().zip(&own_logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(gap <= 1e-5 * scale, "{arch}, batch {batch}: direct convolutions differ from tract's by {gap}");
        }
        for convs in [tract.direct_convs(), single.direct_convs()] {
            assert!(!convs.is_empty(), "{arch}: no convolution ran the direct kernel");
            assert!(convs.iter().any(|c| c.contains("+ relu")), "{arch}: no ReLU fused: {convs:?}");
            if matches!(arch, Architecture::LeNet5 | Architecture::LeNet5Half) {
                let pooled = convs.iter().filter(|c| c.contains("+ maxpool 2x2")).count();
                assert_eq!(pooled, 2, "{arch}: both poolings fused: {convs:?}");
            }
            if arch.name().starts_with("resnet") {
                assert!(convs.iter().any(|c| c.contains("+ add + relu")), "{arch}: no residual fused: {convs:?}");
                // The strided 1x1 shortcuts (a downsample and a matrix product in tract's graph).
                let shortcuts = convs.iter().filter(|c| c.contains("kernel 1x1, stride 2x2")).count();
                assert_eq!(shortcuts, 2, "{arch}: both strided shortcuts ran ours: {convs:?}");
                // Every dense 3x3 stride-1 convolution but the first (1 or 3 input channels)
                // runs Winograd's: F(4x4, 3x3) at 32x32 and 16x16 outputs, F(2x2, 3x3) at 8x8.
                let winograd = |kind: &str| convs.iter().filter(|c| c.contains(kind)).count();
                let (two, four) = (winograd(" winograd-conv/"), winograd(" winograd4x4-conv/"));
                let dense_3x3 = convs.iter().filter(|c| c.contains("-conv/") && c.contains("kernel 3x3, stride 1x1"));
                assert_eq!(two + four + 1, dense_3x3.count(), "{arch}: Winograd's everywhere it pays: {convs:?}");
                assert!(two > 0 && four > 0, "{arch}: both tile sizes where each pays: {convs:?}");
            }
            if arch == Architecture::MobileNet {
                let depthwise = convs.iter().filter(|c| c.contains("depthwise-conv/")).count();
                assert_eq!(depthwise, 13, "{arch}: every depthwise convolution ran ours: {convs:?}");
                // Batch norm's scale and shift (running statistics) folded, the ReLU fused.
                let fused = convs.iter().filter(|c| c.contains("depthwise-conv/") && c.contains("+ relu")).count();
                assert_eq!(fused, 13, "{arch}: every depthwise convolution's ReLU fused: {convs:?}");
                // The pointwise layers whose outputs fill whole tiles (read in place) run ours:
                // at least the six 4x4 ones at 28x28, all 13 at 32x32 (the first one too, where
                // tract's batch-1 graph drops its batch axis).
                let pointwise = convs.iter().filter(|c| c.contains("kernel 1x1, stride 1x1")).count();
                let all = if shape[1] == 32 { 13 } else { 6 };
                assert!(pointwise >= all, "{arch}: the pointwise layers ran ours: {convs:?}");
            }
        }
        // The dynamic batch axis: batch 1 gives the first row.
        assert!(Agreement::of(&expected[..10], &first, 10).ok(), "{arch}: batch 1");
        // Export left the original model usable (burn-onnx would steal its BatchNorm state).
        assert_eq!(burn_logits(&model, &images, shape), expected, "{arch}: model changed by export");
    }
}

#[test]
fn exported_metadata_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ClassifierSpec { architecture: Architecture::ResNet8, in_channels: 3, num_classes: 4 };
    let model = spec.init(&Device::flex()).unwrap();
    let meta = ExportMetadata {
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.247, 0.243, 0.261],
        class_names: Some(vec!["a".into(), "b".into(), "c".into(), "d".into()]),
    };
    let path = dir.path().join("m.onnx");
    let check = export_verified(&model, &spec, &meta, &path).unwrap();
    assert!(check.agreement.ok());
    let (info, _) = inspect(&path).unwrap();
    assert_eq!(info.architecture.as_deref(), Some("resnet8"));
    assert_eq!((info.num_classes, info.input_shape, info.fixed_batch), (4, [3, 32, 32], None));
    let norm = info.normalisation.unwrap();
    assert_eq!((norm.mean, norm.std), (meta.mean, meta.std));
    assert_eq!(info.class_names.unwrap(), vec!["a", "b", "c", "d"]);
    assert_eq!(info.params as usize, mekd_models::trainable_params(&model) + running_stats(&spec));
    // No stray temporary next to the output.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Elements of the BatchNorm running statistics of `spec` (stored as initializers too).
fn running_stats(spec: &ClassifierSpec) -> usize {
    assert_eq!(spec.architecture, Architecture::ResNet8);
    // BN layers of ResNet8: stem 16, block1 16+16, block2 32+32+32, block3 64+64+64; mean and var.
    2 * (16 + 32 + 96 + 192)
}

#[test]
fn export_refuses_wrong_normalisation() {
    let spec = ClassifierSpec { architecture: Architecture::LeNet5, in_channels: 1, num_classes: 10 };
    let model = spec.init(&Device::flex()).unwrap();
    let err = export_classifier(&model, &spec, &ExportMetadata::symmetric(3)).unwrap_err().to_string();
    assert!(err.contains("one mean and std per channel"), "{err}");
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_backend_matches_flex() {
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    let spec = ClassifierSpec { architecture: Architecture::LeNet5, in_channels: 1, num_classes: 10 };
    Device::flex().seed(3);
    let on_flex = spec.init(&Device::flex()).unwrap();
    let on_ndarray = spec.init(&ndarray).unwrap().load_record(on_flex.clone().into_record());
    let images = probe_batch(3, spec.image_shape(), 11);
    let a = burn_logits(&on_flex, &images, spec.image_shape());
    let b = burn_logits(&on_ndarray, &images, spec.image_shape());
    assert!(Agreement::of(&a, &b, 10).ok());
}
