//! Winograd's F(2x2, 3x3) for dense 3x3 convolutions of stride 1 (ResNet's, which are most of
//! its multiply-adds): 16 multiply-adds per input channel for each 2x2 block of outputs where
//! the definition takes 36.
//!
//! Per image, each input channel's 4x4 patches (overlapping by 2, one per 2x2 block of
//! outputs: a *tile*) are transformed to `V = Bt d B` (additions only); the weights were
//! transformed once, when packed, to `U = G g Gt`. Each of the 16 *points* of a tile is then a
//! matrix product over the input channels, `M[p][k][t] = sum_c U[p][k][c] * V[p][c][t]`, run
//! with the direct kernel's tile of output channels by vectors of consecutive tiles (a vector
//! loaded per input channel, multiplied with a weight of each output channel). A tile's
//! outputs are `Y = At M A` (additions only), computed as soon as the 16 points of a tile of
//! output channels are, and stored with the bias, the values to add and the ReLU.
//!
//! The transforms (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//!
//! ```text
//!      | 1  0 -1  0 |        | 1    0    0  |
//! Bt = | 0  1  1  0 |    G = | 1/2  1/2  1/2 |    At = | 1  1  1  0 |
//!      | 0 -1  1  0 |        | 1/2 -1/2  1/2 |         | 0  1 -1 -1 |
//!      | 0  1  0 -1 |        | 0    0    1  |
//! ```
//!
//! Rounding: the transformed weights are computed in f64, the rest in f32 with coefficients 1
//! and 1/2; the result differs from the definition's by a few units in the last place of its
//! largest partial sums (the tests' bound is the direct kernel's).

use super::{Conv2d, Conv2dGeometry, MAX_TILE_OUTPUTS, Vector, copy, copy_even, finish, zero};

/// Values of a transformed tile (4 x 4).
const POINTS: usize = 16;

/// Whether F(2x2, 3x3) computes `geometry` (dense; the caller checks that).
pub(super) fn applies(geometry: &Conv2dGeometry) -> bool {
    geometry.kernel == [3, 3] && geometry.stride == [1, 1]
}

/// Where one image's values lie in the scratch buffer, and the tiles' arrangement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Tiles per row of the output (its width, halved and rounded up).
    tiles_wide: usize,
    /// Rows of tiles.
    tiles_high: usize,
    /// Columns of each phase (even, odd) of a zero-padded row: the padded row has two per
    /// tile and two more for the last tile's reach.
    phase_width: usize,
    /// Values of one padded channel: two rows per row of tiles and two more, each its even
    /// columns then its odd ones.
    padded_channel: usize,
    /// Values of the padded image: its channels, and slack that whole-vector reads and writes
    /// of the last row run into.
    padded_len: usize,
    /// Values between one point of a block's transformed tiles and the next: `x_block` tiles
    /// of each input channel, and a vector of slack that the last channel's lanes past the
    /// block are written into.
    point_stride: usize,
}

impl Layout {
    /// The layout of `geometry` for a kernel whose tiles hold `x_block` tiles of a channel.
    pub(super) fn new(geometry: &Conv2dGeometry, x_block: usize) -> Layout {
        let tiles_wide = geometry.out_width().div_ceil(2);
        let tiles_high = geometry.out_height().div_ceil(2);
        let phase_width = tiles_wide + 1;
        let padded_channel = (2 * tiles_high + 2) * 2 * phase_width;
        Layout {
            tiles_wide,
            tiles_high,
            phase_width,
            padded_channel,
            padded_len: geometry.in_channels * padded_channel + 2 * MAX_TILE_OUTPUTS,
            point_stride: geometry.in_channels * x_block + MAX_TILE_OUTPUTS,
        }
    }

    /// Tiles of one channel.
    fn tiles(&self) -> usize {
        self.tiles_wide * self.tiles_high
    }

    /// Values of one zero-padded channel before its rows are split into their phases (its
    /// rows as wide as both phases), and the slack of a split in whole vectors.
    fn unsplit_len(&self) -> usize {
        self.padded_channel + 2 * MAX_TILE_OUTPUTS + 1
    }

    /// Values of the scratch buffer: the padded image, one block's transformed tiles, the 16
    /// points of one tile of output channels (`channels x x_block`), two rows of its outputs
    /// and one padded channel before its split.
    pub(super) fn scratch_len(&self, channels: usize, x_block: usize) -> usize {
        self.padded_len + POINTS * self.point_stride + POINTS * channels * x_block + 4 * x_block + self.unsplit_len()
    }
}

