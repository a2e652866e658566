//! The weight gradient of a 3x3 convolution of stride 1, for training: `dW[co][ci][ky][kx] =
//! sum over outputs (oy, ox) of grad[co][oy][ox] * input[ci][oy + ky - top][ox + kx - left]`,
//! summed over the images.
//!
//! Each input channel is zero-padded into rows of `out_width + 2` values, and each output
//! gradient channel is written into rows as wide, zero in the two extra columns. Flattened, an
//! output `(oy, ox)` is then position `oy * width + ox` in both, and tap `(ky, kx)` reads the
//! padded channel `ky * width + kx` further on: each of the nine taps is one dot product of
//! two contiguous runs, read in whole vectors (the extra columns multiply by zero).
//!
//! A chunk of images (as many as keep the padded channels within about 256 KiB) is laid out
//! channel by channel, image after image in blocks of the same length in both buffers
//! (`[channel][image][block]`), so that the dot products run over the whole chunk: a tile of
//! output channels x the nine taps stays in registers over it, and its products are summed
//! across lanes once per chunk, not once per image (which, at 8x8 outputs, cost more than the
//! products). A tap's reads past an image's rows land in the next block, where the gradient
//! they multiply is zero.

use super::{Conv2dError, Conv2dGeometry, Simd, Vector, check_len};

/// Taps of the kernels this covers (3x3).
const TAPS: usize = 9;

/// Most lanes of any vector type (AVX-512): blocks are whole vectors of it.
const MAX_LANES: usize = 16;

/// Bytes of padded channels a chunk of images aims for (a share of a core's L2 cache).
const CHUNK_BYTES: usize = 256 << 10;

/// One compiled kernel: add to `dw` the gradient of the images in the padded input channels
/// and padded output gradient channels, over `positions` values of each channel
/// ([`WeightGradient`]'s layout).
type ChunkKernel = unsafe fn(&WeightGradient, &[f32], &[f32], usize, &mut [f32]);

/// The weight gradient of a 3x3 convolution of stride 1, built once per shape.
#[derive(Clone, Debug)]
pub struct WeightGradient {
    geometry: Conv2dGeometry,
    kernel: ChunkKernel,
    simd: Simd,
    /// Values of a padded row: `out_width + 2`.
    width: usize,
    /// Values of one image's block in a padded channel: its `out_height + 2` padded rows,
    /// rounded up to whole vectors.
    block: usize,
    /// Images per chunk.
    chunk: usize,
}

impl WeightGradient {
    /// The weight gradient for `geometry` with the widest vector unit this CPU has; an error
    /// for a geometry it does not cover (a kernel other than 3x3, a stride other than 1) or an
    /// invalid one.
    pub fn new(geometry: Conv2dGeometry) -> Result<WeightGradient, Conv2dError> {
        geometry.validate()?;
        if geometry.kernel != [3, 3] || geometry.stride != [1, 1] {
            return Err(Conv2dError::Geometry(format!(
                "{geometry}: the weight gradient kernel covers 3x3 kernels of stride 1"
            )));
        }
        let simd = Simd::detect();
        let width = geometry.out_width() + 2;
        // `validate` bounds the padded input (`(out_height + 2) x width` values) by 2^48.
        let block = ((geometry.out_height() + 2) * width).div_ceil(MAX_LANES) * MAX_LANES;
        let per_image = (geometry.in_channels + geometry.out_channels) * block * size_of::<f32>();
        Ok(WeightGradient {
            kernel: kernel(simd),
            simd,
            width,
            block,
            chunk: (CHUNK_BYTES / per_image).max(1),
            geometry,
        })
    }

    /// The same with the kernel of `simd`; an error where this CPU lacks it.
    pub fn with_simd(geometry: Conv2dGeometry, simd: Simd) -> Result<WeightGradient, Conv2dError> {
        if !Simd::available().contains(&simd) {
            return Err(Conv2dError::Geometry(format!("this machine cannot run the {} kernel", simd.name())));
        }
        Ok(WeightGradient { kernel: kernel(simd), simd, ..WeightGradient::new(geometry)? })
    }

    /// The vector unit its kernel runs on.
    pub fn simd(&self) -> Simd {
        self.simd
    }

    /// Values of one padded input channel: a chunk's blocks and one more, which the taps of
    /// the last image read into.
    fn channel_len(&self) -> usize {
        (self.chunk + 1) * self.block
    }

