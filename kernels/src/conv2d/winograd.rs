//! Winograd's minimal filtering for dense 3x3 convolutions of stride 1 (ResNet's, which are
//! most of its multiply-adds), in two sizes: F(2x2, 3x3), 16 multiply-adds per input channel
//! for each 2x2 block of outputs where the definition takes 36, and F(4x4, 3x3), 36 for each
//! 4x4 block where it takes 144 (larger transforms, and a few times F(2x2)'s rounding).
//!
//! Per image, each input channel's `N x N` patches (`N = M + 2` for `M x M` outputs,
//! overlapping by 2: a *tile*) are transformed to `V = Bt d B`; the weights were transformed
//! once, when packed, to `U = G g Gt`. Each of the `N * N` *points* of a tile is then a
//! matrix product over the input channels, `M[p][k][t] = sum_c U[p][k][c] * V[p][c][t]`, run
//! with the direct kernel's tile of output channels by vectors of consecutive tiles (a vector
//! loaded per input channel, multiplied with a weight of each output channel). Consecutive
//! tiles run across the ends of rows of tiles: the padded input is stored so that each patch
//! value of a vector of tiles is one load ([`Layout`]), however narrow the output. A tile's
//! outputs are `Y = At M A`, computed as soon as the points of a tile of output channels are,
//! and stored with the bias, the values to add and the ReLU.
//!
//! The transforms (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//! F(2x2, 3x3), additions only:
//!
//! ```text
//!      | 1  0 -1  0 |        | 1    0    0  |
//! Bt = | 0  1  1  0 |    G = | 1/2  1/2  1/2 |    At = | 1  1  1  0 |
//!      | 0 -1  1  0 |        | 1/2 -1/2  1/2 |         | 0  1 -1 -1 |
//!      | 0  1  0 -1 |        | 0    0    1  |
//! ```
//!
//! F(4x4, 3x3):
//!
//! ```text
//!      | 4  0 -5  0  1  0 |        |  1/4    0     0   |
//!      | 0 -4 -4  1  1  0 |        | -1/6  -1/6  -1/6  |         | 1  1  1  1  1  0 |
//! Bt = | 0  4 -4 -1  1  0 |    G = | -1/6   1/6  -1/6  |    At = | 0  1 -1  2 -2  0 |
//!      | 0 -2 -1  2  1  0 |        |  1/24  1/12  1/6  |         | 0  1  1  4  4  0 |
//!      | 0  2 -1 -2  1  0 |        |  1/24 -1/12  1/6  |         | 0  1 -1  8 -8  1 |
//!      | 0  4  0 -5  0  1 |        |  0     0     1    |
//! ```
//!
//! Rounding: the transformed weights are computed in f64, the rest in f32; F(2x2)'s result
//! differs from the definition's by a few units in the last place of its largest partial
//! sums, F(4x4)'s by up to about ten times that (its transforms multiply by up to 8; the
//! tests' bounds say how much).

use super::{
    Conv2d, Conv2dGeometry, MAX_TILE_OUTPUTS, ScratchLayout, Vector, accumulate, copy, copy_even, finish, opaque, zero,
};

/// Whether Winograd's computes `geometry` (dense; the caller checks that).
pub(super) fn applies(geometry: &Conv2dGeometry) -> bool {
    geometry.kernel == [3, 3] && geometry.stride == [1, 1]
}

/// Whether F(4x4, 3x3) takes fewer matrix products than F(2x2, 3x3) for `geometry` with
/// vectors of `x_block` tiles: `ceil(tiles / x_block)` vectors of 36 points each, against 16
/// points each (an 8x8 output is 16 2x2 tiles, a vector on AVX-512, but 4 4x4 ones: a
/// quarter of a vector).
pub(super) fn four_by_four_is_fewer(geometry: &Conv2dGeometry, x_block: usize) -> bool {
    let vectors = |m: usize| (geometry.out_height().div_ceil(m) * geometry.out_width().div_ceil(m)).div_ceil(x_block);
    vectors(4) * 36 < vectors(2) * 16
}

