//! Direct 2-D convolution for few channels and small images (NCHW, no dilation; one group, or
//! depthwise: one group per channel).
//!
//! Why: an im2col + matrix product lowering spends most of its time gathering the few input
//! channels of a small student into panels, and pads an 8-row matrix tile with 3 real rows.
//! This kernel gathers little. Per image it copies the input into zero-padded *shifted
//! planes*, one per input channel, kernel column `kx` and offset `py` of the vertical stride
//! `sy`: plane `(c, py, kx)` holds at row `r`, column `x` the padded input's value at row
//! `r * sy + py`, column `x * sx + kx`. Its rows are exactly as wide as the output, so tap
//! `(ky, kx)` of output pixel `q = oy * out_width + ox` reads plane `(c, ky % sy, kx)` at
//! `q + (ky / sy) * out_width`: the outputs of a channel are one contiguous run, and a tile of
//! `CO` output channels by a few vectors of consecutive outputs (running across row ends) loads
//! each tap's inputs as whole vectors however narrow or strided the convolution, keeps
//! `CO x vectors` accumulators in registers and multiplies each loaded vector with `CO`
//! weights. Weights are packed once, at construction, in the order the taps are walked.
//!
//! The same code is compiled for each vector unit and chosen when the kernel is built
//! ([`Simd::detect`]): tiles of 8 output channels by 32 outputs on AVX-512 (16 by 16 where a
//! channel has no more), by 8 on AVX2 and on NEON, with fused multiply-adds where the target
//! has them. The planes are filled inside the compiled kernel, with its vector unit.
//!
//! A 1x1 convolution of stride 1 without padding (MobileNet's pointwise layers) needs no
//! planes: where its outputs fill whole tiles, each input channel is read where it is
//! ([`Conv2d::reads_in_place`]); where a channel has fewer than 16 outputs (its 2x2 layers), a
//! vector runs across 16 output channels instead, 4 outputs at a time.
//!
//! A depthwise convolution ([`Conv2d::depthwise`]: each output channel reads only its own input
//! channel) has no weights to share between channels and 9 multiply-adds per output: copying
//! planes would cost more. Its vectors run along output rows, read straight from the padded
//! channel (`depthwise.rs`); where a channel has at most 16 outputs (MobileNet's last layers,
//! hundreds of 4x4 or 2x2 channels), the image is transposed to `[pixels][channels]` instead
//! and a vector holds one output of as many channels.
//!
//! Dense 3x3 convolutions of stride 1 with enough input channels run Winograd's instead
//! (`winograd.rs`): F(4x4, 3x3) ([`Algorithm::Winograd4x4`], 4x fewer multiply-adds) where its
//! 4x4 tiles fill the vectors, else F(2x2, 3x3) ([`Algorithm::Winograd`], 2.25x fewer), with
//! the same kind of tiles of output channels by vectors of outputs in their matrix products.

use std::fmt;

mod depthwise;
mod permute;
pub mod weight_gradient;
mod winograd;

/// The shape of one convolution: `[N, in_channels, in_height, in_width]` in,
/// `[N, out_channels, out_height, out_width]` out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Input height.
    pub in_height: usize,
    /// Input width.
    pub in_width: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `[height, width]`.
    pub kernel: [usize; 2],
    /// Stride `[vertical, horizontal]`.
    pub stride: [usize; 2],
    /// Zero padding before the first row and column `[top, left]`.
    pub pad_before: [usize; 2],
    /// Zero padding after the last row and column `[bottom, right]`.
    pub pad_after: [usize; 2],
}

impl Conv2dGeometry {
    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.in_height + self.pad_before[0] + self.pad_after[0] - self.kernel[0]) / self.stride[0] + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.in_width + self.pad_before[1] + self.pad_after[1] - self.kernel[1]) / self.stride[1] + 1
    }

    /// Values of one input image.
    pub fn input_len(&self) -> usize {
        self.in_channels * self.in_height * self.in_width
    }

    /// Values of one output image.
    pub fn output_len(&self) -> usize {
        self.out_channels * self.out_height() * self.out_width()
    }

    /// Values of the weights, `[out_channels, in_channels, kernel height, kernel width]`.
    pub fn weights_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Values of [`Conv2dGeometry::unfold`]'s matrix: `in x kernel h x kernel w` rows of
    /// `out_height x out_width` outputs.
    pub fn unfolded_len(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1] * self.out_height() * self.out_width()
    }

    /// Write into `matrix` (`[in x kernel h x kernel w, outputs]`, [`Conv2dGeometry::unfolded_len`]
    /// values) the input value each weight meets at each output of one image (`input`: `[in,
    /// height, width]`), zero where it falls in the padding: row `(c, ky, kx)`'s value at output
    /// `(oy, ox)` is the input's `(c, oy * sy + ky - top, ox * sx + kx - left)`. Rows of the image
    /// are copied whole where the stride is 1. The weight gradient is the output gradient
    /// (`[out, outputs]`) times this matrix's transpose, summed over the images.
    pub fn unfold(&self, input: &[f32], matrix: &mut [f32]) -> Result<(), Conv2dError> {
        check_len("input", input.len(), self.input_len())?;
        check_len("unfolded matrix", matrix.len(), self.unfolded_len())?;
        let g = self;
        let ([kh, kw], [sy, sx], [top, left]) = (g.kernel, g.stride, g.pad_before);
        let (h, w, out_h, out_w) = (g.in_height, g.in_width, g.out_height(), g.out_width());
        let mut rows = matrix.chunks_exact_mut(out_h * out_w);
        for channel in input.chunks_exact(h * w) {
            for ky in 0..kh {
                for kx in 0..kw {
                    let Some(row) = rows.next() else { return Ok(()) };
                    // The outputs whose column falls in the image: `ox * sx + kx` in `[left, left + w)`.
                    let first = left.saturating_sub(kx).div_ceil(sx).min(out_w);
                    let end = (left + w).saturating_sub(kx).div_ceil(sx).clamp(first, out_w);
                    for (oy, out) in row.chunks_exact_mut(out_w).enumerate() {
                        let iy = (oy * sy + ky).checked_sub(top).filter(|&iy| iy < h);
                        let Some(iy) = iy else {
                            out.fill(0.0);
                            continue;
                        };
                        let from = &channel[iy * w..][..w];
                        out[..first].fill(0.0);
                        out[end..].fill(0.0);
                        if first == end {
                            continue;
                        }
                        let x0 = first * sx + kx - left;
                        if sx == 1 {
                            out[first..end].copy_from_slice(&from[x0..][..end - first]);
                        } else {
                            for (value, x) in out[first..end].iter_mut().zip((x0..).step_by(sx)) {
                                *value = from[x];
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every size at least one, the kernel within the padded input, and the sizes small enough
    /// that no index computation overflows.
    pub fn validate(&self) -> Result<(), Conv2dError> {
        let sizes = [
            ("in_channels", self.in_channels),
            ("in_height", self.in_height),
            ("in_width", self.in_width),
            ("out_channels", self.out_channels),
            ("kernel height", self.kernel[0]),
            ("kernel width", self.kernel[1]),
            ("vertical stride", self.stride[0]),
            ("horizontal stride", self.stride[1]),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(Conv2dError::Geometry(format!("{name} is 0")));
        }
        // 2^24 values per image or per weight tensor bound every product below.
        const LIMIT: usize = 1 << 24;
        let too_big = |v: Option<usize>| v.is_none_or(|v| v > LIMIT);
        let padded = [
            self.in_height.checked_add(self.pad_before[0]).and_then(|v| v.checked_add(self.pad_after[0])),
            self.in_width.checked_add(self.pad_before[1]).and_then(|v| v.checked_add(self.pad_after[1])),
        ];
        let input = self.in_channels.checked_mul(self.in_height).and_then(|v| v.checked_mul(self.in_width));
        let weights = self
            .out_channels
            .checked_mul(self.in_channels)
            .and_then(|v| v.checked_mul(self.kernel[0]))
            .and_then(|v| v.checked_mul(self.kernel[1]));
        if too_big(padded[0]) || too_big(padded[1]) || too_big(input) || too_big(weights) {
            return Err(Conv2dError::Geometry(format!("{self} is too large for this kernel")));
        }
        if padded.iter().zip(self.kernel).any(|(padded, kernel)| padded.unwrap_or(0) < kernel) {
            return Err(Conv2dError::Geometry(format!("{self}: the kernel is larger than the padded input")));
        }
        let output = self.out_channels.checked_mul(self.out_height()).and_then(|v| v.checked_mul(self.out_width()));
        if too_big(output) {
            return Err(Conv2dError::Geometry(format!("{self} is too large for this kernel")));
        }
        Ok(())
    }
}

impl fmt::Display for Conv2dGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{}x{} -> {} channels, kernel {}x{}, stride {}x{}, padding {},{},{},{}",
            self.in_channels,
            self.in_height,
            self.in_width,
            self.out_channels,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
            self.pad_before[0],
            self.pad_before[1],
            self.pad_after[0],
            self.pad_after[1]
        )
    }
}

/// Why a convolution cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Conv2dError {
    /// The geometry is empty, inconsistent or too large.
    #[error("invalid convolution: {0}")]
    Geometry(String),
    /// A buffer does not have the length the geometry needs.
    #[error("{what} has {actual} values, the convolution needs {expected}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Values given.
        actual: usize,
        /// Values needed.
        expected: usize,
    },
}

/// The vector unit a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    /// x86-64 with AVX-512F (and AVX2, FMA): 16 lanes.
    Avx512,
    /// x86-64 with AVX2 and FMA: 8 lanes.
    Avx2,
    /// What the target has without run-time detection: NEON on aarch64, plain f32 code
    /// elsewhere (SSE2 on x86-64, the board's FPU on armv7).
    Portable,
}

impl Simd {
    /// The best one this machine runs.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Every one this machine runs, best first (tests run each).
    pub fn available() -> Vec<Simd> {
        match Simd::detect() {
            Simd::Avx512 => vec![Simd::Avx512, Simd::Avx2, Simd::Portable],
            Simd::Avx2 => vec![Simd::Avx2, Simd::Portable],
            Simd::Portable => vec![Simd::Portable],
        }
    }

    /// Its short name, as in [`Conv2d::kernel_name`]: `avx512`, `avx2`, `neon` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Portable if cfg!(target_arch = "aarch64") => "neon",
            Simd::Portable => "portable",
        }
    }
}

/// How a dense convolution computes its outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The multiply-adds of the definition, over shifted planes.
    Direct,
    /// Winograd's F(2x2, 3x3): 3x3 kernels of stride 1 only.
    Winograd,
    /// Winograd's F(4x4, 3x3): 3x3 kernels of stride 1 only; fewer multiply-adds than
    /// F(2x2, 3x3) (36 per 4x4 block of outputs against 64), larger transforms, and up to about
    /// ten times its rounding (still a few hundred-thousandths of the largest partial sum).
    Winograd4x4,
}

