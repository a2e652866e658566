//! The cloud side: training the teacher on its private labeled data and serving it as a black
//! box over HTTP.

pub mod accounts;
pub mod batcher;
mod http;
pub mod onnx_model;
pub mod server;
pub mod train;
mod v1;
mod v2;