/// Where one image's values lie in the scratch buffer, and the tiles' arrangement, for tiles
/// of `m x m` outputs.
///
/// Each padded channel is stored as `m * (m + 2)` *components*: component `(r, j)` holds, at
/// row `y` and column `x`, the padded channel's value at row `m * y + r`, column `m * x + j`,
/// with rows exactly as wide as a row of tiles. Value `(i, j)` of the patch of tile
/// `t = ty * tiles_wide + tx` is then component `(i % m, j)` at `t + (i / m) * tiles_wide`:
/// consecutive tiles are consecutive values across the ends of rows of tiles, so a vector of
/// tiles is one load however narrow the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Outputs per tile side (2 or 4).
    m: usize,
    /// Tiles per row of the output (its width over `m`, rounded up).
    tiles_wide: usize,
    /// Rows of tiles.
    tiles_high: usize,
    /// Values of one component: a row more than there are rows of tiles (the patches' last two
    /// rows reach into the next row of tiles), and slack that the reads of a block's last
    /// vectors and the writes of whole vectors run into.
    component_len: usize,
    /// Values of one padded channel: its `m * (m + 2)` components.
    padded_channel: usize,
    /// Values of the padded image: its channels.
    padded_len: usize,
    /// Values of one zero-padded channel before its split (rows of [`Layout::unsplit_width`]),
    /// and the slack of a split in whole vectors (from up to `m + 2` values into a row, `m`
    /// vectors).
    unsplit_len: usize,
    /// Values between one point of a block's transformed tiles and the next: `x_block` tiles
    /// of each input channel, and a vector of slack that the last channel's lanes past the
    /// block are written into.
    point_stride: usize,
}

impl Layout {
    /// The layout of `geometry` for a kernel whose tiles hold `x_block` tiles (of `m x m`
    /// outputs) of a channel; none where a size overflows.
    pub(super) fn new(geometry: &Conv2dGeometry, x_block: usize, m: usize) -> Option<Layout> {
        assert!((m == 2 || m == 4) && x_block <= MAX_TILE_OUTPUTS);
        let tiles_wide = geometry.out_width().div_ceil(m);
        let tiles_high = geometry.out_height().div_ceil(m);
        let component_len = (tiles_high + 1).checked_mul(tiles_wide)?.checked_add(MAX_TILE_OUTPUTS)?;
        let padded_channel = (m * (m + 2)).checked_mul(component_len)?;
        let mut layout = Layout {
            m,
            tiles_wide,
            tiles_high,
            component_len,
            padded_channel,
            padded_len: geometry.in_channels.checked_mul(padded_channel)?,
            unsplit_len: 0,
            point_stride: geometry.in_channels.checked_mul(x_block)?.checked_add(MAX_TILE_OUTPUTS)?,
        };
        let unsplit = layout.padded_rows().checked_mul(layout.unsplit_width())?;
        layout.unsplit_len = unsplit.checked_add(4 * MAX_TILE_OUTPUTS + m + 2)?;
        Some(layout)
    }

    /// Tiles of one channel.
    fn tiles(&self) -> usize {
        self.tiles_wide * self.tiles_high
    }

    /// Points of a transformed tile.
    fn points(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }

    /// Rows of a padded channel: `m` per row of tiles and two more for the last tiles' reach.
    fn padded_rows(&self) -> usize {
        self.m * self.tiles_high + 2
    }

    /// Values of a padded row before its split: `m` per tile, and `m` more (at least the two
    /// the last tile reaches).
    fn unsplit_width(&self) -> usize {
        self.m * (self.tiles_wide + 1)
    }

    /// Values of the scratch buffer: the padded image, one block's transformed tiles, the
    /// points of one tile of output channels (`channels x x_block`), `m` rows of its outputs
    /// and one padded channel before its split; none where the sum overflows.
    pub(super) fn scratch_len(&self, channels: usize, x_block: usize) -> Option<usize> {
        let per_point = self.point_stride.checked_add(channels.checked_mul(x_block)?)?;
        self.padded_len
            .checked_add(self.points().checked_mul(per_point)?)?
            .checked_add(self.m * self.m * x_block)?
            .checked_add(self.unsplit_len)
    }
}

