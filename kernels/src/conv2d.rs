//! Direct 2-D convolution for few channels and small images (NCHW, no dilation; one group, or
//! depthwise: one group per channel).
//!
//! Why: an im2col + matrix product lowering spends most of its time gathering the few input
//! channels of a small student into panels, and pads an 8-row matrix tile with 3 real rows.
//! This kernel gathers nothing. Per image it copies the input once into zero-padded *phase
//! planes* (for stride `s`, `s x s` planes, one per offset of the stride, so that every tap of
//! every stride reads a contiguous row), then, for a block of `CO` output channels and `X`
//! neighbouring output pixels of one row, keeps `CO x X` accumulators in vector registers and
//! walks the taps: each tap loads `X` inputs once and multiplies them with `CO` weights.
//! Weights are packed once, at construction, in the order the taps are walked.
//!
//! The same code is compiled for each vector unit and chosen when the kernel is built
//! ([`Simd::detect`]): tiles of 8 output channels by 2 rows of 16 pixels on AVX-512 (2 rows of 8
//! where the output is that narrow), by 1 row of 8 on AVX2 and on NEON, with fused
//! multiply-adds where the target has them.
//!
//! A depthwise convolution ([`Conv2d::depthwise`]: each output channel reads only its own input
//! channel) has no weights to share between channels: its tile is one channel by 4 rows of a
//! vector of pixels, read from the same phase planes.

use std::fmt;

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

    fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Portable if cfg!(target_arch = "aarch64") => "neon",
            Simd::Portable => "portable",
        }
    }
}

