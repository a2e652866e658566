//! The zoo: every architecture by name, a classifier enum that dispatches to them, and the
//! summary (parameters, multiply-adds) that `mekd zoo` prints.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::IMAGE_SIZE;
use crate::error::ModelError;
use crate::gan::{DiscriminatorConfig, GeneratorConfig};
use crate::lenet::LeNet;
use crate::mobilenet::MobileNet;
use crate::params::trainable_params;
use crate::resnet::ResNet;
use crate::vgg::{self, Vgg};

/// Every architecture the zoo can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Architecture {
    /// CIFAR-style ResNet-8.
    ResNet8,
    /// CIFAR-style ResNet-20.
    ResNet20,
    /// CIFAR-style ResNet-32 (the reference teacher).
    ResNet32,
    /// CIFAR-style ResNet-56.
    ResNet56,
    /// LeNet-5 (6/16/120/84).
    LeNet5,
    /// LeNet-5 at half width (3/8/60/42).
    LeNet5Half,
    /// VGG-11 without batch norm.
    Vgg11,
    /// VGG-11 with batch norm.
    Vgg11Bn,
    /// VGG-13 without batch norm.
    Vgg13,
    /// VGG-13 with batch norm.
    Vgg13Bn,
    /// MobileNet v1, width 1.0.
    MobileNet,
    /// The MEKD generator (not a classifier).
    Generator,
    /// The MEKD discriminator (not a classifier).
    Discriminator,
}

impl Architecture {
    /// All architectures, classifiers first.
    pub const ALL: [Architecture; 13] = [
        Self::ResNet8,
        Self::ResNet20,
        Self::ResNet32,
        Self::ResNet56,
        Self::LeNet5,
        Self::LeNet5Half,
        Self::Vgg11,
        Self::Vgg11Bn,
        Self::Vgg13,
        Self::Vgg13Bn,
        Self::MobileNet,
        Self::Generator,
        Self::Discriminator,
    ];

    /// The zoo's name, as used on the command line and in ONNX metadata.
    pub fn name(self) -> &'static str {
        match self {
            Self::ResNet8 => "resnet8",
            Self::ResNet20 => "resnet20",
            Self::ResNet32 => "resnet32",
            Self::ResNet56 => "resnet56",
            Self::LeNet5 => "lenet5",
            Self::LeNet5Half => "lenet5-half",
            Self::Vgg11 => "vgg11",
            Self::Vgg11Bn => "vgg11-bn",
            Self::Vgg13 => "vgg13",
            Self::Vgg13Bn => "vgg13-bn",
            Self::MobileNet => "mobilenet",
            Self::Generator => "generator",
            Self::Discriminator => "discriminator",
        }
    }

    /// Whether this architecture maps images to class logits.
    pub fn is_classifier(self) -> bool {
        !matches!(self, Self::Generator | Self::Discriminator)
    }

    /// The classifiers of the zoo.
    pub fn classifiers() -> impl Iterator<Item = Architecture> {
        Self::ALL.into_iter().filter(|a| a.is_classifier())
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Architecture {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|a| a.name() == wanted).ok_or_else(|| ModelError::UnknownArchitecture {
            name: s.to_string(),
            known: Self::ALL.map(Self::name).join(", "),
        })
    }
}

impl From<Architecture> for String {
    fn from(a: Architecture) -> String {
        a.name().to_string()
    }
}

