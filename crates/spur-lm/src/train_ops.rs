//! Fused ops of the training passes, each a candle custom op with its own backward pass: the
//! RMS norm ([`rms_norm`]), the rotary embedding ([`rope`]) and SwiGLU gating ([`swiglu`]).
//!
//! candle's fused RMS-norm and rotary kernels have no backward pass (they cut the gradient
//! silently, see STACK-NOTES), so a differentiable pass used to write these ops out of five to
//! ten elementwise ops, each allocating its output and keeping its inputs for the backward pass.
//! These ops keep only their inputs and recompute the rest (a row's RMS, a gate's sigmoid).
//!
//! The CPU kernels read f32, bf16 and f16 and compute in f32. They split the work by rows over
//! rayon's pool, each output element written by one thread, and the one sum across rows (the
//! norm weight's gradient) adds fixed blocks of rows in a fixed order, so results do not depend
//! on the number of threads. The CUDA kernels (`train_ops_cuda.rs`, f32 and bf16) follow the
//! same semantics; they serve CUDA passes only with `SPUR_CUDA_KERNELS=1` until a lent GPU has
//! checked them against these (`spur bench train-ops`). Other devices and dtypes use candle's
//! composite ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;

#[cfg(feature = "cuda")]
#[path = "train_ops_cuda.rs"]
mod cuda;

/// How rotary embeddings pair up head dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face layout: dimension i pairs with i + head_dim/2 (candle's `rope`).
    Half,
    /// llama.cpp layout: dimension 2i pairs with 2i+1 (candle's `rope_i`). GGUF files of Llama
    /// models store the q/k rows permuted for this.
    Interleaved,
}

/// RMS norm of the last dimension, `x / sqrt(mean(x²) + eps) · weight`: `x` `[.., hidden]` in
/// any float dtype, `weight` `[hidden]`; the result in `x`'s dtype, computed in f32.
/// Differentiable with respect to both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // The weight in f32 (a no-op for the f32 master weights): its gradient is an f32 sum.
    let weight = weight.to_dtype(DType::F32)?;
    if !has_kernel(x) {
        return rms_norm_composite(x, &weight, eps);
    }
    rms_norm_fused(x, &weight, eps)
}

/// [`rms_norm`] through spur's kernel on any device that has one.
pub(crate) fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm { eps: eps as f32 };
    let weight = weight.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.contiguous()?.apply_op2(&weight, op)?)
}

/// Rotary embedding of `x` `[b, heads, t, head_dim]` by the angles whose cosines and sines are
/// `cos`, `sin` `[b, t, head_dim/2]`: each row of the batch has its own positions. The tables
/// are cast to `x`'s dtype. Differentiable with respect to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    if !has_kernel(x) {
        return rope_composite(x, &cos, &sin, style);
    }
    rope_fused(x, &cos, &sin, style)
}

/// [`rope`] through spur's kernel on any device that has one.
pub(crate) fn rope_fused(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let op = Rope {
        style,
        inverse: false,
    };
    Ok(x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)?)
}

/// `silu(gate) · up`, the gated activation of a SwiGLU MLP, for `gate` and `up` of one shape
/// and dtype. Differentiable with respect to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !has_kernel(gate) {
        return swiglu_composite(gate, up);
    }
    swiglu_fused(gate, up)
}

/// [`swiglu`] through spur's kernel on any device that has one.
pub(crate) fn swiglu_fused(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// Whether spur's kernels serve `x`.
fn has_kernel(x: &Tensor) -> bool {
    has_kernels(x.device(), x.dtype())
}

/// Whether these ops run spur's own kernels on `device` in `dtype` (the memory model counts
/// their activations by this too): on the CPU in f32, bf16 and f16; on CUDA in f32 and bf16
/// when `SPUR_CUDA_KERNELS=1` asks for the kernels, not yet checked on a GPU.
pub(crate) fn has_kernels(device: &Device, dtype: DType) -> bool {
    match device {
        Device::Cpu => matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
        Device::Cuda(_) => {
            crate::unchecked_cuda_kernels() && matches!(dtype, DType::F32 | DType::BF16)
        }
        _ => false,
    }
}

/// [`rms_norm`] from candle's elementwise ops, in f32 whatever `x`'s dtype (a bf16 mean of
/// squares over thousands of features loses most of its digits).
pub(crate) fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    Ok(normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .to_dtype(dtype)?)
}

