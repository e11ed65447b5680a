//! CUDA kernels of the fused training ops, with the CPU kernels' semantics: f32 and bf16
//! operands, f32 arithmetic, and the norm weight's gradient summed over fixed blocks of rows in
//! a fixed order (so it does not depend on scheduling). RMS norms take one block per row;
//! rotary embedding and SwiGLU one thread per output pair or element.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Shape};

use crate::cuda::{blocks_for, contiguous, THREADS};

const SOURCE: &str = r#"
// 1 / sqrt(mean(x²) + eps) of a row of n, in every thread of the block.
template <typename T>
__device__ float inv_rms(const T* x, int n, float eps, float* shared) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += THREADS) { float v = ld(x, j); s += v * v; }
    s = block_sum(s, shared);
    return 1.0f / sqrtf(s / n + eps);
}

template <typename T>
__device__ void rms_norm(const T* x, const float* w, T* out, int n, float eps) {
    __shared__ float shared[33];
    const long row = (long)blockIdx.x * n;
    const float r = inv_rms(x + row, n, eps, shared);
    for (int j = threadIdx.x; j < n; j += THREADS) st(out, row + j, ld(x, row + j) * r * w[j]);
}

// dx = r·g⊙w − x · r³ · Σ(g⊙w⊙x) / n.
template <typename T>
__device__ void rms_norm_grad_input(const T* x, const float* w, const T* g, T* out, int n,
                                    float eps) {
    __shared__ float shared[33];
    const long row = (long)blockIdx.x * n;
    const float r = inv_rms(x + row, n, eps, shared);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += THREADS) dot += ld(x, row + j) * ld(g, row + j) * w[j];
    dot = block_sum(dot, shared);
    const float c = r * r * r * dot / n;
    for (int j = threadIdx.x; j < n; j += THREADS) {
        st(out, row + j, r * ld(g, row + j) * w[j] - ld(x, row + j) * c);
    }
}

template <typename T>
__device__ void inv_rms_rows(const T* x, float* out, int n, float eps) {
    __shared__ float shared[33];
    const float r = inv_rms(x + (long)blockIdx.x * n, n, eps, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// partial[block][j] = Σ over the block's rows of g·x·r, one thread per column j.
template <typename T>
__device__ void rms_norm_grad_weight_partial(const T* x, const T* g, const float* r,
                                             float* partial, int n, long rows, int block_rows) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= n) return;
    const long first = (long)blockIdx.y * block_rows;
    long last = first + block_rows;
    if (last > rows) last = rows;
    float s = 0.0f;
    for (long row = first; row < last; row++) s += ld(g, row * n + j) * ld(x, row * n + j) * r[row];
    partial[(long)blockIdx.y * n + j] = s;
}

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, int h, int t, int half,
                     int interleaved, float sign, long pairs) {
    const long idx = (long)blockIdx.x * THREADS + threadIdx.x;
    if (idx >= pairs) return;
    const long row = idx / half;
    const int i = idx % half;
    // Row (batch, head, position) reads the table of (batch, position).
    const long table = (row / ((long)h * t) * t + row % t) * half;
    const long base = row * 2 * half;
    const long i1 = base + (interleaved ? 2 * i : i);
    const long i2 = base + (interleaved ? 2 * i + 1 : i + half);
    const float x1 = ld(x, i1), x2 = ld(x, i2);
    const float c = ld(cos, table + i), s = sign * ld(sin, table + i);
    st(out, i1, x1 * c - x2 * s);
    st(out, i2, x2 * c + x1 * s);
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    const float g = ld(gate, i);
    st(out, i, g * sigmoid(g) * ld(up, i));
}

// out[0..n] = d_gate, out[n..2n] = d_up.
template <typename T>
__device__ void swiglu_grad(const T* gate, const T* up, const T* dy, T* out, long n) {
    const long i = (long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) return;
    const float g = ld(gate, i), u = ld(up, i), d = ld(dy, i);
    const float s = sigmoid(g);
    st(out, n + i, d * g * s);
    st(out, i, d * u * s * (1.0f + g * (1.0f - s)));
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
extern "C" __global__ void rms_norm_##SUFFIX(const T* x, const float* w, T* o, int n,        \
                                             float eps) {                                     \
    rms_norm(x, w, o, n, eps);                                                               \
}                                                                                            \
extern "C" __global__ void rms_norm_grad_input_##SUFFIX(const T* x, const float* w,          \
                                                        const T* g, T* o, int n, float eps) {\
    rms_norm_grad_input(x, w, g, o, n, eps);                                                 \
}                                                                                            \
extern "C" __global__ void inv_rms_rows_##SUFFIX(const T* x, float* o, int n, float eps) {   \
    inv_rms_rows(x, o, n, eps);                                                              \
}                                                                                            \
extern "C" __global__ void rms_norm_grad_weight_partial_##SUFFIX(                            \
    const T* x, const T* g, const float* r, float* p, int n, long rows, int block_rows) {    \
    rms_norm_grad_weight_partial(x, g, r, p, n, rows, block_rows);                           \
}                                                                                            \
extern "C" __global__ void rope_##SUFFIX(const T* x, const T* c, const T* s, T* o, int h,    \
                                         int t, int half, int interleaved, float sign,       \
                                         long pairs) {                                       \
    rope(x, c, s, o, h, t, half, interleaved, sign, pairs);                                  \
}                                                                                            \
extern "C" __global__ void swiglu_##SUFFIX(const T* g, const T* u, T* o, long n) {           \
    swiglu(g, u, o, n);                                                                      \
}                                                                                            \
extern "C" __global__ void swiglu_grad_##SUFFIX(const T* g, const T* u, const T* d, T* o,    \
                                                long n) {                                    \
    swiglu_grad(g, u, d, o, n);                                                              \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

// Σ over the blocks, in order, of each column's partial sums.
extern "C" __global__ void sum_partials(const float* partial, float* out, int n, int blocks) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= n) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; b++) s += partial[(long)b * n + j];
    out[j] = s;
}
"#;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    crate::cuda::ptx(&PTX, SOURCE, "training-op")
}

