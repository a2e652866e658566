//! The MEKD model zoo: burn modules for teachers, students and the GAN, plus ONNX export.
//!
//! Every network takes `[batch, channels, 32, 32]` images scaled to `[-1, 1]` (the reference
//! preprocessing) and is parameterised by input channels and class count. Classifiers return
//! raw logits `[batch, classes]`.

pub mod cost;
pub mod error;
pub mod export;
pub mod gan;
mod head;
pub mod lenet;
pub mod mobilenet;
pub mod ops;
pub mod params;
pub mod resnet;
pub mod vgg;
pub mod zoo;

pub use error::ModelError;
pub use gan::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
pub use params::{initialise, running_statistics, trainable_params};
pub use zoo::{Architecture, Classifier, ClassifierSpec, ZooEntry, zoo_entries};

/// Side length of every image the zoo consumes and the generator produces.
pub const IMAGE_SIZE: usize = 32;
