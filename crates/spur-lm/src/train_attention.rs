//! Causal attention over packed sequences as one op with its own backward pass, for the
//! training and scoring passes on the CPU ([`packed_attention`]).
//!
//! Written with candle ops, each sequence's attention materialises its scores, their scaling,
//! mask, softmax and casts, several tensors of [heads, n, n], and candle's backward pass holds
//! about eight f32 tensors of that size again: at 4,096 tokens and 12 heads that is 0.8 GB per
//! tensor. This op keeps only its output and each query's log-sum-exp, and its backward pass
//! recomputes the probabilities one block of queries at a time, as FlashAttention does: memory
//! per head grows with n, not n².
//!
//! The forward pass splits its work into tasks of (row, sequence, head, block of queries), the
//! backward pass into tasks of (row, sequence, key/value head), which own the gradients of their
//! keys and values. Each task writes its own outputs in a fixed order and runs its products on
//! its own thread, so results do not depend on the number of threads. The products are `gemm`'s,
//! the crate behind candle's CPU matmul; everything is computed in f32 whatever the operands'
//! dtype (scores and softmax in f32, as autocast does). The CUDA kernels
//! (`train_attention_cuda.rs`) keep the semantics with a warp per query; they have not run on a
//! GPU yet, so CUDA passes use them only with `SPUR_CUDA_KERNELS=1`, and candle's composite
//! attention otherwise.

use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;

#[cfg(feature = "cuda")]
#[path = "train_attention_cuda.rs"]
mod cuda;

/// Whether [`packed_attention`] serves passes on `device` in `dtype`: on the CPU, in f32, bf16
/// and f16; on CUDA in f32 and bf16 with `SPUR_CUDA_KERNELS=1` (its kernels are unchecked).
pub(crate) fn has_kernel(device: &Device, dtype: DType) -> bool {
    match device {
        Device::Cpu => matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
        Device::Cuda(_) => {
            crate::unchecked_cuda_kernels() && matches!(dtype, DType::F32 | DType::BF16)
        }
        _ => false,
    }
}

/// Queries per block: a block's scores are `QUERY_BLOCK × n` f32 (1 MiB at n = 4,096).
const QUERY_BLOCK: usize = 64;

/// Softmax attention of `q` [b, heads, t, hd] over `k`, `v` [b, kv_heads, t, hd], where each row
/// of the batch holds sequences of `lengths` back to back (summing to t): each query attends
/// causally within its own sequence. Query head h reads key/value head h / (heads / kv_heads).
/// Returns [b, t, heads · hd] (the layout the output projection reads) in q's dtype.
/// Differentiable with respect to q, k and v. Where [`has_kernel`] says.
pub fn packed_attention(q: &Tensor, k: &Tensor, v: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let op = PackedAttention {
        lengths: lengths.to_vec(),
        lse: Mutex::new(None),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The same attention from candle's ops, as the model's composite path computes it: each
/// sequence sliced out, its scores masked and soft-maxed in f32, the outputs joined,
/// [b, t, heads · hd] in q's dtype. The reference the kernels are tested and timed against.
pub(crate) fn packed_attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
) -> Result<Tensor> {
    let (b, heads, t, hd) = q.dims4()?;
    let (kb, kv_heads, kt, khd) = k.dims4()?;
    let group = heads / kv_heads;
    // Each key/value head `group` times in a row: [b, heads, t, hd].
    let repeat = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((kb, kv_heads, group, kt, khd))?
            .reshape((kb, heads, kt, khd))?)
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut outs = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &n in lengths {
        let part =
            |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(2, start, n)?.to_dtype(DType::F32)?) };
        let (qs, ks, vs) = (part(q)?, part(&k)?, part(&v)?);
        let scores = (qs.matmul(&ks.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), q.device())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
        outs.push(probs.matmul(&vs)?);
        start += n;
    }
    Ok(Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .reshape((b, t, heads * hd))?
        .to_dtype(q.dtype())?)
}

