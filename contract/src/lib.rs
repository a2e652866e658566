//! What the trainer (`mekd`), the edge runtime (`mekd-edge`) and the model exporter agree on,
//! defined once: the teacher's HTTP wire protocol ([`protocol`], with the Open Inference
//! Protocol in [`protocol::v2`]) and the byte rule that counts its traffic ([`Usage`]), the metadata keys of
//! exported ONNX models ([`metadata`]), how `u8` pixels become model input ([`Normalisation`]),
//! and the percentile rule of every benchmark ([`Percentiles`]).
//!
//! Serde only: this crate cross-compiles to the boards with the runtime.

pub mod metadata;
pub mod normalisation;
pub mod percentiles;
pub mod protocol;
pub mod usage;

pub use normalisation::{Normalisation, NormalisationError, to_model_input};
pub use percentiles::Percentiles;
pub use usage::Usage;