/// `[blocks][point][in_channels][block]`: the transformed weights `G g Gt` of each output
/// channel and input channel for tiles of `m x m` outputs, zero beyond `out_channels`, the
/// points of a tile of `block` output channels together (the order the kernel reads them).
pub(super) fn pack(geometry: &Conv2dGeometry, weights: &[f32], block: usize, m: usize) -> Vec<f32> {
    const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    const G4: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let g: &[[f64; 3]] = if m == 4 { &G4 } else { &G2 };
    let (n, inputs, outputs) = (g.len(), geometry.in_channels, geometry.out_channels);
    let points = n * n;
    let blocks = outputs.div_ceil(block);
    let mut packed = vec![0f32; blocks * points * inputs * block];
    for (k, filters) in weights.chunks_exact(inputs * 9).enumerate() {
        let (b, lane) = (k / block, k % block);
        for (c, w) in filters.chunks_exact(9).enumerate() {
            // `G w`, n x 3, then `(G w) Gt`, n x n.
            let left: Vec<[f64; 3]> =
                g.iter().map(|gi| std::array::from_fn(|j| (0..3).map(|k| gi[k] * w[k * 3 + j] as f64).sum())).collect();
            for (i, row) in left.iter().enumerate() {
                for (j, gj) in g.iter().enumerate() {
                    let u: f64 = (0..3).map(|k| row[k] * gj[k]).sum();
                    packed[((b * points + i * n + j) * inputs + c) * block + lane] = u as f32;
                }
            }
        }
    }
    packed
}

/// One image, in tiles of `M x M` outputs (`N = M + 2`): transform its input, then per tile of
/// `CO` output channels by `XV` vectors of consecutive tiles, the `N * N` points' products over
/// the input channels, then their outputs.
///
/// # Safety
/// The CPU must have `V`'s features; `image`, `scratch`, `add` and `out` have the lengths
/// [`Conv2d::run_adding`] checks.
#[inline(always)]
pub(super) unsafe fn image<V: Vector, const M: usize, const N: usize, const CO: usize, const XV: usize>(
    conv: &Conv2d,
    image: &[f32],
    scratch: &mut [f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    const { assert!(XV * V::LANES <= MAX_TILE_OUTPUTS && (M == 2 || M == 4) && N == M + 2) };
    let points_per_tile = N * N;
    let x_block = XV * V::LANES;
    let g = &conv.geometry;
    let ScratchLayout::Winograd(layout) = conv.layout else { unreachable!("built with its layout") };
    assert!(x_block == conv.tile.outputs && CO == conv.tile.channels && layout.m == M);
    assert!(scratch.len() >= conv.scratch_len);
    let (padded, rest) = scratch.split_at_mut(layout.padded_len);
    let (transformed, rest) = rest.split_at_mut(points_per_tile * layout.point_stride);
    let (points, rest) = rest.split_at_mut(points_per_tile * CO * x_block);
    let (rows, unsplit) = rest.split_at_mut(M * M * x_block);
    let unsplit = &mut unsplit[..layout.unsplit_len];
    // SAFETY: V's features are the caller's promise.
    unsafe { pad::<V, M, N>(g, &layout, image, unsplit, padded) };
    let tiles = layout.tiles();
    let outputs = g.out_height() * g.out_width();
    let (inputs, stride) = (g.in_channels, layout.point_stride);
    let v = transformed.as_ptr();
    let m = points.as_mut_ptr();
    for t0 in (0..tiles).step_by(x_block) {
        let block = t0..(t0 + x_block).min(tiles);
        // SAFETY: V's features are the caller's promise.
        unsafe { transform::<V, M, N>(g, &layout, padded, block.clone(), x_block, transformed) };
        for (b, (weights, bias)) in
            conv.packed.chunks_exact(points_per_tile * inputs * CO).zip(conv.bias.chunks_exact(CO)).enumerate()
        {
            for (p, weights) in weights.chunks_exact(inputs * CO).enumerate() {
                // SAFETY: V's features are the caller's promise; the reads stay within the
                // transformed tiles (`x_block` of each channel, `p < N * N`) and the writes
                // within the points (`p < N * N`, `c < CO`).
                unsafe {
                    let mut acc: [[V; XV]; CO] = [[V::splat(0.0); XV]; CO];
                    let src = v.add(p * stride);
                    accumulate::<V, CO, XV, false>(&mut acc, weights, (0..inputs).map(|c| src.add(c * x_block)));
                    for (co, lanes) in acc.iter().enumerate() {
                        for (j, lane) in lanes.iter().enumerate() {
                            lane.store(m.add((p * CO + co) * x_block + j * V::LANES));
                        }
                    }
                }
            }
            let channels = (g.out_channels - b * CO).min(CO);
            let row_len = M * x_block;
            for (co, &bias) in bias.iter().enumerate().take(channels) {
                for j in 0..XV {
                    // SAFETY: as above; `rows` holds `M` rows of `M * x_block` values.
                    unsafe {
                        let point = |p: usize| V::load(m.add((p * CO + co) * x_block + j * V::LANES));
                        let outputs = transform_output::<V, M, N>(point, V::splat(bias));
                        for (r, row) in outputs.into_iter().enumerate() {
                            for (k, value) in interleave::<V, M>(row).into_iter().enumerate() {
                                value.store(rows.as_mut_ptr().add(r * row_len + (M * j + k) * V::LANES));
                            }
                        }
                    }
                }
                let channel = (b * CO + co) * outputs;
                let add = add.map(|add| &add[channel..][..outputs]);
                let out = &mut out[channel..][..outputs];
                // SAFETY: V's features are the caller's promise.
                unsafe { store_tiles::<V, M>(g, &layout, block.clone(), &rows[..M * row_len], add, conv.relu, out) };
            }
        }
    }
}

/// `Bt x` for a column (or row) `x` of a patch: F(2x2)'s (`N == 4`) or F(4x4)'s (`N == 6`).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform_input<V: Vector, const N: usize>(d: [V; N]) -> [V; N] {
    let mut out = d;
    // SAFETY: V's features are the caller's promise.
    unsafe {
        if N == 4 {
            out[0] = V::sub(d[0], d[2]);
            out[1] = V::add(d[1], d[2]);
            out[2] = V::sub(d[2], d[1]);
            out[3] = V::sub(d[1], d[3]);
        } else {
            let (four, minus_four, minus_five) = (V::splat(4.0), V::splat(-4.0), V::splat(-5.0));
            let a = V::mul_add(d[4], minus_four, d[2]); // d4 - 4 d2
            let b = V::mul_add(d[3], minus_four, d[1]); // d3 - 4 d1
            let c = V::sub(d[4], d[2]);
            let e = V::sub(d[3], d[1]);
            let e = V::add(e, e); // 2 (d3 - d1)
            out[0] = V::mul_add(V::mul_add(d[4], minus_five, d[2]), four, d[0]);
            out[1] = V::add(a, b);
            out[2] = V::sub(a, b);
            out[3] = V::add(c, e);
            out[4] = V::sub(c, e);
            out[5] = V::mul_add(V::mul_add(d[5], minus_five, d[3]), four, d[1]);
        }
    }
    out
}