/// A convolution with its weights packed for the kernel: build once, run many times.
#[derive(Clone)]
pub struct Conv2d {
    geometry: Conv2dGeometry,
    simd: Simd,
    tile: Tile,
    /// `[blocks][in_channels][kernel h][kernel w][block]`, zero beyond `out_channels`.
    packed: Vec<f32>,
    /// `[blocks * block]`, zero beyond `out_channels`.
    bias: Vec<f32>,
    /// Per tap (in packing order), its offset in the phase planes.
    taps: Vec<usize>,
    plane_height: usize,
    plane_width: usize,
    /// Outputs clamped at zero as they are stored (a ReLU after the convolution, fused).
    relu: bool,
    /// One group per channel: output channel `c` reads input channel `c` only.
    depthwise: bool,
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
        Conv2d::build(geometry, weights, bias, simd, false)
    }

    /// A depthwise convolution (groups = channels, `in_channels == out_channels`): `weights`
    /// are `[channels, 1, kh, kw]`, `bias` `[channels]` or none; for the best vector unit.
    pub fn depthwise(geometry: Conv2dGeometry, weights: &[f32], bias: Option<&[f32]>) -> Result<Conv2d, Conv2dError> {
        Conv2d::build(geometry, weights, bias, Simd::detect(), true)
    }

    fn build(
        geometry: Conv2dGeometry,
        weights: &[f32],
        bias: Option<&[f32]>,
        simd: Simd,
        depthwise: bool,
    ) -> Result<Conv2d, Conv2dError> {
        geometry.validate()?;
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
        let tile = if depthwise {
            Tile::depthwise(simd, geometry.out_width())
        } else {
            Tile::choose(simd, out_channels, geometry.out_width())
        };
        let block = tile.channels;
        let blocks = out_channels.div_ceil(block);
        let taps_per_channel = kh * kw;
        // Depthwise: `[channels][kh][kw]`, as given.
        let packed = if depthwise {
            weights.to_vec()
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
        let mut padded_bias = vec![0f32; blocks * block];
        if let Some(bias) = bias {
            padded_bias[..out_channels].copy_from_slice(bias);
        }
        // Phase planes: for each input channel, sy * sx planes; plane (py, px) holds the padded
        // input's rows py, py + sy, ... and columns px, px + sx, ...; tap (ky, kx) of output
        // (oy, ox) reads plane (ky % sy, kx % sx) at row oy + ky / sy, column ox + kx / sx.
        // A tile may read past the last output row and column: those rows and columns exist
        // (zero) so that no read needs a check.
        let plane_height = geometry.out_height().div_ceil(tile.rows) * tile.rows + (kh - 1) / sy;
        let plane_width = geometry.out_width().div_ceil(tile.pixels) * tile.pixels + (kw - 1) / sx;
        let plane_len = plane_height * plane_width;
        let mut taps = Vec::with_capacity(in_channels * taps_per_channel);
        for ci in 0..in_channels {
            for ky in 0..kh {
                for kx in 0..kw {
                    let plane = (ci * sy + ky % sy) * sx + kx % sx;
                    taps.push(plane * plane_len + (ky / sy) * plane_width + kx / sx);
                }
            }
        }
        Ok(Conv2d {
            geometry,
            simd,
            tile,
            packed,
            bias: padded_bias,
            taps,
            plane_height,
            plane_width,
            relu: false,
            depthwise,
        })
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

    /// Which compiled kernel runs, e.g. `direct-conv/avx512/8x2x16` (a tile of output
    /// channels x rows x pixels), `depthwise-conv/avx512/1x4x16`.
    pub fn kernel_name(&self) -> String {
        let Tile { channels, rows, pixels, .. } = self.tile;
        let kind = if self.depthwise { "depthwise-conv" } else { "direct-conv" };
        format!("{kind}/{}/{channels}x{rows}x{pixels}", self.simd.name())
    }

    /// Values of the scratch buffer [`Conv2d::run`] needs.
    pub fn scratch_len(&self) -> usize {
        let [sy, sx] = self.geometry.stride;
        self.geometry.in_channels * sy * sx * self.plane_height * self.plane_width
    }

    /// Convolve `images` images: `input` is `[images, in_channels, in_height, in_width]`,
    /// `output` `[images, out_channels, out_height, out_width]`, every value of which is written
    /// (its previous contents never read); `scratch` is resized as needed (keep it between calls
    /// to save the allocation).
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
        scratch.resize(self.scratch_len(), 0.0);
        for (i, (image, out)) in input.chunks_exact(in_len).zip(output.chunks_exact_mut(out_len)).enumerate() {
            self.fill_planes(image, scratch);
            self.dispatch(scratch, add.map(|add| &add[i * out_len..][..out_len]), out);
        }
        Ok(())
    }

    /// Copy one image into the zero-padded phase planes.
    fn fill_planes(&self, image: &[f32], planes: &mut [f32]) {
        let g = &self.geometry;
        let [sy, sx] = g.stride;
        let [top, left] = g.pad_before;
        let (h, w) = (g.in_height, g.in_width);
        let plane_len = self.plane_height * self.plane_width;
        for (ci, channel) in image.chunks_exact(h * w).enumerate() {
            for py in 0..sy {
                for px in 0..sx {
                    let plane = (ci * sy + py) * sx + px;
                    let plane = &mut planes[plane * plane_len..][..plane_len];
                    // Plane column c holds input column c * sx + px - left: the columns that
                    // fall inside the image are one contiguous run, the rest are zero.
                    let first = left.saturating_sub(px).div_ceil(sx).min(self.plane_width);
                    let end = (w + left).saturating_sub(px).div_ceil(sx).min(self.plane_width).max(first);
                    for (r, row) in plane.chunks_exact_mut(self.plane_width).enumerate() {
                        let y = (r * sy + py).wrapping_sub(top);
                        if y >= h || first == end {
                            row.fill(0.0);
                            continue;
                        }
                        let src = &channel[y * w..][..w];
                        let x0 = first * sx + px - left;
                        row[..first].fill(0.0);
                        if sx == 1 {
                            row[first..end].copy_from_slice(&src[x0..x0 + end - first]);
                        } else {
                            for (v, x) in row[first..end].iter_mut().zip(src[x0..].iter().step_by(sx)) {
                                *v = *x;
                            }
                        }
                        row[end..].fill(0.0);
                    }
                }
            }
        }
    }

    fn dispatch(&self, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
        // SAFETY: `Tile::choose` picked a kernel for `self.simd`, which `Conv2d::with_simd`
        // accepted only if `Simd::available` detected it on this CPU.
        unsafe { (self.tile.kernel)(self, planes, add, out) }
    }
}

/// A compiled kernel: one image from its phase planes, plus the values to add (if any), into
/// its output.
type ImageKernel = unsafe fn(&Conv2d, &[f32], Option<&[f32]>, &mut [f32]);

