//! Multiply-adds per second of the direct convolution on the zoo's shapes, per vector unit (the
//! fastest of 9 rounds):
//! `cargo run -p mekd-kernels --example conv-speed`.

use std::time::Instant;

use mekd_kernels::conv2d::Simd;
use mekd_kernels::{Conv2d, Conv2dGeometry};

fn main() {
    let shapes = [
        (3, 32, 3, 5, 1, 0),
        (3, 14, 8, 5, 1, 0),
        (3, 32, 16, 3, 1, 1),
        (16, 32, 16, 3, 1, 1),
        (16, 32, 32, 3, 2, 1),
        (32, 16, 32, 3, 1, 1),
        (32, 16, 64, 3, 2, 1),
        (64, 8, 64, 3, 1, 1),
    ];
    for simd in Simd::available() {
        for &(c, hw, o, k, s, p) in &shapes {
            let g = Conv2dGeometry {
                in_channels: c,
                in_height: hw,
                in_width: hw,
                out_channels: o,
                kernel: [k, k],
                stride: [s, s],
                pad_before: [p, p],
                pad_after: [p, p],
            };
            let weights = vec![0.5f32; g.weights_len()];
            let conv = Conv2d::with_simd(g, &weights, None, simd).expect("a valid shape");
            let input = vec![1.0f32; g.input_len()];
            let mut out = vec![0f32; g.output_len()];
            let mut scratch = Vec::new();
            // The fastest of 9 rounds: this machine's neighbours slow single rounds by up to 25%.
            let calls = (40_000_000 / g.macs()).max(10);
            let secs = (0..9)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..calls {
                        conv.run(1, &input, &mut out, &mut scratch).expect("sizes match");
                    }
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "{:<28} {g}: {:8.1} us/call, {:6.2} GMAC/s",
                conv.kernel_name(),
                secs / calls as f64 * 1e6,
                (g.macs() * calls) as f64 / secs / 1e9
            );
        }
    }
}