    /// Values of the scratch buffer: a chunk's padded input and output gradient.
    pub fn scratch_len(&self) -> usize {
        let g = &self.geometry;
        g.in_channels * self.channel_len() + g.out_channels * self.chunk * self.block
    }

    /// Add to `dw` (`[out, in, 3, 3]`) the weight gradient of `images` images: `input` is
    /// `[images, in, height, width]`, `grad` (the gradient of the convolution's output) `[images,
    /// out, out_height, out_width]`; `scratch` grows as needed (keep it between calls).
    pub fn accumulate(
        &self,
        images: usize,
        input: &[f32],
        grad: &[f32],
        dw: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<(), Conv2dError> {
        let g = &self.geometry;
        let (in_len, out_len) = (g.input_len(), g.output_len());
        check_len("input", input.len(), images.saturating_mul(in_len))?;
        check_len("output gradient", grad.len(), images.saturating_mul(out_len))?;
        check_len("weight gradient", dw.len(), g.weights_len())?;
        let needed = self.scratch_len();
        if scratch.len() < needed {
            scratch.resize(needed, 0.0);
        }
        let (padded, padded_grad) = scratch[..needed].split_at_mut(g.in_channels * self.channel_len());
        // The padding, the extra columns and the blocks' tails stay zero; each chunk overwrites
        // the rest (a last, shorter chunk leaves earlier images in blocks it does not read, or
        // reads only against a zero gradient).
        padded.fill(0.0);
        padded_grad.fill(0.0);
        let (out_w, out_h, [top, left]) = (g.out_width(), g.out_height(), g.pad_before);
        let channel_len = self.channel_len();
        for (inputs, grads) in input.chunks(self.chunk * in_len).zip(grad.chunks(self.chunk * out_len)) {
            for (b, (image, grad)) in inputs.chunks_exact(in_len).zip(grads.chunks_exact(out_len)).enumerate() {
                // Stride 1 and a 3x3 kernel: the padded rows are exactly `top + height + bottom`
                // of `left + width + right` values, so each input row lands whole.
                for (channel, padded) in
                    image.chunks_exact(g.in_height * g.in_width).zip(padded.chunks_exact_mut(channel_len))
                {
                    let padded = &mut padded[b * self.block..];
                    for (y, row) in channel.chunks_exact(g.in_width).enumerate() {
                        padded[(y + top) * self.width + left..][..g.in_width].copy_from_slice(row);
                    }
                }
                let grad_channel_len = self.chunk * self.block;
                for (channel, padded) in
                    grad.chunks_exact(out_h * out_w).zip(padded_grad.chunks_exact_mut(grad_channel_len))
                {
                    let padded = &mut padded[b * self.block..];
                    for (row, padded) in channel.chunks_exact(out_w).zip(padded.chunks_mut(self.width)) {
                        padded[..out_w].copy_from_slice(row);
                    }
                }
            }
            let positions = inputs.len() / in_len * self.block;
            // SAFETY: `kernel` was picked for `self.simd`, which `Simd::detect` or
            // `Simd::available` found on this CPU; the buffers have the lengths of this layout.
            unsafe { (self.kernel)(self, padded, padded_grad, positions, dw) };
        }
        Ok(())
    }
}

/// The compiled kernel for `simd`.
fn kernel(simd: Simd) -> ChunkKernel {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => x86::avx512,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => x86::avx2,
        _ => portable,
    }
}