/// [`rope`] from candle's elementwise ops.
pub(crate) fn rope_composite(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    // [b, 1, t, d/2]: one table for every head.
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    match style {
        RopeStyle::Half => {
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[a, b], D::Minus1)?)
        }
        RopeStyle::Interleaved => {
            let pairs = x.reshape((b, h, t, half, 2))?;
            let even = pairs.narrow(D::Minus1, 0, 1)?;
            let odd = pairs.narrow(D::Minus1, 1, 1)?;
            let cos = cos.unsqueeze(D::Minus1)?;
            let sin = sin.unsqueeze(D::Minus1)?;
            let a = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
            let b2 = (odd.broadcast_mul(&cos)? + even.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[a, b2], D::Minus1)?.reshape((b, h, t, d))?)
        }
    }
}

/// [`swiglu`] from candle's elementwise ops.
pub(crate) fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Rows per rayon task: enough work per task to outweigh scheduling it.
const MIN_ROWS_PER_TASK: usize = 8;
/// Rows per partial sum of the norm weight's gradient. Fixed, so that the order of the sums is
/// fixed too, whatever the number of threads.
const WEIGHT_GRAD_BLOCK: usize = 64;

/// An element type the CPU kernels read and write; arithmetic is in f32.
trait Element: Copy + Send + Sync + candle_core::WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Calls `$kernel::<T>($args)` for the element type `T` of `$storage`.
macro_rules! by_dtype {
    ($op:expr, $storage:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $storage.dtype() {
            DType::F32 => $kernel::<f32>($($arg),*),
            DType::BF16 => $kernel::<bf16>($($arg),*),
            DType::F16 => $kernel::<f16>($($arg),*),
            other => candle_core::bail!("{}: dtype {other:?} (expected f32, bf16 or f16)", $op),
        }
    };
}

/// A CPU operand's contiguous values of type `T`; the error names the op and the operand.
fn values<'a, T: Element>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous");
    };
    let Ok(data) = storage.as_slice::<T>() else {
        candle_core::bail!(
            "{op}: {what} is {:?}, expected {:?}",
            storage.dtype(),
            T::DTYPE
        );
    };
    Ok(&data[start..end])
}

/// The last dimension of `layout`'s shape (the row length), which must not be empty.
fn row_len(layout: &Layout, op: &str) -> candle_core::Result<usize> {
    match layout.shape().dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("{op}: rows of shape {:?}", layout.shape().dims()),
    }
}

fn same_shape(a: &Layout, b: &Layout, op: &str) -> candle_core::Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!(
            "{op}: operands of shapes {:?} and {:?}",
            a.shape().dims(),
            b.shape().dims()
        );
    }
    Ok(())
}

fn inv_rms<T: Element>(row: &[T], eps: f32) -> f32 {
    let sum_sq: f32 = row.iter().map(|v| v.to_f32() * v.to_f32()).sum();
    1.0 / (sum_sq / row.len() as f32 + eps).sqrt()
}

/// `(x, weight)` → the RMS norm.
struct RmsNorm {
    eps: f32,
}
/// `(x, weight, grad)` → the gradient with respect to `x`.
struct RmsNormGradInput {
    eps: f32,
}
/// `(x, grad)` → the gradient with respect to the weight, f32 `[hidden]`.
struct RmsNormGradWeight {
    eps: f32,
}

/// The norm's row length, checked against the weight's shape.
fn norm_hidden(op: &str, x: &Layout, weight: &Layout) -> candle_core::Result<usize> {
    let hidden = row_len(x, op)?;
    if weight.shape().dims() != [hidden] {
        candle_core::bail!(
            "{op}: weight of shape {:?} for rows of {hidden}",
            weight.shape().dims()
        );
    }
    Ok(hidden)
}

