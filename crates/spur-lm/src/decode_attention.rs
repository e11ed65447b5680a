//! Attention of one new position per sequence over its KV cache, on the CPU.
//!
//! Written with candle ops, a decode step runs one tiny matmul per (sequence, kv head) for the
//! scores and another for the weighted values, plus a masked softmax over the whole padded
//! cache; with 16–64 sequences that costs more than the weight matmuls once the cache holds a
//! few hundred positions. Here each (sequence, head) is one task that reads only its visible
//! cache columns. No backward pass: decoding takes no gradient.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// `softmax(q·kᵀ·scale) v` for q [b, heads, 1, hd] and k, v [b, kv_heads, len, hd], where
/// row r sees cache columns `pad[r]..len` (left padding). Output [b, heads, 1, hd].
pub(crate) struct DecodeAttention {
    pub pad: Vec<usize>,
    pub scale: f32,
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
        let (b, heads, t, hd) = q_layout.shape().dims4()?;
        let (kb, kv_heads, len, khd) = k_layout.shape().dims4()?;
        if t != 1 || kb != b || khd != hd || v_layout.shape() != k_layout.shape() {
            candle_core::bail!(
                "decode-attention: q {:?}, k {:?}, v {:?}",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        if self.pad.len() != b || heads % kv_heads != 0 {
            candle_core::bail!("decode-attention: {b} rows, {} pads", self.pad.len());
        }
        let (q, k, v) = (
            View::new(q_storage, q_layout, "q")?,
            View::new(k_storage, k_layout, "k")?,
            View::new(v_storage, v_layout, "v")?,
        );
        let n_rep = heads / kv_heads;
        let mut out = vec![0f32; b * heads * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(task, out)| {
            let (row, head) = (task / heads, task % heads);
            let kv_head = head / n_rep;
            let query = q.row(row, head, 0, hd);
            let visible = self.pad[row].min(len)..len;
            let mut scores: Vec<f32> = visible
                .clone()
                .map(|col| {
                    let key = k.row(row, kv_head, col, hd);
                    query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * self.scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            for (col, weight) in visible.zip(&scores) {
                let value = v.row(row, kv_head, col, hd);
                let weight = weight / total;
                for (o, x) in out.iter_mut().zip(value) {
                    *o += weight * x;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, 1, hd))))
    }
}
