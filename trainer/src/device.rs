//! Choosing the burn device (backend) that training runs on: `flex`, `ndarray`, `wgpu[:N]`
//! (the N-th discrete GPU, through burn-wgpu with autotune and fusion; feature `wgpu`),
//! `wgpu:cpu` (the same burn-wgpu code on a software Vulkan driver such as Mesa's lavapipe:
//! slow, but it runs the GPU path, fusion included, on a machine without a GPU), or `cuda[:N]`
//! (the N-th NVIDIA GPU through burn-cuda, TF32 tensor cores on sm_80+; feature `cuda`, whose
//! build links the LLVM that `scripts/fetch-llvm.sh` installs from PyPI).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// The environment variable that turns device graphs off ([`DeviceKind::records_graphs`]): set
/// to anything but empty or `0`, the training commands run every step op by op.
pub const NO_GRAPHS: &str = "MEKD_NO_GRAPHS";

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
    /// The NVIDIA GPU with this index, through burn-cuda.
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
    /// No NVIDIA driver, or no GPU of that index.
    #[error(
        "no usable NVIDIA GPU for `--device {device}`: {reason}\n\
         (burn-cuda needs the NVIDIA driver's libcuda.so.1; kernels with transcendental functions \
         also need libdevice.10.bc from a CUDA toolkit ($CUDA_PATH/nvvm/libdevice) or the PyPI \
         wheel nvidia-cuda-nvcc-cu12. Use `--device flex` to train on the CPU.)"
    )]
    NoCuda {
        /// The requested device.
        device: DeviceKind,
        /// What is missing.
        reason: String,
    },
    /// The device name could not be parsed.
    #[error("unknown device `{0}`: expected flex, ndarray, wgpu, wgpu:N (N = GPU index), wgpu:cpu, cuda or cuda:N")]
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
            "cuda" => Ok(DeviceKind::Cuda(0)),
            other => {
                let index = |prefix: &str| other.strip_prefix(prefix).and_then(|n| n.parse().ok());
                (index("wgpu:").map(DeviceKind::Wgpu))
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
            DeviceKind::WgpuCpu => f.write_str("wgpu:cpu"),
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
    /// Whether training steps on this device replay recorded device graphs
    /// ([`crate::graph_step`]): on burn-cuda (CUDA graphs), where a step of the small networks
    /// here is bound by kernel launches, unless the environment sets [`NO_GRAPHS`] (to compare,
    /// or to rule graphs out). Other backends have no device graphs.
    pub fn records_graphs(self) -> bool {
        matches!(self, DeviceKind::Cuda(_)) && std::env::var_os(NO_GRAPHS).is_none_or(|v| v.is_empty() || v == "0")
    }

    /// The plain (inference) device of this kind. For a GPU this opens the adapter now, so a
    /// missing GPU is reported before any work starts.
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            DeviceKind::Flex => Ok(Device::flex()),
            DeviceKind::Ndarray => ndarray_device(),
            DeviceKind::Wgpu(_) | DeviceKind::WgpuCpu => gpu::wgpu_device(self),
            DeviceKind::Cuda(index) => cuda::cuda_device(index),
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
            DeviceKind::Flex | DeviceKind::Ndarray | DeviceKind::Cuda(_) => {
                unreachable!("{kind} is not a wgpu device")
            }
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

#[cfg(feature = "cuda")]
mod cuda {
    use burn::tensor::Device;

    use super::{DeviceError, DeviceKind};

    /// The burn-cuda device of the GPU `index`, after checking that the driver loads and has
    /// such a GPU (cubecl would panic instead).
    pub fn cuda_device(index: usize) -> Result<Device, DeviceError> {
        let missing = |reason: String| DeviceError::NoCuda { device: DeviceKind::Cuda(index), reason };
        // SAFETY: only tries to open the driver's shared library by its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(missing("the NVIDIA driver library (libcuda.so.1) is not on this machine".into()));
        }
        cudarc::driver::result::init().map_err(|e| missing(format!("the driver did not start: {e}")))?;
        let count = cudarc::driver::result::device::get_count()
            .map_err(|e| missing(format!("the driver cannot count its GPUs: {e}")))?;
        if index >= count.max(0) as usize {
            return Err(missing(format!("the driver sees {count} GPUs, so no index {index}")));
        }
        Ok(Device::cuda(index))
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
        for kind in [
            DeviceKind::Flex,
            DeviceKind::Ndarray,
            DeviceKind::Wgpu(0),
            DeviceKind::Wgpu(3),
            DeviceKind::WgpuCpu,
            DeviceKind::Cuda(0),
            DeviceKind::Cuda(2),
        ] {
            assert_eq!(kind.to_string().parse::<DeviceKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<DeviceKind>(&json).unwrap(), kind);
        }
        assert_eq!("wgpu".parse::<DeviceKind>().unwrap(), DeviceKind::Wgpu(0));
        assert_eq!("cuda".parse::<DeviceKind>().unwrap(), DeviceKind::Cuda(0));
        assert!("wgpu:x".parse::<DeviceKind>().is_err());
        assert!("cuda:-1".parse::<DeviceKind>().is_err());
        assert!("tpu".parse::<DeviceKind>().is_err());
    }
}
