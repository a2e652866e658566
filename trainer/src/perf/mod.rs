//! What is measured, and how: the time of one training step of each stage on a device
//! ([`train_steps`], `mekd bench-train`), tract against ONNX Runtime on the same file
//! ([`engines`], `mekd bench-engines`), and the teacher server's throughput and latency on
//! loopback ([`server`], `mekd teacher bench`). The board's own benchmark is `mekd-edge bench`
//! (`mekd_runtime::bench`); every one of them reports percentiles by one rule
//! ([`mekd_contract::Percentiles`]).

pub mod engines;
pub mod server;
pub mod train_steps;
