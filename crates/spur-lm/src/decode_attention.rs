//! Attention of one new position per sequence over its KV cache, on the CPU.
//!
//! Written with candle ops, a decode step runs one tiny matmul per (sequence, kv head) for the
//! scores and another for the weighted values, plus a masked softmax over the whole padded
//! cache; with 16–64 sequences that costs more than the weight matmuls once the cache holds a
//! few hundred positions. Here each (sequence, head) is one task that reads only its visible
//! cache columns. No backward pass: decoding takes no gradient.
//!
//! Rows that continue a shared prompt ([`crate::KvCache::continuing`]) read its columns from
//! the prompt's own row first: the columns a row holding its prompt would read, in that order,
//! so the result is the same to the bit.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// `softmax(q·kᵀ·scale) v` for q [b, heads, 1, hd] and k, v [b, kv_heads, len, hd], where
/// row r sees its prompt's columns (if any), then cache columns `pad[r]..len` (left padding).
/// Output [b, heads, 1, hd].
pub(crate) struct DecodeAttention {
    pub pad: Vec<usize>,
    pub scale: f32,
    pub prompts: Option<PromptColumns>,
    /// On CUDA: each row's (pad, prompt, prompt pad), u32 [b, 3] on the device, as the kernel
    /// reads them (uploaded once per decode step, not per layer). Read by CUDA builds only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub rows_on_device: Option<Tensor>,
}

/// The shared prompts of one layer: keys and values [prompts, kv_heads, width, hd], each
/// prompt's left padding, and the prompt each row continues.
pub(crate) struct PromptColumns {
    pub k: Tensor,
    pub v: Tensor,
    pub width: usize,
    pub pad: Vec<usize>,
    pub of_row: Vec<usize>,
}

/// A rank-4 f32 operand as a slice with its strides (the last dimension must be contiguous).
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 3],
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("decode-attention: {what} must be f32");
        };
        let stride = layout.stride();
        if stride.len() != 4 || stride[3] != 1 {
            candle_core::bail!("decode-attention: {what} must be rank 4 with contiguous rows");
        }
        Ok(View {
            data,
            offset: layout.start_offset(),
            stride: [stride[0], stride[1], stride[2]],
        })
    }

    fn of_storage(storage: &'a Storage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        match storage {
            Storage::Cpu(storage) => View::new(storage, layout, what),
            _ => candle_core::bail!("decode-attention: {what} must be on the CPU"),
        }
    }

    fn row(&self, i: usize, j: usize, k: usize, len: usize) -> &'a [f32] {
        let at = self.offset + i * self.stride[0] + j * self.stride[1] + k * self.stride[2];
        &self.data[at..at + len]
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims {
            b,
            heads,
            kv_heads,
            len,
            hd,
        } = self.dims(q_layout, k_layout, v_layout)?;
        let (q, k, v) = (
            View::new(q_storage, q_layout, "q")?,
            View::new(k_storage, k_layout, "k")?,
            View::new(v_storage, v_layout, "v")?,
        );
        let n_rep = heads / kv_heads;
        let prompt_storage = match &self.prompts {
            Some(p) => {
                let (k, k_layout) = p.k.storage_and_layout();
                let (v, v_layout) = p.v.storage_and_layout();
                if p.of_row.len() != b || k_layout.shape() != v_layout.shape() {
                    candle_core::bail!("decode-attention: prompts of {} rows", p.of_row.len());
                }
                Some((k, k_layout.clone(), v, v_layout.clone(), p))
            }
            None => None,
        };
        let prompts = match &prompt_storage {
            Some((k, k_layout, v, v_layout, p)) => {
                let (pk, pv) = (
                    View::of_storage(k, k_layout, "prompt k")?,
                    View::of_storage(v, v_layout, "prompt v")?,
                );
                Some((pk, pv, *p))
            }
            None => None,
        };
        let mut out = vec![0f32; b * heads * hd];
        // One task per (sequence, kv head): its n_rep query heads are consecutive in `out`
        // and share every key and value row, which is then read once.
        out.par_chunks_mut(n_rep * hd)
            .enumerate()
            .for_each(|(task, out)| {
                let (row, kv_head) = (task / kv_heads, task % kv_heads);
                let queries: Vec<&[f32]> = (0..n_rep)
                    .map(|r| q.row(row, kv_head * n_rep + r, 0, hd))
                    .collect();
                // The visible columns: the prompt's, then the row's own.
                let mut keys = Vec::new();
                let mut values = Vec::new();
                if let Some((pk, pv, p)) = &prompts {
                    let prompt = p.of_row[row];
                    for col in p.pad[prompt].min(p.width)..p.width {
                        keys.push(pk.row(prompt, kv_head, col, hd));
                        values.push(pv.row(prompt, kv_head, col, hd));
                    }
                }
                for col in self.pad[row].min(len)..len {
                    keys.push(k.row(row, kv_head, col, hd));
                    values.push(v.row(row, kv_head, col, hd));
                }
                // scores[r * n + j]: query r against visible column j.
                let n = keys.len();
                let mut scores = vec![0f32; n_rep * n];
                for (j, key) in keys.iter().enumerate() {
                    // The cache streams from memory (130 MB a step at batch 16): fetch the key
                    // row KEYS_AHEAD columns on, and this column's value row, which the
                    // weighted sum below reads.
                    if let Some(ahead) = keys.get(j + KEYS_AHEAD) {
                        prefetch(ahead);
                    }
                    prefetch(values[j]);
                    for (r, query) in queries.iter().enumerate() {
                        scores[r * n + j] = dot(query, key) * self.scale;
                    }
                }
                for scores in scores.chunks_exact_mut(n.max(1)) {
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    for s in scores.iter_mut() {
                        *s /= total;
                    }
                }
                for (out, weights) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(n.max(1))) {
                    weighted_sum(&values, weights, out);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, 1, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q_storage: &candle_core::CudaStorage,
        q_layout: &Layout,
        k_storage: &candle_core::CudaStorage,
        k_layout: &Layout,
        v_storage: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(q_layout, k_layout, v_layout)?;
        let out = cuda::forward(
            self,
            (q_storage, q_layout),
            (k_storage, k_layout),
            (v_storage, v_layout),
            &dims,
        )?;
        Ok((out, Shape::from((dims.b, dims.heads, 1, dims.hd))))
    }
}