impl Algorithm {
    /// The faster one for `geometry` (dense) on `simd`: Winograd's where it applies, the input
    /// has at least [`WINOGRAD_MIN_IN_CHANNELS`] channels and the output more than 4 (fewer
    /// leave its transforms and its 8-channel tiles more costly than the multiply-adds they
    /// save), on a unit with vectors of at least 4 lanes (`conv-speed`: faster on AVX-512 and
    /// AVX2, slower in plain f32 code; NEON by the same count of operations as AVX2); in 4x4
    /// tiles where they take fewer vectors of matrix products than 2x2 ones (not where a 4x4
    /// tiling leaves most of a vector empty, as 8x8 outputs on AVX-512).
    pub fn best(geometry: &Conv2dGeometry, simd: Simd) -> Algorithm {
        let enough = geometry.in_channels >= WINOGRAD_MIN_IN_CHANNELS && geometry.out_channels > 4;
        let vectors = simd != Simd::Portable || portable::LANES >= 4;
        if !(enough && vectors && winograd::applies(geometry)) {
            return Algorithm::Direct;
        }
        let x_block = Tile::winograd(simd, geometry.out_channels, 2).outputs;
        match winograd::four_by_four_is_fewer(geometry, x_block) {
            true => Algorithm::Winograd4x4,
            false => Algorithm::Winograd,
        }
    }

    /// Outputs per side of a Winograd tile (none for the direct algorithm).
    fn winograd_tile(self) -> Option<usize> {
        match self {
            Algorithm::Direct => None,
            Algorithm::Winograd => Some(2),
            Algorithm::Winograd4x4 => Some(4),
        }
    }
}

/// The fewest input channels for which [`Algorithm::best`] picks Winograd's.
pub const WINOGRAD_MIN_IN_CHANNELS: usize = 8;

/// A convolution with its weights packed for the kernel: build once, run many times.
#[derive(Clone)]
pub struct Conv2d {
    geometry: Conv2dGeometry,
    simd: Simd,
    algorithm: Algorithm,
    tile: Tile,
    /// `[blocks][in_channels][kernel h][kernel w][block]`, zero beyond `out_channels`.
    packed: Vec<f32>,
    /// `[blocks * block]`, zero beyond `out_channels`.
    bias: Vec<f32>,
    /// Per tap (in packing order), its offset in the shifted planes.
    taps: Vec<usize>,
    /// Values of one shifted plane: the output's rows, the `(kh - 1) / sy` rows below them
    /// that the lower taps read, and zeros up to a whole tile past the last output.
    plane_len: usize,
    /// Values of one padded input row, as far as the taps reach.
    padded_row_len: usize,
    /// Values of the shifted planes of one image (none where the input is read in place;
    /// checked when built).
    planes_len: usize,
    /// Outputs clamped at zero as they are stored (a ReLU after the convolution, fused).
    relu: bool,
    /// One group per channel: output channel `c` reads input channel `c` only.
    depthwise: bool,
    /// A dense 1x1 convolution of stride 1 without padding whose outputs fill whole tiles
    /// (MobileNet's pointwise layers): each input channel is its own only plane, read where it
    /// is (no copy).
    in_place: bool,
    /// How the kernel lays out one image in the scratch buffer.
    layout: ScratchLayout,
    /// Values of the scratch buffer one image needs (checked when built).
    scratch_len: usize,
}

/// How a kernel lays out one image in the scratch buffer: each way of running a convolution
/// has its own, computed (with its sizes checked) once, when the convolution is built.
#[derive(Clone, Debug)]
enum ScratchLayout {
    /// Shifted planes and one padded channel, or nothing where the input is read in place.
    Planes,
    /// Winograd's padded image, transformed tiles and points (`winograd.rs`).
    Winograd(winograd::Layout),
    /// One padded channel split into its column phases (`depthwise.rs`).
    DepthwiseRows(depthwise::Layout),
    /// The padded input and the output as `[pixels][channels]` ([`depthwise_across`]).
    DepthwiseAcross(AcrossLayout),
    /// No scratch: per tap, where each output lane reads, for a depthwise convolution of tiny
    /// channels run in registers (`permute.rs`, AVX-512).
    Registers(#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] Vec<permute::LaneTap>), // read on x86 only
}

impl fmt::Debug for Conv2d {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conv2d({}, {})", self.geometry, self.kernel_name())
    }
}

impl Conv2d {
    /// Pack `weights` (`[out_channels, in_channels, kh, kw]`) and `bias` (`[out_channels]`, or
    /// none) for the best vector unit of this machine.
    pub fn new(geometry: Conv2dGeometry, weights: &[f32], bias: Option<&[f32]>) -> Result<Conv2d, Conv2dError> {
        Conv2d::with_simd(geometry, weights, bias, Simd::detect())
    }

    /// As [`Conv2d::new`], for a given vector unit (which must be one of [`Simd::available`]).
    pub fn with_simd(
        geometry: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        simd: Simd,
    ) -> Result<Conv2d, Conv2dError> {
        Conv2d::build(geometry, weights, bias, simd, Algorithm::best(&geometry, simd), false)
    }

    /// As [`Conv2d::with_simd`], with a given algorithm (an error where it does not apply).
    pub fn with_algorithm(
        geometry: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        simd: Simd,
        algorithm: Algorithm,
    ) -> Result<Conv2d, Conv2dError> {
        Conv2d::build(geometry, weights, bias, simd, algorithm, false)
    }

    /// A depthwise convolution (groups = channels, `in_channels == out_channels`): `weights`
    /// are `[channels, 1, kh, kw]`, `bias` `[channels]` or none; for the best vector unit.
    pub fn depthwise(geometry: Conv2dGeometry, weights: &[f32], bias: Option<&[f32]>) -> Result<Conv2d, Conv2dError> {
        Conv2d::build(geometry, weights, bias, Simd::detect(), Algorithm::Direct, true)
    }

    fn build(
        geometry: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        simd: Simd,
        algorithm: Algorithm,
        depthwise: bool,
    ) -> Result<Conv2d, Conv2dError> {
        geometry.validate()?;
        if algorithm.winograd_tile().is_some() && (depthwise || !winograd::applies(&geometry)) {
            return Err(Conv2dError::Geometry(format!(
                "{geometry}: Winograd's F(2x2, 3x3) and F(4x4, 3x3) need a dense 3x3 kernel of stride 1"
            )));
        }
        if !Simd::available().contains(&simd) {
            return Err(Conv2dError::Geometry(format!("this machine cannot run the {} kernel", simd.name())));
        }
        if depthwise && geometry.in_channels != geometry.out_channels {
            return Err(Conv2dError::Geometry(format!("{geometry}: a depthwise convolution keeps its channels")));
        }
        let weights_len =
            if depthwise { geometry.weights_len() / geometry.in_channels } else { geometry.weights_len() };
        check_len("weights", weights.len(), weights_len)?;
        if let Some(bias) = bias {
            check_len("bias", bias.len(), geometry.out_channels)?;
        }
        let Conv2dGeometry { in_channels, out_channels, kernel: [kh, kw], stride: [sy, sx], .. } = geometry;
        let (out_h, out_w) = (geometry.out_height(), geometry.out_width());
        let outputs = out_h * out_w;
        let unpadded = geometry.pad_before == [0, 0] && geometry.pad_after == [0, 0];
        let pointwise = !depthwise && [kh, kw, sy, sx] == [1, 1, 1, 1] && unpadded;
        // Tiny depthwise channels in registers, where the unit permutes across four vectors.
        let permuted = depthwise && simd == Simd::Avx512 && permute::applies(&geometry);
        let tile = match (depthwise, algorithm) {
            (true, _) => Tile::depthwise(simd, outputs, permuted),
            (false, Algorithm::Direct) if pointwise && runs_pointwise_across(outputs) => Tile::pointwise_across(simd),
            (false, Algorithm::Direct) => Tile::choose(simd, out_channels, outputs),
            (false, Algorithm::Winograd) => Tile::winograd(simd, out_channels, 2),
            (false, Algorithm::Winograd4x4) => Tile::winograd(simd, out_channels, 4),
        };
        let block = tile.channels;
        let blocks = out_channels.div_ceil(block);
        let taps_per_channel = kh * kw;
        let mut padded_bias = vec![0f32; blocks * block];
        if let Some(bias) = bias {
            padded_bias[..out_channels].copy_from_slice(bias);
        }
        // Each way of running it bounds its own buffers ([`Conv2d::scratch_len`]); none where a
        // size overflows.
        let too_large = || Conv2dError::Geometry(format!("{geometry} needs too large a scratch buffer"));
        let fits = |len: Option<usize>| len.filter(|&len| len <= MAX_SCRATCH).ok_or_else(too_large);
        let across_stride = padded_bias.len() + block;
        let base = Conv2d {
            geometry,
            simd,
            algorithm,
            tile,
            packed: Vec::new(),
            bias: padded_bias,
            taps: Vec::new(),
            plane_len: 0,
            padded_row_len: 0,
            planes_len: 0,
            relu: false,
            depthwise,
            in_place: false,
            layout: ScratchLayout::Planes,
            scratch_len: 0,
        };
        if let Some(m) = algorithm.winograd_tile() {
            let layout = winograd::Layout::new(&geometry, tile.outputs, m).ok_or_else(too_large)?;
            let scratch_len = fits(layout.scratch_len(block, tile.outputs))?;
            let packed = winograd::pack(&geometry, weights, block, m);
            return Ok(Conv2d { packed, layout: ScratchLayout::Winograd(layout), scratch_len, ..base });
        }
        if permuted {
            // The weights as given (`[channels][kh][kw]`), each tap's inputs permuted out of
            // the input's registers.
            let layout = ScratchLayout::Registers(permute::lane_taps(&geometry));
            return Ok(Conv2d { packed: weights.to_vec(), layout, ..base });
        }
        if depthwise && !tile.across_channels {
            // Along rows: the weights as given, read from the padded channel (no planes).
            let rows = depthwise::Layout::new(&geometry).ok_or_else(too_large)?;
            let scratch_len = fits(Some(rows.scratch_len()))?;
            let (taps, layout) = (rows.taps(&geometry), ScratchLayout::DepthwiseRows(rows));
            return Ok(Conv2d { packed: weights.to_vec(), taps, layout, scratch_len, ..base });
        }
        let packed = if depthwise && tile.across_channels {
            // `[blocks][kh][kw][block]`: each tap's weights for a vector of channels.
            let mut packed = vec![0f32; blocks * taps_per_channel * block];
            for (c, weights) in weights.chunks_exact(taps_per_channel).enumerate() {
                let (b, lane) = (c / block, c % block);
                for (tap, &w) in weights.iter().enumerate() {
                    packed[(b * taps_per_channel + tap) * block + lane] = w;
                }
            }
            packed
        } else {
            let mut packed = vec![0f32; blocks * in_channels * taps_per_channel * block];
            for co in 0..out_channels {
                let (b, lane) = (co / block, co % block);
                for ci in 0..in_channels {
                    for tap in 0..taps_per_channel {
                        let src = (co * in_channels + ci) * taps_per_channel + tap;
                        let dst = ((b * in_channels + ci) * taps_per_channel + tap) * block + lane;
                        packed[dst] = weights[src];
                    }
                }
            }
            packed
        };
        if depthwise {
            // The padded input and the output, `[pixels][channels]`: a padding may be any size.
            let padded = |axis: usize| geometry.pad_before[axis].checked_add(geometry.pad_after[axis]);
            let padded_width = padded(1).and_then(|p| p.checked_add(geometry.in_width));
            let padded_pixels = padded(0)
                .and_then(|p| p.checked_add(geometry.in_height))
                .and_then(|rows| rows.checked_mul(padded_width?))
                .ok_or_else(too_large)?;
            let layout = AcrossLayout {
                padded_width: padded_width.ok_or_else(too_large)?,
                padded_pixels,
                stride: across_stride,
            };
            let scratch_len = fits(padded_pixels.checked_add(outputs).and_then(|p| p.checked_mul(across_stride)))?;
            return Ok(Conv2d { packed, layout: ScratchLayout::DepthwiseAcross(layout), scratch_len, ..base });
        }
        // The last tile reads up to a whole tile past the last output, from the lowest tap's
        // row on: those values exist (zero) so that no read needs a check. The fill writes
        // rows in whole vectors, up to a vector past the last row.
        let in_place = pointwise && outputs.is_multiple_of(tile.outputs);
        let plane_len = match in_place {
            true => outputs,
            false => outputs.div_ceil(tile.outputs) * tile.outputs + (kh - 1) / sy * out_w + MAX_TILE_OUTPUTS,
        };
        // One stride more than the taps reach, so that a strided gather reads whole strides.
        let padded_row_len = out_w.checked_mul(sx).and_then(|v| v.checked_add(kw)).ok_or_else(too_large)?;
        // The planes' and the padded channel's sizes are products `validate` does not bound (a
        // stride may be any size), checked: the planes, then the padded channel.
        let planes = in_channels.checked_mul(sy).and_then(|v| v.checked_mul(kw)).and_then(|v| v.checked_mul(plane_len));
        // The padded channel the planes are copied from: `plane_rows * sy` rows of
        // `padded_row_len`, and a slack that rows read in whole vectors (or pairs of vectors,
        // for a stride of 2) may run into.
        let padded = plane_rows(&geometry)
            .checked_mul(sy)
            .and_then(|v| v.checked_mul(padded_row_len)?.checked_add(MAX_TILE_OUTPUTS));
        let (planes_len, scratch_len) = match in_place {
            true => (0, 0),
            false => {
                let planes = fits(planes)?;
                (planes, fits(padded.and_then(|padded| padded.checked_add(planes)))?)
            }
        };
        let mut taps = Vec::with_capacity(in_channels * taps_per_channel);
        for ci in 0..in_channels {
            for ky in 0..kh {
                for kx in 0..kw {
                    let plane = (ci * sy + ky % sy) * kw + kx;
                    taps.push(plane * plane_len + ky / sy * out_w);
                }
            }
        }
        Ok(Conv2d { packed, taps, plane_len, padded_row_len, planes_len, in_place, scratch_len, ..base })
    }

