//! Preprocessing as in the reference: resize (bilinear), gray/RGB conversion, and scaling of
//! pixels to the model's normalisation (this project's own models: [-1, 1]).

use image::imageops::{FilterType, resize};
use image::{GrayImage, ImageBuffer, Luma};

use super::DataError;

/// Per-channel normalisation applied to pixels scaled to [0, 1]: `(p / 255 - mean) / std`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalisation {
    /// Mean per channel.
    pub mean: Vec<f32>,
    /// Standard deviation per channel.
    pub std: Vec<f32>,
}

impl Normalisation {
    /// This project's scaling to [-1, 1]: mean 0.5, std 0.5 on every channel.
    pub fn symmetric(channels: usize) -> Self {
        Self { mean: vec![0.5; channels], std: vec![0.5; channels] }
    }

    /// Check the values and broadcast a single value to `channels` channels.
    pub fn for_channels(&self, channels: usize) -> Result<Self, DataError> {
        let widen = |v: &[f32], what: &str| -> Result<Vec<f32>, DataError> {
            match v.len() {
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(DataError::Convert(format!("{what} has {n} values, the model has {channels} channels"))),
            }
        };
        let out = Self { mean: widen(&self.mean, "mean")?, std: widen(&self.std, "std")? };
        if out.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || out.mean.iter().any(|m| !m.is_finite()) {
            return Err(DataError::Convert(format!("std must be positive and finite, mean finite: {out:?}")));
        }
        Ok(out)
    }
}

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

/// Scale `u8` CHW images of `shape` (any number of them) to `f32` model input.
///
/// `norm` must have one value per channel (see [`Normalisation::for_channels`]).
pub fn to_model_input(pixels: &[u8], shape: [usize; 3], norm: &Normalisation) -> Vec<f32> {
    let plane = shape[1] * shape[2];
    let scale: Vec<(f32, f32)> =
        (0..shape[0]).map(|c| (1.0 / (255.0 * norm.std[c]), norm.mean[c] / norm.std[c])).collect();
    let mut out = Vec::with_capacity(pixels.len());
    for image in pixels.chunks_exact(shape[0] * plane) {
        for (c, channel) in image.chunks_exact(plane).enumerate() {
            let (a, b) = scale[c];
            out.extend(channel.iter().map(|&p| p as f32 * a - b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_scaling_maps_to_minus_one_one() {
        let x = to_model_input(&[0, 255, 51], [1, 1, 3], &Normalisation::symmetric(1));
        assert!((x[0] + 1.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
        // 51/255 = 0.2 -> (0.2 - 0.5) / 0.5 = -0.6
        assert!((x[2] + 0.6).abs() < 1e-6);
    }

    #[test]
    fn per_channel_normalisation() {
        let norm = Normalisation { mean: vec![0.0, 1.0], std: vec![1.0, 0.5] };
        let x = to_model_input(&[255, 255], [2, 1, 1], &norm);
        assert_eq!(x, vec![1.0, 0.0]);
    }

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

    #[test]
    fn broadcast_and_validate_normalisation() {
        let n = Normalisation { mean: vec![0.5], std: vec![0.25] }.for_channels(3).unwrap();
        assert_eq!(n.std, vec![0.25; 3]);
        assert!(Normalisation { mean: vec![0.5], std: vec![0.0] }.for_channels(1).is_err());
        assert!(Normalisation { mean: vec![0.5, 0.5], std: vec![1.0, 1.0] }.for_channels(3).is_err());
    }
}