/// The op. `lse` keeps each query's log-sum-exp of its scaled scores, [b, heads, t], from the
/// forward pass for the backward pass (the graph holds this op, so it lives as long as the
/// output's graph does).
struct PackedAttention {
    lengths: Vec<usize>,
    lse: Mutex<Option<Vec<f32>>>,
}

/// The sizes of one call, checked against the operands.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    tokens: usize,
    head_dim: usize,
}

impl Dims {
    fn new(lengths: &[usize], q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Self> {
        const OP: &str = "packed-attention";
        let (batch, heads, tokens, head_dim) = q.dims4()?;
        let (kb, kv_heads, kt, khd) = k.dims4()?;
        if (kb, kt, khd) != (batch, tokens, head_dim) || v != k {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?} and v {:?} do not match",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("{OP}: {heads} query heads cannot share {kv_heads} key/value heads");
        }
        let total: usize = lengths.iter().sum();
        if total != tokens {
            candle_core::bail!("{OP}: sequences of {total} tokens in rows of {tokens}");
        }
        Ok(Dims {
            batch,
            heads,
            kv_heads,
            tokens,
            head_dim,
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    #[cfg(feature = "cuda")]
    fn sizes(&self) -> candle_core::Result<cuda::Sizes> {
        if self.head_dim > cuda::MAX_HEAD_DIM {
            candle_core::bail!(
                "packed-attention: the CUDA kernels hold heads of up to {} dimensions, not {}",
                cuda::MAX_HEAD_DIM,
                self.head_dim
            );
        }
        Ok(cuda::Sizes {
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            tokens: self.tokens,
            head_dim: self.head_dim,
        })
    }

    /// Offset of (row, head, position 0) in q-shaped data.
    fn q_at(&self, row: usize, head: usize) -> usize {
        (row * self.heads + head) * self.tokens * self.head_dim
    }

    /// Offset of (row, kv head, position 0) in k-shaped data.
    fn kv_at(&self, row: usize, kv_head: usize) -> usize {
        (row * self.kv_heads + kv_head) * self.tokens * self.head_dim
    }

    /// Row stride of the output [b, t, heads · hd].
    fn out_stride(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Offset of (row, position 0, head) in the output.
    fn out_at(&self, row: usize, head: usize) -> usize {
        row * self.tokens * self.out_stride() + head * self.head_dim
    }
}

/// One sequence of one row: where it starts and how long it is.
#[derive(Clone, Copy, Debug)]
struct Sequence {
    row: usize,
    start: usize,
    len: usize,
}

fn sequences(lengths: &[usize], batch: usize) -> Vec<Sequence> {
    let mut out = Vec::new();
    for row in 0..batch {
        let mut start = 0;
        for &len in lengths {
            if len > 0 {
                out.push(Sequence { row, start, len });
            }
            start += len;
        }
    }
    out
}

/// A matrix inside a slice: element (i, j) at `offset + i · rows + j · cols`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Mat<'a> {
    /// Row-major, rows `stride` apart.
    fn rows(data: &'a [f32], offset: usize, stride: usize) -> Self {
        Mat {
            data,
            offset,
            rows: stride,
            cols: 1,
        }
    }

    /// The transpose of [`Mat::rows`].
    fn transposed(data: &'a [f32], offset: usize, stride: usize) -> Self {
        Mat {
            data,
            offset,
            rows: 1,
            cols: stride,
        }
    }

    /// Panics unless an (m × n) matrix lies inside the slice: the bounds `gemm` cannot check.
    fn check(&self, m: usize, n: usize) {
        let last = self.offset + (m - 1) * self.rows + (n - 1) * self.cols;
        assert!(last < self.data.len(), "matrix out of its slice");
    }
}

/// `dst (m × n, rows dst_stride apart) = [dst +] scale · a (m × k) · b (k × n)`, on this thread.
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    a: Mat<'_>,
    b: Mat<'_>,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_stride..i * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * dst_stride + n <= dst.len(),
        "product out of its slice"
    );
    a.check(m, k);
    b.check(k, n);
    // SAFETY: the three matrices lie inside their slices (checked above); `dst` is borrowed
    // mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.cols as isize,
            a.rows as isize,
            b.data.as_ptr().add(b.offset),
            b.cols as isize,
            b.rows as isize,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// A CPU operand's contiguous values as f32 (borrowed when they already are).
fn f32_values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("packed-attention: {what} must be contiguous");
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!(
            "packed-attention: {what} is {:?} (expected f32, bf16 or f16)",
            other.dtype()
        ),
    })
}