    /// The same convolution followed by a ReLU (`max(x, 0)`), applied to each tile as it is
    /// stored: no second pass over the output.
    pub fn with_relu(mut self) -> Conv2d {
        self.relu = true;
        self
    }

    /// Whether a ReLU is fused ([`Conv2d::with_relu`]).
    pub fn relu(&self) -> bool {
        self.relu
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> usize {
        let macs = self.geometry.macs();
        if self.depthwise { macs / self.geometry.in_channels } else { macs }
    }

    /// The convolution's shape.
    pub fn geometry(&self) -> &Conv2dGeometry {
        &self.geometry
    }

    /// Whether the input is read where it is, not copied first: a dense 1x1 convolution of
    /// stride 1 without padding whose outputs per channel fill whole tiles (or run across
    /// channels, 4 at a time).
    pub fn reads_in_place(&self) -> bool {
        self.in_place
    }

    /// The algorithm (depthwise convolutions: [`Algorithm::Direct`]).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Which compiled kernel runs, e.g. `direct-conv/avx512/8x32` (a tile of output channels x
    /// consecutive outputs of each), `depthwise-conv/avx512/1x64`, `winograd-conv/avx512/8x32`
    /// (output channels x consecutive 2x2 blocks of outputs).
    pub fn kernel_name(&self) -> String {
        let kind = match (self.depthwise, self.algorithm) {
            (true, _) => "depthwise-conv",
            (false, Algorithm::Direct) => "direct-conv",
            (false, Algorithm::Winograd) => "winograd-conv",
            (false, Algorithm::Winograd4x4) => "winograd4x4-conv",
        };
        format!("{kind}/{}/{}x{}", self.simd.name(), self.tile.channels, self.tile.outputs)
    }

    /// Values of the scratch buffer [`Conv2d::run`] needs: the planes and one padded channel
    /// (none where the input is read in place); for Winograd's, the padded image, one block's
    /// transformed tiles and points; for a depthwise convolution along rows, one padded
    /// channel; across channels, the padded input and the output, both `[pixels][channels]`;
    /// in registers, none.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Convolve `images` images: `input` is `[images, in_channels, in_height, in_width]`,
    /// `output` `[images, out_channels, out_height, out_width]`, every value of which is written
    /// (its previous contents never read); `scratch` is grown as needed (keep it between calls
    /// to save the allocation; any contents will do).
    pub fn run(
        &self,
        images: usize,
        input: &[f32],
        output: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<(), Conv2dError> {
        self.run_adding(images, input, None, output, scratch)
    }

    /// [`Conv2d::run`], with `add` (shaped as `output`; e.g. a residual connection) added to
    /// the convolution's result before the ReLU, if one is fused.
    pub fn run_adding(
        &self,
        images: usize,
        input: &[f32],
        add: Option<&[f32]>,
        output: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<(), Conv2dError> {
        let (in_len, out_len) = (self.geometry.input_len(), self.geometry.output_len());
        check_len("input", input.len(), images.saturating_mul(in_len))?;
        check_len("output", output.len(), images.saturating_mul(out_len))?;
        if let Some(add) = add {
            check_len("added input", add.len(), output.len())?;
        }
        // Grown, never shrunk: convolutions of different sizes share one buffer, and growing it
        // again would write zeros the kernels do not need (they never read what they did not
        // write).
        let needed = self.scratch_len();
        if scratch.len() < needed {
            scratch.resize(needed, 0.0);
        }
        let scratch = &mut scratch[..needed];
        for (i, (image, out)) in input.chunks_exact(in_len).zip(output.chunks_exact_mut(out_len)).enumerate() {
            let add = add.map(|add| &add[i * out_len..][..out_len]);
            // SAFETY: `Tile::choose` picked a kernel for `self.simd`, which `Conv2d::build`
            // accepted only if `Simd::available` detected it on this CPU; the buffers' lengths
            // were checked above.
            unsafe { (self.tile.kernel)(self, image, scratch, add, out) }
        }
        Ok(())
    }

    /// Copy one image into the zero-padded shifted planes (`scratch`: [`Conv2d::scratch_len`]
    /// values) and return where they start (the image itself where it is read in place), for
    /// a kernel whose tiles hold `x_block` outputs of a channel. Inlined into each compiled
    /// kernel, so that its copies use the kernel's vector unit (and no library call per row:
    /// rows are a few dozen values).
    ///
    /// # Safety
    /// The CPU must have `V`'s features.
    #[inline(always)]
    unsafe fn fill_planes<V: Vector>(&self, image: &[f32], scratch: &mut [f32], x_block: usize) -> *const f32 {
        let g = &self.geometry;
        if self.in_place {
            // The last tap (channel) reads its outputs, a whole number of tiles: the image's end.
            let reach = self.taps.iter().max().map_or(0, |t| t + g.out_height() * g.out_width());
            assert!(x_block == self.tile.outputs && reach <= image.len());
            return image.as_ptr();
        }
        let ([sy, sx], [top, left], kw) = (g.stride, g.pad_before, g.kernel[1]);
        let (h, w, out_w) = (g.in_height, g.in_width, g.out_width());
        let plane_rows = plane_rows(g);
        let row_len = self.padded_row_len;
        let (planes, padded) = scratch.split_at_mut(self.planes_len);
        // SAFETY (all calls below): V's features are the caller's promise.
        // One channel, zero-padded: the padding stays zero, each channel overwrites the image.
        unsafe { zero::<V>(padded) };
        let first = left.min(row_len);
        let columns = w.min(row_len - first);
        // A plane row is written in whole vectors: the values past its end land on the next
        // row (written next) or on the tail (zeroed last), within the plane (`Conv2d::build`);
        // the reads past a padded row's end stay within the scratch (its slack).
        let wide = out_w.div_ceil(V::LANES) * V::LANES;
        for (channel, planes) in image.chunks_exact(h * w).zip(planes.chunks_exact_mut(sy * kw * self.plane_len)) {
            // First the whole padded channel, then the planes from it: a row read right after
            // it was written, at other offsets than written, would wait for the stores to
            // complete (measured: the fill's hot spot when it went row by row).
            for (y, row) in channel.chunks_exact(w).enumerate() {
                if y + top < plane_rows * sy {
                    unsafe { copy::<V>(&mut padded[(y + top) * row_len + first..][..columns], &row[..columns]) };
                }
            }
            for (py, planes) in planes.chunks_exact_mut(kw * self.plane_len).enumerate() {
                for r in 0..plane_rows {
                    let padded_row = &padded[(r * sy + py) * row_len..];
                    for (kx, plane) in planes.chunks_exact_mut(self.plane_len).enumerate() {
                        let dst = &mut plane[r * out_w..][..wide];
                        if sx == 1 {
                            unsafe { copy::<V>(dst, &padded_row[kx..][..wide]) };
                        } else if sx == 2 {
                            unsafe { copy_even::<V>(dst, &padded_row[kx..][..2 * wide]) };
                        } else {
                            for (d, s) in dst[..out_w].iter_mut().zip(padded_row[kx..].chunks_exact(sx)) {
                                *d = s[0];
                            }
                        }
                    }
                }
                // The tail the last tile reads past the outputs (the scratch may hold anything).
                for plane in planes.chunks_exact_mut(self.plane_len) {
                    unsafe { zero::<V>(&mut plane[plane_rows * out_w..]) };
                }
            }
        }
        // Every tap's reads, from its offset to a whole tile past the last output, lie within
        // the planes (`Conv2d::build` sized them for this tile): checked once here instead of
        // per load.
        let outputs = g.out_height() * out_w;
        let reach = self.taps.iter().max().map_or(0, |t| t + outputs.div_ceil(x_block) * x_block);
        assert!(x_block == self.tile.outputs && reach <= planes.len());
        planes.as_ptr()
    }
}

/// Rows of each shifted plane of `g`: the output's and the `(kh - 1) / sy` below them the
/// lower taps read.
fn plane_rows(g: &Conv2dGeometry) -> usize {
    g.out_height() + (g.kernel[0] - 1) / g.stride[0]
}

/// `pointer`, hidden from the optimiser: an empty `asm!` block claims to change it, so that a
/// loop of stores through it is not recognised as a copy or a fill (and turned into a library
/// call); unlike [`std::hint::black_box`], it stays in its register (no round trip through the
/// stack per store).
#[inline(always)]
fn opaque(pointer: *mut f32) -> *mut f32 {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm"))]
    {
        pointer.map_addr(|mut address| {
            // SAFETY: the block is empty: it reads, writes and changes nothing (the address, and
            // with it the pointer's provenance, stays as it was).
            unsafe { std::arch::asm!("/* {0} */", inout(reg) address, options(nomem, nostack, preserves_flags)) };
            address
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    std::hint::black_box(pointer)
}

/// `dst.copy_from_slice(src)`, in vectors where `dst` holds whole ones.
///
/// The planes' rows are a few dozen values: a library call per row (which the compiler makes
/// of a plain copy loop, however written) costs more than the copy. Each store's address passed
/// through [`opaque`] hides the loop's shape from that rewrite (checked in the compiled
/// kernels' code: no `memcpy`/`memset` calls left in the fill).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn copy<V: Vector>(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let whole = dst.len() / V::LANES * V::LANES;
    let to = dst.as_mut_ptr();
    for j in (0..whole).step_by(V::LANES) {
        // SAFETY: `j + LANES <= whole <= len` for both; V's features are the caller's promise.
        unsafe { V::load(src.as_ptr().add(j)).store(opaque(to.add(j))) };
    }
    let rest = dst.len() - whole;
    if rest > 0 {
        // SAFETY: `whole + rest == len` for both; V's features are the caller's promise.
        unsafe { V::load_partial(src.as_ptr().add(whole), rest).store_partial(to.add(whole), rest) };
    }
}

/// `dst[i] = src[2 * i]` for every `i` of `dst` (whole vectors; `src` twice as long): the
/// columns of one phase of a stride-2 convolution.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn copy_even<V: Vector>(dst: &mut [f32], src: &[f32]) {
    assert!(dst.len().is_multiple_of(V::LANES) && src.len() == 2 * dst.len());
    let to = dst.as_mut_ptr();
    for j in (0..dst.len()).step_by(V::LANES) {
        // SAFETY: `j + LANES <= dst.len()` and `2 * j + 2 * LANES <= src.len()`; V's features
        // are the caller's promise.
        unsafe {
            let pair = src.as_ptr().add(2 * j);
            V::even(V::load(pair), V::load(pair.add(V::LANES))).store(opaque(to.add(j)));
        }
    }
}

/// `dst.fill(0.0)`, in vectors where `dst` holds whole ones (not a library call: see [`copy`]).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn zero<V: Vector>(dst: &mut [f32]) {
    let whole = dst.len() / V::LANES * V::LANES;
    let to = dst.as_mut_ptr();
    for j in (0..whole).step_by(V::LANES) {
        // SAFETY: `j + LANES <= whole <= len`; V's features are the caller's promise.
        unsafe { V::splat(0.0).store(opaque(to.add(j))) };
    }
    let rest = dst.len() - whole;
    if rest > 0 {
        // SAFETY: `whole + rest == len`; V's features are the caller's promise.
        unsafe { V::splat(0.0).store_partial(to.add(whole), rest) };
    }
}

/// The buffers of [`depthwise_across`]: the zero-padded input, then the output, each
/// `[pixels][stride]`.
#[derive(Clone, Copy, Debug)]
struct AcrossLayout {
    /// Width of the padded input.
    padded_width: usize,
    /// Pixels of the padded input.
    padded_pixels: usize,
    /// Values between one pixel's channels and the next's: the channels rounded up to whole
    /// vectors, and one vector more, so that a pixel's channels are not a power-of-two stride
    /// apart (512 channels are 2 KiB: every pixel in the same two sets of the L1 cache).
    stride: usize,
}

/// A compiled kernel: fill the shifted planes of one image in the scratch buffer, convolve,
/// add the values to add (if any), store into the image's output.
type ImageKernel = unsafe fn(&Conv2d, &[f32], &mut [f32], Option<&[f32]>, &mut [f32]);

/// The most values of the planes of one image (1 GiB of f32).
const MAX_SCRATCH: usize = 1 << 28;

/// The most lanes of a vector (AVX-512's 16 f32).
const MAX_LANES: usize = 16;

/// The most outputs of one channel a tile holds (the store buffer's length).
const MAX_TILE_OUTPUTS: usize = 64;

/// A compiled kernel and the tile of outputs it computes at once.
#[derive(Clone, Copy)]
struct Tile {
    /// Output channels.
    channels: usize,
    /// Consecutive outputs of each channel.
    outputs: usize,
    /// A vector's lanes run across channels (one output of `channels` channels) instead of
    /// along a channel's outputs: the depthwise kernel for small images, which reads the input
    /// transposed to `[pixels][channels]` instead of from shifted planes.
    across_channels: bool,
    /// Each kernel is a concrete function of this crate, never inlined into a caller (a generic
    /// one would be compiled in the calling crate, with its build profile).
    kernel: ImageKernel,
}

impl Tile {
    /// `channels x vectors * lanes` outputs, the vectors along each channel's outputs.
    fn along(channels: usize, vectors: usize, lanes: usize, kernel: ImageKernel) -> Tile {
        Tile { channels, outputs: vectors * lanes, across_channels: false, kernel }
    }

    /// The kernel for this vector unit: 4 output channels where there are that few, else 8;
    /// on AVX-512, two vectors of 16 outputs per channel (four with 4 channels), or 16 channels
    /// by one vector where a channel has at most 16 outputs.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // the size matters on x86 only
    fn choose(simd: Simd, out_channels: usize, outputs: usize) -> Tile {
        let few = out_channels <= 4;
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => match few {
                true => Tile::along(4, 4, 16, x86::avx512_4),
                false if outputs <= 16 => Tile::along(16, 1, 16, x86::avx512_16_short),
                false => Tile::along(8, 2, 16, x86::avx512_8),
            },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => match few {
                true => Tile::along(4, 2, 8, x86::avx2_4),
                false => Tile::along(8, 1, 8, x86::avx2_8),
            },
            _ => {
                let (vectors, lanes) = (portable::VECTORS, portable::LANES);
                match few {
                    true => Tile::along(4, vectors, lanes, portable::block_4),
                    false => Tile::along(8, vectors, lanes, portable::block_8),
                }
            }
        }
    }

    /// The kernel of a 1x1 convolution with few outputs per channel
    /// ([`runs_pointwise_across`]),
    /// vectors across output channels: 4 outputs by 4 vectors of channels (2 on AVX2, which
    /// has 16 registers).
    fn pointwise_across(simd: Simd) -> Tile {
        let across = |vectors: usize, lanes: usize, kernel| Tile {
            channels: vectors * lanes,
            outputs: POINTWISE_ACROSS_TILE,
            across_channels: true,
            kernel,
        };
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => across(4, 16, x86::pointwise_across_avx512),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => across(2, 8, x86::pointwise_across_avx2),
            _ => across(portable::ACROSS_VECTORS, portable::LANES, portable::pointwise_across),
        }
    }

    /// The Winograd kernel for this vector unit and tiles of `m x m` outputs: output channels
    /// by a vector of tiles; on AVX-512, 16 channels where there are more than 8 (as many
    /// accumulators as 8 by two vectors, half the loads), else 8.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // the size matters on x86 only
    fn winograd(simd: Simd, out_channels: usize, m: usize) -> Tile {
        let four = m == 4;
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if out_channels > 8 && four => Tile::along(16, 1, 16, x86::winograd4x4_avx512_16),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if out_channels > 8 => Tile::along(16, 1, 16, x86::winograd_avx512_16),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if four => Tile::along(8, 1, 16, x86::winograd4x4_avx512_8),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => Tile::along(8, 1, 16, x86::winograd_avx512_8),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if four => Tile::along(8, 1, 8, x86::winograd4x4_avx2),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => Tile::along(8, 1, 8, x86::winograd_avx2),
            _ if four => Tile::along(8, portable::VECTORS, portable::LANES, portable::winograd4x4_8),
            _ => Tile::along(8, portable::VECTORS, portable::LANES, portable::winograd_8),
        }
    }