impl TryFrom<String> for Architecture {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What a classifier is: its architecture and its input/output sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierSpec {
    /// The architecture (must be a classifier).
    pub architecture: Architecture,
    /// Image channels (1 for gray, 3 for RGB).
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
}

impl ClassifierSpec {
    /// Check that the spec describes a buildable classifier.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !self.architecture.is_classifier() {
            return Err(ModelError::InvalidConfig(format!("{} is not a classifier", self.architecture)));
        }
        if !(1..=4).contains(&self.in_channels) || self.num_classes < 2 {
            return Err(ModelError::InvalidConfig(format!(
                "need 1..=4 input channels and >= 2 classes, got {} channels and {} classes",
                self.in_channels, self.num_classes
            )));
        }
        Ok(())
    }

    /// Input shape of one image, `[channels, 32, 32]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.in_channels, IMAGE_SIZE, IMAGE_SIZE]
    }

    /// Build the classifier with fresh weights on `device`.
    pub fn init(&self, device: &Device) -> Result<Classifier, ModelError> {
        self.validate()?;
        let (c, k) = (self.in_channels, self.num_classes);
        Ok(match self.architecture {
            Architecture::ResNet8 => Classifier::ResNet(ResNet::new(1, c, k, device)),
            Architecture::ResNet20 => Classifier::ResNet(ResNet::new(3, c, k, device)),
            Architecture::ResNet32 => Classifier::ResNet(ResNet::new(5, c, k, device)),
            Architecture::ResNet56 => Classifier::ResNet(ResNet::new(9, c, k, device)),
            Architecture::LeNet5 => Classifier::LeNet(LeNet::new([6, 16, 120, 84], c, k, device)),
            Architecture::LeNet5Half => Classifier::LeNet(LeNet::new([3, 8, 60, 42], c, k, device)),
            Architecture::Vgg11 | Architecture::Vgg11Bn | Architecture::Vgg13 | Architecture::Vgg13Bn => {
                let depth =
                    if matches!(self.architecture, Architecture::Vgg11 | Architecture::Vgg11Bn) { 11 } else { 13 };
                let bn = matches!(self.architecture, Architecture::Vgg11Bn | Architecture::Vgg13Bn);
                let widths = vgg::groups(depth).expect("depth 11 and 13 are defined");
                Classifier::Vgg(Vgg::new(widths, bn, c, k, device))
            }
            Architecture::MobileNet => Classifier::MobileNet(MobileNet::new(c, k, device)),
            Architecture::Generator | Architecture::Discriminator => unreachable!("validated above"),
        })
    }

    /// Load a classifier checkpoint (burnpack) saved by [`Classifier::save`].
    pub fn load(&self, path: &std::path::Path, device: &Device) -> Result<Classifier, ModelError> {
        let model = self.init(device)?;
        model
            .try_load_file(path)
            .map_err(|e| ModelError::Checkpoint { path: path.display().to_string(), reason: format!("{e:?}") })
    }
}

/// Any zoo classifier, behind one type so that training and export code is written once.
///
/// One value lives per model, so the size difference between variants costs nothing worth the
/// indirection of boxing (which burn's `Module` derive would also have to see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Classifier {
    /// A CIFAR-style ResNet.
    ResNet(ResNet),
    /// LeNet-5 or LeNet-5-half.
    LeNet(LeNet),
    /// VGG-11/13 (+BN).
    Vgg(Vgg),
    /// MobileNet v1.
    MobileNet(MobileNet),
}

impl Classifier {
    /// Logits `[batch, classes]` for images `[batch, channels, 32, 32]` in `[-1, 1]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Self::ResNet(m) => m.forward(x),
            Self::LeNet(m) => m.forward(x),
            Self::Vgg(m) => m.forward(x),
            Self::MobileNet(m) => m.forward(x),
        }
    }

    /// Multiply-adds per 32x32 image.
    pub fn macs(&self) -> u64 {
        let hw = (IMAGE_SIZE, IMAGE_SIZE);
        match self {
            Self::ResNet(m) => m.macs(hw),
            Self::LeNet(m) => m.macs(hw),
            Self::Vgg(m) => m.macs(hw),
            Self::MobileNet(m) => m.macs(hw),
        }
    }

    /// Save the weights (and BatchNorm running statistics) as a burnpack checkpoint.
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        self.clone()
            .save_file(path)
            .map_err(|e| ModelError::Checkpoint { path: path.display().to_string(), reason: format!("{e:?}") })
    }
}

/// One row of `mekd zoo`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ZooEntry {
    /// Zoo name, e.g. `resnet8`.
    pub name: String,
    /// `classifier` or `gan`.
    pub kind: String,
    /// Trainable parameters.
    pub params: usize,
    /// Multiply-adds per 32x32 image (per generated image for the generator).
    pub macs: u64,
    /// Floating-point operations per image (2 x multiply-adds).
    pub flops: u64,
    /// Input channels the row was computed for.
    pub in_channels: usize,
    /// Classes the row was computed for.
    pub num_classes: usize,
}

/// Summaries of every architecture for the given channels and classes.
pub fn zoo_entries(in_channels: usize, num_classes: usize, device: &Device) -> Result<Vec<ZooEntry>, ModelError> {
    Architecture::ALL
        .into_iter()
        .map(|architecture| {
            let (kind, params, macs) = match architecture {
                Architecture::Generator => {
                    let g = GeneratorConfig::new(num_classes, in_channels).init(device)?;
                    ("gan", trainable_params(&g), g.macs())
                }
                Architecture::Discriminator => {
                    let d = DiscriminatorConfig::new(in_channels).init(device)?;
                    ("gan", trainable_params(&d), d.macs())
                }
                _ => {
                    let spec = ClassifierSpec { architecture, in_channels, num_classes };
                    let m = spec.init(device)?;
                    ("classifier", trainable_params(&m), m.macs())
                }
            };
            Ok(ZooEntry {
                name: architecture.name().to_string(),
                kind: kind.to_string(),
                params,
                macs,
                flops: 2 * macs,
                in_channels,
                num_classes,
            })
        })
        .collect()
}
