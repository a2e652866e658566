//! The edge side of MEKD: dataset readers shared with the trainer, ONNX inference with tract,
//! the teacher's HTTP client (the wire protocol itself is `mekd-contract`'s).
//!
//! This crate must stay small and must not depend on burn: it cross-compiles to the boards.

pub mod bench;
pub mod cli;
pub mod data;
pub mod direct_conv;
pub mod display;
pub mod engine;
pub mod fsutil;
#[cfg(feature = "ort")]
pub mod onnxruntime;
pub mod rng;
pub mod runner;
pub mod teacher_client;

pub use data::{DataError, Dataset, Split};
pub use engine::{ConvKernels, Engine, EngineError, ModelInfo};
