//! CUDA backend skeleton (feature `cuda`): cudarc with dynamic loading, so
//! the crate builds without a CUDA toolkit. For now it finds the driver and
//! the devices; the op implementations (kernels in `kernels/*.cu`) are
//! still to come, and asking to run on CUDA says so.

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: msg.into(),
    }
}

/// The names of the CUDA devices, or why there are none.
pub fn devices() -> Result<Vec<String>> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(err("the CUDA driver library (libcuda.so) was not found"));
    }
    let n = CudaContext::device_count().map_err(|e| err(format!("cuDeviceGetCount: {e:?}")))?;
    if n <= 0 {
        return Err(err("the CUDA driver reports no device"));
    }
    (0..n as usize)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| err(format!("device {i}: {e:?}")))?;
            ctx.name().map_err(|e| err(format!("device {i}: {e:?}")))
        })
        .collect()
}

/// Opening the backend: checks the device, then reports that the CUDA ops
/// are not implemented in this build.
pub fn open() -> Result<std::convert::Infallible> {
    let names = devices()?;
    Err(err(format!(
        "found {} ({}), but this build's CUDA backend has no kernels yet; use --backend cpu",
        names.len(),
        names.join(", ")
    )))
}
