//! Choosing the burn device (backend) that training runs on: `flex`, `ndarray`, `wgpu[:N]`
//! (the N-th discrete GPU, through burn-wgpu with autotune and fusion; feature `wgpu`) or
//! `cuda[:N]` (burn's CUDA backend; feature `cuda`).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// The burn backends this build can train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend (im2col + gemm, SIMD, threads). The default.
    #[default]
    Flex,
    /// burn's older ndarray CPU backend (deprecated upstream; much slower for convolutions).
    Ndarray,
    /// The discrete GPU with this index, through burn-wgpu (Vulkan, Metal or DX12).
    Wgpu(usize),
    /// The NVIDIA GPU with this index, through burn's CUDA backend.
    Cuda(usize),
}

/// A device that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend was left out of this build.
    #[error("this build of mekd has no `{0}` backend; rebuild with `--features {0}`")]
    NotCompiled(&'static str),
    /// No GPU adapter answered (no GPU, no driver, or no Vulkan loader).
    #[error(
        "no usable GPU for `--device wgpu:{index}`: {reason}\n\
         (burn-wgpu needs a discrete GPU with a Vulkan, Metal or DX12 driver; on Linux the Vulkan \
         loader libvulkan.so.1 and the vendor's ICD. Use `--device flex` to train on the CPU.)"
    )]
    NoAdapter {
        /// The requested discrete GPU.
        index: usize,
        /// What wgpu said.
        reason: String,
    },
    /// CUDA could not open the GPU.
    #[error(
        "no usable GPU for `--device cuda:{index}`: {reason}\n\
         (burn's CUDA backend needs an NVIDIA driver (libcuda.so) and NVRTC (libnvrtc.so) at run \
         time. Use `--device flex` to train on the CPU.)"
    )]
    NoCudaDevice {
        /// The requested GPU.
        index: usize,
        /// What failed.
        reason: String,
    },
    /// The device name could not be parsed.
    #[error("unknown device `{0}`: expected flex, ndarray, wgpu, wgpu:N, cuda or cuda:N (N = GPU index)")]
    Unknown(String),
}

impl FromStr for DeviceKind {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "flex" | "cpu" => Ok(DeviceKind::Flex),
            "ndarray" => Ok(DeviceKind::Ndarray),
            "wgpu" | "gpu" => Ok(DeviceKind::Wgpu(0)),
            "cuda" => Ok(DeviceKind::Cuda(0)),
            other => {
                let index = |prefix: &str| other.strip_prefix(prefix).and_then(|n| n.parse().ok());
                index("wgpu:")
                    .map(DeviceKind::Wgpu)
                    .or_else(|| index("cuda:").map(DeviceKind::Cuda))
                    .ok_or_else(|| DeviceError::Unknown(s.to_string()))
            }
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Flex => f.write_str("flex"),
            DeviceKind::Ndarray => f.write_str("ndarray"),
            DeviceKind::Wgpu(index) => write!(f, "wgpu:{index}"),
            DeviceKind::Cuda(index) => write!(f, "cuda:{index}"),
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
            DeviceKind::Wgpu(index) => gpu::wgpu_device(index),
            DeviceKind::Cuda(index) => cuda::cuda_device(index),
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

#[cfg(feature = "wgpu")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use burn::backend::WgpuDeviceKind;
    use burn::backend::wgpu::graphics::AutoGraphicsApi;
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, try_init_setup};
    use burn::tensor::Device;

    use super::DeviceError;

    /// Adapters already opened in this process (wgpu registers a device once).
    static OPENED: Mutex<Option<HashMap<usize, Result<(), String>>>> = Mutex::new(None);

    /// Open the `index`-th discrete GPU, or say why it cannot be opened.
    pub fn wgpu_device(index: usize) -> Result<Device, DeviceError> {
        let device = WgpuDevice::from(WgpuDeviceKind::DiscreteGpu(index));
        let mut opened = OPENED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = opened.get_or_insert_with(HashMap::new).entry(index).or_insert_with(|| {
            let options = RuntimeOptions::try_default().map_err(|e| e.to_string())?;
            try_init_setup::<AutoGraphicsApi>(&device, options).map(|_| ()).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(()) => Ok(Device::from(device)),
            Err(reason) => Err(DeviceError::NoAdapter { index, reason: reason.clone() }),
        }
    }
}

#[cfg(not(feature = "wgpu"))]
mod gpu {
    use burn::tensor::Device;

    use super::DeviceError;

    /// This build has no GPU backend.
    pub fn wgpu_device(_index: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotCompiled("wgpu"))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use burn::backend::CudaDevice;
    use burn::tensor::{Device, Tensor};

    use super::DeviceError;

    /// Open the `index`-th CUDA GPU: a first tiny tensor round trip, so a missing driver or
    /// GPU is reported here, as an error, rather than as a panic later.
    pub fn cuda_device(index: usize) -> Result<Device, DeviceError> {
        let device = Device::from(CudaDevice { index });
        let probe = device.clone();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = std::panic::catch_unwind(move || Tensor::<1>::zeros([1], &probe).into_data());
        std::panic::set_hook(hook);
        match outcome {
            Ok(_) => Ok(device),
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the CUDA runtime failed to start".into());
                Err(DeviceError::NoCudaDevice { index, reason })
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use burn::tensor::Device;

    use super::DeviceError;

    /// This build has no CUDA backend.
    pub fn cuda_device(_index: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotCompiled("cuda"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in
            [DeviceKind::Flex, DeviceKind::Ndarray, DeviceKind::Wgpu(0), DeviceKind::Wgpu(3), DeviceKind::Cuda(1)]
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
