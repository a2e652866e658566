//! Depthwise convolution along each output row, read straight from the zero-padded channel.
//!
//! A depthwise layer has 9 multiply-adds per output (3x3): copying its input into shifted
//! planes (one per kernel column) cost more than the multiply-adds. Here each channel is
//! zero-padded once and each tap of a vector of consecutive outputs of a row loads the padded
//! row it reads at its column offset. A horizontal stride splits each padded row into its
//! phases first (for a stride of 2: even and odd columns), so that tap `kx` reads phase
//! `kx % sx` at offset `kx / sx`: whole vectors however strided. Rows of outputs go eight at a
//! time (eight independent sums per tap); a row's last values are stored masked where the unit
//! can.

use super::{Conv2d, Conv2dGeometry, MAX_TILE_OUTPUTS, ScratchLayout, Vector, copy, copy_even, store, zero};

/// Output rows computed at once.
const ROWS: usize = 8;

/// The buffers of one channel: the padded channel split into phases (`[rows][sx][phase_width]`)
/// and, for a stride above 1, the padded channel before its split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Padded rows the taps read: `(out_height - 1) * sy + kh`.
    rows: usize,
    /// Padded columns the taps read: `(out_width - 1) * sx + kw`.
    columns: usize,
    /// Columns of each phase of a row.
    phase_width: usize,
    /// Values of the split channel, and a tile's slack past its end (a vector read or written
    /// whole from the last row's last column on).
    split_len: usize,
    /// Values of the channel before its split (none without a stride), and the slack of a split
    /// in whole pairs of vectors.
    unsplit_len: usize,
}

impl Layout {
    /// The layout of `g` (valid: [`Conv2dGeometry::validate`]); none where a size overflows (a
    /// stride may be any size).
    pub(super) fn new(g: &Conv2dGeometry) -> Option<Layout> {
        let ([kh, kw], [sy, sx]) = (g.kernel, g.stride);
        let rows = (g.out_height() - 1).checked_mul(sy)?.checked_add(kh)?;
        let columns = (g.out_width() - 1).checked_mul(sx)?.checked_add(kw)?;
        let phase_width = columns.div_ceil(sx);
        let split_len = rows.checked_mul(sx)?.checked_mul(phase_width)?.checked_add(2 * MAX_TILE_OUTPUTS)?;
        let unsplit_len = match sx {
            1 => 0,
            _ => rows.checked_mul(columns)?.checked_add(4 * MAX_TILE_OUTPUTS + 1)?,
        };
        split_len.checked_add(unsplit_len)?;
        Some(Layout { rows, columns, phase_width, split_len, unsplit_len })
    }

    /// Values of the scratch buffer: the split channel, then the channel before its split.
    pub(super) fn scratch_len(&self) -> usize {
        self.split_len + self.unsplit_len
    }

    /// Per tap (row-major), its offset in the split channel from the first column of its
    /// output row's first padded row: its row, its phase, its column within the phase.
    pub(super) fn taps(&self, g: &Conv2dGeometry) -> Vec<usize> {
        let ([kh, kw], sx) = (g.kernel, g.stride[1]);
        let (phase, row_stride) = (self.phase_width, sx * self.phase_width);
        (0..kh).flat_map(|ky| (0..kw).map(move |kx| ky * row_stride + (kx % sx) * phase + kx / sx)).collect()
    }
}

