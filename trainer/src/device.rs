//! Choosing the burn device (backend) that training runs on.

use burn::tensor::Device;

/// The burn backends this build can train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend (im2col + gemm, SIMD, threads). The default.
    Flex,
    /// burn's older ndarray CPU backend (deprecated upstream; much slower for convolutions).
    Ndarray,
}

/// A device that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend was left out of this build.
    #[error("this build of mekd has no `{0}` backend; rebuild with `--features {0}`")]
    NotCompiled(&'static str),
}

impl DeviceKind {
    /// The plain (inference) device of this kind.
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            DeviceKind::Flex => Ok(Device::flex()),
            DeviceKind::Ndarray => ndarray_device(),
        }
    }

    /// The device with autodiff, for training.
    pub fn training_device(self) -> Result<Device, DeviceError> {
        Ok(self.device()?.autodiff())
    }
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)] // kept selectable on purpose: users know it
fn ndarray_device() -> Result<Device, DeviceError> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled("ndarray"))
}