/// The norm's `x` and f32 weight, checked: (hidden, x, weight).
fn norm_operands<'a, T: Element>(
    op: &str,
    x: (&'a CpuStorage, &Layout),
    weight: (&'a CpuStorage, &Layout),
) -> candle_core::Result<(usize, &'a [T], &'a [f32])> {
    let hidden = norm_hidden(op, x.1, weight.1)?;
    Ok((
        hidden,
        values::<T>(x.0, x.1, op, "x")?,
        values::<f32>(weight.0, weight.1, op, "the weight")?,
    ))
}

fn rms_norm_cpu<T: Element>(
    op: &str,
    eps: f32,
    x: (&CpuStorage, &Layout),
    weight: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (hidden, xs, w) = norm_operands::<T>(op, x, weight)?;
    let mut out = vec![T::from_f32(0.0); xs.len()];
    out.par_chunks_mut(hidden)
        .zip(xs.par_chunks(hidden))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(y, x)| {
            let r = inv_rms(x, eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = T::from_f32(x.to_f32() * r * w);
            }
        });
    Ok((T::to_cpu_storage_owned(out), x.1.shape().clone()))
}

/// dx = r·g⊙w − x · r³ · Σ(g⊙w⊙x) / n per row, with r = 1/rms(x).
fn rms_norm_grad_input_cpu<T: Element>(
    op: &str,
    eps: f32,
    x: (&CpuStorage, &Layout),
    weight: (&CpuStorage, &Layout),
    grad: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (hidden, xs, w) = norm_operands::<T>(op, x, weight)?;
    same_shape(x.1, grad.1, op)?;
    let gs = values::<T>(grad.0, grad.1, op, "the gradient")?;
    let mut out = vec![T::from_f32(0.0); xs.len()];
    out.par_chunks_mut(hidden)
        .zip(xs.par_chunks(hidden).zip(gs.par_chunks(hidden)))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(dx, (x, g))| {
            let r = inv_rms(x, eps);
            let dot: f32 = x
                .iter()
                .zip(g)
                .zip(w)
                .map(|((x, g), w)| x.to_f32() * g.to_f32() * w)
                .sum();
            let c = r * r * r * dot / hidden as f32;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = T::from_f32(r * g.to_f32() * w - x.to_f32() * c);
            }
        });
    Ok((T::to_cpu_storage_owned(out), x.1.shape().clone()))
}