/// A tensor's values as f32, in its (contiguous) order.
fn tensor_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn storage_of(values: Vec<f32>, dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        other => candle_core::bail!("packed-attention: dtype {other:?}"),
    })
}

/// Turns the block's scaled scores `s` (`queries × keys`, query r at position `first + r` of its
/// sequence) into probabilities in place, zero beyond each query's position. With `lse`, the
/// probabilities are `exp(s − lse)`; without, each row's log-sum-exp is computed and returned.
fn softmax_rows(s: &mut [f32], keys: usize, first: usize, lse: Option<&[f32]>) -> Vec<f32> {
    let mut out = Vec::new();
    for (r, row) in s.chunks_mut(keys).enumerate() {
        let visible = first + r + 1;
        let (seen, hidden) = row.split_at_mut(visible);
        let shift = match lse {
            Some(lse) => lse[r],
            None => {
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f32 = seen.iter().map(|&v| (v - max).exp()).sum();
                let lse = max + sum.ln();
                out.push(lse);
                lse
            }
        };
        for v in seen.iter_mut() {
            *v = (*v - shift).exp();
        }
        hidden.fill(0.0);
    }
    out
}

/// One task of the forward pass: a block of queries of one head of one sequence.
#[derive(Clone, Copy, Debug)]
struct QueryBlock {
    seq: Sequence,
    head: usize,
    /// First query, relative to the sequence's start.
    first: usize,
    count: usize,
}

fn query_blocks(seqs: &[Sequence], heads: usize) -> Vec<QueryBlock> {
    let mut out = Vec::new();
    for &seq in seqs {
        for head in 0..heads {
            for first in (0..seq.len).step_by(QUERY_BLOCK) {
                let count = QUERY_BLOCK.min(seq.len - first);
                out.push(QueryBlock {
                    seq,
                    head,
                    first,
                    count,
                });
            }
        }
    }
    out
}

/// The forward pass: the output [b, t, heads · hd] and the log-sum-exps [b, heads, t].
fn forward(dims: Dims, lengths: &[usize], q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let hd = dims.head_dim;
    let group = dims.heads / dims.kv_heads;
    let blocks = query_blocks(&sequences(lengths, dims.batch), dims.heads);
    let results: Vec<(Vec<f32>, Vec<f32>)> = blocks
        .par_iter()
        .map(|b| {
            let keys = b.first + b.count;
            let q_at = dims.q_at(b.seq.row, b.head) + (b.seq.start + b.first) * hd;
            let kv_at = dims.kv_at(b.seq.row, b.head / group) + b.seq.start * hd;
            let mut s = vec![0f32; b.count * keys];
            product(
                &mut s,
                keys,
                false,
                (b.count, keys, hd),
                Mat::rows(q, q_at, hd),
                Mat::transposed(k, kv_at, hd),
                dims.scale(),
            );
            let lse = softmax_rows(&mut s, keys, b.first, None);
            let mut o = vec![0f32; b.count * hd];
            product(
                &mut o,
                hd,
                false,
                (b.count, hd, keys),
                Mat::rows(&s, 0, keys),
                Mat::rows(v, kv_at, hd),
                1.0,
            );
            (o, lse)
        })
        .collect();
    let mut out = vec![0f32; dims.batch * dims.tokens * dims.out_stride()];
    let mut lse = vec![0f32; dims.batch * dims.heads * dims.tokens];
    for (b, (o, l)) in blocks.iter().zip(results) {
        let position = b.seq.start + b.first;
        let at = dims.out_at(b.seq.row, b.head) + position * dims.out_stride();
        for (r, row) in o.chunks(hd).enumerate() {
            let at = at + r * dims.out_stride();
            out[at..at + hd].copy_from_slice(row);
        }
        let at = (b.seq.row * dims.heads + b.head) * dims.tokens + position;
        lse[at..at + b.count].copy_from_slice(&l);
    }
    (out, lse)
}

