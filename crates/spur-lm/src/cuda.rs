//! What spur's CUDA kernels share: a prelude of element loads and stores and block reductions,
//! NVRTC compilation at first use (no headers, no nvcc at run time), and operands as contiguous
//! device slices.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::{cudarc, CudaStorage, CudaStorageSlice};
use candle_core::Layout;

/// The kernels' common CUDA source, put before each kernel source. bf16 is read and written as
/// its 16 bits (no `cuda_bf16.h`, which NVRTC would need headers for); all arithmetic is f32.
/// Blocks are `THREADS` wide.
pub const PRELUDE: &str = include_str!("../kernels/prelude.cuh");

/// Threads per block, as the prelude's `THREADS`.
pub const THREADS: u32 = 256;

/// The PTX of [`PRELUDE`] followed by `source`, compiled once per process into `cell`; errors
/// name `what`.
pub fn ptx(
    cell: &'static OnceLock<Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(format!("{PRELUDE}{source}"))
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling spur's {what} kernels: {e}")))
}

/// `slice` as the contiguous elements `layout` spans; the error names the op and the operand.
pub fn contiguous<'a, T>(
    slice: &'a cudarc::driver::CudaSlice<T>,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// The kernel-name suffix of `storage`'s dtype: every kernel is instantiated for f32 and bf16.
pub fn dtype_suffix(op: &str, storage: &CudaStorage) -> candle_core::Result<&'static str> {
    match &storage.slice {
        CudaStorageSlice::F32(_) => Ok("f32"),
        CudaStorageSlice::BF16(_) => Ok("bf16"),
        _ => candle_core::bail!(
            "{op}: CUDA kernels take f32 or bf16, not {:?}",
            storage.dtype()
        ),
    }
}

/// A launch of (x, y) blocks of [`THREADS`] threads.
pub fn blocks(grid: (u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of [`THREADS`] that cover `n` elements, one thread each.
pub fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).max(1) as u32
}
