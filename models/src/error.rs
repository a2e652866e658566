//! Errors of the model crate.

/// Everything that can go wrong when building, loading or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An architecture name that the zoo does not know.
    #[error("unknown architecture `{name}`; known: {known}")]
    UnknownArchitecture {
        /// The name that was asked for.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },
    /// A model parameter outside its valid range.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// The burn ONNX exporter refused the graph.
    #[error("ONNX export of {architecture} failed: {source}")]
    Export {
        /// The architecture being exported.
        architecture: String,
        /// The exporter's error.
        #[source]
        source: burn_onnx::export::ExportError,
    },
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}
