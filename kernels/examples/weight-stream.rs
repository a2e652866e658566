//! A pointwise kernel whose weights come from memory, as in a network: MobileNet's 512x4x4 ->
//! 512 layer (1 MiB of weights), run in turn over SETS copies with different weights (the
//! fastest of 20 rounds of 20 passes): `cargo run --release -p mekd-kernels --example
//! weight-stream [SETS]` (default 20: 20 MiB, more than the caches keep for one core; 1 keeps
//! them in cache).

use std::time::Instant;

use mekd_kernels::{Conv2d, Conv2dGeometry};

fn main() {
    let sets = match std::env::args().nth(1).map(|s| s.parse::<usize>()) {
        None => 20,
        Some(Ok(sets)) if sets > 0 => sets,
        Some(_) => {
            eprintln!("usage: weight-stream [SETS], SETS a whole number of at least 1");
            std::process::exit(2);
        }
    };
    let g = Conv2dGeometry {
        in_channels: 512,
        in_height: 4,
        in_width: 4,
        out_channels: 512,
        kernel: [1, 1],
        stride: [1, 1],
        pad_before: [0, 0],
        pad_after: [0, 0],
    };
    let convs: Vec<Conv2d> = (0..sets)
        .map(|i| Conv2d::new(g, &vec![0.5 + i as f32; g.weights_len()], None).expect("a valid shape"))
        .collect();
    let input = vec![1.0f32; g.input_len()];
    let mut out = vec![0f32; g.output_len()];
    let mut scratch = Vec::new();
    let secs = (0..20)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..20 {
                for conv in &convs {
                    conv.run(1, &input, &mut out, &mut scratch).expect("sizes match");
                }
            }
            t.elapsed().as_secs_f64() / (20 * sets) as f64
        })
        .fold(f64::INFINITY, f64::min);
    println!("{} ({g}), {sets} sets of weights in turn: {:.1} us per call", convs[0].kernel_name(), secs * 1e6);
}
