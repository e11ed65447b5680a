//! The packed causal attention on CUDA, with the CPU op's semantics: one warp per (row, head,
//! query) walks its sequence's keys in order with an online softmax (no scores kept); the
//! backward pass recomputes each query's log-sum-exp, then the queries' gradients (a warp per
//! query) and the keys' and values' (a warp per key and key/value head, over the queries that
//! see it), so every sum runs in a fixed order and no atomics are needed. Lanes hold head
//! dimensions (up to 256). Arithmetic is f32 for f32 and bf16 operands.
//!
//! Not yet run on a GPU: used only with `SPUR_CUDA_KERNELS=1` (`crate::unchecked_cuda_kernels`).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Storage, Tensor};

use crate::cuda::contiguous;

const SOURCE: &str = r#"
#define MAX_DIMS 8  // head dimensions per lane: head_dim <= 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// The warp's item and lane; false past the last item.
__device__ __forceinline__ bool warp_item(long items, long* item, int* lane) {
    *item = (long)blockIdx.x * WARPS + threadIdx.x / 32;
    *lane = threadIdx.x % 32;
    return *item < items;
}

// q [b, heads, t, hd], k and v [b, kv, t, hd], out and its gradient [b, t, heads, hd];
// start[i]: where position i's sequence starts, end[i]: where it ends.
template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, T* out,
                                  const unsigned int* start, int heads, int kv_heads, int t,
                                  int hd, float scale, long items) {
    long item; int lane;
    if (!warp_item(items, &item, &lane)) return;
    const int i = item % t, h = (item / t) % heads;
    const long row = item / ((long)t * heads);
    const int kvh = h / (heads / kv_heads);
    const T* qi = q + ((row * heads + h) * t + i) * hd;
    const T* kb = k + (row * kv_heads + kvh) * (long)t * hd;
    const T* vb = v + (row * kv_heads + kvh) * (long)t * hd;
    float qd[MAX_DIMS], acc[MAX_DIMS];
    int n = 0;
    for (int d = lane; d < hd; d += 32) { qd[n] = ld(qi, d); acc[n] = 0.0f; n++; }
    float m = NEG_INF, l = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f;
        int c = 0;
        for (int d = lane; d < hd; d += 32) s += qd[c++] * ld(kb, (long)j * hd + d);
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float keep = expf(m - m_new), p = expf(s - m_new);
        l = l * keep + p;
        c = 0;
        for (int d = lane; d < hd; d += 32) { acc[c] = acc[c] * keep + p * ld(vb, (long)j * hd + d); c++; }
        m = m_new;
    }
    T* o = out + ((row * t + i) * heads + h) * hd;
    int c = 0;
    for (int d = lane; d < hd; d += 32) st(o, d, acc[c++] / l);
}

// stats[2 * item] = the query's log-sum-exp of its scaled scores, stats[2 * item + 1] = its
// output's dot product with the output's gradient.
template <typename T>
__device__ void attention_stats(const T* q, const T* k, const T* out, const T* grad,
                                float* stats, const unsigned int* start, int heads,
                                int kv_heads, int t, int hd, float scale, long items) {
    long item; int lane;
    if (!warp_item(items, &item, &lane)) return;
    const int i = item % t, h = (item / t) % heads;
    const long row = item / ((long)t * heads);
    const int kvh = h / (heads / kv_heads);
    const T* qi = q + ((row * heads + h) * t + i) * hd;
    const T* kb = k + (row * kv_heads + kvh) * (long)t * hd;
    float m = NEG_INF, l = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32) s += ld(qi, d) * ld(kb, (long)j * hd + d);
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        l = l * expf(m - m_new) + expf(s - m_new);
        m = m_new;
    }
    const long o = ((row * t + i) * heads + h) * hd;
    float dot = 0.0f;
    for (int d = lane; d < hd; d += 32) dot += ld(out, o + d) * ld(grad, o + d);
    dot = warp_sum(dot);
    if (lane == 0) { stats[2 * item] = m + logf(l); stats[2 * item + 1] = dot; }
}