/// dw = Σ_rows g⊙x·r: partial sums over fixed blocks of rows in parallel, then the blocks'
/// sums in order.
fn rms_norm_grad_weight_cpu<T: Element>(
    op: &str,
    eps: f32,
    x: (&CpuStorage, &Layout),
    grad: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let hidden = row_len(x.1, op)?;
    same_shape(x.1, grad.1, op)?;
    let xs = values::<T>(x.0, x.1, op, "x")?;
    let gs = values::<T>(grad.0, grad.1, op, "the gradient")?;
    let block = hidden * WEIGHT_GRAD_BLOCK;
    let partials: Vec<Vec<f32>> = xs
        .par_chunks(block)
        .zip(gs.par_chunks(block))
        .map(|(xb, gb)| {
            let mut sum = vec![0f32; hidden];
            for (x, g) in xb.chunks(hidden).zip(gb.chunks(hidden)) {
                let r = inv_rms(x, eps);
                for ((s, x), g) in sum.iter_mut().zip(x).zip(g) {
                    *s += g.to_f32() * x.to_f32() * r;
                }
            }
            sum
        })
        .collect();
    let mut dw = vec![0f32; hidden];
    for partial in partials {
        for (d, p) in dw.iter_mut().zip(partial) {
            *d += p;
        }
    }
    Ok((CpuStorage::F32(dw), Shape::from(hidden)))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "spur-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(
            self.name(),
            s1,
            rms_norm_cpu(self.name(), self.eps, (s1, l1), (s2, l2))
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hidden = norm_hidden(self.name(), l1, l2)?;
        let rows = l1.shape().elem_count() / hidden;
        let scalars = [
            cuda::Scalar::I32(hidden as i32),
            cuda::Scalar::F32(self.eps),
        ];
        let out = cuda::launch(
            self.name(),
            "rms_norm",
            &[(s1, l1), (s2, l2)],
            &[1],
            rows * hidden,
            (rows as u32, 1),
            &scalars,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let eps = self.eps;
        let dx = x.apply_op3_no_bwd(weight, &grad, &RmsNormGradInput { eps })?;
        let dw = x.apply_op2_no_bwd(&grad, &RmsNormGradWeight { eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "spur-rms-norm-grad-input"
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
        by_dtype!(
            self.name(),
            s1,
            rms_norm_grad_input_cpu(self.name(), self.eps, (s1, l1), (s2, l2), (s3, l3))
        )
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
        let hidden = norm_hidden(self.name(), l1, l2)?;
        same_shape(l1, l3, self.name())?;
        let rows = l1.shape().elem_count() / hidden;
        let scalars = [
            cuda::Scalar::I32(hidden as i32),
            cuda::Scalar::F32(self.eps),
        ];
        let out = cuda::launch(
            self.name(),
            "rms_norm_grad_input",
            &[(s1, l1), (s2, l2), (s3, l3)],
            &[1],
            rows * hidden,
            (rows as u32, 1),
            &scalars,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for RmsNormGradWeight {
    fn name(&self) -> &'static str {
        "spur-rms-norm-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(
            self.name(),
            s1,
            rms_norm_grad_weight_cpu(self.name(), self.eps, (s1, l1), (s2, l2))
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hidden = row_len(l1, self.name())?;
        same_shape(l1, l2, self.name())?;
        cuda::rms_norm_grad_weight(
            self.name(),
            (s1, l1),
            (s2, l2),
            hidden,
            WEIGHT_GRAD_BLOCK,
            self.eps,
        )
    }
}

/// `(x, cos, sin)` → `x` rotated by the tables' angles, or by their negatives (`inverse`: the
/// backward pass, whose Jacobian is the transposed rotation).
struct Rope {
    style: RopeStyle,
    inverse: bool,
}

fn rope_cpu<T: Element>(
    op: &Rope,
    x: (&CpuStorage, &Layout),
    cos: (&CpuStorage, &Layout),
    sin: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let name = op.name();
    let (_, h, t, half) = rope_dims(name, x.1, cos.1, sin.1)?;
    let d = 2 * half;
    let xs = values::<T>(x.0, x.1, name, "x")?;
    let cos = values::<T>(cos.0, cos.1, name, "cos")?;
    let sin = values::<T>(sin.0, sin.1, name, "sin")?;
    let sign = if op.inverse { -1.0 } else { 1.0 };
    let mut out = vec![T::from_f32(0.0); xs.len()];
    out.par_chunks_mut(d)
        .zip(xs.par_chunks(d))
        .enumerate()
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(row, (y, x))| {
            // Row (batch, head, position) reads the table of (batch, position).
            let table = (row / (h * t) * t + row % t) * half;
            for i in 0..half {
                let (i1, i2) = match op.style {
                    RopeStyle::Half => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (x[i1].to_f32(), x[i2].to_f32());
                let c = cos[table + i].to_f32();
                let s = sign * sin[table + i].to_f32();
                y[i1] = T::from_f32(x1 * c - x2 * s);
                y[i2] = T::from_f32(x2 * c + x1 * s);
            }
        });
    Ok((T::to_cpu_storage_owned(out), x.1.shape().clone()))
}

/// `x`'s [b, heads, t, head_dim / 2], checked against the tables' shapes.
fn rope_dims(
    name: &str,
    x: &Layout,
    cos: &Layout,
    sin: &Layout,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, h, t, d) = x.shape().dims4()?;
    if d == 0 || d % 2 != 0 {
        candle_core::bail!("{name}: head dimension {d} is not even");
    }
    let half = d / 2;
    for table in [cos, sin] {
        if table.shape().dims() != [b, t, half] {
            candle_core::bail!(
                "{name}: tables of shape {:?} for x of shape {:?} (expected [{b}, {t}, {half}])",
                table.shape().dims(),
                x.shape().dims()
            );
        }
    }
    Ok((b, h, t, half))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "spur-rope"
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
        by_dtype!(
            self.name(),
            s1,
            rope_cpu(self, (s1, l1), (s2, l2), (s3, l3))
        )
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
        use cuda::Scalar;
        let (b, h, t, half) = rope_dims(self.name(), l1, l2, l3)?;
        let pairs = b * h * t * half;
        let scalars = [
            Scalar::I32(h as i32),
            Scalar::I32(t as i32),
            Scalar::I32(half as i32),
            Scalar::I32((self.style == RopeStyle::Interleaved) as i32),
            Scalar::F32(if self.inverse { -1.0 } else { 1.0 }),
            Scalar::I64(pairs as i64),
        ];
        let out = cuda::launch(
            self.name(),
            "rope",
            &[(s1, l1), (s2, l2), (s3, l3)],
            &[],
            2 * pairs,
            (crate::cuda::blocks_for(pairs), 1),
            &scalars,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let inverse = Rope {
            style: self.style,
            inverse: !self.inverse,
        };
        // The tables are functions of the positions, not trained: no gradient.
        Ok((Some(grad.apply_op3_no_bwd(cos, sin, &inverse)?), None, None))
    }
}

/// `(gate, up)` → `silu(gate) · up`.
struct SwiGlu;
/// `(gate, up, grad)` → the gradients with respect to gate and up, stacked: `[2, ..shape]`.
struct SwiGluGrad;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

fn swiglu_cpu<T: Element>(
    op: &str,
    gate: (&CpuStorage, &Layout),
    up: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let n = row_len(gate.1, op)?;
    same_shape(gate.1, up.1, op)?;
    let gs = values::<T>(gate.0, gate.1, op, "gate")?;
    let us = values::<T>(up.0, up.1, op, "up")?;
    let mut out = vec![T::from_f32(0.0); gs.len()];
    out.par_chunks_mut(n)
        .zip(gs.par_chunks(n).zip(us.par_chunks(n)))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(y, (g, u))| {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                let g = g.to_f32();
                *y = T::from_f32(g * sigmoid(g) * u.to_f32());
            }
        });
    Ok((T::to_cpu_storage_owned(out), gate.1.shape().clone()))
}

/// d_up = dy·silu(g); d_gate = dy·u·σ(g)·(1 + g·(1 − σ(g))).
fn swiglu_grad_cpu<T: Element>(
    op: &str,
    gate: (&CpuStorage, &Layout),
    up: (&CpuStorage, &Layout),
    grad: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let n = row_len(gate.1, op)?;
    same_shape(gate.1, up.1, op)?;
    same_shape(gate.1, grad.1, op)?;
    let gs = values::<T>(gate.0, gate.1, op, "gate")?;
    let us = values::<T>(up.0, up.1, op, "up")?;
    let dys = values::<T>(grad.0, grad.1, op, "the gradient")?;
    let mut out = vec![T::from_f32(0.0); 2 * gs.len()];
    let (d_gate, d_up) = out.split_at_mut(gs.len());
    d_gate
        .par_chunks_mut(n)
        .zip(d_up.par_chunks_mut(n))
        .zip(
            gs.par_chunks(n)
                .zip(us.par_chunks(n))
                .zip(dys.par_chunks(n)),
        )
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((d_gate, d_up), ((g, u), dy))| {
            for ((((dg, du), g), u), dy) in d_gate.iter_mut().zip(d_up).zip(g).zip(u).zip(dy) {
                let (g, u, dy) = (g.to_f32(), u.to_f32(), dy.to_f32());
                let s = sigmoid(g);
                *du = T::from_f32(dy * g * s);
                *dg = T::from_f32(dy * u * s * (1.0 + g * (1.0 - s)));
            }
        });
    let mut dims = vec![2];
    dims.extend_from_slice(gate.1.shape().dims());
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "spur-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), s1, swiglu_cpu(self.name(), (s1, l1), (s2, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        row_len(l1, self.name())?;
        same_shape(l1, l2, self.name())?;
        let n = l1.shape().elem_count();
        let out = cuda::launch(
            self.name(),
            "swiglu",
            &[(s1, l1), (s2, l2)],
            &[],
            n,
            (crate::cuda::blocks_for(n), 1),
            &[cuda::Scalar::I64(n as i64)],
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(gate.dtype())?.contiguous()?;
        let both = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "spur-swiglu-grad"
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
        by_dtype!(
            self.name(),
            s1,
            swiglu_grad_cpu(self.name(), (s1, l1), (s2, l2), (s3, l3))
        )
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
        row_len(l1, self.name())?;
        same_shape(l1, l2, self.name())?;
        same_shape(l1, l3, self.name())?;
        let n = l1.shape().elem_count();
        let out = cuda::launch(
            self.name(),
            "swiglu_grad",
            &[(s1, l1), (s2, l2), (s3, l3)],
            &[],
            2 * n,
            (crate::cuda::blocks_for(n), 1),
            &[cuda::Scalar::I64(n as i64)],
        )?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        Ok((out, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};

    use super::*;
    use crate::test_util::{assert_central_differences, random, rel_diff, to_vec};

    /// Angles of per-row positions: cos and sin `[b, t, half]`, each row at its own offset.
    fn tables(b: usize, t: usize, half: usize) -> (Tensor, Tensor) {
        let angles: Vec<f32> = (0..b * t * half)
            .map(|i| {
                let (row, pos, k) = (i / (t * half), i / half % t, i % half);
                (3 * row + pos) as f32 * 10_000f32.powf(-(k as f32) / half as f32)
            })
            .collect();
        let angles = Tensor::from_vec(angles, (b, t, half), &Device::Cpu).unwrap();
        (angles.cos().unwrap(), angles.sin().unwrap())
    }

    /// One of the three ops on f32 inputs, fused or composite, in `dtype`: the inputs are cast
    /// to `dtype` (differentiably), the output back to f32.
    #[derive(Clone, Copy, Debug)]
    enum Case {
        Norm,
        Rope(RopeStyle),
        SwiGlu,
    }

    const CASES: [Case; 4] = [
        Case::Norm,
        Case::Rope(RopeStyle::Half),
        Case::Rope(RopeStyle::Interleaved),
        Case::SwiGlu,
    ];

    /// Differentiable inputs of a case (x [2, 3, 5, 8] for the rope, [3, 7, 24] otherwise).
    fn inputs(case: Case) -> Vec<Var> {
        let shape: &[usize] = match case {
            Case::Rope(_) => &[2, 3, 5, 8],
            _ => &[3, 7, 24],
        };
        let x = Var::from_tensor(&random(shape, 1, 2.0)).unwrap();
        let second = match case {
            Case::Norm => random(&[24], 2, 0.5).affine(1.0, 1.0).unwrap(),
            Case::Rope(_) => return vec![x],
            Case::SwiGlu => random(shape, 3, 2.0),
        };
        vec![x, Var::from_tensor(&second).unwrap()]
    }

    fn apply(case: Case, vars: &[Var], dtype: DType, fused: bool) -> Tensor {
        let args: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(dtype).unwrap())
            .collect();
        let out = match (case, fused) {
            (Case::Norm, true) => rms_norm(&args[0], &args[1], 1e-6),
            (Case::Norm, false) => rms_norm_composite(&args[0], &args[1], 1e-6),
            (Case::Rope(style), _) => {
                let (b, _, t, d) = args[0].dims4().unwrap();
                let (cos, sin) = tables(b, t, d / 2);
                if fused {
                    rope(&args[0], &cos, &sin, style)
                } else {
                    let (cos, sin) = (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap());
                    rope_composite(&args[0], &cos, &sin, style)
                }
            }
            (Case::SwiGlu, true) => swiglu(&args[0], &args[1]),
            (Case::SwiGlu, false) => Ok((args[0].silu().unwrap() * &args[1]).unwrap()),
        };
        out.unwrap().to_dtype(DType::F32).unwrap()
    }

    /// Σ out ⊙ r for fixed random r: a scalar whose gradient is a generic vector-Jacobian
    /// product.
    fn loss(out: &Tensor) -> Tensor {
        let r = random(out.dims(), 99, 1.0);
        (out * r).unwrap().sum_all().unwrap()
    }

    fn grads_of(vars: &[Var], grads: &GradStore) -> Vec<Tensor> {
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
            .collect()
    }

    #[test]
    fn fused_ops_match_candles_composite_ops() {
        for case in CASES {
            for (dtype, tolerance) in [(DType::F32, 2e-6), (DType::BF16, 2e-2), (DType::F16, 2e-3)]
            {
                let vars = inputs(case);
                let fused = apply(case, &vars, dtype, true);
                let composite = apply(case, &vars, dtype, false);
                let value_diff = rel_diff(&fused, &composite);
                assert!(value_diff <= tolerance, "{case:?} {dtype:?}: {value_diff}");
                let fused_grads = grads_of(&vars, &loss(&fused).backward().unwrap());
                let composite_grads = grads_of(&vars, &loss(&composite).backward().unwrap());
                for (i, (f, c)) in fused_grads.iter().zip(&composite_grads).enumerate() {
                    let d = rel_diff(f, c);
                    assert!(d <= 2.0 * tolerance, "{case:?} {dtype:?} input {i}: {d}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        for case in CASES {
            let vars = inputs(case);
            let grads = grads_of(
                &vars,
                &loss(&apply(case, &vars, DType::F32, true))
                    .backward()
                    .unwrap(),
            );
            for (var, grad) in vars.iter().zip(&grads) {
                assert_central_differences(var, grad, 7, &format!("{case:?}"), || {
                    loss(&apply(case, &vars, DType::F32, true))
                });
            }
        }
    }

    /// Values and gradients, run on a pool of `threads` threads.
    fn run_on(threads: usize, case: Case, vars: &[Var], dtype: DType) -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let out = apply(case, vars, dtype, true);
            let grads = grads_of(vars, &loss(&out).backward().unwrap());
            std::iter::once(&out).chain(&grads).map(to_vec).collect()
        })
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        for case in CASES {
            // Enough rows for several tasks and several blocks of the weight gradient's sum.
            let shape: &[usize] = match case {
                Case::Rope(_) => &[3, 4, 70, 16],
                _ => &[5, 61, 24],
            };
            let mut vars = vec![Var::from_tensor(&random(shape, 4, 2.0)).unwrap()];
            match case {
                Case::Norm => vars.push(Var::from_tensor(&random(&[24], 5, 1.0)).unwrap()),
                Case::SwiGlu => vars.push(Var::from_tensor(&random(shape, 6, 2.0)).unwrap()),
                Case::Rope(_) => {}
            }
            for dtype in [DType::F32, DType::BF16] {
                let one = run_on(1, case, &vars, dtype);
                let four = run_on(4, case, &vars, dtype);
                for (a, b) in one.iter().zip(&four) {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{case:?} {dtype:?}: results differ between 1 and 4 threads"
                    );
                }
            }
        }
    }

    #[test]
    fn non_contiguous_inputs_are_copied_and_rejected_by_the_kernels() {
        let x = random(&[24, 6], 7, 2.0).t().unwrap();
        assert!(!x.is_contiguous());
        let w = random(&[24], 8, 1.0);
        let direct = rms_norm(&x, &w, 1e-6).unwrap();
        let copied = rms_norm(&x.contiguous().unwrap(), &w, 1e-6).unwrap();
        assert_eq!(to_vec(&direct), to_vec(&copied));
        let swiglu_direct = swiglu(&x, &x).unwrap();
        let swiglu_copied = swiglu(&x.contiguous().unwrap(), &x.contiguous().unwrap()).unwrap();
        assert_eq!(to_vec(&swiglu_direct), to_vec(&swiglu_copied));
        let q = random(&[1, 5, 2, 8], 9, 1.0).transpose(1, 2).unwrap();
        let (cos, sin) = tables(1, 5, 4);
        let rope_direct = rope(&q, &cos, &sin, RopeStyle::Half).unwrap();
        let rope_copied = rope(&q.contiguous().unwrap(), &cos, &sin, RopeStyle::Half).unwrap();
        assert_eq!(to_vec(&rope_direct), to_vec(&rope_copied));

        let err = x
            .apply_op2_no_bwd(&w, &RmsNorm { eps: 1e-6 })
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be contiguous"), "{err}");
        let err = x.apply_op2_no_bwd(&x, &SwiGlu).unwrap_err().to_string();
        assert!(err.contains("must be contiguous"), "{err}");
        let rope = Rope {
            style: RopeStyle::Half,
            inverse: false,
        };
        let err = q
            .apply_op3_no_bwd(&cos, &sin, &rope)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be contiguous"), "{err}");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = random(&[3, 24], 1, 1.0);
        let err = rms_norm(&x, &random(&[23], 2, 1.0), 1e-6).unwrap_err();
        assert!(err.to_string().contains("weight of shape [23]"), "{err}");
        let err = swiglu(&x, &random(&[3, 23], 2, 1.0)).unwrap_err();
        assert!(err.to_string().contains("shapes"), "{err}");
        let q = random(&[1, 2, 5, 8], 3, 1.0);
        let (cos, sin) = tables(1, 4, 4);
        let err = rope(&q, &cos, &sin, RopeStyle::Half).unwrap_err();
        assert!(err.to_string().contains("tables of shape"), "{err}");
    }
}