    /// The depthwise kernel for this vector unit: tiny channels in registers where `permuted`
    /// (`permute.rs`, AVX-512); where a channel has at most
    /// [`ACROSS_CHANNELS_MAX_OUTPUTS`] outputs, a vector of channels at a time (a vector of a
    /// channel's outputs would be mostly empty); else a vector of consecutive outputs of a row
    /// (`depthwise.rs`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // x86 only
    fn depthwise(simd: Simd, outputs: usize, permuted: bool) -> Tile {
        let across = |channels, kernel| Tile { channels, outputs: 1, across_channels: true, kernel };
        let small = outputs <= ACROSS_CHANNELS_MAX_OUTPUTS;
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if permuted => Tile::along(1, 1, 16, permute::image),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if small => across(16, x86::depthwise_across_avx512),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => Tile::along(1, 1, 16, x86::depthwise_avx512),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if small => across(8, x86::depthwise_across_avx2),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => Tile::along(1, 1, 8, x86::depthwise_avx2),
            _ if small => across(portable::LANES, portable::depthwise_across),
            _ => Tile::along(1, 1, portable::LANES, portable::depthwise_rows),
        }
    }
}

/// Whether a dense 1x1 convolution of stride 1 without padding, `outputs` per channel, runs
/// with vectors across output channels (MobileNet's 2x2 layers: a vector of 16 outputs of a
/// channel would be mostly empty): fewer than 16, a multiple of [`POINTWISE_ACROSS_TILE`].
fn runs_pointwise_across(outputs: usize) -> bool {
    outputs < 16 && outputs.is_multiple_of(POINTWISE_ACROSS_TILE)
}

/// Outputs per tile of [`pointwise_across`].
const POINTWISE_ACROSS_TILE: usize = 4;

/// The most outputs per channel for which a depthwise convolution runs across channels
/// (MobileNet's 4x4 and 2x2 layers; its 8x8 ones run faster along the outputs).
const ACROSS_CHANNELS_MAX_OUTPUTS: usize = 16;

fn check_len(what: &'static str, actual: usize, expected: usize) -> Result<(), Conv2dError> {
    if actual == expected { Ok(()) } else { Err(Conv2dError::Length { what, actual, expected }) }
}

