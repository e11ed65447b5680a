//! What spur's CUDA kernels share: a prelude of element loads and stores and block reductions,
//! NVRTC compilation at first use (no headers, no nvcc at run time), and operands as contiguous
//! device slices.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc;
use candle_core::Layout;

/// The kernels' common CUDA source, put before each kernel source. bf16 is read and written as
/// its 16 bits (no `cuda_bf16.h`, which NVRTC would need headers for); all arithmetic is f32.
/// Blocks are `THREADS` wide.
pub const PRELUDE: &str = r#"
typedef unsigned short bf16_t;
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}

#define THREADS 256
#define NEG_INF __int_as_float(0xff800000)
// Block-wide reductions: each warp reduces, warp 0 reduces the warps' results, and thread 0
// hands the total to every thread through shared memory.
__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : NEG_INF;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
        if (threadIdx.x == 0) shared[32] = v;
    }
    __syncthreads();
    v = shared[32];
    __syncthreads();
    return v;
}
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) shared[32] = v;
    }
    __syncthreads();
    v = shared[32];
    __syncthreads();
    return v;
}
"#;

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

/// Blocks of [`THREADS`] that cover `n` elements, one thread each.
pub fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).max(1) as u32
}
