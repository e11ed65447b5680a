//! The sampled token's log-probability, `x[target] − logsumexp(x)` per row of logits, as one op
//! with its own backward pass, and the rows' entropies.
//!
//! The composite `log_softmax` + `gather` keeps three vocabulary-sized tensors for the backward
//! pass and makes seven more in it (a 7B model's micro-batch of 4 × 1,536 completion tokens:
//! 43 GB). This op keeps only its input, the logits (in their own dtype, bf16 in a bf16 pass),
//! and its backward pass writes one tensor, `g · (onehot(target) − softmax(x))`, from a
//! recomputed log-sum-exp. Sums are in f32. The CPU and CUDA kernels compute the same
//! formulas; tests check the CPU one against candle's composite ops and finite differences,
//! and `scripts/gpu-check.sh` compares the devices.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// log p(targets[i]) under softmax(logits[i]): `logits` f32 or bf16 `[rows, vocab]`, `targets`
/// u32 `[rows]`; f32 `[rows]`, differentiable with respect to the logits.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenLogprob)?)
}

/// The entropy of softmax(logits[i]) per row, f32 `[rows]`, without a gradient.
pub fn entropies(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1_no_bwd(&RowEntropy)?)
}

struct TokenLogprob;
/// `(logits, targets, grad [rows])` → the gradient with respect to the logits.
struct TokenLogprobGrad;
struct RowEntropy;

/// A row's values as f32.
fn row_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<Rows<'a>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: logits must be contiguous");
    };
    let (_, vocab) = layout.shape().dims2()?;
    Ok(match storage {
        CpuStorage::F32(v) => Rows::F32(&v[start..end], vocab),
        CpuStorage::BF16(v) => Rows::Bf16(&v[start..end], vocab),
        _ => candle_core::bail!("{op}: logits must be f32 or bf16"),
    })
}

enum Rows<'a> {
    F32(&'a [f32], usize),
    Bf16(&'a [half::bf16], usize),
}

impl Rows<'_> {
    fn count(&self) -> usize {
        match self {
            Rows::F32(v, n) => v.len() / n,
            Rows::Bf16(v, n) => v.len() / n,
        }
    }

    fn get(&self, row: usize) -> Vec<f32> {
        match self {
            Rows::F32(v, n) => v[row * n..(row + 1) * n].to_vec(),
            Rows::Bf16(v, n) => v[row * n..(row + 1) * n]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        }
    }
}

/// max and Σ exp(x − max) of a row.
fn max_and_sum(x: &[f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = x.iter().map(|&v| (v - max).exp()).sum();
    (max, sum)
}

fn targets_u32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [u32]> {
    let (CpuStorage::U32(t), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{op}: targets must be contiguous u32");
    };
    Ok(&t[start..end])
}

/// The logits and targets of a CPU kernel, checked: (rows, vocab, logits, targets).
fn cpu_operands<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    op: &str,
) -> candle_core::Result<(usize, usize, Rows<'a>, &'a [u32])> {
    let (rows, vocab) = check_shapes(l1, l2, op)?;
    let logits = row_f32(s1, l1, op)?;
    let targets = targets_u32(s2, l2, op)?;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("{op}: target {t} outside a vocabulary of {vocab}");
    }
    Ok((rows, vocab, logits, targets))
}

fn check_shapes(
    logits: &Layout,
    targets: &Layout,
    op: &str,
) -> candle_core::Result<(usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if targets.shape().dims() != [rows] {
        candle_core::bail!(
            "{op}: {rows} rows of logits but targets of shape {:?}",
            targets.shape().dims()
        );
    }
    Ok((rows, vocab))
}

impl CustomOp2 for TokenLogprob {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, _, logits, targets) = cpu_operands(s1, l1, s2, l2, self.name())?;
        let out: Vec<f32> = (0..logits.count())
            .into_par_iter()
            .map(|r| {
                let x = logits.get(r);
                let (max, sum) = max_and_sum(&x);
                x[targets[r] as usize] - (max + sum.ln())
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = check_shapes(l1, l2, self.name())?;
        let out = cuda::row_kernel("token_logprob", s1, l1, Some((s2, l2)), None, rows, vocab)?;
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let grad_logits = logits.apply_op3_no_bwd(targets, &grad, &TokenLogprobGrad)?;
        Ok((Some(grad_logits), None))
    }
}

