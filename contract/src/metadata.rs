//! Metadata keys of the ONNX models this project exports (`metadata_props`), read by the edge
//! runtime and the teacher server to learn a model's input and normalisation.

/// Zoo architecture name, e.g. `resnet8`.
pub const ARCHITECTURE: &str = "mekd.architecture";
/// Number of classes.
pub const NUM_CLASSES: &str = "mekd.num_classes";
/// Input shape of one image, `C,H,W`.
pub const INPUT_SHAPE: &str = "mekd.input_shape";
/// Per-channel mean applied to pixels scaled to [0, 1], comma-separated.
pub const MEAN: &str = "mekd.mean";
/// Per-channel standard deviation applied to pixels scaled to [0, 1], comma-separated.
pub const STD: &str = "mekd.std";
/// Class names, comma-separated (optional).
pub const CLASS_NAMES: &str = "mekd.class_names";
