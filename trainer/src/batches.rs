//! Turning `u8` datasets into burn tensors, batch by batch.

use burn::tensor::{Device, Int, Tensor, TensorData};
use mekd_contract::{Normalisation, to_model_input};
use mekd_runtime::Dataset;
use mekd_runtime::rng::SplitMix64;

/// Images of `indices` as a `[n, C, H, W]` tensor scaled to [-1, 1].
pub fn images(data: &Dataset, indices: &[usize], device: &Device) -> Tensor<4> {
    let [c, h, w] = data.shape;
    Tensor::from_data(TensorData::new(image_values(data, indices), [indices.len(), c, h, w]), device)
}

/// Images of `indices` scaled to [-1, 1], flat (`[n, C, H, W]` order), on the host.
pub fn image_values(data: &Dataset, indices: &[usize]) -> Vec<f32> {
    let [c, h, w] = data.shape;
    let mut pixels = Vec::with_capacity(indices.len() * c * h * w);
    for &i in indices {
        pixels.extend_from_slice(data.image(i));
    }
    to_model_input(&pixels, data.shape, &Normalisation::symmetric(c))
}

/// Labels of `indices` as an integer tensor.
pub fn labels(data: &Dataset, indices: &[usize], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(label_values(data, indices), [indices.len()]), device)
}

/// Labels of `indices`, on the host.
pub fn label_values(data: &Dataset, indices: &[usize]) -> Vec<i64> {
    indices.iter().map(|&i| data.labels[i] as i64).collect()
}

/// The visiting order of epoch `epoch` (0-based): a permutation seeded by `(seed, epoch)`, so a
/// resumed run sees the same batches as an uninterrupted one.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
    order
}

/// Index of the largest logit per row.
pub fn predictions(logits: Tensor<2>) -> Vec<usize> {
    let [_, k] = logits.dims();
    let values: Vec<f32> = logits.into_data().try_to_vec().expect("f32 logits");
    mekd_runtime::engine::argmax_rows(&values, k)
}