/// `[blocks][point][in_channels][block]`: the transformed weights `G g Gt` of each output
/// channel and input channel, zero beyond `out_channels`, the points of a tile of `block`
/// output channels together (the order the kernel reads them).
pub(super) fn pack(geometry: &Conv2dGeometry, weights: &[f32], block: usize) -> Vec<f32> {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let (inputs, outputs) = (geometry.in_channels, geometry.out_channels);
    let blocks = outputs.div_ceil(block);
    let mut packed = vec![0f32; blocks * POINTS * inputs * block];
    for (k, filters) in weights.chunks_exact(inputs * 9).enumerate() {
        let (b, lane) = (k / block, k % block);
        for (c, g) in filters.chunks_exact(9).enumerate() {
            // `G g`, 4 x 3, then `(G g) Gt`, 4 x 4.
            let mut left = [[0f64; 3]; 4];
            for (i, row) in left.iter_mut().enumerate() {
                for (j, value) in row.iter_mut().enumerate() {
                    *value = (0..3).map(|m| G[i][m] * g[m * 3 + j] as f64).sum();
                }
            }
            for (i, row) in left.iter().enumerate() {
                for (j, gj) in G.iter().enumerate() {
                    let u: f64 = (0..3).map(|m| row[m] * gj[m]).sum();
                    packed[((b * POINTS + i * 4 + j) * inputs + c) * block + lane] = u as f32;
                }
            }
        }
    }
    packed
}

/// One image: transform its input, then per tile of `CO` output channels by `XV` vectors of
/// consecutive tiles, the 16 points' products over the input channels, then their outputs.
///
/// # Safety
/// The CPU must have `V`'s features; `image`, `scratch`, `add` and `out` have the lengths
/// [`Conv2d::run_adding`] checks.
#[inline(always)]
pub(super) unsafe fn image<V: Vector, const CO: usize, const XV: usize>(
    conv: &Conv2d,
    image: &[f32],
    scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    const { assert!(XV * V::LANES <= MAX_TILE_OUTPUTS) };
    let x_block = XV * V::LANES;
    let g = &conv.geometry;
    let layout = Layout::new(g, x_block);
    assert!(x_block == conv.tile.outputs && CO == conv.tile.channels);
    assert!(scratch.len() >= layout.scratch_len(CO, x_block));
    let (padded, rest) = scratch.split_at_mut(layout.padded_len);
    let (transformed, rest) = rest.split_at_mut(POINTS * layout.point_stride);
    let (points, rest) = rest.split_at_mut(POINTS * CO * x_block);
    let (rows, unsplit) = rest.split_at_mut(4 * x_block);
    // SAFETY: V's features are the caller's promise.
    unsafe { pad::<V>(g, &layout, image, &mut unsplit[..layout.unsplit_len()], padded) };
    let tiles = layout.tiles();
    let outputs = g.out_height() * g.out_width();
    let (inputs, stride) = (g.in_channels, layout.point_stride);
    let v = transformed.as_ptr();
    let m = points.as_mut_ptr();
    for t0 in (0..tiles).step_by(x_block) {
        let block = t0..(t0 + x_block).min(tiles);
        // SAFETY: V's features are the caller's promise.
        unsafe { transform::<V>(g, &layout, padded, block.clone(), x_block, transformed) };
        for (b, (weights, bias)) in
            conv.packed.chunks_exact(POINTS * inputs * CO).zip(conv.bias.chunks_exact(CO)).enumerate()
        {
            for (p, weights) in weights.chunks_exact(inputs * CO).enumerate() {
                // SAFETY: V's features are the caller's promise; the reads stay within the
                // transformed tiles (`x_block` of each channel, `p < 16`) and the writes within
                // the points (`p < 16`, `c < CO`).
                unsafe {
                    let mut acc: [[V; XV]; CO] = [[V::splat(0.0); XV]; CO];
                    let src = v.add(p * stride);
                    for (c, w) in weights.chunks_exact(CO).enumerate() {
                        let src = src.add(c * x_block);
                        let mut values = [V::splat(0.0); XV];
                        for (j, value) in values.iter_mut().enumerate() {
                            *value = V::load(src.add(j * V::LANES));
                        }
                        for (lanes, &w) in acc.iter_mut().zip(w) {
                            let weight = V::splat(w);
                            for (lane, value) in lanes.iter_mut().zip(&values) {
                                *lane = V::mul_add(*lane, weight, *value);
                            }
                        }
                    }
                    for (co, lanes) in acc.iter().enumerate() {
                        for (j, lane) in lanes.iter().enumerate() {
                            lane.store(m.add((p * CO + co) * x_block + j * V::LANES));
                        }
                    }
                }
            }
            let channels = (g.out_channels - b * CO).min(CO);
            for (co, &bias) in bias.iter().enumerate().take(channels) {
                let (top, bottom) = rows.split_at_mut(2 * x_block);
                for j in 0..XV {
                    // SAFETY: as above; the rows hold `2 * x_block` values each.
                    unsafe {
                        let point = |p: usize| V::load(m.add((p * CO + co) * x_block + j * V::LANES));
                        let [y00, y01, y10, y11] = transform_output(point, V::splat(bias));
                        let (a, b) = V::interleave(y00, y01);
                        a.store(top.as_mut_ptr().add(2 * j * V::LANES));
                        b.store(top.as_mut_ptr().add((2 * j + 1) * V::LANES));
                        let (a, b) = V::interleave(y10, y11);
                        a.store(bottom.as_mut_ptr().add(2 * j * V::LANES));
                        b.store(bottom.as_mut_ptr().add((2 * j + 1) * V::LANES));
                    }
                }
                let channel = (b * CO + co) * outputs;
                let add = add.map(|add| &add[channel..][..outputs]);
                let out = &mut out[channel..][..outputs];
                // SAFETY: V's features are the caller's promise.
                unsafe { store_tiles::<V>(g, &layout, block.clone(), [top, bottom], add, conv.relu, out) };
            }
        }
    }
}

