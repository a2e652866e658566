//! Time one convolution's passes at the training shapes (ResNet's 3x3 layers at batch 128) on
//! flex: burn's own convolution against `mekd_models::ops::conv2d` (mekd-kernels' forward and
//! input gradient, the weight gradient by unfolded rows and gemm), the forward pass apart from
//! the backward pass (both gradients). `cargo run -p mekd-models --example conv-passes`.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn main() {
    let device = Device::flex().autodiff();
    for &(c, hw, b) in &[(16usize, 32usize, 128usize), (32, 16, 128), (64, 8, 128)] {
        let conv: Conv2d = Conv2dConfig::new([c, c], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(&device);
        let x = Tensor::<4>::random([b, c, hw, hw], Distribution::Normal(0.0, 1.0), &device).require_grad();
        for ours in [false, true, false, true] {
            let (mut forward, mut backward) = (Vec::new(), Vec::new());
            for _ in 0..4 {
                let t = Instant::now();
                let y = if ours { mekd_models::ops::conv2d(&conv, x.clone()) } else { conv.forward(x.clone()) };
                let _ = y.clone().sum().into_scalar::<f32>();
                forward.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let g = y.sum().backward();
                let dx = x.grad(&g).expect("input gradient");
                let dw = conv.weight.grad(&g).expect("weight gradient");
                let _ = (dx.sum().into_scalar::<f32>(), dw.sum().into_scalar::<f32>());
                backward.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let name = if ours { "mekd-kernels" } else { "burn" };
            println!(
                "{c}x{hw}x{hw} b{b} {name:>12}: forward {:6.1} ms, backward {:6.1} ms",
                median(&mut forward),
                median(&mut backward)
            );
        }
    }
}
