//! 2x2 max pooling with stride 2 and no padding, the pooling of the zoo's LeNets after each
//! convolution: `[planes, h, w]` in, `[planes, h / 2, w / 2]` out (a last odd row or column is
//! dropped, as ONNX `MaxPool` without padding does).

use crate::conv2d::Conv2dError;

/// Output height and width of a 2x2, stride-2 max pooling of `h x w` planes.
pub fn max_pool_2x2_shape(h: usize, w: usize) -> [usize; 2] {
    [h / 2, w / 2]
}

/// Max-pool `planes` planes of `h x w` values from `input` into `output` (`planes x h/2 x w/2`).
pub fn max_pool_2x2(planes: usize, h: usize, w: usize, input: &[f32], output: &mut [f32]) -> Result<(), Conv2dError> {
    let [oh, ow] = max_pool_2x2_shape(h, w);
    let length = |what, actual, expected| Conv2dError::Length { what, actual, expected };
    let (in_len, out_len) = (planes.saturating_mul(h).saturating_mul(w), planes.saturating_mul(oh).saturating_mul(ow));
    if input.len() != in_len {
        return Err(length("pooling input", input.len(), in_len));
    }
    if output.len() != out_len {
        return Err(length("pooling output", output.len(), out_len));
    }
    if oh == 0 || ow == 0 {
        return Ok(());
    }
    for (plane, out) in input.chunks_exact(h * w).zip(output.chunks_exact_mut(oh * ow)) {
        for (y, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let top = &plane[2 * y * w..][..2 * ow];
            let bottom = &plane[(2 * y + 1) * w..][..2 * ow];
            for ((o, t), b) in out_row.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                *o = t[0].max(t[1]).max(b[0].max(b[1]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_each_window_and_drops_an_odd_edge() {
        // Two 3x5 planes: windows (0..2, 0..2) and (0..2, 2..4); the last row and column drop.
        let input: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut out = vec![f32::NAN; 2 * 2];
        max_pool_2x2(2, 3, 5, &input, &mut out).unwrap();
        let window = |p: usize, y: usize, x: usize| {
            let at = |dy: usize, dx: usize| input[p * 15 + (2 * y + dy) * 5 + 2 * x + dx];
            at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
        };
        assert_eq!(out, vec![window(0, 0, 0), window(0, 0, 1), window(1, 0, 0), window(1, 0, 1)]);
        assert!(max_pool_2x2(2, 3, 5, &input[1..], &mut out).is_err());
        assert!(max_pool_2x2(2, 3, 5, &input, &mut out[1..]).is_err());
        let mut empty: Vec<f32> = Vec::new();
        max_pool_2x2(1, 1, 4, &input[..4], &mut empty).unwrap();
    }
}
