//! Device selection and hardware facts.
//!
//! `auto` uses a CUDA GPU when the binary was built with the `cuda` feature *and* a driver and
//! device are usable, otherwise the CPU; the fallback is logged once and never panics.
//!
//! Building `--features cuda` needs a CUDA toolkit with `nvcc` (candle-kernels compiles its
//! kernels at build time) and `CUDA_COMPUTE_CAP` when no GPU is visible; see
//! `scripts/check-cuda-build.sh` for what was tried here and what a build image needs.

use candle_core::Device;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A CUDA GPU when available, else the CPU.
    Auto,
    Cpu,
    /// A CUDA GPU; falls back to the CPU (logged) when no driver or device is usable. A
    /// binary built without the `cuda` feature refuses it (exit 1)
    Cuda,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda: this binary was built without the `cuda` feature; use --device cpu (or auto), or a build with `--features cuda` (the switchyard-cuda image)"
    )]
    CudaNotBuilt,
    #[error("--device cuda: {0}")]
    Cuda(String),
}

/// The chosen device and a description of the hardware behind it.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub hardware: String,
}

/// Picks the device for `choice`.
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Auto | DeviceChoice::Cuda => select_cuda(choice),
    }
}

#[cfg(not(feature = "cuda"))]
fn select_cuda(choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    match choice {
        DeviceChoice::Cuda => Err(DeviceError::CudaNotBuilt),
        _ => Ok(cpu()),
    }
}

#[cfg(feature = "cuda")]
fn select_cuda(_choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    // candle 0.11's CUDA backend builds cudarc with `dynamic-linking`, so a `cuda` binary is
    // linked against libcuda and `cudarc::driver::sys::is_culib_present()` (a `dynamic-loading`
    // only, `unsafe` function) is unavailable. A host without
    // the driver library cannot start such a binary at all; a host with the library but no
    // usable GPU gets an error from device creation here, never a panic, and falls back.
    if !driver_library_present() {
        tracing::warn!("no CUDA driver (libcuda.so.1) found: serving on the CPU");
        return Ok(cpu());
    }
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "CUDA device 0 unusable: serving on the CPU");
            return Ok(cpu());
        }
    };
    let hardware = gpu_description(&device).unwrap_or_else(|e| format!("cuda:0 ({e})"));
    Ok(SelectedDevice { device, hardware })
}

/// Whether the dynamic linker can find libcuda (checked by file, without loading it).
#[cfg(feature = "cuda")]
fn driver_library_present() -> bool {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(Into::into)
        .collect();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/lib64/stubs",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(d.into());
    }
    dirs.iter()
        .any(|d| d.join("libcuda.so.1").exists() || d.join("libcuda.so").exists())
}

/// GPU name and memory, from the driver through cudarc's safe API.
#[cfg(feature = "cuda")]
fn gpu_description(device: &Device) -> Result<String, DeviceError> {
    let cuda = device
        .as_cuda_device()
        .map_err(|e| DeviceError::Cuda(e.to_string()))?;
    let ctx = cuda.cuda_stream().context().clone();
    let name = ctx.name().map_err(|e| DeviceError::Cuda(e.to_string()))?;
    let bytes = ctx
        .total_mem()
        .map_err(|e| DeviceError::Cuda(e.to_string()))?;
    Ok(format!("gpu: {name}, {} MiB", bytes / (1024 * 1024)))
}

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::Cpu,
        hardware: cpu_description(),
    }
}

/// Bytes of memory this process may use: the host's (`MemTotal`), or its cgroup's limit
/// (a container's, cgroup v2 `memory.max`) when lower; `None` when neither can be read.
pub fn memory_limit_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    // "max" (no limit) does not parse, and leaves the host's figure.
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// "cpu: <model name>" (the engine adds how many threads it computes on).
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu: {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_described() {
        let d = select(DeviceChoice::Cpu).unwrap();
        assert!(d.device.is_cpu());
        assert!(d.hardware.starts_with("cpu: "), "{}", d.hardware);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn auto_without_cuda_build_is_cpu_and_explicit_cuda_is_refused() {
        assert!(select(DeviceChoice::Auto).unwrap().device.is_cpu());
        let Err(error @ DeviceError::CudaNotBuilt) = select(DeviceChoice::Cuda) else {
            panic!("--device cuda was accepted by a binary without the cuda feature");
        };
        // The operator learns what to do instead.
        assert!(error.to_string().contains("use --device cpu"), "{error}");
    }
}
