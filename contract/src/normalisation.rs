//! How `u8` pixels become model input: `(p / 255 - mean) / std` per channel, as the reference's
//! `ToTensor` + `Normalize` (this project's own models: mean 0.5, std 0.5, so [-1, 1]).

use std::path::Path;

/// Normalisation values that cannot apply to a model.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NormalisationError(String);

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

    /// The normalisation of the model at `model` with `channels` input channels: `given` (the
    /// user's --mean/--std) if any, else the model's metadata; checked and broadcast to every
    /// channel. The one rule of every binary that feeds a model.
    pub fn choose(
        given: Option<Normalisation>,
        from_model: Option<&Normalisation>,
        channels: usize,
        model: &Path,
    ) -> Result<Self, NormalisationError> {
        let norm = given.or_else(|| from_model.cloned()).ok_or_else(|| {
            NormalisationError(format!(
                "{} carries no normalisation metadata: give --mean and --std (per channel, on pixels in [0, 1])",
                model.display()
            ))
        })?;
        norm.for_channels(channels)
    }

    /// Check the values and broadcast a single value to `channels` channels.
    pub fn for_channels(&self, channels: usize) -> Result<Self, NormalisationError> {
        let widen = |v: &[f32], what: &str| -> Result<Vec<f32>, NormalisationError> {
            match v.len() {
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(NormalisationError(format!("{what} has {n} values, the model has {channels} channels"))),
            }
        };
        let out = Self { mean: widen(&self.mean, "mean")?, std: widen(&self.std, "std")? };
        if out.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || out.mean.iter().any(|m| !m.is_finite()) {
            return Err(NormalisationError(format!("std must be positive and finite, mean finite: {out:?}")));
        }
        Ok(out)
    }
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
    fn the_given_normalisation_wins_then_the_model_s_then_an_error() {
        let (given, meta) = (Normalisation { mean: vec![0.1], std: vec![0.3] }, Normalisation::symmetric(3));
        let model = Path::new("m.onnx");
        let chosen = Normalisation::choose(Some(given), Some(&meta), 3, model).unwrap();
        assert_eq!(chosen, Normalisation { mean: vec![0.1; 3], std: vec![0.3; 3] });
        assert_eq!(Normalisation::choose(None, Some(&meta), 3, model).unwrap(), meta);
        let err = Normalisation::choose(None, None, 3, model).unwrap_err().to_string();
        assert!(err.contains("m.onnx carries no normalisation metadata"), "{err}");
        assert!(Normalisation::choose(None, Some(&meta), 1, model).is_err(), "3 values for 1 channel");
    }

    #[test]
    fn broadcast_and_validate_normalisation() {
        let n = Normalisation { mean: vec![0.5], std: vec![0.25] }.for_channels(3).unwrap();
        assert_eq!(n.std, vec![0.25; 3]);
        assert!(Normalisation { mean: vec![0.5], std: vec![0.0] }.for_channels(1).is_err());
        assert!(Normalisation { mean: vec![0.5, 0.5], std: vec![1.0, 1.0] }.for_channels(3).is_err());
    }
}
