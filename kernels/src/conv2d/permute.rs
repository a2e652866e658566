//! Depthwise convolution of tiny channels in registers (AVX-512): where a channel's input has
//! at most 64 values and its output at most 16 (MobileNet's 4x4 layers, hundreds of channels), the channel is loaded into four vectors and each tap's inputs for the 16 outputs
//! are picked out of them by one or two permutations (zero where the tap reads padding): no
//! padded copy, no transposes, one load and one store per channel.

use super::Conv2dGeometry;

/// Output lanes of one channel (a vector).
const LANES: usize = 16;

/// Input values of one channel at most (four vectors).
const MAX_INPUTS: usize = 4 * LANES;

/// Where each output lane of one tap reads its input: the input value's index modulo 32
/// (`sources`), and the lanes that read the first 32 values (`low`) or the last 32 (`high`);
/// the lanes in neither read padding (zero), or are past the outputs.
#[derive(Clone, Copy, Debug)]
pub(super) struct LaneTap {
    sources: [i32; LANES],
    low: u16,
    high: u16,
}

/// Whether a depthwise convolution of `geometry` runs here: at most 64 inputs and 16 outputs
/// per channel, more than 4 outputs (for 2x2 outputs, a masked store of 4 lanes per channel
/// cost more than transposing across channels, in `conv-speed`'s 1024x2x2 layer).
pub(super) fn applies(geometry: &Conv2dGeometry) -> bool {
    let outputs = geometry.out_height() * geometry.out_width();
    geometry.in_height * geometry.in_width <= MAX_INPUTS && outputs <= LANES && outputs > 4
}

/// Per tap (row-major), where each output reads.
pub(super) fn lane_taps(g: &Conv2dGeometry) -> Vec<LaneTap> {
    let ([kh, kw], [sy, sx], [top, left]) = (g.kernel, g.stride, g.pad_before);
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let mut tap = LaneTap { sources: [0; LANES], low: 0, high: 0 };
            for q in 0..out_h * out_w {
                let (y, x) = ((q / out_w * sy + ky).checked_sub(top), (q % out_w * sx + kx).checked_sub(left));
                let Some((y, x)) = y.zip(x).filter(|&(y, x)| y < g.in_height && x < g.in_width) else { continue };
                let source = y * g.in_width + x;
                tap.sources[q] = (source % 32) as i32;
                match source < 32 {
                    true => tap.low |= 1 << q,
                    false => tap.high |= 1 << q,
                }
            }
            taps.push(tap);
        }
    }
    taps
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::image;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;
    use crate::conv2d::{Conv2d, ScratchLayout};

    /// One image ([`super::applies`]): per channel, its input in four vectors, each tap's
    /// inputs permuted out of them, multiplied with the tap's weight; bias, the values to add
    /// and the ReLU applied in the register, the outputs stored at once.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `image`, `add` and `out` have the lengths
    /// [`Conv2d::run_adding`] checks.
    #[target_feature(enable = "avx512f")]
    pub(in crate::conv2d) unsafe fn image(
        conv: &Conv2d,
        image: &[f32],
        _scratch: &mut [f32],
        add: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let g = &conv.geometry;
        let (inputs, outputs) = (g.in_height * g.in_width, g.out_height() * g.out_width());
        let ScratchLayout::Registers(taps) = &conv.layout else { unreachable!("built with its lane taps") };
        assert!(inputs <= 4 * LANES && outputs <= LANES && taps.len() == g.kernel[0] * g.kernel[1]);
        assert!(image.len() == g.in_channels * inputs && out.len() == g.out_channels * outputs);
        assert!(add.is_none_or(|a| a.len() == out.len()) && conv.packed.len() == g.in_channels * taps.len());
        let mask = |n: usize| ((1u32 << n.min(LANES)) - 1) as __mmask16;
        let out_mask = mask(outputs);
        let zero = _mm512_setzero_ps();
        for (c, weights) in conv.packed.chunks_exact(taps.len()).enumerate() {
            // SAFETY: every load and store is masked to the channel's values (the assertions).
            unsafe {
                let from = image.as_ptr().add(c * inputs);
                let x: [__m512; 4] = std::array::from_fn(|k| match inputs > k * LANES {
                    true => _mm512_maskz_loadu_ps(mask(inputs - k * LANES), from.add(k * LANES)),
                    false => zero,
                });
                let mut acc = _mm512_set1_ps(conv.bias[c]);
                for (tap, &w) in taps.iter().zip(weights) {
                    let sources = _mm512_loadu_si512(tap.sources.as_ptr().cast());
                    let mut v = _mm512_maskz_permutex2var_ps(tap.low, x[0], sources, x[1]);
                    if tap.high != 0 {
                        v = _mm512_mask_mov_ps(v, tap.high, _mm512_permutex2var_ps(x[2], sources, x[3]));
                    }
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(w), v, acc);
                }
                let at = c * outputs;
                if let Some(add) = add {
                    acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(out_mask, add.as_ptr().add(at)));
                }
                if conv.relu {
                    acc = _mm512_max_ps(acc, zero);
                }
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), out_mask, acc);
            }
        }
    }
}
