//! Device selection and hardware facts.
//!
//! `auto` uses a CUDA GPU when the binary was built with the `cuda` feature *and* a driver is
//! present, otherwise the CPU. The driver check comes first because cudarc's context creation
//! panics when `libcuda` cannot be loaded; the fallback is logged once and never panics.

use candle_core::Device;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A CUDA GPU when available, else the CPU.
    Auto,
    Cpu,
    /// A CUDA GPU; falls back to the CPU (logged) when no driver is present.
    Cuda,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device cuda: this binary was built without the `cuda` feature")]
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
    if !cudarc::driver::sys::is_culib_present() {
        tracing::warn!("no CUDA driver (libcuda) found: serving on the CPU");
        return Ok(cpu());
    }
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "CUDA device 0 unusable: serving on the CPU");
            return Ok(cpu());
        }
    };
    let hardware = gpu_description().unwrap_or_else(|e| format!("cuda:0 ({e})"));
    Ok(SelectedDevice { device, hardware })
}

/// GPU name and memory through the driver API (only called once the driver is known present).
#[cfg(feature = "cuda")]
fn gpu_description() -> Result<String, DeviceError> {
    use cudarc::driver::result;
    let err = |e: result::DriverError| DeviceError::Cuda(e.to_string());
    result::init().map_err(err)?;
    let dev = result::device::get(0).map_err(err)?;
    let name = result::device::get_name(dev).map_err(err)?;
    let bytes = unsafe_free_total_mem(dev).map_err(err)?;
    Ok(format!("{name}, {} MiB", bytes / (1024 * 1024)))
}

#[cfg(feature = "cuda")]
fn unsafe_free_total_mem(
    dev: cudarc::driver::sys::CUdevice,
) -> Result<usize, cudarc::driver::result::DriverError> {
    cudarc::driver::result::device::total_mem(dev)
}

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::Cpu,
        hardware: cpu_description(),
    }
}

/// "cpu: <model name>, <n> threads".
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
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("cpu: {model}, {threads} threads")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_described() {
        let d = select(DeviceChoice::Cpu).unwrap();
        assert!(d.device.is_cpu());
        assert!(d.hardware.starts_with("cpu: "), "{}", d.hardware);
        assert!(d.hardware.contains("threads"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn auto_without_cuda_build_is_cpu_and_explicit_cuda_is_refused() {
        assert!(select(DeviceChoice::Auto).unwrap().device.is_cpu());
        assert!(matches!(
            select(DeviceChoice::Cuda),
            Err(DeviceError::CudaNotBuilt)
        ));
    }
}
