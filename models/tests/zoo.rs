//! Parameter counts against the reference implementation, output shapes and costs.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use mekd_models::{Architecture, ClassifierSpec, DiscriminatorConfig, GeneratorConfig, trainable_params, zoo_entries};

fn params(arch: Architecture, channels: usize) -> usize {
    let spec = ClassifierSpec { architecture: arch, in_channels: channels, num_classes: 10 };
    trainable_params(&spec.init(&Device::flex()).unwrap())
}

#[test]
fn parameter_counts_equal_the_reference() {
    // Reference implementation (PyTorch), C = 10, 1 input channel.
    let expected = [
        (Architecture::ResNet8, 77_754),
        (Architecture::ResNet20, 272_186),
        (Architecture::ResNet32, 466_618),
        (Architecture::ResNet56, 855_482),
        (Architecture::LeNet5, 61_706),
        (Architecture::LeNet5Half, 15_738),
    ];
    for (arch, count) in expected {
        assert_eq!(params(arch, 1), count, "{arch}");
        if matches!(arch, Architecture::ResNet8 | Architecture::ResNet32) {
            assert_eq!(params(arch, 3), count + 288, "{arch} with 3 channels");
        }
    }
    // 3 input channels: VGG11 9.75 M, VGG13 9.94 M, MobileNet 3.22 M in the reference.
    assert_eq!(params(Architecture::Vgg11, 3), 9_750_922);
    assert_eq!(params(Architecture::Vgg13, 3), 9_935_434);
    assert_eq!(params(Architecture::Vgg11Bn, 3), 9_750_922 + 2 * (64 + 128 + 2 * 256 + 4 * 512));
    assert_eq!(params(Architecture::MobileNet, 3), 3_223_178);

    let dev = Device::flex();
    assert_eq!(trainable_params(&GeneratorConfig::new(10, 1).init(&dev).unwrap()), 312_705);
    assert_eq!(trainable_params(&GeneratorConfig::new(10, 3).init(&dev).unwrap()), 313_859);
    assert_eq!(trainable_params(&DiscriminatorConfig::new(1).init(&dev).unwrap()), 98_113);
}

#[test]
fn zoo_lists_every_architecture_with_costs() {
    let entries = zoo_entries(1, 10, &Device::flex()).unwrap();
    assert_eq!(entries.len(), Architecture::ALL.len());
    let generator = entries.iter().find(|e| e.name == "generator").unwrap();
    // 10*8192 + 128*128*9*16*16 + 128*64*9*32*32 + 64*1*9*32*32 multiply-adds.
    assert_eq!(generator.macs, 113_917_952);
    assert_eq!(generator.flops, 2 * generator.macs);
    let lenet = entries.iter().find(|e| e.name == "lenet5").unwrap();
    // conv1 6*25*28*28 + conv2 16*150*10*10 + conv3 120*400 + 120*84 + 84*10
    assert_eq!(lenet.macs, 117_600 + 240_000 + 48_000 + 10_080 + 840);
    assert!(entries.iter().all(|e| e.params > 0 && e.macs > 0));
}

#[test]
fn classifiers_map_images_to_logits() {
    let dev = Device::flex();
    for arch in Architecture::classifiers() {
        for channels in [1, 3] {
            let spec = ClassifierSpec { architecture: arch, in_channels: channels, num_classes: 7 };
            let model = spec.init(&dev).unwrap();
            let x = Tensor::<4>::random([2, channels, 32, 32], Distribution::Uniform(-1.0, 1.0), &dev);
            assert_eq!(model.forward(x).dims(), [2, 7], "{arch} with {channels} channel(s)");
        }
    }
}

#[test]
fn generator_and_discriminator_shapes_and_ranges() {
    let dev = Device::flex();
    let g = GeneratorConfig::new(10, 3).with_width(32).init(&dev).unwrap();
    let img = g.forward(Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 1.0), &dev));
    assert_eq!(img.dims(), [4, 3, 32, 32]);
    let values: Vec<f32> = img.clone().into_data().try_to_vec().unwrap();
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
    let d = DiscriminatorConfig::new(3).with_width(8).init(&dev).unwrap();
    let logits: Vec<f32> = d.forward_logits(img).into_data().try_to_vec().unwrap();
    assert_eq!(logits.len(), 4);
    assert!(logits.iter().all(|v| v.is_finite()));
    assert!(GeneratorConfig::new(10, 1).with_width(3).init(&dev).is_err());
}

#[test]
fn architecture_names_round_trip() {
    for arch in Architecture::ALL {
        assert_eq!(arch.name().parse::<Architecture>().unwrap(), arch);
    }
    assert_eq!("LeNet5_Half".parse::<Architecture>().unwrap(), Architecture::LeNet5Half);
    let err = "resnet9".parse::<Architecture>().unwrap_err().to_string();
    assert!(err.contains("unknown architecture `resnet9`") && err.contains("resnet8"), "{err}");
}

#[test]
fn latent_grad_matches_autodiff() {
    // A generator whose BatchNorms have non-trivial running statistics, then frozen.
    let train = Device::flex().autodiff();
    train.seed(3);
    let g = GeneratorConfig::new(10, 1).with_width(8).init(&train).unwrap();
    for _ in 0..3 {
        let _ = g.forward(Tensor::<2>::random([16, 10], Distribution::Normal(0.0, 2.0), &train));
    }
    let frozen = g.valid().no_grad();
    let plain = Device::flex();
    let z = Tensor::<2>::random([5, 10], Distribution::Normal(0.0, 1.0), &plain);
    let cotangent = Tensor::<4>::random([5, 1, 32, 32], Distribution::Uniform(-1.0, 1.0), &plain);

    // Reference: autodiff through the ordinary forward pass.
    let z_tracked = z.clone().autodiff().require_grad();
    let images = frozen.forward(z_tracked.clone());
    let grads = (images.clone() * cotangent.clone().autodiff()).sum().backward();
    let expected: Vec<f32> = z_tracked.grad(&grads).unwrap().into_data().try_to_vec().unwrap();

    let trace = frozen.forward_traced(z);
    let same: Vec<f32> = (trace.images().clone() - images.inner()).abs().max().into_data().try_to_vec().unwrap();
    assert!(same[0] < 1e-6, "traced images differ by {}", same[0]);
    let got: Vec<f32> = frozen.latent_grad(&trace, cotangent.clone()).into_data().try_to_vec().unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "a gradient worth comparing: {expected:?}");
    for (e, g) in expected.iter().zip(&got) {
        assert!((e - g).abs() <= 1e-4 * scale, "{expected:?}\nvs\n{got:?}");
    }

    // The trace of some rows of a batch serves as the trace of those rows alone.
    let rows: Vec<f32> = frozen.latent_grad(&trace.rows(1..4), cotangent.slice(1..4)).into_data().try_to_vec().unwrap();
    assert_eq!(rows.len(), 30);
    for (e, g) in expected[10..40].iter().zip(&rows) {
        assert!((e - g).abs() <= 1e-4 * scale, "{expected:?}\nvs rows 1..4\n{rows:?}");
    }
}