impl CustomOp3 for TokenLogprobGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
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
        let (rows, vocab, logits, targets) = cpu_operands(s1, l1, s2, l2, self.name())?;
        let grad = crate::contiguous_f32(s3, l3, self.name(), "the gradient")?;
        let row_grad = |r: usize| -> Vec<f32> {
            let x = logits.get(r);
            let (max, sum) = max_and_sum(&x);
            let g = grad[r];
            let mut out: Vec<f32> = x.iter().map(|&v| -g * ((v - max).exp() / sum)).collect();
            out[targets[r] as usize] += g;
            out
        };
        let storage = match logits {
            Rows::F32(..) => {
                CpuStorage::F32((0..rows).into_par_iter().flat_map_iter(row_grad).collect())
            }
            Rows::Bf16(..) => CpuStorage::BF16(
                (0..rows)
                    .into_par_iter()
                    .flat_map_iter(|r| row_grad(r).into_iter().map(half::bf16::from_f32))
                    .collect(),
            ),
        };
        Ok((storage, Shape::from((rows, vocab))))
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
        let (rows, vocab) = check_shapes(l1, l2, self.name())?;
        let out = cuda::row_kernel(
            "token_logprob_grad",
            s1,
            l1,
            Some((s2, l2)),
            Some((s3, l3)),
            rows,
            vocab,
        )?;
        Ok((out, Shape::from((rows, vocab))))
    }
}