/// The few operations the kernel needs of a vector register of `LANES` f32.
///
/// # Safety
/// Every method needs the CPU features of its implementation; `load` reads and `store` writes
/// `LANES` values.
trait Vector: Copy {
    /// At most [`MAX_LANES`].
    const LANES: usize;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn load(src: *const f32) -> Self;
    unsafe fn store(self, dst: *mut f32);
    /// `acc + a * b` (fused where the unit has it).
    unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    /// Lane-wise `max(a, 0)`.
    unsafe fn relu(a: Self) -> Self;
    /// The even lanes of `a` then of `b` (lanes 0, 2, ... of the two as one vector of twice the
    /// lanes).
    unsafe fn even(a: Self, b: Self) -> Self;
    /// The odd lanes of `a` then of `b` (lanes 1, 3, ... of the two as one vector of twice the
    /// lanes).
    unsafe fn odd(a: Self, b: Self) -> Self;
    /// The lanes of `a` and `b` alternating, `a0 b0 a1 b1 ...`, as two vectors (the inverse of
    /// [`Vector::even`] and its odd counterpart).
    unsafe fn interleave(a: Self, b: Self) -> (Self, Self);
    /// The first `n` (less than `LANES`) values at `src`, the other lanes zero: element by
    /// element, unless the unit has masked loads.
    #[inline(always)]
    unsafe fn load_partial(src: *const f32, n: usize) -> Self {
        let mut values = [0f32; MAX_LANES];
        for (j, value) in values.iter_mut().enumerate().take(n) {
            // SAFETY: the caller's promise (`n` values to read).
            *value = unsafe { src.add(j).read() };
        }
        // SAFETY: `values` holds at least LANES values; the features are the caller's promise.
        unsafe { Self::load(values.as_ptr()) }
    }
    /// Write the first `n` (less than `LANES`) lanes to `dst`: element by element (each
    /// address through [`opaque`], see [`copy`]), unless the unit has masked
    /// stores.
    #[inline(always)]
    unsafe fn store_partial(self, dst: *mut f32, n: usize) {
        let mut values = [0f32; MAX_LANES];
        // SAFETY: `values` holds at least LANES values; the rest is the caller's promise.
        unsafe {
            self.store(values.as_mut_ptr());
            for (j, &value) in values.iter().enumerate().take(n) {
                opaque(dst.add(j)).write(value);
            }
        }
    }
}

/// One image: fill its shifted planes, then convolve a tile of `CO` output channels by `XV`
/// vectors of consecutive outputs at a time: each tap loads `XV` vectors of inputs and
/// multiplies them with `CO` weights.
///
/// # Safety
/// The CPU must have `V`'s features; `image`, `scratch`, `add` and `out` have the lengths
/// [`Conv2d::run_adding`] checks.
#[inline(always)]
unsafe fn image<V: Vector, const CO: usize, const XV: usize>(
    conv: &Conv2d,
    image: &[f32],
    scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    const { assert!(XV * V::LANES <= MAX_TILE_OUTPUTS) };
    let x_block = XV * V::LANES;
    // SAFETY: V's features are the caller's promise.
    let planes = unsafe { conv.fill_planes::<V>(image, scratch, x_block) };
    let g = &conv.geometry;
    let outputs = g.out_height() * g.out_width();
    let taps = conv.taps.len();
    let mut buffer = [0f32; MAX_TILE_OUTPUTS];
    for (b, (weights, bias)) in conv.packed.chunks_exact(taps * CO).zip(conv.bias.chunks_exact(CO)).enumerate() {
        let channels = (g.out_channels - b * CO).min(CO);
        for q0 in (0..outputs).step_by(x_block) {
            // SAFETY: the caller guarantees V's features; every read lies within the planes
            // (`fill_planes` checked their reach).
            unsafe {
                let mut acc: [[V; XV]; CO] = [[V::splat(0.0); XV]; CO];
                for (c, lanes) in acc.iter_mut().enumerate() {
                    *lanes = [V::splat(bias[c]); XV];
                }
                accumulate::<V, CO, XV, true>(&mut acc, weights, conv.taps.iter().map(|&tap| planes.add(tap + q0)));
                let n = (outputs - q0).min(x_block);
                for (c, lanes) in acc.iter().enumerate().take(channels) {
                    let at = (b * CO + c) * outputs + q0;
                    let add = add.map(|add| &add[at..][..n]);
                    store(lanes, add, conv.relu, &mut out[at..][..n], &mut buffer);
                }
            }
        }
    }
}

/// The tile's matrix product: for each chunk of `CO` weights (one per output channel) and
/// its source, `XV` vectors loaded from the source, multiplied with each output channel's
/// weight and added to that channel's accumulators.
///
/// With `PREFETCH` (the direct kernel), the weights [`WEIGHTS_PREFETCH_DISTANCE`] values
/// ahead are asked for as each chunk is used: where a channel has few outputs, each weight is
/// used once per image, and a network's weights stream from memory (MobileNet's 512x512
/// pointwise layers are 1 MiB each, 17 MiB in all: more than the caches keep for one core).
/// Winograd's weights of a tile of output channels serve all its blocks of tiles from cache.
///
/// # Safety
/// The CPU must have `V`'s features; each source has `XV` vectors to read.
#[inline(always)]
unsafe fn accumulate<V: Vector, const CO: usize, const XV: usize, const PREFETCH: bool>(
    acc: &mut [[V; XV]; CO],
    weights: &[f32],
    sources: impl Iterator<Item = *const f32>,
) {
    for (w, src) in weights.chunks_exact(CO).zip(sources) {
        if PREFETCH {
            prefetch(w.as_ptr().wrapping_add(WEIGHTS_PREFETCH_DISTANCE));
        }
        // SAFETY: the caller's promises.
        unsafe {
            let mut inputs = [V::splat(0.0); XV];
            for (j, v) in inputs.iter_mut().enumerate() {
                *v = V::load(src.add(j * V::LANES));
            }
            for (lanes, &w) in acc.iter_mut().zip(w) {
                let weight = V::splat(w);
                for (lane, input) in lanes.iter_mut().zip(&inputs) {
                    *lane = V::mul_add(*lane, weight, *input);
                }
            }
        }
    }
}

/// How far ahead of the weights in use [`accumulate`] asks for the next ones (values): 4 KiB.
/// A 512x4x4 -> 512 pointwise kernel taking 20 sets of weights in turn (20 MiB, as a
/// network's layers do) took 45-49 us per call with it against 72-95 us without, about as
/// long as with one set in cache, 38-41 us (`kernels/examples/weight-stream.rs`, three
/// alternations; `results/engines-epyc/session17/weight-stream.txt`). 4 KiB was the fastest
/// of 1, 2, 4 and 8 KiB ahead in a sweep on the same machine (not kept).
const WEIGHTS_PREFETCH_DISTANCE: usize = 1024;

/// Ask the cache for the line at `pointer` (a hint: no fault, no effect on results; any address
/// will do). x86-64 and aarch64; nothing elsewhere.
#[inline(always)]
fn prefetch(pointer: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and does not fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(pointer.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (`prfm` is a hint).
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) pointer, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = pointer;
}

/// Store one channel's tile of vectors into `dst` (its first `dst.len()` values, at most the
/// tile's), plus `add` (as long as `dst`) where given, clamped at zero when `relu`: whole
/// vectors straight from the registers, a partial tile through `buffer`.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn store<V: Vector, const XV: usize>(
    lanes: &[V; XV],
    add: Option<&[f32]>,
    relu: bool,
    dst: &mut [f32],
    buffer: &mut [f32; MAX_TILE_OUTPUTS],
) {
    let n = dst.len();
    // SAFETY: V's features are the caller's promise; every pointer below points into `dst`,
    // `add` or `buffer`, each checked to hold the vector written or read.
    unsafe {
        if n == XV * V::LANES {
            for (j, &lane) in lanes.iter().enumerate() {
                let add = add.map(|add| V::load(add[j * V::LANES..][..V::LANES].as_ptr()));
                epilogue(lane, add, relu).store(dst[j * V::LANES..][..V::LANES].as_mut_ptr());
            }
            return;
        }
        for (j, lane) in lanes.iter().enumerate() {
            lane.store(buffer[j * V::LANES..][..V::LANES].as_mut_ptr());
        }
        finish::<V>(&buffer[..n], add, relu, dst);
    }
}

/// `v` plus `add` where given, clamped at zero when `relu`: what every kernel applies to its
/// outputs as it stores them.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn epilogue<V: Vector>(v: V, add: Option<V>, relu: bool) -> V {
    // SAFETY: V's features are the caller's promise.
    unsafe {
        let v = match add {
            Some(add) => V::add(v, add),
            None => v,
        };
        if relu { V::relu(v) } else { v }
    }
}

/// `dst = src (+ add) (clamped at zero when relu)`, in vectors where `dst` holds whole ones.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn finish<V: Vector>(src: &[f32], add: Option<&[f32]>, relu: bool, dst: &mut [f32]) {
    let n = dst.len();
    assert!(src.len() == n && add.is_none_or(|add| add.len() == n));
    // SAFETY: `j + lanes <= n` for each buffer; V's features are the caller's promise.
    unsafe {
        for j in (0..n).step_by(V::LANES) {
            let lanes = (n - j).min(V::LANES);
            let load = |from: *const f32| match lanes == V::LANES {
                true => V::load(from.add(j)),
                false => V::load_partial(from.add(j), lanes),
            };
            let v = epilogue(load(src.as_ptr()), add.map(|add| load(add.as_ptr())), relu);
            match lanes == V::LANES {
                true => v.store(dst.as_mut_ptr().add(j)),
                false => v.store_partial(dst.as_mut_ptr().add(j), lanes),
            }
        }
    }
}

/// One image of a depthwise convolution with few outputs per channel, a vector of channels at
/// a time: the input transposed into `[padded pixels][channels]` (zero padding around it), then
/// per vector of channels and output pixel, each tap multiplies a vector of inputs with that
/// tap's vector of weights; the `[pixels][channels]` result transposed back into the output.
///
/// # Safety
/// As [`image`].
#[inline(always)]
unsafe fn depthwise_across<V: Vector>(
    conv: &Conv2d,
    image: &[f32],
    scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    let g = &conv.geometry;
    let ([kh, kw], [sy, sx], [top, left]) = (g.kernel, g.stride, g.pad_before);
    let (h, w) = (g.in_height, g.in_width);
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let outputs = out_h * out_w;
    let ScratchLayout::DepthwiseAcross(AcrossLayout { padded_width, padded_pixels, stride }) = conv.layout else {
        unreachable!("built with its layout")
    };
    let taps = kh * kw;
    let (padded, result) = scratch.split_at_mut(padded_pixels * stride);
    let result = &mut result[..outputs * stride];
    // SAFETY: V's features are the caller's promise.
    unsafe { zero::<V>(padded) };
    // Every access below stays within these lengths: rows `oy * sy + ky < padded height` and
    // columns `ox * sx + kx < padded width` (the geometry's output size), channels below
    // `stride`; checked once here instead of per value.
    assert!(image.len() == g.input_len() && out.len() == g.output_len() && add.is_none_or(|a| a.len() == out.len()));
    assert!(conv.packed.len() == conv.bias.len() * taps && conv.bias.len().is_multiple_of(V::LANES));
    assert_eq!(conv.tile.channels, V::LANES);
    // A vector of channels at a time, so that the accesses of one pass touch few cache lines.
    let (from, to) = (image.as_ptr(), padded.as_mut_ptr());
    for first in (0..g.in_channels).step_by(V::LANES) {
        let channels = first..(first + V::LANES).min(g.in_channels);
        for y in 0..h {
            for x in 0..w {
                let at = ((y + top) * padded_width + left + x) * stride;
                for c in channels.clone() {
                    // SAFETY: see the assertions above.
                    unsafe { *to.add(at + c) = *from.add((c * h + y) * w + x) };
                }
            }
        }
    }
    let (padded, result, weights) = (padded.as_ptr(), result.as_mut_ptr(), conv.packed.as_ptr());
    for first in (0..conv.bias.len()).step_by(V::LANES) {
        // SAFETY: V's features are the caller's promise; every pointer stays within its
        // buffer (the assertions above).
        unsafe {
            let weights = weights.add(first * taps);
            let bias = V::load(conv.bias.as_ptr().add(first));
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let corner = padded.add(((oy * sy) * padded_width + ox * sx) * stride + first);
                    let mut acc = bias;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let input = V::load(corner.add((ky * padded_width + kx) * stride));
                            acc = V::mul_add(acc, V::load(weights.add((ky * kw + kx) * V::LANES)), input);
                        }
                    }
                    acc.store(result.add((oy * out_w + ox) * stride + first));
                }
            }
        }
    }
    let (result, to) = (result.cast_const(), out.as_mut_ptr());
    for first in (0..g.out_channels).step_by(V::LANES) {
        for c in first..(first + V::LANES).min(g.out_channels) {
            for q in 0..outputs {
                // SAFETY: see the assertions above.
                unsafe {
                    let mut v = *result.add(q * stride + c);
                    if let Some(add) = add {
                        v += *add.as_ptr().add(c * outputs + q);
                    }
                    *to.add(c * outputs + q) = if conv.relu { v.max(0.0) } else { v };
                }
            }
        }
    }
}

