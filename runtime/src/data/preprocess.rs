//! Preprocessing as in the reference: resize (bilinear) and gray/RGB conversion. Scaling pixels
//! to a model's normalisation is part of the contract ([`mekd_contract::normalisation`]).

use image::imageops::{FilterType, resize};
use image::{GrayImage, ImageBuffer, Luma};

use super::DataError;

/// Convert one CHW `u8` image from shape `from` to shape `to` (channels, then bilinear resize).
pub fn convert_image(data: &[u8], from: [usize; 3], to: [usize; 3]) -> Result<Vec<u8>, DataError> {
    let [c, h, w] = from;
    if data.len() != c * h * w {
        return Err(DataError::Convert(format!("image has {} bytes, shape {from:?} needs {}", data.len(), c * h * w)));
    }
    let plane = h * w;
    let channels: Vec<Vec<u8>> = match (c, to[0]) {
        (a, b) if a == b => data.chunks_exact(plane).map(<[u8]>::to_vec).collect(),
        (1, 3) => vec![data.to_vec(); 3],
        (3, 1) => {
            // ITU-R 601-2 luma, exactly as PIL's `convert("L")`.
            let (r, g, b) = (&data[..plane], &data[plane..2 * plane], &data[2 * plane..]);
            vec![
                (0..plane)
                    .map(|i| ((r[i] as u32 * 19595 + g[i] as u32 * 38470 + b[i] as u32 * 7471 + 0x8000) >> 16) as u8)
                    .collect(),
            ]
        }
        (a, b) => return Err(DataError::Convert(format!("cannot convert {a}-channel images to {b} channels"))),
    };
    let (th, tw) = (to[1], to[2]);
    if th == 0 || tw == 0 {
        return Err(DataError::Convert(format!("target size {th}x{tw} is empty")));
    }
    let mut out = Vec::with_capacity(to[0] * th * tw);
    for ch in channels {
        if (th, tw) == (h, w) {
            out.extend(ch);
        } else {
            let img: GrayImage =
                ImageBuffer::<Luma<u8>, _>::from_raw(w as u32, h as u32, ch).expect("size checked above");
            out.extend(resize(&img, tw as u32, th as u32, FilterType::Triangle).into_raw());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_rgb_conversions() {
        // PIL: convert("L") of (255, 0, 0) is 76; of (0, 255, 0) is 150; of (0, 0, 255) is 29.
        let rgb = [255, 0, 0, 0, 255, 0, 0, 0, 255];
        assert_eq!(convert_image(&rgb, [3, 1, 3], [1, 1, 3]).unwrap(), vec![76, 150, 29]);
        assert_eq!(convert_image(&[9], [1, 1, 1], [3, 1, 1]).unwrap(), vec![9, 9, 9]);
        assert!(convert_image(&[1, 2], [2, 1, 1], [3, 1, 1]).is_err());
    }

    #[test]
    fn bilinear_upscale_of_constant_and_ramp() {
        let img = vec![100u8; 28 * 28];
        assert!(convert_image(&img, [1, 28, 28], [1, 32, 32]).unwrap().iter().all(|&p| p == 100));
        // 2x upscale of [0, 200] with half-pixel centres (PIL/torchvision): 0, 50, 150, 200.
        assert_eq!(convert_image(&[0, 200], [1, 1, 2], [1, 1, 4]).unwrap(), vec![0, 50, 150, 200]);
    }
}