// dq_i = scale · Σ_j p_ij (dP_ij − D_i) k_j, dP_ij = dO_i · v_j.
template <typename T>
__device__ void attention_grad_q(const T* q, const T* k, const T* v, const T* grad,
                                 const float* stats, T* dq, const unsigned int* start,
                                 int heads, int kv_heads, int t, int hd, float scale,
                                 long items) {
    long item; int lane;
    if (!warp_item(items, &item, &lane)) return;
    const int i = item % t, h = (item / t) % heads;
    const long row = item / ((long)t * heads);
    const int kvh = h / (heads / kv_heads);
    const T* qi = q + ((row * heads + h) * t + i) * hd;
    const T* kb = k + (row * kv_heads + kvh) * (long)t * hd;
    const T* vb = v + (row * kv_heads + kvh) * (long)t * hd;
    const T* gi = grad + ((row * t + i) * heads + h) * hd;
    const float lse = stats[2 * item], big_d = stats[2 * item + 1];
    float acc[MAX_DIMS];
    for (int c = 0; c < MAX_DIMS; c++) acc[c] = 0.0f;
    for (int j = start[i]; j <= i; j++) {
        float s = 0.0f, dp = 0.0f;
        for (int d = lane; d < hd; d += 32) {
            s += ld(qi, d) * ld(kb, (long)j * hd + d);
            dp += ld(gi, d) * ld(vb, (long)j * hd + d);
        }
        s = warp_sum(s) * scale;
        dp = warp_sum(dp);
        const float ds = expf(s - lse) * (dp - big_d);
        int c = 0;
        for (int d = lane; d < hd; d += 32) acc[c++] += ds * ld(kb, (long)j * hd + d);
    }
    T* o = dq + ((row * heads + h) * t + i) * hd;
    int c = 0;
    for (int d = lane; d < hd; d += 32) st(o, d, acc[c++] * scale);
}

// For key j of a kv head: dv_j = Σ p_ij dO_i, dk_j = scale · Σ p_ij (dP_ij − D_i) q_i, over the
// group's query heads and the queries of j's sequence from j on.
template <typename T>
__device__ void attention_grad_kv(const T* q, const T* k, const T* v, const T* grad,
                                  const float* stats, T* dk, T* dv, const unsigned int* start,
                                  int heads, int kv_heads, int t, int hd, float scale,
                                  long items) {
    long item; int lane;
    if (!warp_item(items, &item, &lane)) return;
    const int j = item % t, kvh = (item / t) % kv_heads;
    const long row = item / ((long)t * kv_heads);
    const int group = heads / kv_heads;
    const T* kj = k + ((row * kv_heads + kvh) * t + j) * hd;
    const T* vj = v + ((row * kv_heads + kvh) * t + j) * hd;
    float dk_acc[MAX_DIMS], dv_acc[MAX_DIMS];
    for (int c = 0; c < MAX_DIMS; c++) { dk_acc[c] = 0.0f; dv_acc[c] = 0.0f; }
    for (int r = 0; r < group; r++) {
        const int h = kvh * group + r;
        for (int i = j; i < t && start[i] == start[j]; i++) {
            const T* qi = q + ((row * heads + h) * t + i) * hd;
            const T* gi = grad + ((row * t + i) * heads + h) * hd;
            const long s_at = 2 * ((row * heads + h) * t + i);
            float s = 0.0f, dp = 0.0f;
            for (int d = lane; d < hd; d += 32) {
                s += ld(qi, d) * ld(kj, d);
                dp += ld(gi, d) * ld(vj, d);
            }
            s = warp_sum(s) * scale;
            dp = warp_sum(dp);
            const float p = expf(s - stats[s_at]);
            const float ds = p * (dp - stats[s_at + 1]);
            int c = 0;
            for (int d = lane; d < hd; d += 32) {
                dv_acc[c] += p * ld(gi, d);
                dk_acc[c] += ds * ld(qi, d);
                c++;
            }
        }
    }
    const long o = ((row * kv_heads + kvh) * t + j) * hd;
    int c = 0;
    for (int d = lane; d < hd; d += 32) {
        st(dk, o + d, dk_acc[c] * scale);
        st(dv, o + d, dv_acc[c]);
        c++;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
extern "C" __global__ void attention_forward_##SUFFIX(                                         \
    const T* q, const T* k, const T* v, T* out, const unsigned int* start, int heads,          \
    int kv_heads, int t, int hd, float scale, long items) {                                    \
    attention_forward(q, k, v, out, start, heads, kv_heads, t, hd, scale, items);              \
}                                                                                              \
extern "C" __global__ void attention_stats_##SUFFIX(                                           \
    const T* q, const T* k, const T* out, const T* grad, float* stats,                         \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_stats(q, k, out, grad, stats, start, heads, kv_heads, t, hd, scale, items);      \
}                                                                                              \
extern "C" __global__ void attention_grad_q_##SUFFIX(                                          \
    const T* q, const T* k, const T* v, const T* grad, const float* stats, T* dq,              \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_grad_q(q, k, v, grad, stats, dq, start, heads, kv_heads, t, hd, scale, items);   \
}                                                                                              \
extern "C" __global__ void attention_grad_kv_##SUFFIX(                                         \
    const T* q, const T* k, const T* v, const T* grad, const float* stats, T* dk, T* dv,       \
    const unsigned int* start, int heads, int kv_heads, int t, int hd, float scale,            \
    long items) {                                                                              \
    attention_grad_kv(q, k, v, grad, stats, dk, dv, start, heads, kv_heads, t, hd, scale,      \
                      items);                                                                  \
}
INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
"#;