/// `At x` for a column (or row) `x` of the points: F(2x2)'s (`M == 2`) or F(4x4)'s.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform_points<V: Vector, const M: usize, const N: usize>(x: [V; N]) -> [V; M] {
    let mut out = [x[0]; M];
    // SAFETY: V's features are the caller's promise.
    unsafe {
        let (s12, d12) = (V::add(x[1], x[2]), V::sub(x[1], x[2]));
        if M == 2 {
            out[0] = V::add(x[0], s12);
            out[1] = V::sub(d12, x[3]);
        } else {
            let (s34, d34) = (V::add(x[3], x[4]), V::sub(x[3], x[4]));
            out[0] = V::add(V::add(x[0], s12), s34);
            out[1] = V::mul_add(d12, d34, V::splat(2.0));
            out[2] = V::mul_add(s12, s34, V::splat(4.0));
            out[3] = V::add(V::mul_add(d12, d34, V::splat(8.0)), x[5]);
        }
    }
    out
}

/// `Y = At M A` of a vector of tiles, plus `bias`: `point(p)` is point `p` (row-major `N x
/// N`) of `M`; the result is each tile's outputs, row by row (`[row][column]`).
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform_output<V: Vector, const M: usize, const N: usize>(
    point: impl Fn(usize) -> V,
    bias: V,
) -> [[V; M]; M] {
    // SAFETY: V's features are the caller's promise.
    unsafe {
        // `At M`: M rows of N, column by column.
        let mut left = [[bias; N]; M];
        for j in 0..N {
            let mut column = [bias; N];
            for (i, value) in column.iter_mut().enumerate() {
                *value = point(i * N + j);
            }
            for (row, value) in left.iter_mut().zip(transform_points::<V, M, N>(column)) {
                row[j] = value;
            }
        }
        // `(At M) A`, plus the bias.
        let mut out = [[bias; M]; M];
        for (row, left) in out.iter_mut().zip(left) {
            for (y, value) in row.iter_mut().zip(transform_points::<V, M, N>(left)) {
                *y = V::add(value, bias);
            }
        }
        out
    }
}