/// A compiled kernel and the tile of outputs it computes at once.
#[derive(Clone, Copy)]
struct Tile {
    /// Output channels.
    channels: usize,
    /// Output rows.
    rows: usize,
    /// Output pixels of a row.
    pixels: usize,
    /// Convolve one image from its phase planes. Each kernel is a concrete function of this
    /// crate, never inlined into a caller (a generic one would be compiled in the calling crate,
    /// with its build profile).
    kernel: ImageKernel,
}

impl Tile {
    /// The kernel for this vector unit: 4 output channels where there are that few, else 8;
    /// on AVX-512, two rows of 16 pixels, or two rows of 8 (256-bit registers, 32 of them with
    /// AVX-512VL) where the output is at most 8 wide.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // the width matters on x86 only
    fn choose(simd: Simd, out_channels: usize, out_width: usize) -> Tile {
        let few = out_channels <= 4;
        let tile = |channels, rows, pixels, kernel| Tile { channels, rows, pixels, kernel };
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if out_width <= 8 => match few {
                true => tile(4, 2, 8, x86::avx512_narrow_4),
                false => tile(8, 2, 8, x86::avx512_narrow_8),
            },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => match few {
                true => tile(4, 2, 16, x86::avx512_4),
                false => tile(8, 2, 16, x86::avx512_8),
            },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => match few {
                true => tile(4, 2, 8, x86::avx2_4),
                false => tile(8, 1, 8, x86::avx2_8),
            },
            _ => match few {
                true => tile(4, 1, 8, portable::block_4),
                false => tile(8, 1, 8, portable::block_8),
            },
        }
    }

    /// The depthwise kernel for this vector unit: one channel, 4 rows (four independent sums
    /// per tap), a vector of pixels per row (8 where the output is that narrow on AVX-512).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // the width matters on x86 only
    fn depthwise(simd: Simd, out_width: usize) -> Tile {
        let tile = |pixels, kernel| Tile { channels: 1, rows: 4, pixels, kernel };
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if out_width <= 8 => tile(8, x86::depthwise_avx512_narrow),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => tile(16, x86::depthwise_avx512),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => tile(8, x86::depthwise_avx2),
            _ => tile(8, portable::depthwise),
        }
    }
}

fn check_len(what: &'static str, actual: usize, expected: usize) -> Result<(), Conv2dError> {
    if actual == expected { Ok(()) } else { Err(Conv2dError::Length { what, actual, expected }) }
}

/// The few operations the kernel needs of a vector register of `LANES` f32.
///
/// # Safety
/// Every method needs the CPU features of its implementation; `load` reads `LANES` values.
trait Vector: Copy {
    const LANES: usize;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn load(src: *const f32) -> Self;
    unsafe fn store(self, dst: *mut f32);
    /// `acc + a * b` (fused where the unit has it).
    unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self;
}

/// One image from its phase planes, a tile of `CO` output channels by `R` rows by `XV`
/// vectors of pixels at a time: each tap loads `R * XV` vectors of inputs and multiplies them
/// with `CO` weights.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn image<V: Vector, const CO: usize, const R: usize, const XV: usize>(
    conv: &Conv2d,
    planes: &[f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    let x_block = XV * V::LANES;
    let g = &conv.geometry;
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let pw = conv.plane_width;
    // The tile's footprint in a plane, from its first input: R rows of x_block values.
    let span = (R - 1) * pw + x_block;
    let taps = conv.taps.len();
    let mut row = vec![0f32; x_block];
    for (b, (weights, bias)) in conv.packed.chunks_exact(taps * CO).zip(conv.bias.chunks_exact(CO)).enumerate() {
        let channels = (g.out_channels - b * CO).min(CO);
        for oy in (0..out_h).step_by(R) {
            for x0 in (0..out_w).step_by(x_block) {
                let base = oy * pw + x0;
                // SAFETY: the caller guarantees V's features; every pointer below points into
                // a slice bounds-checked to hold the values read.
                unsafe {
                    let mut acc: [[[V; XV]; R]; CO] = [[[V::splat(0.0); XV]; R]; CO];
                    for (c, rows) in acc.iter_mut().enumerate() {
                        *rows = [[V::splat(bias[c]); XV]; R];
                    }
                    for (w, &tap) in weights.chunks_exact(CO).zip(&conv.taps) {
                        let src = planes[tap + base..][..span].as_ptr();
                        let mut inputs = [[V::splat(0.0); XV]; R];
                        for (r, vectors) in inputs.iter_mut().enumerate() {
                            for (j, v) in vectors.iter_mut().enumerate() {
                                *v = V::load(src.add(r * pw + j * V::LANES));
                            }
                        }
                        for (c, rows) in acc.iter_mut().enumerate() {
                            let weight = V::splat(w[c]);
                            for (lanes, vectors) in rows.iter_mut().zip(&inputs) {
                                for (lane, input) in lanes.iter_mut().zip(vectors) {
                                    *lane = V::mul_add(*lane, weight, *input);
                                }
                            }
                        }
                    }
                    let width = (out_w - x0).min(x_block);
                    for (c, rows) in acc.iter().enumerate().take(channels) {
                        let co = b * CO + c;
                        for (r, lanes) in rows.iter().enumerate().take(out_h - oy) {
                            let at = (co * out_h + oy + r) * out_w + x0;
                            let add = add.map(|add| &add[at..][..width]);
                            store_row(lanes, &mut row, add, conv.relu, &mut out[at..][..width]);
                        }
                    }
                }
            }
        }
    }
}