/// One chunk's gradient: for each input channel and tile of `CO` output channels, the nine
/// taps' dot products over the first `positions` values in `CO x 9` vector accumulators, then
/// summed across lanes into `dw`.
///
/// # Safety
/// The CPU must have `V`'s features; `padded` and `grad` have [`WeightGradient`]'s layout and
/// `positions` is at most a chunk's blocks.
#[inline(always)]
unsafe fn chunk<V: Vector, const CO: usize>(
    wg: &WeightGradient,
    padded: &[f32],
    grad: &[f32],
    positions: usize,
    dw: &mut [f32],
) {
    let g = &wg.geometry;
    let (channels_in, channels_out) = (g.in_channels, g.out_channels);
    let (channel_len, grad_channel_len) = (wg.channel_len(), wg.chunk * wg.block);
    // The reads: `positions` values (whole vectors: blocks are whole vectors of the widest
    // lanes) from `ky * width + kx` (at most `2 * width + 2`, within a block) in a padded
    // channel, from 0 in a gradient channel.
    assert!(positions <= grad_channel_len && positions.is_multiple_of(V::LANES) && 2 * wg.width + 2 <= wg.block);
    assert!(padded.len() >= channels_in * channel_len && grad.len() >= channels_out * grad_channel_len);
    assert!(dw.len() >= channels_out * channels_in * TAPS);
    let offsets: [usize; TAPS] = std::array::from_fn(|t| (t / 3) * wg.width + t % 3);
    for ci in 0..channels_in {
        let x = padded[ci * channel_len..].as_ptr();
        for co0 in (0..channels_out).step_by(CO) {
            // A last tile of fewer channels repeats its last one (and stores it once).
            let rows: [usize; CO] = std::array::from_fn(|c| (co0 + c).min(channels_out - 1));
            let gp: [*const f32; CO] = std::array::from_fn(|c| grad[rows[c] * grad_channel_len..].as_ptr());
            // SAFETY: V's features are the caller's promise; the reads stay within the
            // lengths asserted above.
            let mut acc = [[unsafe { V::splat(0.0) }; TAPS]; CO];
            for p in (0..positions).step_by(V::LANES) {
                let gv: [V; CO] = std::array::from_fn(|c| unsafe { V::load(gp[c].add(p)) });
                for (t, &offset) in offsets.iter().enumerate() {
                    let xv = unsafe { V::load(x.add(offset + p)) };
                    for c in 0..CO {
                        acc[c][t] = unsafe { V::mul_add(acc[c][t], gv[c], xv) };
                    }
                }
            }
            for (c, acc) in acc.iter().enumerate().take(channels_out - co0) {
                let at = (rows[c] * channels_in + ci) * TAPS;
                for (t, v) in acc.iter().enumerate() {
                    let mut lanes = [0.0f32; MAX_LANES];
                    unsafe { v.store(lanes.as_mut_ptr()) };
                    dw[at + t] += lanes[..V::LANES].iter().sum::<f32>();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{WeightGradient, chunk};

    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA; the buffers have [`WeightGradient`]'s layout.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512(wg: &WeightGradient, padded: &[f32], grad: &[f32], positions: usize, dw: &mut [f32]) {
        // Two output channels: 18 accumulators, two gradient vectors and one input vector of
        // the 32 registers.
        unsafe { chunk::<__m512, 2>(wg, padded, grad, positions, dw) }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; the buffers have [`WeightGradient`]'s layout.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(wg: &WeightGradient, padded: &[f32], grad: &[f32], positions: usize, dw: &mut [f32]) {
        // One output channel: 9 accumulators of the 16 registers.
        unsafe { chunk::<__m256, 1>(wg, padded, grad, positions, dw) }
    }
}

/// The target's baseline vectors (NEON on aarch64: two output channels in its 32 registers;
/// plain `f32` elsewhere).
///
/// # Safety
/// The buffers have [`WeightGradient`]'s layout.
unsafe fn portable(wg: &WeightGradient, padded: &[f32], grad: &[f32], positions: usize, dw: &mut [f32]) {
    unsafe { chunk::<super::portable::Lanes, 2>(wg, padded, grad, positions, dw) }
}

#[cfg(test)]
mod tests {
    use super::super::tests::values;
    use super::*;

    fn geometry(c_in: usize, c_out: usize, h: usize, w: usize, pad: [usize; 4]) -> Conv2dGeometry {
        Conv2dGeometry {
            in_channels: c_in,
            in_height: h,
            in_width: w,
            out_channels: c_out,
            kernel: [3, 3],
            stride: [1, 1],
            pad_before: [pad[0], pad[1]],
            pad_after: [pad[2], pad[3]],
        }
    }

    /// The definition in f64, summed over the images; and, from the same definition, through
    /// [`Conv2dGeometry::unfold`]: the output gradient times the unfolded input's transpose.
    fn reference(g: &Conv2dGeometry, images: usize, input: &[f32], grad: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (oh, ow) = (g.out_height(), g.out_width());
        let mut direct = vec![0f64; g.weights_len()];
        let mut unfolded = vec![0f64; g.weights_len()];
        let mut matrix = vec![f32::NAN; g.unfolded_len()];
        for n in 0..images {
            let image = &input[n * g.input_len()..][..g.input_len()];
            let grad = &grad[n * g.output_len()..][..g.output_len()];
            g.unfold(image, &mut matrix).expect("unfold");
            for o in 0..g.out_channels {
                for c in 0..g.in_channels {
                    for t in 0..TAPS {
                        let (ky, kx) = (t / 3, t % 3);
                        let row = &matrix[(c * TAPS + t) * oh * ow..][..oh * ow];
                        let mut sum = 0f64;
                        for y in 0..oh {
                            for x in 0..ow {
                                let iy = (y + ky) as isize - g.pad_before[0] as isize;
                                let ix = (x + kx) as isize - g.pad_before[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.in_height && (ix as usize) < g.in_width {
                                    let i = (c * g.in_height + iy as usize) * g.in_width + ix as usize;
                                    sum += f64::from(grad[(o * oh + y) * ow + x]) * f64::from(image[i]);
                                }
                            }
                        }
                        direct[(o * g.in_channels + c) * TAPS + t] += sum;
                        let dot: f64 = (0..oh * ow).map(|p| f64::from(grad[o * oh * ow + p]) * f64::from(row[p])).sum();
                        unfolded[(o * g.in_channels + c) * TAPS + t] += dot;
                    }
                }
            }
        }
        (direct, unfolded)
    }

    /// Every vector unit this machine has, on the training shapes (ResNet's 3x3 layers, the
    /// generator's; chunks of one image and of several) and uneven ones: an odd count of output channels (a last tile of one),
    /// no padding, a padding of 2 (rows and columns beyond the taps' reach), a row narrower than
    /// a vector. The unfold path agrees with the definition too.
    #[test]
    fn matches_the_definition_and_the_unfold() {
        let cases = [
            (geometry(16, 16, 32, 32, [1, 1, 1, 1]), 2),
            // Chunks of 4 images: one whole, then a shorter one over the first's leftovers.
            (geometry(64, 64, 8, 8, [1, 1, 1, 1]), 6),
            (geometry(3, 5, 7, 5, [1, 1, 1, 1]), 3),
            (geometry(4, 3, 9, 11, [0, 0, 0, 0]), 2),
            (geometry(2, 7, 6, 4, [2, 1, 0, 2]), 2),
            (geometry(1, 1, 1, 1, [1, 1, 1, 1]), 1),
        ];
        for (g, images) in cases {
            if g.in_channels == 64 {
                assert_eq!(WeightGradient::new(g).expect("geometry").chunk, 4, "the chunks this case is for");
            }
            let input = values(images * g.input_len(), 1);
            let grad = values(images * g.output_len(), 2);
            let (direct, unfolded) = reference(&g, images, &input, &grad);
            let scale = direct.iter().fold(1e-9f64, |m, v| m.max(v.abs()));
            for (a, b) in direct.iter().zip(&unfolded) {
                assert!((a - b).abs() <= 1e-9 * scale, "{g}: unfold");
            }
            for simd in Simd::available() {
                let wg = WeightGradient::with_simd(g, simd).expect("geometry");
                // Accumulates onto what is there.
                let mut dw = vec![1.0f32; g.weights_len()];
                let mut scratch = vec![f32::NAN; 3];
                wg.accumulate(images, &input, &grad, &mut dw, &mut scratch).expect("lengths");
                let worst = dw.iter().zip(&direct).map(|(&a, b)| (f64::from(a) - 1.0 - b).abs()).fold(0.0, f64::max);
                assert!(worst <= 1e-5 * scale.max(1.0), "{g} {simd:?}: off by {worst:e} (largest {scale})");
            }
        }
    }

    /// Geometries it does not cover, and buffers of the wrong length, are errors.
    #[test]
    fn refuses_what_it_does_not_cover() {
        let strided = Conv2dGeometry { stride: [2, 2], ..geometry(2, 2, 8, 8, [1, 1, 1, 1]) };
        assert!(WeightGradient::new(strided).is_err());
        let five = Conv2dGeometry { kernel: [5, 5], ..geometry(2, 2, 8, 8, [2, 2, 2, 2]) };
        assert!(WeightGradient::new(five).is_err());
        let g = geometry(2, 3, 4, 4, [1, 1, 1, 1]);
        let wg = WeightGradient::new(g).expect("geometry");
        let (input, grad) = (vec![0.0; g.input_len()], vec![0.0; g.output_len()]);
        let mut scratch = Vec::new();
        assert!(wg.accumulate(1, &input, &grad, &mut [0.0; 5], &mut scratch).is_err());
        assert!(wg.accumulate(2, &input, &grad, &mut vec![0.0; g.weights_len()], &mut scratch).is_err());
    }
}