/// The lanes of `y` (one output column per vector, a tile per lane) as `M` vectors of
/// consecutive outputs: `y[0][0] y[1][0] .. y[M-1][0] y[0][1] ..`.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn interleave<V: Vector, const M: usize>(y: [V; M]) -> [V; M] {
    let mut out = y;
    // SAFETY: V's features are the caller's promise.
    unsafe {
        if M == 2 {
            (out[0], out[1]) = V::interleave(y[0], y[1]);
        } else {
            // Columns 0 and 2, 1 and 3 in pairs, then the pairs: four values per tile.
            let (a0, a1) = V::interleave(y[0], y[2]);
            let (b0, b1) = V::interleave(y[1], y[3]);
            (out[0], out[1]) = V::interleave(a0, b0);
            (out[2], out[3]) = V::interleave(a1, b1);
        }
    }
    out
}

/// Copy `image` into `padded`, each channel zero-padded (the rows and columns past the
/// image's padding zero too) and stored as its components ([`Layout`]), so that the transform
/// reads each value of the patches of a vector of tiles with one load. Each channel is padded
/// whole in `unsplit` first, then each row split into its components in whole vectors (a row
/// read right after it was written, at other offsets, would wait for the stores to complete).
/// The values written past a component's row land on its next row, written after, or in its
/// slack.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn pad<V: Vector, const M: usize, const N: usize>(
    g: &Conv2dGeometry,
    layout: &Layout,
    image: &[f32],
    unsplit: &mut [f32],
    padded: &mut [f32],
) {
    let ([top, left], (h, w)) = (g.pad_before, (g.in_height, g.in_width));
    let (tiles_wide, component) = (layout.tiles_wide, layout.component_len);
    let width = layout.unsplit_width();
    let wide = tiles_wide.div_ceil(V::LANES) * V::LANES;
    let rows = layout.padded_rows();
    // The reads of a row: `M * wide` values from its start, and `N` more for the components of
    // the patches' last columns; the writes of a component's row: `wide` values from
    // `(row / M) * tiles_wide`, within its `(tiles_high + 1) * tiles_wide` values and slack.
    assert!(rows >= h + top && width >= w + left && unsplit.len() >= (rows - 1) * width + M * wide + N);
    assert!(rows <= M * (layout.tiles_high + 1) && layout.tiles_high * tiles_wide + wide <= component);
    assert!(padded.len() >= g.in_channels * layout.padded_channel && layout.padded_channel == M * N * component);
    // SAFETY: V's features are the caller's promise (here and below).
    // The padding stays zero, each channel overwrites the image.
    unsafe { zero::<V>(unsplit) };
    for (channel, padded) in image.chunks_exact(h * w).zip(padded.chunks_exact_mut(layout.padded_channel)) {
        for (y, row) in channel.chunks_exact(w).enumerate() {
            unsafe { copy::<V>(&mut unsplit[(y + top) * width + left..][..w], row) };
        }
        for r in 0..rows {
            let from = &unsplit[r * width..][..M * wide + N];
            // Component `(r % M, j)`'s row `r / M`.
            let at = |j: usize| (r % M * N + j) * component + r / M * tiles_wide;
            if M == 2 {
                // Columns `2x + j`: the even or odd ones from column `j` on.
                for j in 0..N {
                    unsafe { copy_even::<V>(&mut padded[at(j)..][..wide], &from[j..][..2 * wide]) };
                }
                continue;
            }
            let to = padded.as_mut_ptr();
            // SAFETY: the writes of `wide` values from `at(j)` lie within `padded` (the
            // assertions above); the reads within `from`.
            unsafe {
                let from = from.as_ptr();
                for x in (0..wide).step_by(V::LANES) {
                    // Columns `4x` to `4x + 4 lanes` (and from `4x + 4` on for the last two
                    // components): their even and odd ones, then the evens' even and odd ones
                    // (components 0 and 2) and the odds' (1 and 3).
                    let split = |offset: usize| {
                        let v = |i: usize| V::load(from.add(4 * x + offset + i * V::LANES));
                        let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
                        let (even, odd) = ([V::even(v0, v1), V::even(v2, v3)], [V::odd(v0, v1), V::odd(v2, v3)]);
                        (even, odd)
                    };
                    let (even, odd) = split(0);
                    let (next_even, next_odd) = split(4);
                    let values = [
                        V::even(even[0], even[1]),
                        V::even(odd[0], odd[1]),
                        V::odd(even[0], even[1]),
                        V::odd(odd[0], odd[1]),
                        V::even(next_even[0], next_even[1]),
                        V::even(next_odd[0], next_odd[1]),
                    ];
                    for (j, value) in values.into_iter().enumerate() {
                        value.store(opaque(to.add(at(j) + x)));
                    }
                }
            }
        }
    }
}