/// One image of a dense 1x1 convolution of stride 1 without padding, few outputs per channel
/// ([`runs_pointwise_across`]), `KV` vectors of output channels by 4 outputs at a time: each input
/// channel loads `KV` vectors of weights (packed `[blocks][in_channels][block]`) and multiplies
/// them with each of the 4 input values, read in place; the `[outputs][channels]` tile is
/// transposed into the output as it is stored.
///
/// # Safety
/// As [`image`].
#[inline(always)]
unsafe fn pointwise_across<V: Vector, const KV: usize>(
    conv: &Conv2d,
    image: &[f32],
    _scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    const Q: usize = POINTWISE_ACROSS_TILE;
    let g = &conv.geometry;
    let outputs = g.out_height() * g.out_width();
    let (inputs, block) = (g.in_channels, KV * V::LANES);
    assert!(block <= MAX_TILE_OUTPUTS && block == conv.tile.channels && outputs.is_multiple_of(Q));
    assert!(image.len() == inputs * outputs && out.len() == g.out_channels * outputs);
    assert!(add.is_none_or(|a| a.len() == out.len()) && conv.packed.len() == conv.bias.len() * inputs);
    let mut buffer = [[0f32; MAX_TILE_OUTPUTS]; Q];
    for (b, (weights, bias)) in conv.packed.chunks_exact(inputs * block).zip(conv.bias.chunks_exact(block)).enumerate()
    {
        for q0 in (0..outputs).step_by(Q) {
            // SAFETY: V's features are the caller's promise; the weights and bias hold `block`
            // values per input channel (the assertions), the image `outputs` per channel.
            unsafe {
                let mut acc = [[V::splat(0.0); KV]; Q];
                for lanes in acc.iter_mut() {
                    for (j, lane) in lanes.iter_mut().enumerate() {
                        *lane = V::load(bias.as_ptr().add(j * V::LANES));
                    }
                }
                let x = image.as_ptr().add(q0);
                for c in 0..inputs {
                    let w = weights.as_ptr().add(c * block);
                    let mut ws = [V::splat(0.0); KV];
                    for (j, v) in ws.iter_mut().enumerate() {
                        *v = V::load(w.add(j * V::LANES));
                    }
                    for (q, lanes) in acc.iter_mut().enumerate() {
                        let input = V::splat(*x.add(c * outputs + q));
                        for (lane, w) in lanes.iter_mut().zip(&ws) {
                            *lane = V::mul_add(*lane, input, *w);
                        }
                    }
                }
                for (lanes, row) in acc.iter().zip(&mut buffer) {
                    for (j, lane) in lanes.iter().enumerate() {
                        lane.store(row.as_mut_ptr().add(j * V::LANES));
                    }
                }
            }
            let channels = (g.out_channels - b * block).min(block);
            for k in 0..channels {
                for (q, row) in buffer.iter().enumerate() {
                    let at = (b * block + k) * outputs + q0 + q;
                    let v = row[k] + add.map_or(0.0, |add| add[at]);
                    out[at] = if conv.relu { v.max(0.0) } else { v };
                }
            }
        }
    }
}

