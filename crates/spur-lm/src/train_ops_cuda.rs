//! CUDA kernels of the fused training ops, with the CPU kernels' semantics: f32 and bf16
//! operands, f32 arithmetic, and the norm weight's gradient summed over fixed blocks of rows in
//! a fixed order (so it does not depend on scheduling). RMS norms take one block per row;
//! rotary embedding and SwiGLU one thread per output pair or element.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Shape};

use crate::cuda::{blocks, blocks_for, contiguous, dtype_suffix};

const SOURCE: &str = include_str!("../kernels/train_ops.cu");

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
            unsafe { builder.launch(blocks(grid)) }.w()?;
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
    let row_blocks = rows.div_ceil(block_rows);
    // SAFETY: every element of the three buffers is written by the kernels below.
    let (r, partial, dw) = unsafe {
        (
            dev.alloc::<f32>(rows)?,
            dev.alloc::<f32>(row_blocks * hidden)?,
            dev.alloc::<f32>(hidden)?,
        )
    };
    let (n, rows_arg) = (hidden as i32, rows as i64);
    let (block_rows_arg, blocks_arg) = (block_rows as i32, row_blocks as i32);
    macro_rules! run {
        ($ty:ty) => {{
            let xs = contiguous(x.0.as_cuda_slice::<$ty>()?, x.1, op, "x")?;
            let gs = contiguous(grad.0.as_cuda_slice::<$ty>()?, grad.1, op, "the gradient")?;
            let f = load(&format!("inv_rms_rows_{suffix}"))?;
            let mut b = f.builder();
            b.arg(&xs).arg(&r).arg(&n).arg(&eps);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(blocks((rows as u32, 1))) }.w()?;
            let f = load(&format!("rms_norm_grad_weight_partial_{suffix}"))?;
            let mut b = f.builder();
            b.arg(&xs).arg(&gs).arg(&r).arg(&partial);
            b.arg(&n).arg(&rows_arg).arg(&block_rows_arg);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(blocks((blocks_for(hidden), row_blocks as u32))) }.w()?;
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
    unsafe { b.launch(blocks((blocks_for(hidden), 1))) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(dw, dev.clone()),
        Shape::from(hidden),
    ))
}
