//! Accelerators as candle sees them.

use crate::profile::{Accelerator, AcceleratorKind, CpuVendor};

/// Accelerators found: asked of candle where the `cuda` / `metal` features
/// are on; otherwise found through the driver (`/proc/driver/nvidia`) or the
/// platform (Apple silicon has Metal) and marked not usable in this build.
pub(crate) fn detect(nvidia_gpus_in_driver: usize, vendor: CpuVendor) -> Vec<Accelerator> {
    let mut found = Vec::new();
    if let Some(cuda) = cuda(nvidia_gpus_in_driver) {
        found.push(cuda);
    }
    if let Some(metal) = metal(vendor) {
        found.push(metal);
    }
    found
}

#[cfg(feature = "cuda")]
fn cuda(in_driver: usize) -> Option<Accelerator> {
    if !candle_core::utils::cuda_is_available() {
        return (in_driver > 0).then(|| Accelerator {
            kind: AcceleratorKind::Cuda,
            devices: in_driver,
            usable: false,
            note: "NVIDIA driver lists GPUs but candle could not use CUDA".into(),
        });
    }
    // Count the devices candle can open (stops at the first failure).
    let devices = (0..64)
        .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
        .count();
    Some(Accelerator {
        kind: AcceleratorKind::Cuda,
        devices,
        usable: devices > 0,
        note: format!("candle opened {devices} CUDA device(s)"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(in_driver: usize) -> Option<Accelerator> {
    (in_driver > 0).then(|| Accelerator {
        kind: AcceleratorKind::Cuda,
        devices: in_driver,
        usable: false,
        note: "NVIDIA driver lists GPUs; build with the `cuda` feature to use them".into(),
    })
}

#[cfg(feature = "metal")]
fn metal(_vendor: CpuVendor) -> Option<Accelerator> {
    candle_core::utils::metal_is_available().then(|| Accelerator {
        kind: AcceleratorKind::Metal,
        devices: 1,
        usable: candle_core::Device::new_metal(0).is_ok(),
        note: "candle reports Metal".into(),
    })
}

#[cfg(not(feature = "metal"))]
fn metal(vendor: CpuVendor) -> Option<Accelerator> {
    (cfg!(target_os = "macos") && vendor == CpuVendor::Apple).then(|| Accelerator {
        kind: AcceleratorKind::Metal,
        devices: 1,
        usable: false,
        note: "Apple silicon has Metal; build with the `metal` feature to use it".into(),
    })
}