/// The operands of the backward pass, as f32 in their tensors' layouts.
struct Saved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// The forward output and its gradient, [b, t, heads · hd].
    out: &'a [f32],
    grad: &'a [f32],
    lse: &'a [f32],
}

/// What one backward task computes: the gradients of its sequence's queries (each head of its
/// group, one after another), keys and values.
struct SequenceGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The backward pass of one (sequence, key/value head): for each query head of the group and
/// each block of its queries, the probabilities are recomputed from the saved log-sum-exps.
fn backward_task(dims: Dims, saved: &Saved<'_>, seq: Sequence, kv_head: usize) -> SequenceGrads {
    let (hd, n, stride) = (dims.head_dim, seq.len, dims.out_stride());
    let group = dims.heads / dims.kv_heads;
    let scale = dims.scale();
    let kv_at = dims.kv_at(seq.row, kv_head) + seq.start * hd;
    let mut grads = SequenceGrads {
        dq: vec![0f32; group * n * hd],
        dk: vec![0f32; n * hd],
        dv: vec![0f32; n * hd],
    };
    for r in 0..group {
        let head = kv_head * group + r;
        for first in (0..n).step_by(QUERY_BLOCK) {
            let count = QUERY_BLOCK.min(n - first);
            let keys = first + count;
            let q_at = dims.q_at(seq.row, head) + (seq.start + first) * hd;
            let o_at = dims.out_at(seq.row, head) + (seq.start + first) * stride;
            let lse_at = (seq.row * dims.heads + head) * dims.tokens + seq.start + first;
            let q_block = Mat::rows(saved.q, q_at, hd);
            let grad_block = Mat::rows(saved.grad, o_at, stride);
            // P = exp(scale · q kᵀ − lse).
            let mut p = vec![0f32; count * keys];
            product(
                &mut p,
                keys,
                false,
                (count, keys, hd),
                q_block,
                Mat::transposed(saved.k, kv_at, hd),
                scale,
            );
            softmax_rows(
                &mut p,
                keys,
                first,
                Some(&saved.lse[lse_at..lse_at + count]),
            );
            // dV += Pᵀ dO.
            product(
                &mut grads.dv,
                hd,
                true,
                (keys, hd, count),
                Mat::transposed(&p, 0, keys),
                grad_block,
                1.0,
            );
            // dP = dO vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)) in place.
            let mut ds = vec![0f32; count * keys];
            product(
                &mut ds,
                keys,
                false,
                (count, keys, hd),
                grad_block,
                Mat::transposed(saved.v, kv_at, hd),
                1.0,
            );
            for i in 0..count {
                let at = o_at + i * stride;
                let (o, g) = (&saved.out[at..at + hd], &saved.grad[at..at + hd]);
                let d: f32 = o.iter().zip(g).map(|(o, g)| o * g).sum();
                let row = i * keys..(i + 1) * keys;
                for (s, &pr) in ds[row.clone()].iter_mut().zip(&p[row]) {
                    *s = pr * (*s - d);
                }
            }
            // dQ = scale · dS k; dK += scale · dSᵀ q.
            let dq_at = (r * n + first) * hd;
            product(
                &mut grads.dq[dq_at..],
                hd,
                false,
                (count, hd, keys),
                Mat::rows(&ds, 0, keys),
                Mat::rows(saved.k, kv_at, hd),
                scale,
            );
            product(
                &mut grads.dk,
                hd,
                true,
                (keys, hd, count),
                Mat::transposed(&ds, 0, keys),
                q_block,
                scale,
            );
        }
    }
    grads
}