/// Store one tile row of vectors into `dst` (its first `dst.len()` values) through `row` (room
/// for all the vectors), plus `add` (as long as `dst`) where given, clamped at zero when `relu`.
///
/// # Safety
/// The CPU must have `V`'s features; `row` holds `XV * V::LANES` values.
#[inline(always)]
unsafe fn store_row<V: Vector, const XV: usize>(
    lanes: &[V; XV],
    row: &mut [f32],
    add: Option<&[f32]>,
    relu: bool,
    dst: &mut [f32],
) {
    for (j, lane) in lanes.iter().enumerate() {
        // SAFETY: `row` has room for every vector (the caller's promise); V's features too.
        unsafe { lane.store(row.as_mut_ptr().add(j * V::LANES)) };
    }
    let row = &mut row[..dst.len()];
    if let Some(add) = add {
        for (v, a) in row.iter_mut().zip(add) {
            *v += a;
        }
    }
    if relu {
        for v in row.iter_mut() {
            *v = v.max(0.0);
        }
    }
    dst.copy_from_slice(row);
}

/// One image of a depthwise convolution from its phase planes: per channel, a tile of `R` rows
/// by `XV` vectors of pixels; each tap loads `R * XV` vectors and multiplies them with the
/// channel's weight.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn depthwise_image<V: Vector, const R: usize, const XV: usize>(
    conv: &Conv2d,
    planes: &[f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    let x_block = XV * V::LANES;
    let g = &conv.geometry;
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let pw = conv.plane_width;
    let span = (R - 1) * pw + x_block;
    let taps_per_channel = g.kernel[0] * g.kernel[1];
    let mut row = vec![0f32; x_block];
    for (c, (weights, taps)) in
        conv.packed.chunks_exact(taps_per_channel).zip(conv.taps.chunks_exact(taps_per_channel)).enumerate()
    {
        let bias = conv.bias[c];
        for oy in (0..out_h).step_by(R) {
            for x0 in (0..out_w).step_by(x_block) {
                let base = oy * pw + x0;
                // SAFETY: the caller guarantees V's features; every pointer below points into
                // a slice bounds-checked to hold the values read.
                unsafe {
                    let mut acc = [[V::splat(bias); XV]; R];
                    for (&w, &tap) in weights.iter().zip(taps) {
                        let src = planes[tap + base..][..span].as_ptr();
                        let weight = V::splat(w);
                        for (r, lanes) in acc.iter_mut().enumerate() {
                            for (j, lane) in lanes.iter_mut().enumerate() {
                                *lane = V::mul_add(*lane, weight, V::load(src.add(r * pw + j * V::LANES)));
                            }
                        }
                    }
                    let width = (out_w - x0).min(x_block);
                    for (r, lanes) in acc.iter().enumerate().take(out_h - oy) {
                        let at = (c * out_h + oy + r) * out_w + x0;
                        let add = add.map(|add| &add[at..][..width]);
                        store_row(lanes, &mut row, add, conv.relu, &mut out[at..][..width]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Conv2d, Vector, depthwise_image, image};

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(value: f32) -> Self {
            _mm512_set1_ps(value)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(src: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(src) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, dst: *mut f32) {
            unsafe { _mm512_storeu_ps(dst, self) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self {
            _mm512_fmadd_ps(a, b, acc)
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(value: f32) -> Self {
            _mm256_set1_ps(value)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(src: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(src) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, dst: *mut f32) {
            unsafe { _mm256_storeu_ps(dst, self) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul_add(acc: Self, a: Self, b: Self) -> Self {
            _mm256_fmadd_ps(a, b, acc)
        }
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $vector:ty, $co:literal, $rows:literal) => {
            /// # Safety
            /// The CPU must have the enabled features ([`super::Simd::detect`]).
            #[target_feature(enable = $features)]
            #[inline(never)]
            pub(super) unsafe fn $name(conv: &Conv2d, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
                unsafe { image::<$vector, $co, $rows, 1>(conv, planes, add, out) }
            }
        };
    }

    kernel!(avx512_4, "avx512f,avx2,fma", __m512, 4, 2);
    kernel!(avx512_8, "avx512f,avx2,fma", __m512, 8, 2);
    kernel!(avx512_narrow_4, "avx512f,avx512vl,avx2,fma", __m256, 4, 2);
    kernel!(avx512_narrow_8, "avx512f,avx512vl,avx2,fma", __m256, 8, 2);
    kernel!(avx2_4, "avx2,fma", __m256, 4, 2);
    kernel!(avx2_8, "avx2,fma", __m256, 8, 1);

    macro_rules! depthwise_kernel {
        ($name:ident, $features:literal, $vector:ty) => {
            /// # Safety
            /// The CPU must have the enabled features ([`super::Simd::detect`]).
            #[target_feature(enable = $features)]
            #[inline(never)]
            pub(super) unsafe fn $name(conv: &Conv2d, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
                unsafe { depthwise_image::<$vector, 4, 1>(conv, planes, add, out) }
            }
        };
    }

    depthwise_kernel!(depthwise_avx512, "avx512f,avx2,fma", __m512);
    depthwise_kernel!(depthwise_avx512_narrow, "avx512f,avx512vl,avx2,fma", __m256);
    depthwise_kernel!(depthwise_avx2, "avx2,fma", __m256);
}

/// What the target has without run-time detection: NEON on aarch64 (two registers of 4 per
/// 8 pixels), plain f32 elsewhere (the compiler may still vectorise it).
mod portable {
    use super::{Conv2d, Vector, depthwise_image, image};

    #[cfg(target_arch = "aarch64")]
    mod lanes {
        use std::arch::aarch64::*;

        pub type Lanes = float32x4_t;
        pub const PER_ROW: usize = 2;

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
        }
    }

    #[cfg(not(target_arch = "aarch64"))]
    mod lanes {
        pub type Lanes = f32;
        pub const PER_ROW: usize = 8;

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
        }
    }

    use lanes::{Lanes, PER_ROW};

    /// # Safety
    /// None beyond the target's baseline (`unsafe` to share the kernels' signature).
    #[inline(never)]
    pub(super) unsafe fn block_4(conv: &Conv2d, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
        // SAFETY: `Lanes` needs only the target's baseline.
        unsafe { image::<Lanes, 4, 1, PER_ROW>(conv, planes, add, out) }
    }

    /// # Safety
    /// As [`block_4`].
    #[inline(never)]
    pub(super) unsafe fn block_8(conv: &Conv2d, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { image::<Lanes, 8, 1, PER_ROW>(conv, planes, add, out) }
    }

    /// # Safety
    /// As [`block_4`].
    #[inline(never)]
    pub(super) unsafe fn depthwise(conv: &Conv2d, planes: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { depthwise_image::<Lanes, 4, PER_ROW>(conv, planes, add, out) }
    }
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

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
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
                let conv = Conv2d::with_simd(g, &weights, Some(&bias), simd).unwrap();
                let expected = reference(&g, images, &input, &weights, &bias);
                check(conv, relu, add, images, &input, expected, g.in_channels * g.kernel[0] * g.kernel[1]);
            }
        }
    }

    /// Run `conv` (with a ReLU when `relu`, adding seeded values when `add`) on `images` images
    /// of `input` into a NaN-filled output (every value must be written) and compare with
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
        conv.run_adding(images, input, added.as_deref(), &mut out, &mut Vec::new()).unwrap();
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
                let conv = Conv2d::build(g, &weights, Some(&bias), simd, true).unwrap();
                assert_eq!(conv.macs() * channels, g.macs());
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