/// A compiled kernel ([`ImageKernel`]) named `$name` that runs `$run` (an instance of a generic
/// kernel), with `$attr` (its documentation, the target features it is compiled for). Never
/// inlined: each is a concrete function of this crate, compiled with its features and profile.
macro_rules! kernel {
    ($(#[$attr:meta])* $name:ident, $run:expr) => {
        $(#[$attr])*
        #[inline(never)]
        pub(super) unsafe fn $name(
            conv: &Conv2d,
            input: &[f32],
            scratch: &mut [f32],
            add: Option<&[f32]>,
            out: &mut [f32],
        ) {
            // SAFETY: the caller's promise (the features and the buffers' lengths).
            unsafe { $run(conv, input, scratch, add, out) }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Conv2d, Vector, depthwise, depthwise_across, image, pointwise_across, winograd};

    /// `Vector` for an x86 register type, from its intrinsics: set1, loadu, storeu, fmadd, add,
    /// sub, max, setzero (`$even`, `$odd` and `$interleave`: the bodies of `Vector::even`,
    /// `Vector::odd` and `Vector::interleave`).
    macro_rules! vector {
        (
            $ty:ty, $lanes:literal, $features:literal,
            [$set1:ident, $load:ident, $store:ident, $fmadd:ident, $add:ident, $sub:ident, $max:ident, $zero:ident],
            |$a:ident, $b:ident| $even:block,
            |$e:ident, $f:ident| $odd:block,
            |$c:ident, $d:ident| $interleave:block
            $(, $extra:item)*
        ) => {
            impl Vector for $ty {
                const LANES: usize = $lanes;
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn splat(value: f32) -> Self {
                    $set1(value)
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn load(src: *const f32) -> Self {
                    unsafe { $load(src) }
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn store(self, dst: *mut f32) {
                    unsafe { $store(dst, self) }
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self {
                    $fmadd(a, b, acc)
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn add(a: Self, b: Self) -> Self {
                    $add(a, b)
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn sub(a: Self, b: Self) -> Self {
                    $sub(a, b)
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn relu(a: Self) -> Self {
                    $max(a, $zero())
                }
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn even($a: Self, $b: Self) -> Self $even
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn odd($e: Self, $f: Self) -> Self $odd
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn interleave($c: Self, $d: Self) -> (Self, Self) $interleave
                $($extra)*
            }
        };
    }

    vector!(
        __m512,
        16,
        "avx512f",
        [
            _mm512_set1_ps,
            _mm512_loadu_ps,
            _mm512_storeu_ps,
            _mm512_fmadd_ps,
            _mm512_add_ps,
            _mm512_sub_ps,
            _mm512_max_ps,
            _mm512_setzero_ps
        ],
        |a, b| {
            let index = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            _mm512_permutex2var_ps(a, index, b)
        },
        |a, b| {
            let index = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            _mm512_permutex2var_ps(a, index, b)
        },
        |a, b| {
            let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            (_mm512_permutex2var_ps(a, low, b), _mm512_permutex2var_ps(a, high, b))
        },
        // Masked: no element-by-element loop for a row's last values.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_partial(src: *const f32, n: usize) -> Self {
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, src) }
        },
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_partial(self, dst: *mut f32, n: usize) {
            unsafe { _mm512_mask_storeu_ps(dst, ((1u32 << n) - 1) as __mmask16, self) }
        }
    );

    vector!(
        __m256,
        8,
        "avx2,fma",
        [
            _mm256_set1_ps,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_fmadd_ps,
            _mm256_add_ps,
            _mm256_sub_ps,
            _mm256_max_ps,
            _mm256_setzero_ps
        ],
        |a, b| {
            // Per 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the 64-bit quarters reordered.
            let halves = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(halves)))
        },
        |a, b| {
            // As `even`, from lanes 1 and 3 of each half.
            let halves = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(halves)))
        },
        |a, b| {
            // Per 128-bit half: a0 b0 a1 b1 | a4 b4 a5 b5 and a2 b2 a3 b3 | a6 b6 a7 b7.
            let (low, high) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            (_mm256_permute2f128_ps::<0x20>(low, high), _mm256_permute2f128_ps::<0x31>(low, high))
        }
    );

    /// A kernel compiled for `$features`.
    macro_rules! x86_kernel {
        ($name:ident, $features:literal, $run:expr) => {
            kernel!(
                /// # Safety
                /// The CPU must have the enabled features ([`super::Simd::detect`]); the buffers
                /// have the lengths [`Conv2d::run_adding`] checks.
                #[target_feature(enable = $features)]
                $name,
                $run
            );
        };
    }

    x86_kernel!(avx512_4, "avx512f,avx2,fma", image::<__m512, 4, 4>);
    x86_kernel!(avx512_8, "avx512f,avx2,fma", image::<__m512, 8, 2>);
    x86_kernel!(avx512_16_short, "avx512f,avx2,fma", image::<__m512, 16, 1>);
    x86_kernel!(avx2_4, "avx2,fma", image::<__m256, 4, 2>);
    x86_kernel!(avx2_8, "avx2,fma", image::<__m256, 8, 1>);
    x86_kernel!(depthwise_avx512, "avx512f,avx2,fma", depthwise::image::<__m512>);
    x86_kernel!(depthwise_avx2, "avx2,fma", depthwise::image::<__m256>);
    x86_kernel!(depthwise_across_avx512, "avx512f,avx2,fma", depthwise_across::<__m512>);
    x86_kernel!(depthwise_across_avx2, "avx2,fma", depthwise_across::<__m256>);
    x86_kernel!(pointwise_across_avx512, "avx512f,avx2,fma", pointwise_across::<__m512, 4>);
    x86_kernel!(pointwise_across_avx2, "avx2,fma", pointwise_across::<__m256, 2>);
    x86_kernel!(winograd_avx512_16, "avx512f,avx2,fma", winograd::image::<__m512, 2, 4, 16, 1>);
    x86_kernel!(winograd_avx512_8, "avx512f,avx2,fma", winograd::image::<__m512, 2, 4, 8, 1>);
    x86_kernel!(winograd_avx2, "avx2,fma", winograd::image::<__m256, 2, 4, 8, 1>);
    x86_kernel!(winograd4x4_avx512_16, "avx512f,avx2,fma", winograd::image::<__m512, 4, 6, 16, 1>);
    x86_kernel!(winograd4x4_avx512_8, "avx512f,avx2,fma", winograd::image::<__m512, 4, 6, 8, 1>);
    x86_kernel!(winograd4x4_avx2, "avx2,fma", winograd::image::<__m256, 4, 6, 8, 1>);
}

/// What the target has without run-time detection: NEON on aarch64 (two registers of 4 per
/// 8 outputs), plain f32 elsewhere (the compiler may still vectorise it).
mod portable {
    use super::{Conv2d, Vector, depthwise, image, winograd};

    /// Vectors of output channels per tile of [`super::pointwise_across`] (plain f32: as many
    /// channels as the other tiles).
    pub(super) const ACROSS_VECTORS: usize = if LANES == 1 { 8 } else { 4 };

    #[cfg(target_arch = "aarch64")]
    mod lanes {
        use std::arch::aarch64::*;

        pub type Lanes = float32x4_t;
        pub const VECTORS: usize = 2;

        impl super::Vector for float32x4_t {
            const LANES: usize = 4;
            #[inline(always)]
            unsafe fn splat(value: f32) -> Self {
                unsafe { vdupq_n_f32(value) }
            }
            #[inline(always)]
            unsafe fn load(src: *const f32) -> Self {
                unsafe { vld1q_f32(src) }
            }
            #[inline(always)]
            unsafe fn store(self, dst: *mut f32) {
                unsafe { vst1q_f32(dst, self) }
            }
            #[inline(always)]
            unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self {
                unsafe { vfmaq_f32(acc, a, b) }
            }
            #[inline(always)]
            unsafe fn add(a: Self, b: Self) -> Self {
                unsafe { vaddq_f32(a, b) }
            }
            #[inline(always)]
            unsafe fn sub(a: Self, b: Self) -> Self {
                unsafe { vsubq_f32(a, b) }
            }
            #[inline(always)]
            unsafe fn relu(a: Self) -> Self {
                unsafe { vmaxq_f32(a, vdupq_n_f32(0.0)) }
            }
            #[inline(always)]
            unsafe fn even(a: Self, b: Self) -> Self {
                unsafe { vuzp1q_f32(a, b) }
            }
            #[inline(always)]
            unsafe fn odd(a: Self, b: Self) -> Self {
                unsafe { vuzp2q_f32(a, b) }
            }
            #[inline(always)]
            unsafe fn interleave(a: Self, b: Self) -> (Self, Self) {
                unsafe { (vzip1q_f32(a, b), vzip2q_f32(a, b)) }
            }
        }
    }

    #[cfg(not(target_arch = "aarch64"))]
    mod lanes {
        pub type Lanes = f32;
        pub const VECTORS: usize = 8;

        impl super::Vector for f32 {
            const LANES: usize = 1;
            #[inline(always)]
            unsafe fn splat(value: f32) -> Self {
                value
            }
            #[inline(always)]
            unsafe fn load(src: *const f32) -> Self {
                unsafe { src.read() }
            }
            #[inline(always)]
            unsafe fn store(self, dst: *mut f32) {
                unsafe { dst.write(self) }
            }
            #[inline(always)]
            unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self {
                // Not `f32::mul_add`: without an FMA unit it is a library call.
                acc + a * b
            }
            #[inline(always)]
            unsafe fn add(a: Self, b: Self) -> Self {
                a + b
            }
            #[inline(always)]
            unsafe fn sub(a: Self, b: Self) -> Self {
                a - b
            }
            #[inline(always)]
            unsafe fn relu(a: Self) -> Self {
                a.max(0.0)
            }
            #[inline(always)]
            unsafe fn even(a: Self, _b: Self) -> Self {
                a
            }
            #[inline(always)]
            unsafe fn odd(_a: Self, b: Self) -> Self {
                b
            }
            #[inline(always)]
            unsafe fn interleave(a: Self, b: Self) -> (Self, Self) {
                (a, b)
            }
        }
    }

    pub(super) use lanes::Lanes;
    pub(super) use lanes::VECTORS;

    /// Values per vector.
    pub(super) const LANES: usize = <Lanes as Vector>::LANES;

    kernel!(
        /// # Safety
        /// The buffers have the lengths [`Conv2d::run_adding`] checks (`unsafe` to share the
        /// kernels' signature; `Lanes` needs only the target's baseline).
        block_4, image::<Lanes, 4, VECTORS>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        block_8, image::<Lanes, 8, VECTORS>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        depthwise_rows, depthwise::image::<Lanes>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        depthwise_across, super::depthwise_across::<Lanes>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        winograd_8, winograd::image::<Lanes, 2, 4, 8, VECTORS>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        winograd4x4_8, winograd::image::<Lanes, 4, 6, 8, VECTORS>
    );
    kernel!(
        /// # Safety
        /// As [`block_4`].
        pointwise_across, super::pointwise_across::<Lanes, ACROSS_VECTORS>
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64: out[n][o][y][x] = bias[o] + sum over c, ky, kx of
    /// w[o][c][ky][kx] * in[n][c][y*sy + ky - top][x*sx + kx - left] (zero outside).
    fn reference(g: &Conv2dGeometry, images: usize, input: &[f32], weights: &[f32], bias: &[f32]) -> Vec<f32> {
        let (oh, ow) = (g.out_height(), g.out_width());
        let [kh, kw] = g.kernel;
        let mut out = vec![0f32; images * g.output_len()];
        for n in 0..images {
            for o in 0..g.out_channels {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut sum = bias[o] as f64;
                        for c in 0..g.in_channels {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (y * g.stride[0] + ky) as isize - g.pad_before[0] as isize;
                                    let ix = (x * g.stride[1] + kx) as isize - g.pad_before[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= g.in_height as isize || ix >= g.in_width as isize {
                                        continue;
                                    }
                                    let i = ((n * g.in_channels + c) * g.in_height + iy as usize) * g.in_width
                                        + ix as usize;
                                    let w = ((o * g.in_channels + c) * kh + ky) * kw + kx;
                                    sum += input[i] as f64 * weights[w] as f64;
                                }
                            }
                        }
                        out[((n * g.out_channels + o) * oh + y) * ow + x] = sum as f32;
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1) (the other kernels' tests use them too).
    pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn geometry(c: usize, hw: [usize; 2], o: usize, k: [usize; 2], s: [usize; 2], pad: [usize; 4]) -> Conv2dGeometry {
        Conv2dGeometry {
            in_channels: c,
            in_height: hw[0],
            in_width: hw[1],
            out_channels: o,
            kernel: k,
            stride: s,
            pad_before: [pad[0], pad[1]],
            pad_after: [pad[2], pad[3]],
        }
    }

    /// The zoo's shapes (LeNet-5 and ResNet convolutions, the strided ones and their 1x1
    /// shortcuts) and odd ones (widths that leave partial pixel blocks, asymmetric padding,
    /// channel counts that leave partial channel blocks).
    fn cases() -> Vec<Conv2dGeometry> {
        vec![
            geometry(3, [32, 32], 3, [5, 5], [1, 1], [0, 0, 0, 0]),
            geometry(3, [14, 14], 8, [5, 5], [1, 1], [0, 0, 0, 0]),
            geometry(1, [28, 28], 6, [5, 5], [1, 1], [2, 2, 2, 2]),
            geometry(3, [32, 32], 16, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(16, [32, 32], 16, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(16, [32, 32], 32, [3, 3], [2, 2], [1, 1, 1, 1]),
            geometry(16, [32, 32], 32, [1, 1], [2, 2], [0, 0, 0, 0]),
            geometry(64, [8, 8], 64, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(5, [9, 13], 11, [3, 2], [2, 3], [0, 2, 1, 0]),
            geometry(2, [5, 7], 1, [1, 1], [1, 1], [0, 0, 0, 0]),
            // MobileNet's pointwise layers, read in place: whole tiles of outputs.
            geometry(32, [8, 8], 24, [1, 1], [1, 1], [0, 0, 0, 0]),
            geometry(40, [4, 4], 20, [1, 1], [1, 1], [0, 0, 0, 0]),
            // MobileNet's 2x2 pointwise layers: across output channels, in place; 8 outputs
            // per channel (two tiles), channels that leave a partial vector.
            geometry(48, [2, 2], 70, [1, 1], [1, 1], [0, 0, 0, 0]),
            geometry(33, [2, 4], 9, [1, 1], [1, 1], [0, 0, 0, 0]),
            // Padding wider than the image, on a strided axis.
            geometry(2, [3, 2], 3, [1, 4], [1, 2], [0, 3, 0, 2]),
        ]
    }

    #[test]
    fn every_kernel_matches_the_definition() {
        for (simd, relu, add) in Simd::available()
            .into_iter()
            .flat_map(|simd| [(simd, false, false), (simd, true, false), (simd, true, true)])
        {
            for (i, g) in cases().into_iter().enumerate() {
                let images = 2;
                let input = values(images * g.input_len(), 1 + i as u64);
                let weights = values(g.weights_len(), 100 + i as u64);
                let bias = values(g.out_channels, 200 + i as u64);
                let conv = Conv2d::with_algorithm(g, &weights, Some(&bias), simd, Algorithm::Direct).unwrap();
                let pointwise = g.kernel == [1, 1] && g.stride == [1, 1] && g.in_channels > 30;
                assert_eq!(conv.reads_in_place(), pointwise, "{g}");
                let few = g.out_height() * g.out_width() < 16;
                assert_eq!(conv.tile.across_channels, pointwise && few, "{g}");
                let expected = reference(&g, images, &input, &weights, &bias);
                check(conv, relu, add, images, &input, expected, g.in_channels * g.kernel[0] * g.kernel[1]);
            }
        }
    }

    #[test]
    fn every_winograd_kernel_matches_the_definition() {
        // ResNet's 3x3 layers, and odd ones: output widths and heights that leave half a 2x2
        // block and partial vectors of blocks, asymmetric and no padding, a single output,
        // channel counts that leave partial tiles of output channels.
        let cases = [
            geometry(16, [32, 32], 16, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(32, [16, 16], 32, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(64, [8, 8], 64, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(9, [7, 5], 11, [3, 3], [1, 1], [0, 2, 1, 0]),
            geometry(8, [3, 3], 5, [3, 3], [1, 1], [0, 0, 0, 0]),
            geometry(12, [2, 9], 3, [3, 3], [1, 1], [2, 1, 2, 1]),
            geometry(3, [1, 1], 17, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(10, [21, 37], 9, [3, 3], [1, 1], [1, 0, 1, 3]),
        ];
        for (simd, relu, add) in Simd::available()
            .into_iter()
            .flat_map(|simd| [(simd, false, false), (simd, true, false), (simd, true, true)])
        {
            for (i, g) in cases.into_iter().enumerate() {
                let images = 2;
                let input = values(images * g.input_len(), 21 + i as u64);
                let weights = values(g.weights_len(), 120 + i as u64);
                let bias = values(g.out_channels, 220 + i as u64);
                let expected = reference(&g, images, &input, &weights, &bias);
                for (algorithm, name) in
                    [(Algorithm::Winograd, "winograd-conv/"), (Algorithm::Winograd4x4, "winograd4x4-conv/")]
                {
                    let conv = Conv2d::with_algorithm(g, &weights, Some(&bias), simd, algorithm).unwrap();
                    assert!(conv.kernel_name().starts_with(name), "{}", conv.kernel_name());
                    check(conv, relu, add, images, &input, expected.clone(), g.in_channels * 9);
                }
            }
        }
        // The best algorithm is Winograd's for ResNet's layers, not for its first (3 channels):
        // in 4x4 tiles at 32x32 and 16x16 outputs, in 2x2 ones at 8x8 (four 4x4 tiles would
        // fill a quarter of an AVX-512 vector, half of an AVX2 or NEON kernel's).
        let vectors = Simd::detect() != Simd::Portable || portable::LANES >= 4;
        let expect = |winograd| if vectors { winograd } else { Algorithm::Direct };
        assert_eq!(Algorithm::best(&cases[0], Simd::detect()), expect(Algorithm::Winograd4x4));
        assert_eq!(Algorithm::best(&cases[1], Simd::detect()), expect(Algorithm::Winograd4x4));
        assert_eq!(Algorithm::best(&cases[2], Simd::detect()), expect(Algorithm::Winograd));
        assert_eq!(Algorithm::best(&cases[6], Simd::detect()), Algorithm::Direct);
        for g in [
            geometry(16, [8, 8], 16, [3, 3], [2, 2], [1, 1, 1, 1]),
            geometry(16, [8, 8], 16, [5, 5], [1, 1], [1, 1, 1, 1]),
            geometry(16, [8, 8], 16, [1, 1], [1, 1], [0, 0, 0, 0]),
        ] {
            assert_eq!(Algorithm::best(&g, Simd::detect()), Algorithm::Direct);
            let weights = values(g.weights_len(), 5);
            for algorithm in [Algorithm::Winograd, Algorithm::Winograd4x4] {
                let err = Conv2d::with_algorithm(g, &weights, None, Simd::detect(), algorithm).unwrap_err();
                assert!(err.to_string().contains("Winograd"), "{err}");
            }
        }
        let g = cases[2];
        let err = Conv2d::build(g, &values(64 * 9, 1), None, Simd::detect(), Algorithm::Winograd, true).unwrap_err();
        assert!(err.to_string().contains("dense"), "{err}");
    }

    /// Run `conv` (with a ReLU when `relu`, adding seeded values when `add`) on `images` images
    /// of `input` into a NaN-filled output (every value must be written), with a NaN-filled
    /// scratch buffer, and compare with
    /// `expected` (the definition, to which the addition and the ReLU are applied here): f32
    /// sums of `taps` products of values in [-1, 1] round by at most taps * 2^-24 of the largest
    /// partial sum.
    fn check(
        mut conv: Conv2d,
        relu: bool,
        add: bool,
        images: usize,
        input: &[f32],
        mut expected: Vec<f32>,
        taps: usize,
    ) {
        let added = add.then(|| values(expected.len(), 999));
        if let Some(added) = &added {
            expected.iter_mut().zip(added).for_each(|(e, a)| *e += a);
        }
        if relu {
            conv = conv.with_relu();
            expected.iter_mut().for_each(|e| *e = e.max(0.0));
        }
        let g = *conv.geometry();
        let mut out = vec![f32::NAN; images * g.output_len()];
        // A scratch buffer left full of NaN (by another convolution, say): nothing of it may
        // reach the output.
        let mut scratch = vec![f32::NAN; conv.scratch_len() + 100];
        conv.run_adding(images, input, added.as_deref(), &mut out, &mut scratch).unwrap();
        for (j, (a, e)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (a - e).abs() <= 1e-6 * taps.max(1) as f32 * 4.0,
                "{} (relu {relu}, add {add}) on {g}: output {j} is {a}, expected {e}",
                conv.kernel_name()
            );
        }
    }

    #[test]
    fn every_depthwise_kernel_matches_the_definition() {
        // MobileNet's shapes (3x3, stride 1 and 2, padding 1, down to 2x2 outputs) and odd ones.
        let cases = [
            geometry(32, [32, 32], 32, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(64, [32, 32], 64, [3, 3], [2, 2], [1, 1, 1, 1]),
            geometry(16, [8, 8], 16, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(24, [4, 4], 24, [3, 3], [2, 2], [1, 1, 1, 1]),
            geometry(5, [7, 9], 5, [3, 5], [2, 1], [0, 2, 1, 1]),
            geometry(3, [2, 2], 3, [3, 3], [1, 1], [1, 1, 1, 1]),
            // Rows split into 3 phases (element by element), odd widths split into 2.
            geometry(6, [11, 13], 6, [3, 3], [1, 3], [1, 2, 0, 1]),
            geometry(9, [9, 37], 9, [5, 3], [2, 2], [2, 1, 1, 2]),
            // At most 16 outputs per channel: the kernels across channels, with channel
            // counts that leave a partial vector, and odd padding and strides.
            geometry(40, [4, 4], 40, [3, 3], [1, 1], [1, 1, 1, 1]),
            geometry(7, [3, 5], 7, [3, 3], [2, 2], [1, 0, 0, 2]),
            // Tiny channels in registers on AVX-512: inputs in the last two of four vectors
            // (MobileNet's 8x8 -> 4x4), odd shapes; and one too large for it (across channels).
            geometry(18, [8, 8], 18, [3, 3], [2, 2], [1, 1, 1, 1]),
            geometry(5, [7, 6], 5, [3, 3], [2, 2], [0, 1, 1, 0]),
            geometry(20, [9, 9], 20, [3, 3], [3, 3], [1, 1, 1, 1]),
        ];
        for (simd, relu, add) in Simd::available()
            .into_iter()
            .flat_map(|simd| [(simd, false, false), (simd, true, false), (simd, true, true)])
        {
            for (i, g) in cases.into_iter().enumerate() {
                let images = 2;
                let channels = g.in_channels;
                let taps = g.kernel[0] * g.kernel[1];
                let input = values(images * g.input_len(), 11 + i as u64);
                let weights = values(channels * taps, 110 + i as u64);
                let bias = values(channels, 210 + i as u64);
                // The definition: a dense convolution whose weights are zero off the diagonal.
                let mut dense = vec![0f32; g.weights_len()];
                for c in 0..channels {
                    dense[(c * channels + c) * taps..][..taps].copy_from_slice(&weights[c * taps..][..taps]);
                }
                let expected = reference(&g, images, &input, &dense, &bias);
                let conv = Conv2d::build(g, &weights, Some(&bias), simd, Algorithm::Direct, true).unwrap();
                assert_eq!(conv.macs() * channels, g.macs());
                let permuted = simd == Simd::Avx512 && permute::applies(&g);
                assert_eq!(matches!(conv.layout, ScratchLayout::Registers(_)), permuted, "{g}");
                let across = g.out_height() * g.out_width() <= ACROSS_CHANNELS_MAX_OUTPUTS;
                assert_eq!(conv.tile.across_channels, across && !permuted, "{g}");
                check(conv, relu, add, images, &input, expected, taps);
            }
        }
        let g = geometry(4, [8, 8], 8, [3, 3], [1, 1], [1, 1, 1, 1]);
        assert!(matches!(Conv2d::depthwise(g, &[0.0; 36], None), Err(Conv2dError::Geometry(_))));
        let g = geometry(4, [8, 8], 4, [3, 3], [1, 1], [1, 1, 1, 1]);
        assert!(matches!(Conv2d::depthwise(g, &[0.0; 35], None), Err(Conv2dError::Length { what: "weights", .. })));
        assert!(Conv2d::depthwise(g, &[0.0; 36], None).unwrap().kernel_name().starts_with("depthwise-conv/"));
    }

    #[test]
    fn bias_is_optional_and_scratch_is_reused() {
        let g = geometry(3, [10, 10], 5, [3, 3], [1, 1], [1, 1, 1, 1]);
        let input = values(g.input_len(), 7);
        let weights = values(g.weights_len(), 8);
        let conv = Conv2d::new(g, &weights, None).unwrap();
        let mut scratch = vec![123.0; 3];
        let mut first = vec![0f32; g.output_len()];
        conv.run(1, &input, &mut first, &mut scratch).unwrap();
        let mut second = vec![0f32; g.output_len()];
        conv.run(1, &input, &mut second, &mut scratch).unwrap();
        assert_eq!(first, second);
        let expected = reference(&g, 1, &input, &weights, &[0.0; 5]);
        assert!(first.iter().zip(&expected).all(|(a, e)| (a - e).abs() < 1e-5));
    }

    #[test]
    fn bad_shapes_and_buffers_are_errors() {
        let good = geometry(3, [8, 8], 4, [3, 3], [1, 1], [1, 1, 1, 1]);
        let weights = values(good.weights_len(), 1);
        let mut zero = good;
        zero.stride = [0, 1];
        assert!(matches!(Conv2d::new(zero, &weights, None), Err(Conv2dError::Geometry(_))));
        let mut large = good;
        large.kernel = [11, 3];
        assert!(matches!(Conv2d::new(large, &weights, None), Err(Conv2dError::Geometry(_))));
        let mut huge = good;
        huge.in_width = usize::MAX / 2;
        assert!(matches!(Conv2d::new(huge, &weights, None), Err(Conv2dError::Geometry(_))));
        // A valid geometry (one output row) whose planes would not fit in memory.
        let mut strided = good;
        strided.stride = [usize::MAX / 4, 1];
        assert_eq!(strided.out_height(), 1);
        assert!(matches!(Conv2d::new(strided, &weights, None), Err(Conv2dError::Geometry(_))));
        // One output column: the padded rows' length overflows (dense), the split rows' (depthwise,
        // 32 outputs: along rows).
        strided.stride = [1, usize::MAX / 4];
        assert_eq!(strided.out_width(), 1);
        assert!(matches!(Conv2d::new(strided, &weights, None), Err(Conv2dError::Geometry(_))));
        (strided.out_channels, strided.in_height) = (3, 32);
        assert!(matches!(Conv2d::depthwise(strided, &weights[..27], None), Err(Conv2dError::Geometry(_))));
        // Depthwise geometries with few outputs whose buffers would not fit: a padding of
        // 2^23 - 4 around a 4x4 channel with two outputs per axis (across channels: the padded
        // pixels of each channel), and strides of 2^20 with five outputs per axis (along rows:
        // the padded rows the taps read).
        let mut padded = geometry(1024, [4, 4], 1024, [3, 3], [1 << 23, 1 << 23], [(1 << 23) - 4; 4]);
        assert_eq!((padded.out_height(), padded.out_width()), (2, 2));
        let depthwise_weights = values(1024 * 9, 2);
        assert!(matches!(Conv2d::depthwise(padded, &depthwise_weights, None), Err(Conv2dError::Geometry(_))));
        padded = geometry(16, [6, 6], 16, [3, 3], [1 << 20, 1 << 20], [0, 0, (1 << 22) - 3, (1 << 22) - 3]);
        assert_eq!((padded.out_height(), padded.out_width()), (5, 5));
        assert!(matches!(Conv2d::depthwise(padded, &depthwise_weights[..16 * 9], None), Err(Conv2dError::Geometry(_))));
        assert!(matches!(Conv2d::new(good, &weights[1..], None), Err(Conv2dError::Length { what: "weights", .. })));
        assert!(matches!(Conv2d::new(good, &weights, Some(&[1.0])), Err(Conv2dError::Length { what: "bias", .. })));
        let conv = Conv2d::new(good, &weights, None).unwrap();
        let mut out = vec![0f32; good.output_len()];
        let err = conv.run(1, &[0.0; 5], &mut out, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("input has 5 values"), "{err}");
        let err = conv.run(2, &vec![0.0; 2 * good.input_len()], &mut out, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("output"), "{err}");
        let input = vec![0.0; good.input_len()];
        let err = conv.run_adding(1, &input, Some(&[1.0; 3]), &mut out, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("added input has 3 values"), "{err}");
    }
}
