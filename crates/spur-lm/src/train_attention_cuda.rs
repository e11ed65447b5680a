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

use crate::cuda::{contiguous, dtype_suffix};

const SOURCE: &str = include_str!("../kernels/train_attention.cu");

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

/// A warp per item.
fn warps_for(items: usize) -> LaunchConfig {
    let warps = (crate::cuda::THREADS / 32) as usize;
    crate::cuda::blocks((items.div_ceil(warps).max(1) as u32, 1))
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
        &format!("attention_forward_{}", dtype_suffix(op, q.0)?),
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
            unsafe { b.launch(warps_for(items)) }.w()?;
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
    let sfx = dtype_suffix(op, q.0)?;
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
            unsafe { b.launch(warps_for(q_items)) }.w()?;
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
                unsafe { b.launch(warps_for(q_items)) }.w()?;
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
                unsafe { b.launch(warps_for(kv_items)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(grads, dev.clone())
        }};
    }
    Ok(match &q.0.slice {
        CudaStorageSlice::F32(_) => run!(f32),
        _ => run!(half::bf16),
    })
}
