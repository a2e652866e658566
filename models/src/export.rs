//! ONNX export of zoo classifiers through burn-onnx's graph-capture exporter, with the
//! metadata the runtime and the teacher server read (architecture, classes, input shape,
//! normalisation).
//!
//! burn-onnx writes no model metadata, so [`append_metadata`] appends `metadata_props`
//! entries (field 14 of `ModelProto`) to its protobuf bytes: protobuf parsers merge a repeated
//! field that appears after the rest of a message, so this is a valid, minimal extension.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn_onnx::export::{AxisSpec, InputSpec, OnnxExporter};

use mekd_contract::metadata as keys;

use crate::error::ModelError;
use crate::zoo::{Classifier, ClassifierSpec};

/// What the exported model tells its users about its input and output.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportMetadata {
    /// Per-channel mean on [0, 1] pixels.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation on [0, 1] pixels.
    pub std: Vec<f32>,
    /// Optional class names.
    pub class_names: Option<Vec<String>>,
}

impl ExportMetadata {
    /// This project's preprocessing: pixels scaled to [-1, 1], i.e. mean 0.5 and std 0.5.
    pub fn symmetric(channels: usize) -> Self {
        Self { mean: vec![0.5; channels], std: vec![0.5; channels], class_names: None }
    }
}

/// `model`'s weights in a copy on the CPU device the exporter works on: what the exported file
/// computes, in f32 whatever device trained the model (a GPU may multiply in TF32).
pub fn host_copy(model: &Classifier, spec: &ClassifierSpec) -> Result<Classifier, ModelError> {
    Ok(spec.init(&host_device())?.load_record(model.clone().valid().into_record()).valid())
}

/// The CPU device the exporter builds its private copy on.
fn host_device() -> Device {
    #[cfg(feature = "flex")]
    {
        Device::flex()
    }
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    #[allow(deprecated)]
    {
        Device::ndarray()
    }
}

/// Export a classifier to ONNX (opset 18, dynamic batch axis, weights embedded) with metadata.
///
/// The model is copied through its record first, so exporting leaves `model` usable (burn-onnx
/// would otherwise move its BatchNorm running statistics onto the capture device).
pub fn export_classifier(
    model: &Classifier,
    spec: &ClassifierSpec,
    metadata: &ExportMetadata,
) -> Result<Vec<u8>, ModelError> {
    spec.validate()?;
    if metadata.mean.len() != spec.in_channels || metadata.std.len() != spec.in_channels {
        return Err(ModelError::InvalidConfig(format!(
            "normalisation needs one mean and std per channel ({}), got {} and {}",
            spec.in_channels,
            metadata.mean.len(),
            metadata.std.len()
        )));
    }
    let device = host_device();
    let copy = host_copy(model, spec)?;
    let [c, h, w] = spec.image_shape();
    let sample = Tensor::<4>::zeros([2, c, h, w], &device);
    let validation = Tensor::<4>::zeros([3, c, h, w], &device);
    let specs = [InputSpec::new([AxisSpec::dynamic("batch"), AxisSpec::Static, AxisSpec::Static, AxisSpec::Static])];
    let onnx = OnnxExporter::new()
        .export_dynamic(&copy, sample, validation, &specs, |m: &Classifier, x: Tensor<4>| m.forward(x))
        .map_err(|source| ModelError::Export { architecture: spec.architecture.to_string(), source })?;
    let join = |v: &[f32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let mut entries = vec![
        (keys::ARCHITECTURE.to_string(), spec.architecture.to_string()),
        (keys::NUM_CLASSES.to_string(), spec.num_classes.to_string()),
        (keys::INPUT_SHAPE.to_string(), format!("{c},{h},{w}")),
        (keys::MEAN.to_string(), join(&metadata.mean)),
        (keys::STD.to_string(), join(&metadata.std)),
    ];
    if let Some(names) = &metadata.class_names {
        entries.push((keys::CLASS_NAMES.to_string(), names.join(",")));
    }
    let mut bytes = onnx.into_bytes();
    append_metadata(&mut bytes, &entries);
    Ok(bytes)
}

/// Append `metadata_props` entries (ModelProto field 14) to a serialized ONNX model.
pub fn append_metadata(model: &mut Vec<u8>, entries: &[(String, String)]) {
    for (key, value) in entries {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 8);
        write_bytes_field(&mut entry, 1, key.as_bytes());
        write_bytes_field(&mut entry, 2, value.as_bytes());
        write_bytes_field(model, 14, &entry);
    }
}

/// A length-delimited protobuf field: tag, varint length, bytes.
fn write_bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    write_varint(out, (field << 3) | 2);
    write_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_protobuf_examples() {
        // From the protobuf encoding guide: 1 -> 01, 150 -> 96 01, 300 -> ac 02.
        for (value, expected) in [(1u64, vec![0x01]), (150, vec![0x96, 0x01]), (300, vec![0xac, 0x02])] {
            let mut out = Vec::new();
            write_varint(&mut out, value);
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn metadata_entry_layout() {
        let mut out = Vec::new();
        append_metadata(&mut out, &[("k".into(), "vv".into())]);
        // field 14 (0x72), len 7, [field 1 (0x0a), len 1, 'k', field 2 (0x12), len 2, 'v', 'v']
        assert_eq!(out, vec![0x72, 7, 0x0a, 1, b'k', 0x12, 2, b'v', b'v']);
    }
}
