//! Adam's update in place: the two moments and the weight are rewritten where they lie, in three
//! elementwise passes, instead of through candle's whole-tensor ops, which keep six to eight
//! temporaries of the tensor being updated alive at once (for the largest tensor,
//! Qwen2.5-1.5B's 233 M-entry embedding, about 7 GB) and launch about fifteen kernels per
//! tensor on a GPU.
//!
//! Each element goes through the same f32 operations in the same order as the composite update
//! in [`crate::optim`], so with f32 moments the results are bit-identical to it. Moments kept in
//! bf16 are read back rounded by the weight's pass, as PyTorch's bf16 optimizer state is (the
//! composite update uses them unrounded once). Elements are independent, so the passes split
//! them over rayon's pool without changing any result.
//!
//! The CUDA kernels round every product and sum on its own (no fused multiply-adds), so they
//! compute the CPU's bits too. They serve CUDA updates only with `SPUR_CUDA_KERNELS=1` until a
//! lent GPU has checked them (`spur bench train-ops`).

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

/// Whether the in-place passes can update `weight` (an f32 var without a separate master copy)
/// from `grad` with the moments `m` and `v`: every operand contiguous from its start on the CPU
/// (or on CUDA, when asked for), the gradient f32, the moments f32 or bf16.
pub(crate) fn applies(weight: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let device = weight.device();
    let here = device.is_cpu() || (device.is_cuda() && spur_lm::unchecked_cuda_kernels());
    let whole = |t: &Tensor| {
        t.device().same_device(device) && matches!(t.layout().contiguous_offsets(), Some((0, _)))
    };
    here && weight.dtype() == DType::F32
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        moment: &mut candle_core::CudaStorage,
        moment_layout: &Layout,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        cuda::moment(self, (moment, moment_layout), (grad, grad_layout))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        weight: &mut candle_core::CudaStorage,
        weight_layout: &Layout,
        m: &candle_core::CudaStorage,
        m_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        cuda::weight(self, (weight, weight_layout), (m, m_layout), (v, v_layout))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The passes on CUDA: one thread per element, `__fmul_rn`/`__fadd_rn` so that no product
    //! and sum fuse into one rounding.

    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::Layout;
    use spur_lm::cuda::{blocks, blocks_for, contiguous, dtype_suffix};

    use super::{Moment, Weight};

    const SOURCE: &str = include_str!("../kernels/adam.cu");

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        spur_lm::cuda::ptx(&PTX, SOURCE, "Adam")
    }

    fn config(n: usize) -> LaunchConfig {
        blocks((blocks_for(n), 1))
    }

    fn range(layout: &Layout, op: &str, what: &str) -> candle_core::Result<(usize, usize)> {
        layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
    }

    pub(super) fn moment(
        op: &Moment,
        (moment, moment_layout): (&mut CudaStorage, &Layout),
        (grad, grad_layout): (&CudaStorage, &Layout),
    ) -> candle_core::Result<()> {
        let name = "adam-moment";
        let g = contiguous(
            grad.as_cuda_slice::<f32>()?,
            grad_layout,
            name,
            "the gradient",
        )?;
        let (start, end) = range(moment_layout, name, "the moment")?;
        let n = end - start;
        if n != g.len() {
            candle_core::bail!("{name}: {n} moments for {} gradients", g.len());
        }
        let dev = moment.device.clone();
        let func = dev.get_or_load_custom_func(
            &format!("adam_moment_{}", dtype_suffix(name, moment)?),
            "spur_adam",
            ptx()?,
        )?;
        let (keep, take) = (op.keep, op.take);
        let (clip, has_clip) = (op.clip.unwrap_or(1.0), op.clip.is_some() as i32);
        let (squared, count) = (op.squared as i32, n as i64);
        macro_rules! run {
            ($ty:ty) => {{
                let mut m = moment.as_cuda_slice_mut::<$ty>()?.slice_mut(start..end);
                let mut b = func.builder();
                b.arg(&mut m).arg(&g).arg(&keep).arg(&take).arg(&clip);
                b.arg(&has_clip).arg(&squared).arg(&count);
                // SAFETY: arguments match the kernel's signature; `m` holds `n` elements.
                unsafe { b.launch(config(n)) }.w()?;
            }};
        }
        match &moment.slice {
            CudaStorageSlice::F32(_) => run!(f32),
            _ => run!(half::bf16),
        }
        Ok(())
    }

    pub(super) fn weight(
        op: &Weight,
        (weight, weight_layout): (&mut CudaStorage, &Layout),
        (m, m_layout): (&CudaStorage, &Layout),
        (v, v_layout): (&CudaStorage, &Layout),
    ) -> candle_core::Result<()> {
        let name = "adam-weight";
        let (start, end) = range(weight_layout, name, "the weight")?;
        let n = end - start;
        let dev = weight.device.clone();
        let func = dev.get_or_load_custom_func(
            &format!("adam_weight_{}", dtype_suffix(name, m)?),
            "spur_adam",
            ptx()?,
        )?;
        let (decay, has_decay) = (op.decay.unwrap_or(1.0), op.decay.is_some() as i32);
        let (inv_bias2_sqrt, eps, step_size) = (op.inv_bias2_sqrt, op.eps, op.step_size);
        let count = n as i64;
        let mut w = weight.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        macro_rules! run {
            ($ty:ty) => {{
                let ms = contiguous(m.as_cuda_slice::<$ty>()?, m_layout, name, "m")?;
                let vs = contiguous(v.as_cuda_slice::<$ty>()?, v_layout, name, "v")?;
                if ms.len() != n || vs.len() != n {
                    candle_core::bail!("{name}: moments of another size than the weight");
                }
                let mut b = func.builder();
                b.arg(&mut w).arg(&ms).arg(&vs).arg(&decay).arg(&has_decay);
                b.arg(&inv_bias2_sqrt).arg(&eps).arg(&step_size).arg(&count);
                // SAFETY: arguments match the kernel's signature; each operand holds `n`.
                unsafe { b.launch(config(n)) }.w()?;
            }};
        }
        match &m.slice {
            CudaStorageSlice::F32(_) => run!(f32),
            _ => run!(half::bf16),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{Device, Tensor};
    use spur_lm::cuda_emulation::{bytes, emulator, run};

    use super::*;

    /// The CUDA passes, run on the CPU by spur-lm's emulator, compute the CPU passes' bits
    /// (f32 moments, clipped gradient, weight decay).
    #[test]
    fn cuda_kernels_compute_the_cpu_passes_bits() {
        let n = 1000;
        let values = |seed: u32, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 10007) as f32 / 10007.0 - 0.5
                })
                .map(|x| x * scale)
                .collect()
        };
        let (w, g, m) = (values(1, 0.1), values(2, 1e-2), values(3, 1e-3));
        let v: Vec<f32> = values(4, 1e-4).iter().map(|x| x.abs()).collect();
        let s = AdamStep {
            clip: Some(0.37),
            beta1: 0.9,
            beta2: 0.95,
            decay: Some(1.0 - 5e-7 * 0.1),
            bias2_sqrt: (1.0f64 - 0.95f64.powi(3)).sqrt(),
            eps: 1e-8,
            step_size: 5e-7 / (1.0 - 0.9f64.powi(3)),
        };
        let tensor = |x: &[f32]| Tensor::from_vec(x.to_vec(), n, &Device::Cpu).unwrap();
        let (wt, gt, mt, vt) = (tensor(&w), tensor(&g), tensor(&m), tensor(&v));
        step(&wt, &gt, &mt, &vt, &s).unwrap();

        let inputs = [
            ("w", bytes(&w)),
            ("g", bytes(&g)),
            ("m", bytes(&m)),
            ("v", bytes(&v)),
        ];
        let f = |x: f64| x as f32 as f64;
        let params = [
            ("clip", f(s.clip.unwrap())),
            ("has_clip", 1.0),
            ("keep1", f(s.beta1)),
            ("take1", f(1.0 - s.beta1)),
            ("keep2", f(s.beta2)),
            ("take2", f(1.0 - s.beta2)),
            ("decay", f(s.decay.unwrap())),
            ("has_decay", 1.0),
            ("inv_bias2_sqrt", f(1.0 / s.bias2_sqrt)),
            ("eps", f(s.eps)),
            ("step_size", f(s.step_size)),
        ];
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation/adam.cpp");
        let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let got = run(
            &emulator(&source, &kernels),
            "adam",
            &inputs,
            &params,
            &["w", "m", "v"],
        );
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (what, (emulated, cpu)) in ["weights", "m", "v"]
            .iter()
            .zip(got.iter().zip([&wt, &mt, &vt]))
        {
            assert_eq!(
                bits(emulated),
                bits(&cpu.to_vec1::<f32>().unwrap()),
                "{what}"
            );
        }
        assert_ne!(bits(&got[0]), bits(&w), "the weights moved");
    }
}
