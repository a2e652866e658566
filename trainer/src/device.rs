//! Choosing the burn device (backend) that training runs on: `flex`, `ndarray`, `wgpu[:N]`
//! (the N-th discrete GPU, through burn-wgpu with autotune and fusion; feature `wgpu`), or
//! `wgpu:cpu` (the same burn-wgpu code on a software Vulkan driver such as Mesa's lavapipe:
//! slow, but it runs the GPU path, fusion included, on a machine without a GPU).
//! burn's CUDA backend is left out on purpose: cubecl-cuda 0.11 depends on cubecl-llvm, whose
//! build script downloads LLVM (tracel-llvm-bundler), and builds here must fetch nothing.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// The burn backends this build can train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend (im2col + gemm, SIMD, threads). The default.
    #[default]
    Flex,
    /// burn's older ndarray CPU backend (deprecated upstream; much slower for convolutions).
    Ndarray,
    /// The discrete GPU with this index, through burn-wgpu (Vulkan, Metal or DX12).
    Wgpu(usize),
    /// burn-wgpu on a CPU adapter (a software Vulkan driver, e.g. Mesa's lavapipe).
    WgpuCpu,
}

/// A device that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend was left out of this build.
    #[error("this build of mekd has no `{0}` backend; rebuild with `--features {0}`")]
    NotCompiled(&'static str),
    /// No GPU adapter answered (no GPU, no driver, or no Vulkan loader).
    #[error(
        "no usable GPU for `--device {device}`: {reason}\n\
         (burn-wgpu needs a discrete GPU with a Vulkan, Metal or DX12 driver; on Linux the Vulkan \
         loader libvulkan.so.1 and the vendor's ICD; `wgpu:cpu` needs a software Vulkan driver such \
         as Mesa's lavapipe. Use `--device flex` to train on the CPU.)"
    )]
    NoAdapter {
        /// The requested device.
        device: DeviceKind,
        /// What wgpu said.
        reason: String,
    },
    /// The device name could not be parsed.
    #[error("unknown device `{0}`: expected flex, ndarray, wgpu, wgpu:N (N = GPU index) or wgpu:cpu")]
    Unknown(String),
}

impl FromStr for DeviceKind {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "flex" | "cpu" => Ok(DeviceKind::Flex),
            "ndarray" => Ok(DeviceKind::Ndarray),
            "wgpu" | "gpu" => Ok(DeviceKind::Wgpu(0)),
            "wgpu:cpu" => Ok(DeviceKind::WgpuCpu),
            other => other
                .strip_prefix("wgpu:")
                .and_then(|n| n.parse().ok())
                .map(DeviceKind::Wgpu)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Flex => f.write_str("flex"),
            DeviceKind::Ndarray => f.write_str("ndarray"),
            DeviceKind::Wgpu(index) => write!(f, "wgpu:{index}"),
            DeviceKind::WgpuCpu => f.write_str("wgpu:cpu"),
        }
    }
}

impl serde::Serialize for DeviceKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceKind {
    /// The plain (inference) device of this kind. For a GPU this opens the adapter now, so a
    /// missing GPU is reported before any work starts.
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            DeviceKind::Flex => Ok(Device::flex()),
            DeviceKind::Ndarray => ndarray_device(),
            DeviceKind::Wgpu(_) | DeviceKind::WgpuCpu => gpu::wgpu_device(self),
        }
    }

    /// The device with autodiff, for training.
    pub fn training_device(self) -> Result<Device, DeviceError> {
        Ok(self.device()?.autodiff())
    }

    /// A resumed run may continue on another device than it started on (another GPU index, a
    /// GPU after the CPU): the device is not a setting of the run. Says so when it changes.
    pub fn announce_resume(self, ran_on: DeviceKind) {
        if self != ran_on {
            eprintln!("--resume: the run continues on {self} (it ran on {ran_on} so far)");
        }
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

#[cfg(feature = "wgpu")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use burn::backend::WgpuDeviceKind;
    use burn::backend::wgpu::graphics::AutoGraphicsApi;
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, try_init_setup};
    use burn::tensor::Device;

    use super::{DeviceError, DeviceKind};

    /// Adapters already opened in this process (wgpu registers a device once).
    static OPENED: Mutex<Option<HashMap<DeviceKind, Result<(), String>>>> = Mutex::new(None);

    /// Open the burn-wgpu device `kind` names, or say why it cannot be opened.
    pub fn wgpu_device(kind: DeviceKind) -> Result<Device, DeviceError> {
        let device = WgpuDevice::from(match kind {
            DeviceKind::WgpuCpu => WgpuDeviceKind::Cpu,
            DeviceKind::Wgpu(index) => WgpuDeviceKind::DiscreteGpu(index),
            DeviceKind::Flex | DeviceKind::Ndarray => unreachable!("{kind} is not a wgpu device"),
        });
        let mut opened = OPENED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = opened.get_or_insert_with(HashMap::new).entry(kind).or_insert_with(|| {
            let options = RuntimeOptions::try_default().map_err(|e| e.to_string())?;
            try_init_setup::<AutoGraphicsApi>(&device, options).map(|_| ()).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(()) => Ok(Device::from(device)),
            Err(reason) => Err(DeviceError::NoAdapter { device: kind, reason: reason.clone() }),
        }
    }
}

#[cfg(not(feature = "wgpu"))]
mod gpu {
    use burn::tensor::Device;

    use super::{DeviceError, DeviceKind};

    /// This build has no GPU backend.
    pub fn wgpu_device(_kind: DeviceKind) -> Result<Device, DeviceError> {
        Err(DeviceError::NotCompiled("wgpu"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in
            [DeviceKind::Flex, DeviceKind::Ndarray, DeviceKind::Wgpu(0), DeviceKind::Wgpu(3), DeviceKind::WgpuCpu]
        {
            assert_eq!(kind.to_string().parse::<DeviceKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<DeviceKind>(&json).unwrap(), kind);
        }
        assert_eq!("wgpu".parse::<DeviceKind>().unwrap(), DeviceKind::Wgpu(0));
        assert!("wgpu:x".parse::<DeviceKind>().is_err());
        assert!("tpu".parse::<DeviceKind>().is_err());
    }
}