/// The checked sizes of one decode-attention call.
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    hd: usize,
}

impl DecodeAttention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Dims> {
        let (b, heads, t, hd) = q.shape().dims4()?;
        let (kb, kv_heads, len, khd) = k.shape().dims4()?;
        if t != 1 || kb != b || khd != hd || v.shape() != k.shape() {
            candle_core::bail!(
                "decode-attention: q {:?}, k {:?}, v {:?}",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if self.pad.len() != b || heads % kv_heads != 0 {
            candle_core::bail!("decode-attention: {b} rows, {} pads", self.pad.len());
        }
        Ok(Dims {
            b,
            heads,
            kv_heads,
            len,
            hd,
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The op on CUDA: one block per (row, kv head) computes its query heads' scores over the
    //! visible columns (the prompt's, then the row's own) into a scratch buffer, their softmax,
    //! and the weighted values, in one launch where candle's ops take about ten. Not yet run on
    //! a GPU: used only with `SPUR_CUDA_KERNELS=1` (`crate::unchecked_cuda_kernels`).

    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{cudarc, CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{Layout, Storage};

    use super::{DecodeAttention, Dims};

    const SOURCE: &str = include_str!("../kernels/decode_attention.cu");

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        crate::cuda::ptx(&PTX, SOURCE, "decode-attention")
    }

    /// `s`'s elements from `l`'s start.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    fn on_gpu(s: &Storage) -> candle_core::Result<&CudaStorage> {
        match s {
            Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("decode-attention: prompts and rows must be on the GPU"),
        }
    }

    /// Strides of dims 0..3 of a rank-4 layout whose last dimension is contiguous.
    fn strides(layout: &Layout, what: &str) -> candle_core::Result<[i64; 3]> {
        match layout.stride() {
            [s0, s1, s2, 1] => Ok([*s0 as i64, *s1 as i64, *s2 as i64]),
            _ => candle_core::bail!("decode-attention: {what} must be rank 4 with contiguous rows"),
        }
    }

    pub(super) fn forward(
        op: &DecodeAttention,
        (q, q_layout): (&CudaStorage, &Layout),
        (k, k_layout): (&CudaStorage, &Layout),
        (v, v_layout): (&CudaStorage, &Layout),
        dims: &Dims,
    ) -> candle_core::Result<CudaStorage> {
        let Dims {
            b,
            heads,
            kv_heads,
            len,
            hd,
        } = *dims;
        let [qs0, qs1, _] = strides(q_layout, "q")?;
        let [ks0, ks1, ks2] = strides(k_layout, "k")?;
        if strides(v_layout, "v")? != [ks0, ks1, ks2] {
            candle_core::bail!("decode-attention: k and v must share a layout");
        }
        // The prompts' storage, read-locked until the launch is queued.
        let guards = op.prompts.as_ref().map(|p| {
            let (k, k_layout) = p.k.storage_and_layout();
            let (v, v_layout) = p.v.storage_and_layout();
            (k, k_layout.clone(), v, v_layout.clone(), p)
        });
        let Some(rows) = &op.rows_on_device else {
            candle_core::bail!("decode-attention: on CUDA the rows' pads must be on the device");
        };
        if rows.dims() != [b, 3] {
            candle_core::bail!(
                "decode-attention: rows of shape {:?} for {b} rows",
                rows.dims()
            );
        }
        let (rows_guard, rows_layout) = rows.storage_and_layout();
        let mut width = 0usize;
        let mut prompt_strides = [0i64; 3];
        if let Some((_, k_layout, _, v_layout, p)) = &guards {
            width = p.width;
            prompt_strides = strides(k_layout, "prompt k")?;
            if strides(v_layout, "prompt v")? != prompt_strides {
                candle_core::bail!("decode-attention: prompt k and v must share a layout");
            }
        }
        let columns = width + len;
        let dev = q.device.clone();
        let suffix = crate::cuda::dtype_suffix("decode-attention", q)?;
        let func = dev.get_or_load_custom_func(
            &format!("decode_attention_{suffix}"),
            "spur_decode_attention",
            ptx()?,
        )?;
        let meta = crate::cuda::contiguous(
            on_gpu(&rows_guard)?.as_cuda_slice::<u32>()?,
            rows_layout,
            "decode-attention",
            "the rows",
        )?;
        // SAFETY: every score a block reads it has written first.
        let scratch = unsafe { dev.alloc::<f32>((b * heads * columns).max(1))? };
        let cfg = crate::cuda::blocks(((b * kv_heads) as u32, 1));
        let ints = [
            heads as i32,
            kv_heads as i32,
            hd as i32,
            len as i32,
            width as i32,
        ];
        let (columns_arg, scale) = (columns as i32, op.scale);
        let [ps0, ps1, ps2] = prompt_strides;
        macro_rules! run {
            ($ty:ty) => {{
                let from = view::<$ty>;
                let (qv, kv, vv) = (from(q, q_layout)?, from(k, k_layout)?, from(v, v_layout)?);
                // Without prompts the kernel reads no prompt column: k and v stand in.
                let (pk, pv) = match &guards {
                    Some((pk, pk_layout, pv, pv_layout, _)) => {
                        (from(on_gpu(pk)?, pk_layout)?, from(on_gpu(pv)?, pv_layout)?)
                    }
                    None => (from(k, k_layout)?, from(v, v_layout)?),
                };
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$ty>(b * heads * hd)? };
                let mut builder = func.builder();
                builder.arg(&qv).arg(&qs0).arg(&qs1);
                builder.arg(&kv).arg(&vv).arg(&ks0).arg(&ks1).arg(&ks2);
                builder.arg(&pk).arg(&pv).arg(&ps0).arg(&ps1).arg(&ps2);
                builder.arg(&meta).arg(&scratch).arg(&out);
                for i in &ints {
                    builder.arg(i);
                }
                builder.arg(&columns_arg).arg(&scale);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match &q.slice {
            CudaStorageSlice::F32(_) => run!(f32),
            _ => run!(half::bf16),
        })
    }
}

/// How far ahead of the scores the key rows are fetched (measured on SmolLM2's shapes over 30
/// layers' caches: 7.2 → 6.3 ms a step at batch 16, 28.5 → 25.2 at batch 64, with the values
/// fetched too).
const KEYS_AHEAD: usize = 16;

/// Asks for `row`'s cache lines (16 floats each) in L1.
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch is only a hint; it reads nothing and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Dimensions of an output accumulated at once: eight AVX2 registers.
const BLOCK: usize = 64;

/// `out = Σ_j weights[j] · values[j]`, each output a chain of fused multiply-adds in column
/// order. A block of outputs stays in registers across all columns instead of being loaded
/// and stored for every column.
fn weighted_sum(values: &[&[f32]], weights: &[f32], out: &mut [f32]) {
    let whole = out.len() - out.len() % BLOCK;
    for (b, out) in out[..whole].chunks_exact_mut(BLOCK).enumerate() {
        let mut acc = [0f32; BLOCK];
        for (value, &weight) in values.iter().zip(weights) {
            let value = &value[b * BLOCK..(b + 1) * BLOCK];
            for i in 0..BLOCK {
                acc[i] = weight.mul_add(value[i], acc[i]);
            }
        }
        out.copy_from_slice(&acc);
    }
    for (i, o) in out.iter_mut().enumerate().skip(whole) {
        *o = 0.0;
        for (value, &weight) in values.iter().zip(weights) {
            *o = weight.mul_add(value[i], *o);
        }
    }
}

/// `a · b` over eight lanes (one AVX2 register of fused multiply-adds).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = (a_chunks.remainder().iter())
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; LANES];
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}
