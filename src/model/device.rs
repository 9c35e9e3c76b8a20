//! Which device the math runs on. CUDA and Metal sit behind the cargo features `cuda`
//! and `metal`; the code path is the same for both, and asking for one that was not
//! compiled in is a clear error rather than a silent fall back to the CPU.

use std::str::FromStr;

use candle_core::Device;

use super::error::ModelError;

/// A user's device request, as written in a pipeline file or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Metal,
    /// The first accelerator compiled in and present, else the CPU.
    #[default]
    Auto,
}

impl DeviceChoice {
    /// Opens the device (ordinal 0 for accelerators).
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => open_cuda(),
            Self::Metal => open_metal(),
            Self::Auto => Ok(open_cuda().or_else(|_| open_metal()).unwrap_or(Device::Cpu)),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "metal" | "mps" => Ok(Self::Metal),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown device `{other}` (expected cpu, cuda, metal or auto)"
            )),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
            Self::Auto => "auto",
        })
    }
}

fn open_cuda() -> Result<Device, ModelError> {
    if !cfg!(feature = "cuda") {
        return Err(ModelError::FeatureMissing { feature: "cuda" });
    }
    Device::new_cuda(0).map_err(|source| ModelError::Device {
        device: "cuda",
        source,
    })
}

fn open_metal() -> Result<Device, ModelError> {
    if !cfg!(feature = "metal") {
        return Err(ModelError::FeatureMissing { feature: "metal" });
    }
    Device::new_metal(0).map_err(|source| ModelError::Device {
        device: "metal",
        source,
    })
}

/// Keeps freed tensor buffers in the process instead of handing each back to the OS.
///
/// candle allocates a fresh buffer for every op's result. glibc serves blocks above its
/// mmap threshold (adaptive, 128 KiB to 32 MiB) with a new `mmap` and unmaps them on
/// free, so every such buffer faults its pages in and has them zeroed again: a tenth of
/// a CPU training step went to page faults (BENCHMARKS.md, "train (CPU)"). Raising the
/// threshold to glibc's maximum (32 MiB) and the trim threshold to 1 GiB lets the heap
/// reuse them. Call once at start-up, before threads are spawned; a no-op elsewhere than
/// glibc Linux.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc malloc's tuning parameters; called before other
    // threads exist, it races with no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_always_open() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        assert!(DeviceChoice::Auto.open().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let err = DeviceChoice::Cuda.open().unwrap_err();
        assert_eq!(err.to_string(), "taper was built without the cuda feature");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_says_so() {
        let err = DeviceChoice::Metal.open().unwrap_err();
        assert_eq!(err.to_string(), "taper was built without the metal feature");
    }

    #[test]
    fn parses_names() {
        assert_eq!("CUDA".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("tpu"));
    }
}
