//! The edge side of MEKD: dataset readers shared with the trainer, ONNX inference with tract,
//! and (in later modules) the benchmark and the results display.
//!
//! This crate must stay small and must not depend on burn: it cross-compiles to the boards.

pub mod data;
pub mod engine;
pub mod fsutil;
pub mod rng;

pub use data::{DataError, Dataset, Split};
pub use engine::{Engine, EngineError, ModelInfo, Normalisation};
