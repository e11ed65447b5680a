//! Adam's update in place on the CPU: the two moments and the weight are rewritten where they
//! lie, in three elementwise passes, instead of through candle's whole-tensor ops, which keep six
//! to eight temporaries of the tensor being updated alive at once (for the largest tensor,
//! Qwen2.5-1.5B's 233 M-entry embedding, about 7 GB).
//!
//! Each element goes through the same f32 operations in the same order as the composite update
//! in [`crate::optim`], so with f32 moments the results are bit-identical to it. Moments kept in
//! bf16 are read back rounded by the weight's pass, as PyTorch's bf16 optimizer state is (the
//! composite update uses them unrounded once). Elements are independent, so the passes split
//! them over rayon's pool without changing any result.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 16;

/// The step's constants, as the composite update rounds them to f32.
pub(crate) struct AdamStep {
    /// Gradient scale from norm clipping, when below 1.
    pub clip: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    /// 1 − lr · weight decay, when there is decay.
    pub decay: Option<f64>,
    pub bias2_sqrt: f64,
    pub eps: f64,
    /// lr / (1 − β1ᵗ).
    pub step_size: f64,
}

/// Whether the in-place passes can update `weight` (an f32 CPU var without a separate master
/// copy) from `grad` with the moments `m` and `v`: every operand contiguous from its start, the
/// gradient f32, the moments f32 or bf16.
pub(crate) fn applies(weight: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let whole =
        |t: &Tensor| t.device().is_cpu() && matches!(t.layout().contiguous_offsets(), Some((0, _)));
    weight.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && matches!(m.dtype(), DType::F32 | DType::BF16)
        && m.dtype() == v.dtype()
        && [weight, grad, m, v].into_iter().all(whole)
        && grad.shape() == weight.shape()
}

/// One Adam update of `weight` in place: `m` and `v` first, then the weight from them.
pub(crate) fn step(
    weight: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamStep,
) -> candle_core::Result<()> {
    let clip = s.clip.map(|c| c as f32);
    m.inplace_op2(
        grad,
        &Moment {
            keep: s.beta1 as f32,
            take: (1.0 - s.beta1) as f32,
            clip,
            squared: false,
        },
    )?;
    v.inplace_op2(
        grad,
        &Moment {
            keep: s.beta2 as f32,
            take: (1.0 - s.beta2) as f32,
            clip,
            squared: true,
        },
    )?;
    weight.inplace_op3(
        m,
        v,
        &Weight {
            decay: s.decay.map(|d| d as f32),
            inv_bias2_sqrt: (1.0 / s.bias2_sqrt) as f32,
            eps: s.eps as f32,
            step_size: s.step_size as f32,
        },
    )
}

/// `moment ← moment · keep + g' · take`, where g' is the clipped gradient, or its square.
struct Moment {
    keep: f32,
    take: f32,
    clip: Option<f32>,
    squared: bool,
}

impl Moment {
    // Each `· a + 0.0` is candle's affine op (`x · mul + add`): the zero's sign matches too.
    fn next(&self, moment: f32, g: f32) -> f32 {
        let g = match self.clip {
            Some(c) => g * c + 0.0,
            None => g,
        };
        let g = if self.squared { g * g } else { g };
        (moment * self.keep + 0.0) + (g * self.take + 0.0)
    }
}

fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 operand"),
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        _: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32s(grad, grad_layout, self.name())?;
        match moment {
            CpuStorage::F32(m) => {
                m.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(m, g)| {
                        for (m, &g) in m.iter_mut().zip(g) {
                            *m = self.next(*m, g);
                        }
                    })
            }
            CpuStorage::BF16(m) => {
                m.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(m, g)| {
                        for (m, &g) in m.iter_mut().zip(g) {
                            *m = bf16::from_f32(self.next(m.to_f32(), g));
                        }
                    })
            }
            other => candle_core::bail!("adam-moment: moments of dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// `weight ← weight · decay − m / (√v / √(1 − β2ᵗ) + ε) · step_size`.
struct Weight {
    decay: Option<f32>,
    inv_bias2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

impl Weight {
    fn next(&self, w: f32, m: f32, v: f32) -> f32 {
        let w = match self.decay {
            Some(d) => w * d + 0.0,
            None => w,
        };
        let denom = (v.sqrt() * self.inv_bias2_sqrt + 0.0) + self.eps;
        w - (m / denom * self.step_size + 0.0)
    }

    fn apply<M: Copy + Sync>(
        &self,
        w: &mut [f32],
        m: &[M],
        v: &[M],
        f32_of: impl Fn(M) -> f32 + Sync,
    ) {
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    *w = self.next(*w, f32_of(m), f32_of(v));
                }
            });
    }
}

impl InplaceOp3 for Weight {
    fn name(&self) -> &'static str {
        "adam-weight"
    }

    fn cpu_fwd(
        &self,
        weight: &mut CpuStorage,
        _: &Layout,
        m: &CpuStorage,
        m_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        let CpuStorage::F32(w) = weight else {
            candle_core::bail!("adam-weight: the weight must be f32");
        };
        let range = |l: &Layout| l.contiguous_offsets().map(|(a, b)| a..b);
        match (m, v, range(m_layout), range(v_layout)) {
            (CpuStorage::F32(m), CpuStorage::F32(v), Some(mr), Some(vr)) => {
                self.apply(w, &m[mr], &v[vr], |x| x)
            }
            (CpuStorage::BF16(m), CpuStorage::BF16(v), Some(mr), Some(vr)) => {
                self.apply(w, &m[mr], &v[vr], bf16::to_f32)
            }
            _ => {
                candle_core::bail!("adam-weight: moments must be contiguous, both f32 or both bf16")
            }
        }
        Ok(())
    }
}