/// One image: per channel, pad (and split), then per block of [`ROWS`] output rows and vector
/// of consecutive outputs of a row, each tap loads one vector per row and multiplies it with
/// the channel's weight.
///
/// # Safety
/// The CPU must have `V`'s features; `image`, `scratch`, `add` and `out` have the lengths
/// [`Conv2d::run_adding`] checks.
#[inline(always)]
pub(super) unsafe fn image<V: Vector>(
    conv: &Conv2d,
    image: &[f32],
    scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    let g = &conv.geometry;
    let ([kh, kw], [sy, sx]) = (g.kernel, g.stride);
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let outputs = out_h * out_w;
    let ScratchLayout::DepthwiseRows(layout) = conv.layout else { unreachable!("built with its layout") };
    let (split, unsplit) = scratch.split_at_mut(layout.split_len);
    let unsplit = &mut unsplit[..layout.unsplit_len];
    let row_stride = sx * layout.phase_width;
    // The furthest read: the last row of outputs (blocks are clamped to it), its last vector
    // from its first column on, the last tap.
    let taps = kh * kw;
    let reach =
        conv.taps.iter().max().map(|tap| tap + (out_h - 1) * sy * row_stride + out_w.div_ceil(V::LANES) * V::LANES);
    assert!(conv.taps.len() == taps && reach.is_some_and(|reach| reach <= split.len()));
    assert!(conv.packed.len() == g.in_channels * taps);
    assert!(image.len() == g.input_len() && out.len() == g.output_len());
    // SAFETY: V's features are the caller's promise (here and below).
    unsafe {
        zero::<V>(split);
        zero::<V>(unsplit);
    }
    let mut buffer = [0f32; MAX_TILE_OUTPUTS];
    for (c, (channel, weights)) in
        image.chunks_exact(g.in_height * g.in_width).zip(conv.packed.chunks_exact(taps)).enumerate()
    {
        unsafe { pad::<V>(g, &layout, channel, split, unsplit) };
        let bias = conv.bias[c];
        let from = split.as_ptr();
        for y0 in (0..out_h).step_by(ROWS) {
            for x0 in (0..out_w).step_by(V::LANES) {
                // SAFETY: V's features are the caller's promise; every read lies below `reach`
                // (rows clamped to the last output row).
                unsafe {
                    let mut acc = [V::splat(bias); ROWS];
                    let rows: [*const f32; ROWS] =
                        std::array::from_fn(|r| from.add((y0 + r).min(out_h - 1) * sy * row_stride + x0));
                    for (&w, &tap) in weights.iter().zip(&conv.taps) {
                        let weight = V::splat(w);
                        for (lane, row) in acc.iter_mut().zip(rows) {
                            *lane = V::mul_add(*lane, weight, V::load(row.add(tap)));
                        }
                    }
                    let n = (out_w - x0).min(V::LANES);
                    for (r, lane) in acc.iter().enumerate().take(out_h - y0) {
                        let at = c * outputs + (y0 + r) * out_w + x0;
                        let add = add.map(|add| &add[at..][..n]);
                        store::<V, 1>(&[*lane], add, conv.relu, &mut out[at..][..n], &mut buffer);
                    }
                }
            }
        }
    }
}

/// Copy one channel into the padded, split buffer (`split`, zero where nothing is copied):
/// without a stride, its rows straight into place; with one, into `unsplit` first (zero
/// padding around the image), then each row split into its phases in whole vectors (the
/// values past a phase's end land on the next phase or row, written next; the last row's in
/// the slack).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn pad<V: Vector>(g: &Conv2dGeometry, layout: &Layout, channel: &[f32], split: &mut [f32], unsplit: &mut [f32]) {
    let ([top, left], [_, sx], w) = (g.pad_before, g.stride, g.in_width);
    // The image's columns and rows the taps read.
    let columns = w.min(layout.columns.saturating_sub(left));
    let (row_len, target) = if sx == 1 { (layout.phase_width, &mut *split) } else { (layout.columns, &mut *unsplit) };
    for (y, row) in channel.chunks_exact(w).enumerate().take(layout.rows.saturating_sub(top)) {
        // SAFETY: V's features are the caller's promise.
        unsafe { copy::<V>(&mut target[(y + top) * row_len + left..][..columns], &row[..columns]) };
    }
    if sx == 1 {
        return;
    }
    let phase = layout.phase_width;
    if sx == 2 {
        // Each row's even and odd columns, the two phases of a stride of 2, in whole vectors
        // (the values past a phase land on the next phase or row, written next; the last
        // row's in the slack `split` and `unsplit` hold, `Layout`).
        let wide = phase.div_ceil(V::LANES) * V::LANES;
        for r in 0..layout.rows {
            let from = &unsplit[r * layout.columns..];
            for p in 0..2 {
                // SAFETY: as above.
                unsafe { copy_even::<V>(&mut split[(2 * r + p) * phase..][..wide], &from[p..][..2 * wide]) };
            }
        }
        return;
    }
    for r in 0..layout.rows {
        let from = &unsplit[r * layout.columns..];
        for p in 0..sx {
            for (x, value) in split[(r * sx + p) * phase..][..phase].iter_mut().enumerate() {
                *value = from[x * sx + p];
            }
        }
    }
}