/// The backward pass: the gradients of q, k and v in their layouts.
fn backward(dims: Dims, lengths: &[usize], saved: &Saved<'_>) -> [Vec<f32>; 3] {
    let hd = dims.head_dim;
    let group = dims.heads / dims.kv_heads;
    let tasks: Vec<(Sequence, usize)> = sequences(lengths, dims.batch)
        .into_iter()
        .flat_map(|seq| (0..dims.kv_heads).map(move |g| (seq, g)))
        .collect();
    let results: Vec<SequenceGrads> = tasks
        .par_iter()
        .map(|&(seq, g)| backward_task(dims, saved, seq, g))
        .collect();
    let mut dq = vec![0f32; saved.q.len()];
    let mut dk = vec![0f32; saved.k.len()];
    let mut dv = vec![0f32; saved.v.len()];
    for (&(seq, g), grads) in tasks.iter().zip(results) {
        let span = seq.len * hd;
        let at = dims.kv_at(seq.row, g) + seq.start * hd;
        dk[at..at + span].copy_from_slice(&grads.dk);
        dv[at..at + span].copy_from_slice(&grads.dv);
        for r in 0..group {
            let at = dims.q_at(seq.row, g * group + r) + seq.start * hd;
            dq[at..at + span].copy_from_slice(&grads.dq[r * span..(r + 1) * span]);
        }
    }
    [dq, dk, dv]
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::new(&self.lengths, l1.shape(), l2.shape(), l3.shape())?;
        let q = f32_values(s1, l1, "q")?;
        let k = f32_values(s2, l2, "k")?;
        let v = f32_values(s3, l3, "v")?;
        let (out, lse) = forward(dims, &self.lengths, &q, &k, &v);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        let shape = Shape::from((dims.batch, dims.tokens, dims.out_stride()));
        Ok((storage_of(out, s1.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = Dims::new(&self.lengths, l1.shape(), l2.shape(), l3.shape())?;
        let out = cuda::forward((s1, l1), (s2, l2), (s3, l3), &self.lengths, &dims.sizes()?)?;
        let shape = Shape::from((dims.batch, dims.tokens, dims.out_stride()));
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::new(&self.lengths, q.shape(), k.shape(), v.shape())?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let op = PackedAttentionGrad {
                lengths: self.lengths.clone(),
                out: out.contiguous()?,
                grad: grad.to_dtype(q.dtype())?.contiguous()?,
            };
            let flat = q.apply_op3_no_bwd(k, v, &op)?;
            let (nq, nkv) = (q.elem_count(), k.elem_count());
            let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
            let dk = flat.narrow(0, nq, nkv)?.reshape(k.shape())?;
            let dv = flat.narrow(0, nq + nkv, nkv)?.reshape(v.shape())?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lse) = lse.as_deref() else {
            candle_core::bail!("packed-attention: backward pass without a forward pass on the CPU");
        };
        let (qv, kv, vv) = (tensor_values(q)?, tensor_values(k)?, tensor_values(v)?);
        let (ov, gv) = (tensor_values(out)?, tensor_values(grad)?);
        let saved = Saved {
            q: &qv,
            k: &kv,
            v: &vv,
            out: &ov,
            grad: &gv,
            lse,
        };
        let [dq, dk, dv] = backward(dims, &self.lengths, &saved);
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?.to_dtype(q.dtype())?;
        let dk = Tensor::from_vec(dk, k.shape(), k.device())?.to_dtype(k.dtype())?;
        let dv = Tensor::from_vec(dv, v.shape(), v.device())?.to_dtype(v.dtype())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The CUDA backward pass: `(q, k, v)` with the forward output and its gradient → the
/// gradients of q, k and v back to back, flat. The CPU's backward pass runs on the host from
/// the forward pass's saved log-sum-exps instead.
#[cfg(feature = "cuda")]
struct PackedAttentionGrad {
    lengths: Vec<usize>,
    out: Tensor,
    grad: Tensor,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for PackedAttentionGrad {
    fn name(&self) -> &'static str {
        "packed-attention-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("packed-attention-grad: the CPU's backward pass runs from the op")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = Dims::new(&self.lengths, l1.shape(), l2.shape(), l3.shape())?;
        let flat = cuda::backward(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &self.out,
            &self.grad,
            &self.lengths,
            &dims.sizes()?,
        )?;
        let total = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((flat, Shape::from(total)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::test_util::{assert_central_differences, random, rel_diff, to_vec};

    /// q [2, 4, t, 8] over k, v [2, 2, t, 8]; sequences longer and shorter than a query block.
    const LENGTHS: [usize; 4] = [5, 1, 70, 3];

    fn inputs() -> [Var; 3] {
        let t: usize = LENGTHS.iter().sum();
        [
            Var::from_tensor(&random(&[2, 4, t, 8], 1, 2.0)).unwrap(),
            Var::from_tensor(&random(&[2, 2, t, 8], 2, 2.0)).unwrap(),
            Var::from_tensor(&random(&[2, 2, t, 8], 3, 1.0)).unwrap(),
        ]
    }

    fn apply(vars: &[Var; 3], dtype: DType, fused: bool) -> Tensor {
        let [q, k, v] = vars
            .each_ref()
            .map(|v| v.as_tensor().to_dtype(dtype).unwrap());
        let out = if fused {
            packed_attention(&q, &k, &v, &LENGTHS).unwrap()
        } else {
            packed_attention_composite(&q, &k, &v, &LENGTHS).unwrap()
        };
        out.to_dtype(DType::F32).unwrap()
    }

    /// Σ out ⊙ r for a fixed random r: its gradient is a generic vector-Jacobian product.
    fn loss(out: &Tensor) -> Tensor {
        let r = random(out.dims(), 99, 1.0);
        (out * r).unwrap().sum_all().unwrap()
    }

    fn grads(vars: &[Var; 3], out: &Tensor) -> Vec<Tensor> {
        let store = loss(out).backward().unwrap();
        vars.iter()
            .map(|v| store.get(v.as_tensor()).expect("a gradient").clone())
            .collect()
    }

    #[test]
    fn matches_candles_composite_attention() {
        for (dtype, tolerance) in [(DType::F32, 2e-6), (DType::BF16, 2e-2), (DType::F16, 2e-3)] {
            let vars = inputs();
            let fused = apply(&vars, dtype, true);
            let composite = apply(&vars, dtype, false);
            let diff = rel_diff(&fused, &composite);
            assert!(diff <= tolerance, "{dtype:?} values: {diff}");
            for (i, (f, c)) in grads(&vars, &fused)
                .iter()
                .zip(&grads(&vars, &composite))
                .enumerate()
            {
                let d = rel_diff(f, c);
                assert!(d <= 2.0 * tolerance, "{dtype:?} gradient of input {i}: {d}");
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let vars = inputs();
        let analytic = grads(&vars, &apply(&vars, DType::F32, true));
        for (var, grad) in vars.iter().zip(&analytic) {
            assert_central_differences(var, grad, 53, "attention", || {
                loss(&apply(&vars, DType::F32, true))
            });
        }
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        let vars = inputs();
        let run_on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let out = apply(&vars, DType::F32, true);
                let mut all = vec![to_vec(&out)];
                all.extend(grads(&vars, &out).iter().map(to_vec));
                all
            })
        };
        let (one, four) = (run_on(1), run_on(4));
        for (a, b) in one.iter().zip(&four) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let q = random(&[1, 4, 6, 8], 1, 1.0);
        let k = random(&[1, 3, 6, 8], 2, 1.0);
        let err = packed_attention(&q, &k, &k, &[6]).unwrap_err().to_string();
        assert!(err.contains("cannot share 3 key/value heads"), "{err}");
        let k = random(&[1, 2, 6, 8], 2, 1.0);
        let err = packed_attention(&q, &k, &k, &[4, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sequences of 7 tokens in rows of 6"), "{err}");
        let v = random(&[1, 2, 5, 8], 3, 1.0);
        let err = packed_attention(&q, &k, &v, &[6]).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
    }
}
