//! The cloud side: training the teacher on its private labeled data and serving it as a black
//! box over HTTP.

pub mod accounts;
pub mod batcher;
pub mod bench;
pub mod server;
pub mod train;
mod v2;