impl CustomOp1 for RowEntropy {
    fn name(&self) -> &'static str {
        "row-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        let logits = row_f32(s1, l1, self.name())?;
        let out: Vec<f32> = (0..rows)
            .into_par_iter()
            .map(|r| {
                let x = logits.get(r);
                let (max, sum) = max_and_sum(&x);
                // H = log Σe + max − Σ e·x / Σe, with e = exp(x − max).
                let weighted: f32 = x.iter().map(|&v| (v - max).exp() * v).sum();
                sum.ln() + max - weighted / sum
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let out = cuda::row_kernel("row_entropy", s1, l1, None, None, rows, vocab)?;
        Ok((out, Shape::from(rows)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! One block of 256 threads per row; compiled with NVRTC at first use (`crate::cuda`).

    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{cudarc, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::Layout;

    const SOURCE: &str = include_str!("../kernels/token_logprobs.cu");

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        crate::cuda::ptx(&PTX, SOURCE, "token-logprob")
    }

    fn contiguous<'a, T>(
        slice: &'a cudarc::driver::CudaSlice<T>,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
        crate::cuda::contiguous(slice, layout, "token-logprob kernels", what)
    }

    /// Launches kernel `name` (suffixed by the logits' dtype) over `rows` rows of `vocab`
    /// logits. `targets` and `grad` are the optional u32 and f32 operands; the output is f32
    /// `[rows]`, or for the gradient kernel `[rows, vocab]` in the logits' dtype.
    pub(super) fn row_kernel(
        name: &str,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: Option<(&CudaStorage, &Layout)>,
        grad: Option<(&CudaStorage, &Layout)>,
        rows: usize,
        vocab: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = &logits.device;
        let cfg = crate::cuda::blocks((rows as u32, 1));
        let vocab_arg = vocab as i32;
        let suffix = crate::cuda::dtype_suffix("token-logprob kernels", logits)?;
        let func = dev.get_or_load_custom_func(
            &format!("{name}_{suffix}"),
            "spur_token_logprobs",
            ptx()?,
        )?;
        let targets = match targets {
            Some((t, l)) => Some(contiguous(t.as_cuda_slice::<u32>()?, l, "targets")?),
            None => None,
        };
        let grad = match grad {
            Some((g, l)) => Some(contiguous(g.as_cuda_slice::<f32>()?, l, "gradient")?),
            None => None,
        };
        let mut builder = func.builder();
        macro_rules! launch {
            ($src:expr, $ty:ty) => {{
                let src = contiguous($src, logits_layout, "logits")?;
                builder.arg(&src);
                if let Some(t) = &targets {
                    builder.arg(t);
                }
                if let Some(g) = &grad {
                    builder.arg(g);
                }
                if grad.is_some() {
                    // SAFETY: every element is written by the kernel.
                    let out = unsafe { dev.alloc::<$ty>(rows * vocab)? };
                    builder.arg(&out);
                    builder.arg(&vocab_arg);
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { builder.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                } else {
                    // SAFETY: every element is written by the kernel.
                    let out = unsafe { dev.alloc::<f32>(rows)? };
                    builder.arg(&out);
                    builder.arg(&vocab_arg);
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { builder.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }
            }};
        }
        Ok(match &logits.slice {
            CudaStorageSlice::F32(s) => launch!(s, f32),
            CudaStorageSlice::BF16(s) => launch!(s, half::bf16),
            _ => candle_core::bail!("token-logprob kernels: logits must be f32 or bf16"),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var, D};

    use super::*;

    /// Random logits [rows, vocab] with a wide spread, and targets.
    fn inputs(rows: usize, vocab: usize) -> (Tensor, Tensor) {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let logits: Vec<f32> = (0..rows * vocab).map(|_| 8.0 * next() - 4.0).collect();
        let targets: Vec<u32> = (0..rows)
            .map(|_| (next() * vocab as f32) as u32 % vocab as u32)
            .collect();
        (
            Tensor::from_vec(logits, (rows, vocab), &Device::Cpu).unwrap(),
            Tensor::from_vec(targets, rows, &Device::Cpu).unwrap(),
        )
    }

    /// candle's composite ops: log_softmax, gather.
    fn composite(logits: &Tensor, targets: &Tensor) -> Tensor {
        candle_nn::ops::log_softmax(logits, D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn values_and_gradients_match_candles_composite_ops() {
        let (logits, targets) = inputs(37, 1000);
        let var = Var::from_tensor(&logits).unwrap();
        // A weighted sum, so that each row's gradient has its own scale and sign.
        let weights = Tensor::arange(0f32, 37., &Device::Cpu)
            .unwrap()
            .affine(0.1, -1.5)
            .unwrap();
        let fused = token_logprobs(var.as_tensor(), &targets).unwrap();
        let reference = composite(var.as_tensor(), &targets);
        assert!(max_gap(&fused, &reference) < 1e-5);
        let g_fused = (&fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_fused.get(var.as_tensor()).unwrap(),
            g_ref.get(var.as_tensor()).unwrap(),
        );
        assert!(max_gap(a, b) < 1e-6, "gradient gap {}", max_gap(a, b));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (logits, targets) = inputs(3, 50);
        let var = Var::from_tensor(
            &logits
                .to_dtype(DType::F64)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let grads = token_logprobs(var.as_tensor(), &targets)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let value = |w: &[f32]| -> f64 {
            let t = Tensor::from_slice(w, (3, 50), &Device::Cpu).unwrap();
            token_logprobs(&t, &targets)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let h = 1e-2f32;
        for i in [0, 7, 49, 50, 77, 149] {
            let (mut up, mut down) = (base.clone(), base.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (value(&up) - value(&down)) / (2.0 * h as f64);
            assert!(
                (grad[i] as f64 - numeric).abs() < 2e-3,
                "logit {i}: gradient {} vs finite difference {numeric}",
                grad[i]
            );
        }
    }

    #[test]
    fn bf16_logits_give_f32_logprobs_and_bf16_gradients() {
        let (logits, targets) = inputs(5, 300);
        let bf16 = logits.to_dtype(DType::BF16).unwrap();
        let var = Var::from_tensor(&bf16).unwrap();
        let fused = token_logprobs(var.as_tensor(), &targets).unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        // Against the composite ops on the same (bf16-rounded) values in f32.
        let reference = composite(&bf16.to_dtype(DType::F32).unwrap(), &targets);
        assert!(max_gap(&fused, &reference) < 1e-5);
        let grads = fused.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(var.as_tensor()).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn entropies_match_the_composite_formula() {
        let (logits, _) = inputs(9, 700);
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let reference = logp
            .exp()
            .unwrap()
            .mul(&logp)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_gap(&entropies(&logits).unwrap(), &reference) < 1e-4);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let (logits, _) = inputs(2, 10);
        let targets = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
        let err = token_logprobs(&logits, &targets).unwrap_err().to_string();
        assert!(
            err.contains("target 10 outside a vocabulary of 10"),
            "{err}"
        );
    }
}