/// Transform the tiles `tiles` of each channel of the padded image into `transformed`
/// (`[point][channel][x_block]`, points `point_stride` apart): a vector of consecutive tiles
/// at a time, each value of its patches one load from its component ([`Layout`]). The lanes
/// past the block hold values of the next tiles or of nothing; the next channel's stores
/// overwrite them, the last channel's land in the slack.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn transform<V: Vector, const M: usize, const N: usize>(
    g: &Conv2dGeometry,
    layout: &Layout,
    padded: &[f32],
    tiles: std::ops::Range<usize>,
    x_block: usize,
    transformed: &mut [f32],
) {
    let (stride, channels, component) = (layout.point_stride, g.in_channels, layout.component_len);
    // The reads of a vector from tile `t` on: `t + (i / M) * tiles_wide` (i < N) of each of
    // the channel's components, and the lanes of the block's last vector past it.
    let reach = tiles.start + x_block + layout.tiles_wide;
    assert!(tiles.end <= layout.tiles() && tiles.len() <= x_block && reach <= component);
    assert!(padded.len() >= channels * layout.padded_channel && layout.padded_channel == M * N * component);
    assert!(transformed.len() >= N * N * stride && channels * x_block + V::LANES <= stride);
    let (from, to) = (padded.as_ptr(), transformed.as_mut_ptr());
    for c in 0..channels {
        for first in (0..tiles.len()).step_by(V::LANES) {
            let t = tiles.start + first;
            // SAFETY: V's features are the caller's promise; reads within the channel's
            // components (`reach`), writes at `point * stride + c * x_block` plus less than
            // `x_block + lanes` (the assertions above).
            unsafe {
                // `d B`, by columns: column `j` holds combination `j` of each patch row.
                let mut columns = [[V::splat(0.0); N]; N];
                for i in 0..N {
                    let row =
                        from.add(c * layout.padded_channel + (i % M) * N * component + i / M * layout.tiles_wide + t);
                    let d: [V; N] = std::array::from_fn(|j| V::load(row.add(j * component)));
                    for (column, value) in columns.iter_mut().zip(transform_input::<V, N>(d)) {
                        column[i] = value;
                    }
                }
                // `Bt (d B)`, stored point by point.
                let at = c * x_block + first;
                for (j, &column) in columns.iter().enumerate() {
                    for (i, value) in transform_input::<V, N>(column).into_iter().enumerate() {
                        value.store(to.add((i * N + j) * stride + at));
                    }
                }
            }
        }
    }
}

/// Store the outputs of the tiles `tiles` of one channel: `rows` holds their `M` rows, each
/// `M` values per tile, the rows `rows.len() / M` apart; each run of tiles within one row of
/// tiles is a run of the output's row (cut at its width and height), written with `add` and
/// the ReLU.
///
/// # Safety
/// The CPU must have `V`'s features.
#[inline(always)]
unsafe fn store_tiles<V: Vector, const M: usize>(
    g: &Conv2dGeometry,
    layout: &Layout,
    tiles: std::ops::Range<usize>,
    rows: &[f32],
    add: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
) {
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let row_len = rows.len() / M;
    let mut t = tiles.start;
    while t < tiles.end {
        let (ty, tx) = (t / layout.tiles_wide, t % layout.tiles_wide);
        let run = (layout.tiles_wide - tx).min(tiles.end - t);
        let from = M * (t - tiles.start);
        let columns = (M * (tx + run)).min(out_w) - M * tx;
        for dy in 0..M {
            let y = M * ty + dy;
            if y < out_h {
                let at = y * out_w + M * tx;
                let add = add.map(|add| &add[at..][..columns]);
                let src = &rows[dy * row_len + from..][..columns];
                // SAFETY: V's features are the caller's promise.
                unsafe { finish::<V>(src, add, relu, &mut out[at..][..columns]) };
            }
        }
        t += run;
    }
}
