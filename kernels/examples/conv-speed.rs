//! Multiply-adds per second of the convolution kernels on the zoo's shapes, per vector unit and
//! algorithm (Winograd's counted at the definition's multiply-adds, so that the figures compare;
//! the fastest of 9 rounds): `cargo run -p mekd-kernels --example conv-speed [FILTER]`, where FILTER
//! keeps the lines that contain it (e.g. `depthwise`, `avx512`).

use std::time::Instant;

use mekd_kernels::conv2d::Simd;
use mekd_kernels::{Algorithm, Conv2d, Conv2dGeometry};

fn main() {
    let shapes = [
        (3, 32, 3, 5, 1, 0),
        (3, 14, 8, 5, 1, 0),
        (3, 32, 16, 3, 1, 1),
        (8, 32, 16, 3, 1, 1),
        (16, 32, 16, 3, 1, 1),
        (16, 32, 32, 3, 2, 1),
        (32, 16, 32, 3, 1, 1),
        (32, 16, 64, 3, 2, 1),
        (64, 8, 64, 3, 1, 1),
        // MobileNet's pointwise layers.
        (32, 32, 64, 1, 1, 0),
        (64, 16, 128, 1, 1, 0),
        (128, 16, 128, 1, 1, 0),
        (128, 8, 256, 1, 1, 0),
        (256, 8, 256, 1, 1, 0),
        (256, 4, 512, 1, 1, 0),
        (512, 4, 512, 1, 1, 0),
        (512, 2, 1024, 1, 1, 0),
        (1024, 2, 1024, 1, 1, 0),
    ];
    for simd in Simd::available() {
        for &(c, hw, o, k, s, p) in &shapes {
            let g = geometry(c, hw, o, k, s, p);
            let weights = vec![0.5f32; g.weights_len()];
            for algorithm in [Algorithm::Direct, Algorithm::Winograd, Algorithm::Winograd4x4] {
                // Winograd's applies to the 3x3 stride-1 shapes only.
                if let Ok(conv) = Conv2d::with_algorithm(g, &weights, None, simd, algorithm) {
                    report(&conv);
                }
            }
        }
    }
    // MobileNet's depthwise layers, with the best vector unit.
    for (c, hw, s) in [
        (32, 32, 1),
        (64, 32, 2),
        (128, 16, 1),
        (128, 16, 2),
        (256, 8, 1),
        (256, 8, 2),
        (512, 4, 1),
        (512, 4, 2),
        (1024, 2, 1),
    ] {
        let g = geometry(c, hw, c, 3, s, 1);
        let conv = Conv2d::depthwise(g, &vec![0.5f32; c * 9], None).expect("a valid shape");
        report(&conv);
    }
}

fn geometry(c: usize, hw: usize, o: usize, k: usize, s: usize, p: usize) -> Conv2dGeometry {
    Conv2dGeometry {
        in_channels: c,
        in_height: hw,
        in_width: hw,
        out_channels: o,
        kernel: [k, k],
        stride: [s, s],
        pad_before: [p, p],
        pad_after: [p, p],
    }
}

/// Time `conv` on one image of ones and print its speed, unless the command line's filter
/// leaves it out.
fn report(conv: &Conv2d) {
    let g = *conv.geometry();
    let line = format!("{:<28} {g}", conv.kernel_name());
    if std::env::args().nth(1).is_some_and(|filter| !line.contains(&filter)) {
        return;
    }
    let input = vec![1.0f32; g.input_len()];
    let mut out = vec![0f32; g.output_len()];
    let mut scratch = Vec::new();
    // The fastest of 9 rounds: this machine's neighbours slow single rounds by up to 25%.
    let calls = (40_000_000 / conv.macs()).max(10);
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
        "{line}: {:8.1} us/call, {:6.2} GMAC/s",
        secs / calls as f64 * 1e6,
        (conv.macs() * calls) as f64 / secs / 1e9
    );
}