/// Head dimensions a warp holds (32 lanes × `MAX_DIMS`).
pub(super) const MAX_HEAD_DIM: usize = 256;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    crate::cuda::ptx(&PTX, SOURCE, "packed-attention")
}

/// The sizes of a call, as the kernels take them.
pub(super) struct Sizes {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
}

/// Each position's sequence start, for rows holding sequences of `lengths` back to back.
fn starts(lengths: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(lengths.iter().sum());
    let mut at = 0u32;
    for &n in lengths {
        out.extend(std::iter::repeat_n(at, n));
        at += n as u32;
    }
    out
}

fn config(items: usize) -> LaunchConfig {
    let warps = (crate::cuda::THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (items.div_ceil(warps).max(1) as u32, 1, 1),
        block_dim: (crate::cuda::THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(s: &CudaStorage) -> candle_core::Result<&'static str> {
    match &s.slice {
        CudaStorageSlice::F32(_) => Ok("f32"),
        CudaStorageSlice::BF16(_) => Ok("bf16"),
        _ => candle_core::bail!("packed-attention: CUDA kernels take f32 or bf16"),
    }
}

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// The forward pass: the output [b, t, heads · hd] in q's dtype.
pub(super) fn forward(
    q: Operand<'_>,
    k: Operand<'_>,
    v: Operand<'_>,
    lengths: &[usize],
    s: &Sizes,
) -> candle_core::Result<CudaStorage> {
    let op = "packed-attention";
    let dev = q.0.device.clone();
    let func = dev.get_or_load_custom_func(
        &format!("attention_forward_{}", suffix(q.0)?),
        "spur_packed_attention",
        ptx()?,
    )?;
    let start = dev.clone_htod(&starts(lengths))?;
    let items = s.batch * s.heads * s.tokens;
    let ints = [
        s.heads as i32,
        s.kv_heads as i32,
        s.tokens as i32,
        s.head_dim as i32,
    ];
    let (scale, count) = (1.0 / (s.head_dim as f32).sqrt(), items as i64);
    macro_rules! run {
        ($ty:ty) => {{
            let qs = contiguous(q.0.as_cuda_slice::<$ty>()?, q.1, op, "q")?;
            let ks = contiguous(k.0.as_cuda_slice::<$ty>()?, k.1, op, "k")?;
            let vs = contiguous(v.0.as_cuda_slice::<$ty>()?, v.1, op, "v")?;
            // SAFETY: every element is written by the kernel.
            let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(items * s.head_dim)? };
            let mut b = func.builder();
            b.arg(&qs).arg(&ks).arg(&vs).arg(&out).arg(&start);
            for i in &ints {
                b.arg(i);
            }
            b.arg(&scale).arg(&count);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(config(items)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match &q.0.slice {
        CudaStorageSlice::F32(_) => run!(f32),
        _ => run!(half::bf16),
    })
}

/// The gradients of q, k and v, back to back in one flat buffer in q's dtype.
pub(super) fn backward(
    q: Operand<'_>,
    k: Operand<'_>,
    v: Operand<'_>,
    out: &Tensor,
    grad: &Tensor,
    lengths: &[usize],
    s: &Sizes,
) -> candle_core::Result<CudaStorage> {
    let op = "packed-attention backward";
    let dev = q.0.device.clone();
    let sfx = suffix(q.0)?;
    let load = |name: &str| {
        dev.get_or_load_custom_func(&format!("{name}_{sfx}"), "spur_packed_attention", ptx()?)
    };
    let (out_guard, out_layout) = out.storage_and_layout();
    let (grad_guard, grad_layout) = grad.storage_and_layout();
    let (Storage::Cuda(out_storage), Storage::Cuda(grad_storage)) = (&*out_guard, &*grad_guard)
    else {
        candle_core::bail!("{op}: the output and its gradient must be on the GPU");
    };
    let start = dev.clone_htod(&starts(lengths))?;
    let q_items = s.batch * s.heads * s.tokens;
    let kv_items = s.batch * s.kv_heads * s.tokens;
    let (nq, nkv) = (q_items * s.head_dim, kv_items * s.head_dim);
    let ints = [
        s.heads as i32,
        s.kv_heads as i32,
        s.tokens as i32,
        s.head_dim as i32,
    ];
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let (q_count, kv_count) = (q_items as i64, kv_items as i64);
    // SAFETY: the stats kernel writes both numbers of every query before the others read them.
    let stats = unsafe { dev.alloc::<f32>(2 * q_items)? };
    macro_rules! run {
        ($ty:ty) => {{
            let qs = contiguous(q.0.as_cuda_slice::<$ty>()?, q.1, op, "q")?;
            let ks = contiguous(k.0.as_cuda_slice::<$ty>()?, k.1, op, "k")?;
            let vs = contiguous(v.0.as_cuda_slice::<$ty>()?, v.1, op, "v")?;
            let os = contiguous(out_storage.as_cuda_slice::<$ty>()?, out_layout, op, "out")?;
            let gs = contiguous(
                grad_storage.as_cuda_slice::<$ty>()?,
                grad_layout,
                op,
                "grad",
            )?;
            // dq, dk and dv back to back; SAFETY: the kernels write every element.
            let mut grads: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(nq + 2 * nkv)? };
            let f = load("attention_stats")?;
            let mut b = f.builder();
            b.arg(&qs)
                .arg(&ks)
                .arg(&os)
                .arg(&gs)
                .arg(&stats)
                .arg(&start);
            for i in &ints {
                b.arg(i);
            }
            b.arg(&scale).arg(&q_count);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(config(q_items)) }.w()?;
            {
                let mut dq = grads.slice_mut(0..nq);
                let f = load("attention_grad_q")?;
                let mut b = f.builder();
                b.arg(&qs)
                    .arg(&ks)
                    .arg(&vs)
                    .arg(&gs)
                    .arg(&stats)
                    .arg(&mut dq)
                    .arg(&start);
                for i in &ints {
                    b.arg(i);
                }
                b.arg(&scale).arg(&q_count);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(config(q_items)) }.w()?;
            }
            {
                let (_, mut rest) = grads.split_at_mut(nq);
                let (mut dk, mut dv) = rest.split_at_mut(nkv);
                let f = load("attention_grad_kv")?;
                let mut b = f.builder();
                b.arg(&qs).arg(&ks).arg(&vs).arg(&gs).arg(&stats);
                b.arg(&mut dk).arg(&mut dv).arg(&start);
                for i in &ints {
                    b.arg(i);
                }
                b.arg(&scale).arg(&kv_count);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(config(kv_items)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(grads, dev.clone())
        }};
    }
    Ok(match &q.0.slice {
        CudaStorageSlice::F32(_) => run!(f32),
        _ => run!(half::bf16),
    })
}
