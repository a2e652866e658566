//! The MEKD trainer: burn devices, data batches, teacher training, model export verified by
//! tract, and the ONNX Runtime binding used by the teacher side.
//!
//! Reusable pieces (export, devices, ONNX Runtime) have typed errors; the run orchestration
//! (run directories, training commands) reports with `anyhow` context chains.

pub mod allocator;
pub mod batches;
pub mod blackbox;
pub mod demo;
pub mod device;
pub mod experiment;
pub mod export;
pub mod graph_step;
pub mod journal;
pub mod methods;
pub mod numerics;
pub mod perf;
pub mod progress;
pub mod report;
pub mod rundir;
pub mod schedule;
pub mod self_test;
pub mod teacher;
