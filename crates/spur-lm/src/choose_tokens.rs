//! Token choice where the logits are: one op that takes a decode step's logits and each row's
//! uniform draw and temperature, and returns each row's token and log-probability, as
//! [`crate::choose_token`] chooses them without top-k or top-p truncation (the paper's
//! sampling: T = 1, or greedy evaluation).
//!
//! On a GPU this replaces copying the whole [rows, vocabulary] logits to the host every step
//! (39 MB at batch 64 for Qwen2.5's 152k vocabulary) with copying two numbers per row. The CPU
//! implementation calls `choose_token` itself; the CUDA kernel sums the same f64 weights in 256
//! chunks of consecutive tokens, so its total may differ from the CPU's in the last bits and a
//! draw within that distance of a token boundary may pick the neighbour.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::engine::{choose_token, SamplingParams};
use crate::error::Result;

/// `(logits f32 [rows, vocab], draws f64 [rows, 2] = (uniform draw, temperature))` → f32
/// `[rows, 2]` = (token id, log-probability). Token ids are exact in f32 below 2²⁴.
struct ChooseTokens;

/// Each row's token and log-probability from `logits` (f32 [rows, vocab], on any device), with
/// `draws[r]` its uniform number in [0, 1) and `temperatures[r]` its temperature (0: greedy).
pub(crate) fn choose_tokens(
    logits: &Tensor,
    draws: &[f64],
    temperatures: &[f64],
) -> Result<Vec<(u32, f32)>> {
    let rows: Vec<f64> = draws
        .iter()
        .zip(temperatures)
        .flat_map(|(&d, &t)| [d, t])
        .collect();
    let rows = Tensor::from_vec(rows, (draws.len(), 2), logits.device())?;
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let out = logits
        .apply_op2_no_bwd(&rows, &ChooseTokens)?
        .to_vec2::<f32>()?;
    Ok(out.iter().map(|r| (r[0] as u32, r[1])).collect())
}

fn check(logits: &Layout, rows: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, vocab) = logits.shape().dims2()?;
    if rows.shape().dims() != [n, 2] || vocab == 0 || vocab >= 1 << 24 {
        candle_core::bail!(
            "choose-tokens: logits {:?} with rows {:?}",
            logits.shape(),
            rows.shape()
        );
    }
    Ok((n, vocab))
}

impl CustomOp2 for ChooseTokens {
    fn name(&self) -> &'static str {
        "choose-tokens"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = check(l1, l2)?;
        let (CpuStorage::F32(logits), CpuStorage::F64(rows)) = (s1, s2) else {
            candle_core::bail!("choose-tokens: logits must be f32 and rows f64");
        };
        let (Some((a, _)), Some((b, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("choose-tokens: operands must be contiguous");
        };
        let (logits, rows) = (&logits[a..a + n * vocab], &rows[b..b + 2 * n]);
        let out: Vec<f32> = (logits.par_chunks(vocab).zip(rows.par_chunks(2)))
            .flat_map_iter(|(row, dt)| {
                let params = SamplingParams {
                    temperature: dt[1],
                    ..SamplingParams::default()
                };
                let (token, logprob) = choose_token(row, &params, || dt[0]);
                [token as f32, logprob]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, vocab) = check(l1, l2)?;
        Ok((cuda::choose(s1, l1, s2, l2, n, vocab)?, Shape::from((n, 2))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! One block per row. Not yet run on a GPU: the engine uses it only with
    //! `SPUR_CUDA_KERNELS=1` (`crate::unchecked_cuda_kernels`).

    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::Layout;

    use crate::cuda::contiguous;

    const SOURCE: &str = include_str!("../kernels/choose_tokens.cu");

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        crate::cuda::ptx(&PTX, SOURCE, "token-choice")
    }

    pub(super) fn choose(
        logits: &CudaStorage,
        logits_layout: &Layout,
        rows: &CudaStorage,
        rows_layout: &Layout,
        n: usize,
        vocab: usize,
    ) -> candle_core::Result<CudaStorage> {
        let op = "choose-tokens";
        let dev = logits.device.clone();
        let func = dev.get_or_load_custom_func("choose_tokens", "spur_choose_tokens", ptx()?)?;
        let x = contiguous(logits.as_cuda_slice::<f32>()?, logits_layout, op, "logits")?;
        let r = contiguous(rows.as_cuda_slice::<f64>()?, rows_layout, op, "rows")?;
        // SAFETY: the kernel writes both numbers of every row.
        let out = unsafe { dev.alloc::<f32>(2 * n)? };
        let vocab_arg = vocab as i32;
        let mut builder = func.builder();
        builder.arg(&x).arg(&r).arg(&out).arg(&vocab_arg);
        let cfg = crate::cuda::blocks((n as u32, 1));
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The op gives what `choose_token` gives row by row: greedy and sampled rows in one call.
    #[test]
    fn rows_choose_as_choose_token_does() {
        let (n, vocab) = (6, 1000);
        let logits: Vec<f32> = (0..n * vocab)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 9.0)
            .collect();
        let draws = [0.0, 0.13, 0.5, 0.87, 0.999_999, 0.42];
        let temperatures = [0.0, 1.0, 0.6, 1.0, 1.3, 0.0];
        let tensor = Tensor::from_vec(logits.clone(), (n, vocab), &Device::Cpu).unwrap();
        let got = choose_tokens(&tensor, &draws, &temperatures).unwrap();
        for (r, &(token, logprob)) in got.iter().enumerate() {
            let params = SamplingParams {
                temperature: temperatures[r],
                ..SamplingParams::default()
            };
            let row = &logits[r * vocab..(r + 1) * vocab];
            assert_eq!(
                choose_token(row, &params, || draws[r]),
                (token, logprob),
                "row {r}"
            );
        }
        // Different draws pick different tokens.
        assert_ne!(got[1].0, got[3].0);
    }

    #[test]
    fn mismatched_rows_are_errors() {
        let logits = Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap();
        assert!(choose_tokens(&logits, &[0.5, 0.5], &[1.0, 1.0]).is_err());
    }
}