/// An operand of one of these ops: its storage and layout.
pub(super) type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// What a kernel is launched over, beside its tensor operands.
pub(super) enum Scalar {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Launches `name` (suffixed by the dtype of the first operand) over `grid` blocks, with the
/// tensor operands in order, then an output of `out_len` elements of their dtype, then
/// `scalars`. Every operand must have the first one's dtype, except `f32_operands`, which are
/// f32 whatever it is.
pub(super) fn launch(
    op: &str,
    name: &str,
    operands: &[Operand<'_>],
    f32_operands: &[usize],
    out_len: usize,
    grid: (u32, u32),
    scalars: &[Scalar],
) -> candle_core::Result<CudaStorage> {
    let first = operands[0].0;
    let dev = &first.device;
    if grid.0 == 0 || grid.1 == 0 {
        candle_core::bail!("{op}: empty operands");
    }
    let func = dev.get_or_load_custom_func(
        &format!("{name}_{}", dtype_suffix(op, first)?),
        "spur_train_ops",
        ptx()?,
    )?;
    macro_rules! run {
        ($ty:ty) => {{
            let mut views = Vec::with_capacity(operands.len());
            for (i, (storage, layout)) in operands.iter().enumerate() {
                let what = format!("operand {i}");
                views.push(if f32_operands.contains(&i) {
                    Err(contiguous(
                        storage.as_cuda_slice::<f32>()?,
                        layout,
                        op,
                        &what,
                    )?)
                } else {
                    Ok(contiguous(
                        storage.as_cuda_slice::<$ty>()?,
                        layout,
                        op,
                        &what,
                    )?)
                });
            }
            // SAFETY: every element is written by the kernel.
            let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(out_len)? };
            let mut builder = func.builder();
            for view in &views {
                match view {
                    Ok(v) => builder.arg(v),
                    Err(v) => builder.arg(v),
                };
            }
            builder.arg(&out);
            for scalar in scalars {
                match scalar {
                    Scalar::I32(v) => builder.arg(v),
                    Scalar::I64(v) => builder.arg(v),
                    Scalar::F32(v) => builder.arg(v),
                };
            }
            // SAFETY: the operands, output and scalars match the kernel's signature.
            unsafe { builder.launch(config(grid)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match &first.slice {
        CudaStorageSlice::F32(_) => run!(f32),
        _ => run!(half::bf16),
    })
}

/// The norm weight's gradient, f32 `[hidden]`: the rows' inverse RMS, then partial sums over
/// blocks of `block_rows` rows, then the blocks' sums in order.
pub(super) fn rms_norm_grad_weight(
    op: &str,
    x: Operand<'_>,
    grad: Operand<'_>,
    hidden: usize,
    block_rows: usize,
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let rows = x.1.shape().elem_count() / hidden;
    if rows == 0 {
        candle_core::bail!("{op}: no rows");
    }
    let dev = &x.0.device;
    let suffix = dtype_suffix(op, x.0)?;
    let load = |name: &str| dev.get_or_load_custom_func(name, "spur_train_ops", ptx()?);
    let blocks = rows.div_ceil(block_rows);
    // SAFETY: every element of the three buffers is written by the kernels below.
    let (r, partial, dw) = unsafe {
        (
            dev.alloc::<f32>(rows)?,
            dev.alloc::<f32>(blocks * hidden)?,
            dev.alloc::<f32>(hidden)?,
        )
    };
    let (n, rows_arg) = (hidden as i32, rows as i64);
    let (block_rows_arg, blocks_arg) = (block_rows as i32, blocks as i32);
    macro_rules! run {
        ($ty:ty) => {{
            let xs = contiguous(x.0.as_cuda_slice::<$ty>()?, x.1, op, "x")?;
            let gs = contiguous(grad.0.as_cuda_slice::<$ty>()?, grad.1, op, "the gradient")?;
            let f = load(&format!("inv_rms_rows_{suffix}"))?;
            let mut b = f.builder();
            b.arg(&xs).arg(&r).arg(&n).arg(&eps);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(config((rows as u32, 1))) }.w()?;
            let f = load(&format!("rms_norm_grad_weight_partial_{suffix}"))?;
            let mut b = f.builder();
            b.arg(&xs).arg(&gs).arg(&r).arg(&partial);
            b.arg(&n).arg(&rows_arg).arg(&block_rows_arg);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(config((blocks_for(hidden), blocks as u32))) }.w()?;
        }};
    }
    match &x.0.slice {
        CudaStorageSlice::F32(_) => run!(f32),
        _ => run!(half::bf16),
    }
    let f = load("sum_partials")?;
    let mut b = f.builder();
    b.arg(&partial).arg(&dw).arg(&n).arg(&blocks_arg);
    // SAFETY: arguments match the kernel's signature.
    unsafe { b.launch(config((blocks_for(hidden), 1))) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(dw, dev.clone()),
        Shape::from(hidden),
    ))
}

fn config(grid: (u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernel-name suffix of `storage`'s dtype.
fn dtype_suffix(op: &str, storage: &CudaStorage) -> candle_core::Result<&'static str> {
    match &storage.slice {
        CudaStorageSlice::F32(_) => Ok("f32"),
        CudaStorageSlice::BF16(_) => Ok("bf16"),
        _ => candle_core::bail!(
            "{op}: CUDA kernels take f32 or bf16, not {:?}",
            storage.dtype()
        ),
    }
}