/// `Y = At M A` of a vector of tiles, plus `bias`: `point(p)` is point `p` (row-major 4 x 4)
/// of `M`; the result is the outputs `[y00, y01, y10, y11]` of each tile (row, column).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform_output<V: Vector>(point: impl Fn(usize) -> V, bias: V) -> [V; 4] {
    // SAFETY: V's features are the caller's promise.
    unsafe {
        // `At M`: two rows of four.
        let mut upper = [V::splat(0.0); 4];
        let mut lower = [V::splat(0.0); 4];
        for (j, (u, l)) in upper.iter_mut().zip(&mut lower).enumerate() {
            let (m0, m1, m2, m3) = (point(j), point(4 + j), point(8 + j), point(12 + j));
            *u = V::add(V::add(m0, m1), m2);
            *l = V::sub(V::sub(m1, m2), m3);
        }
        // `(At M) A`.
        let [u0, u1, u2, u3] = upper;
        let [l0, l1, l2, l3] = lower;
        [
            V::add(V::add(V::add(u0, u1), u2), bias),
            V::add(V::sub(V::sub(u1, u2), u3), bias),
            V::add(V::add(V::add(l0, l1), l2), bias),
            V::add(V::sub(V::sub(l1, l2), l3), bias),
        ]
    }
}

/// Copy `image` into `padded`, each channel zero-padded (`[channel][padded rows][phase]
/// [phase_width]`, the rows and columns past the image's padding zero too) and each row split
/// into its even and odd columns, so that the transform reads each column of a vector of
/// tiles with one load. Each channel is padded whole in `unsplit` first, then its rows split
/// in whole vectors (a row read right after it was written, at other offsets, would wait for
/// the stores to complete); the values written past a row's phase are overwritten by the next
/// phase or row, the last row's land in the slack.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn pad<V: Vector>(g: &Conv2dGeometry, layout: &Layout, image: &[f32], unsplit: &mut [f32], padded: &mut [f32]) {
    let ([top, left], (h, w)) = (g.pad_before, (g.in_height, g.in_width));
    let phase = layout.phase_width;
    let wide = phase.div_ceil(V::LANES) * V::LANES;
    let rows = 2 * layout.tiles_high + 2;
    assert!(rows >= h + top && 2 * phase >= w + left && unsplit.len() > (rows - 1) * 2 * phase + 2 * wide);
    assert!(padded.len() >= g.in_channels * layout.padded_channel + wide);
    // SAFETY: V's features are the caller's promise (here and below).
    // The padding stays zero, each channel overwrites the image.
    unsafe { zero::<V>(unsplit) };
    for (channel, padded) in image.chunks_exact(h * w).zip(padded.chunks_mut(layout.padded_channel)) {
        for (y, row) in channel.chunks_exact(w).enumerate() {
            unsafe { copy::<V>(&mut unsplit[(y + top) * 2 * phase + left..][..w], row) };
        }
        let to = padded.as_mut_ptr();
        for r in 0..rows {
            let from = &unsplit[r * 2 * phase..];
            // SAFETY: `to` points into `padded` (whose slack past the last channel holds the
            // last row's `wide - phase` values past its odd phase; the others land on the next
            // phase or row, written next).
            unsafe {
                let even = std::slice::from_raw_parts_mut(to.add(r * 2 * phase), wide);
                copy_even::<V>(even, &from[..2 * wide]);
                let odd = std::slice::from_raw_parts_mut(to.add(r * 2 * phase + phase), wide);
                copy_even::<V>(odd, &from[1..][..2 * wide]);
            }
        }
    }
}

