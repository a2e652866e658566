//! Batch norm in training, per channel, over activations laid out `[batch, channels, pixels]`
//! (contiguous): the statistics, the normalisation, and the backward pass, each a pass over one
//! channel's rows where they lie (no transposition). Callers split the channels or the rows
//! between threads.
//!
//! Sums run in eight `f32` lanes per row (which the compiler vectorises), rows added up in `f64`.

/// One channel's rows in `x` (`[batch, channels, pixels]`).
fn rows(x: &[f32], channels: usize, pixels: usize, channel: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(channels * pixels).map(move |image| &image[channel * pixels..][..pixels])
}

/// The sum of `f` over `values`: eight `f32` lanes, added up in `f64`.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(f(v))).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + tail
}

/// Channel `channel`'s mean over the batch and its pixels, and its (biased) variance about it:
/// two passes over its rows. `x` is `[batch, channels, pixels]`, with at least one value per
/// channel.
pub fn statistics(x: &[f32], channels: usize, pixels: usize, channel: usize) -> (f32, f32) {
    let count = (x.len() / channels.max(1)).max(1) as f64;
    let mean = (rows(x, channels, pixels, channel).map(|row| lane_sum(row, |v| v)).sum::<f64>() / count) as f32;
    let squares = rows(x, channels, pixels, channel).map(|row| lane_sum(row, |v| (v - mean) * (v - mean)));
    (mean, (squares.sum::<f64>() / count) as f32)
}

/// `out = x * scale + shift`, value by value (a row of the normalised output: `scale = gamma /
/// std`, `shift = beta - mean * scale`).
pub fn scale_shift(x: &[f32], scale: f32, shift: f32, out: &mut [f32]) {
    for (out, &x) in out.iter_mut().zip(x) {
        *out = x * scale + shift;
    }
}

/// Channel `channel`'s sums for the backward pass: of the output gradient `grad` (beta's
/// gradient) and of its product with the centred input `x - mean` (gamma's gradient times the
/// standard deviation). `x` and `grad` are `[batch, channels, pixels]`.
pub fn gradient_sums(x: &[f32], grad: &[f32], channels: usize, pixels: usize, channel: usize, mean: f32) -> (f32, f32) {
    let (mut sum, mut dot) = (0.0f64, 0.0f64);
    for (x, g) in rows(x, channels, pixels, channel).zip(rows(grad, channels, pixels, channel)) {
        sum += lane_sum(g, |v| v);
        let mut lanes = [0.0f32; 8];
        let (xs, gs) = (x.chunks_exact(8), g.chunks_exact(8));
        let tail: f64 = xs.remainder().iter().zip(gs.remainder()).map(|(&x, &g)| f64::from((x - mean) * g)).sum();
        for (x, g) in xs.zip(gs) {
            for ((lane, &x), &g) in lanes.iter_mut().zip(x).zip(g) {
                *lane += (x - mean) * g;
            }
        }
        dot += lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + tail;
    }
    (sum as f32, dot as f32)
}

/// `out = grad * a - x * k + shift`, value by value: a row of the input gradient, `gamma / std
/// * (grad - mean(grad) - normalised * mean(grad * normalised))` written with per-channel
/// coefficients (`a = gamma / std`, `k = a / std * mean(grad * normalised)`, `shift = k * mean
/// - a * mean(grad)`).
pub fn input_gradient(x: &[f32], grad: &[f32], a: f32, k: f32, shift: f32, out: &mut [f32]) {
    for ((out, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        *out = g * a - x * k + shift;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics and sums against a direct computation in `f64` on a small case with a
    /// tail (5 pixels: no whole lane chunk).
    #[test]
    fn statistics_and_sums_match_f64() {
        let (batch, channels, pixels) = (3, 2, 5);
        let x: Vec<f32> = (0..batch * channels * pixels).map(|i| ((i * 7 % 11) as f32) * 0.5 - 2.0).collect();
        let g: Vec<f32> = (0..x.len()).map(|i| ((i * 5 % 13) as f32) * 0.25 - 1.0).collect();
        for c in 0..channels {
            let values: Vec<(f64, f64)> = (0..batch)
                .flat_map(|b| (0..pixels).map(move |p| (b * channels + c) * pixels + p))
                .map(|i| (f64::from(x[i]), f64::from(g[i])))
                .collect();
            let n = values.len() as f64;
            let mean = values.iter().map(|v| v.0).sum::<f64>() / n;
            let variance = values.iter().map(|v| (v.0 - mean).powi(2)).sum::<f64>() / n;
            let (m, var) = statistics(&x, channels, pixels, c);
            assert!((f64::from(m) - mean).abs() < 1e-6 && (f64::from(var) - variance).abs() < 1e-5);
            let (sum, dot) = gradient_sums(&x, &g, channels, pixels, c, m);
            let expected_dot = values.iter().map(|v| (v.0 - f64::from(m)) * v.1).sum::<f64>();
            assert!((f64::from(sum) - values.iter().map(|v| v.1).sum::<f64>()).abs() < 1e-5);
            assert!((f64::from(dot) - expected_dot).abs() < 1e-5);
        }
    }
}
