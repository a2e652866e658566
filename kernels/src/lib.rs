//! Compute kernels of our own, for shapes where the engines we build on spend their time
//! rearranging data instead of computing: few channels, small images (the students of the zoo).
//!
//! Plain Rust with no dependencies on an engine, so that the edge runtime (inside tract's plan)
//! and the trainer's CPU backend (burn's flex, through the models' backend extension) share
//! them: the convolution forward, its weight gradient (or the unfolded input for one), batch
//! norm. Each kernel is written once and compiled for the vector units a machine has: AVX-512
//! or AVX2 with FMA on x86-64 (chosen at run time), NEON on aarch64 (its baseline); elsewhere
//! (armv7) the same code runs with what the target has.

#![deny(missing_docs)]

pub mod batch_norm;
pub mod conv2d;
pub mod pool;

pub use conv2d::weight_gradient::WeightGradient;
pub use conv2d::{Algorithm, Conv2d, Conv2dError, Conv2dGeometry, Simd};
pub use pool::{max_pool_2x2, max_pool_2x2_shape};