/// Transform the tiles `tiles` of each channel of the padded image into `transformed`
/// (`[point][channel][x_block]`, points `point_stride` apart): a vector of consecutive tiles
/// of a row at a time, the four columns of each patch row loaded from the row's even and odd
/// columns. The lanes past a row of tiles (or the block) hold values of the next tiles
/// or of nothing; the next ones' stores overwrite them, the last channel's land in the slack.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform<V: Vector>(
    g: &Conv2dGeometry,
    layout: &Layout,
    padded: &[f32],
    tiles: std::ops::Range<usize>,
    x_block: usize,
    transformed: &mut [f32],
) {
    let (phase, stride, channels) = (layout.phase_width, layout.point_stride, g.in_channels);
    // The reads of a vector from tile (ty, tx) on: rows `2 * ty + i` (i < 4) of its channel,
    // columns `tx` to `tx + lanes` of each phase, within the padded image and its slack.
    let last_read = channels * layout.padded_channel + layout.tiles_wide + V::LANES;
    assert!(last_read <= padded.len() && tiles.end <= layout.tiles() && tiles.len() <= x_block);
    assert!(transformed.len() >= POINTS * stride && channels * x_block + V::LANES <= stride);
    let (from, to) = (padded.as_ptr(), transformed.as_mut_ptr());
    for c in 0..channels {
        let mut t = tiles.start;
        while t < tiles.end {
            let (ty, tx) = (t / layout.tiles_wide, t % layout.tiles_wide);
            let run = (layout.tiles_wide - tx).min(tiles.end - t);
            for first in (0..run).step_by(V::LANES) {
                // SAFETY: V's features are the caller's promise; reads below `last_read`, writes
                // at `point * stride + c * x_block` plus less than `x_block + lanes` (the
                // assertions above).
                unsafe {
                    // `d B`, by columns: column `j` holds combination `j` of each patch row.
                    let mut columns = [[V::splat(0.0); 4]; 4];
                    for i in 0..4 {
                        let even = from.add(c * layout.padded_channel + (2 * ty + i) * 2 * phase + tx + first);
                        let odd = even.add(phase);
                        let (d0, d1, d2, d3) = (V::load(even), V::load(odd), V::load(even.add(1)), V::load(odd.add(1)));
                        let row = [V::sub(d0, d2), V::add(d1, d2), V::sub(d2, d1), V::sub(d1, d3)];
                        for (column, value) in columns.iter_mut().zip(row) {
                            column[i] = value;
                        }
                    }
                    // `Bt (d B)`, stored point by point.
                    let at = c * x_block + t - tiles.start + first;
                    for (j, &[r0, r1, r2, r3]) in columns.iter().enumerate() {
                        let column = [V::sub(r0, r2), V::add(r1, r2), V::sub(r2, r1), V::sub(r1, r3)];
                        for (i, value) in column.into_iter().enumerate() {
                            value.store(to.add((i * 4 + j) * stride + at));
                        }
                    }
                }
            }
            t += run;
        }
    }
}

/// Store the outputs of the tiles `tiles` of one channel: `rows` hold their two rows (top,
/// bottom), two values per tile, interleaved; each run of tiles within one row of tiles is a run
/// of the output's row (cut at its width and height), written with `add` and the ReLU.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn store_tiles<V: Vector>(
    g: &Conv2dGeometry,
    layout: &Layout,
    tiles: std::ops::Range<usize>,
    rows: [&[f32]; 2],
    add: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
) {
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let mut t = tiles.start;
    while t < tiles.end {
        let (ty, tx) = (t / layout.tiles_wide, t % layout.tiles_wide);
        let run = (layout.tiles_wide - tx).min(tiles.end - t);
        let from = 2 * (t - tiles.start);
        let columns = (2 * (tx + run)).min(out_w) - 2 * tx;
        for (dy, src) in rows.into_iter().enumerate() {
            let y = 2 * ty + dy;
            if y < out_h {
                let at = y * out_w + 2 * tx;
                let add = add.map(|add| &add[at..][..columns]);
                // SAFETY: V's features are the caller's promise.
                unsafe { finish::<V>(&src[from..][..columns], add, relu, &mut out[at..][..columns]) };
            }
        }
        t += run;
    }
}
