//! The sampled tokens' log-probs straight from the last hidden states
//! ([`linear_token_logprobs`]), without the logits of every position alive at once.
//!
//! With the logits as a tensor of the graph, a training pass keeps them, [tokens, vocab], for the
//! backward pass, which makes about six more of their size (the log-prob's gradient, candle's
//! zeros and sums, the product's operands): 1.1 GB for SmolLM2 at 4 × 192 completion tokens in
//! f32, 26 GB for a micro-batch of 4 × 3,072 tokens over Qwen2.5's 152,064-token vocabulary in
//! bf16. Here the forward pass computes the logits of a chunk of rows at a time and keeps only
//! each row's log-prob and log-sum-exp; the backward pass recomputes the logits one block of the
//! vocabulary at a time, turns them into their gradient, and multiplies it into the gradients of
//! the hidden states and of the block's rows of the head's weight. One extra product of the
//! head's size (the recomputation) buys vocabulary-sized memory that no longer grows with the
//! number of tokens. Built from candle's products and spur's fused log-prob ops, it runs on
//! every device, in f32 or bf16.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::model::matmul;
use crate::token_logprobs::{entropies, token_logprobs};

/// Bytes of f32 logits one chunk of rows (forward) or block of the vocabulary (backward) holds:
/// the vocabulary-sized transients are a few times this, whatever the number of tokens.
pub(crate) const CHUNK_BYTES: usize = 32 << 20;

/// Per-token results of a scoring or training pass: log p(target) under softmax(logits / T),
/// f32 `[n]`, and with them, when asked for, the distribution's entropy.
#[derive(Clone, Debug)]
pub struct TokenLogprobs {
    pub logprobs: Tensor,
    pub entropies: Option<Tensor>,
}

/// Whether and how a pass computes the per-token entropy of the distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entropy {
    Skip,
    /// As a metric: no gradient.
    Metric,
    /// For an entropy bonus: differentiable, like the log-probs.
    Trainable,
}

/// How many rows a forward chunk and how many vocabulary entries a backward block take.
#[derive(Clone, Copy, Debug)]
struct Chunking {
    rows: usize,
    vocab: usize,
}

impl Chunking {
    fn new(rows: usize, vocab: usize) -> Self {
        let per = |n: usize| (CHUNK_BYTES / (4 * n.max(1))).max(16);
        Chunking {
            rows: per(vocab),
            vocab: per(rows),
        }
    }
}

/// log p(targets[i]) under softmax(h[i] · weightᵀ / temperature) for `h` `[n, hidden]` and the
/// head's `weight` `[vocab, hidden]`, both in the pass's dtype (f32 or bf16); `targets` u32
/// `[n]`. Unless `entropy` is `Skip`, also each row's entropy. The log-probs, and trainable
/// entropies, are differentiable with respect to `h` and `weight` when either is tracked.
pub fn linear_token_logprobs(
    h: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: Entropy,
) -> Result<TokenLogprobs> {
    let chunking = Chunking::new(h.dim(0)?, weight.dim(0)?);
    chunked(h, weight, targets, temperature, entropy, chunking)
}

fn chunked(
    h: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: Entropy,
    chunking: Chunking,
) -> Result<TokenLogprobs> {
    let (n, hidden) = h.dims2()?;
    let (_, weight_hidden) = weight.dims2()?;
    if weight_hidden != hidden || targets.dims() != [n] {
        return Err(Error::Request(format!(
            "linear-token-logprob: hidden states {:?}, head weight {:?} and targets {:?} do not \
             match",
            h.dims(),
            weight.dims(),
            targets.dims()
        )));
    }
    let (hd, wd) = (h.detach(), weight.detach());
    // Without a gradient to take (a scoring pass), the log-sum-exps are not needed.
    let tracked = h.track_op() || weight.track_op();
    let mut logprobs = Vec::new();
    let mut lse = Vec::new();
    let mut ents = Vec::new();
    for start in (0..n).step_by(chunking.rows) {
        let len = chunking.rows.min(n - start);
        let logits = scaled_logits(&hd.narrow(0, start, len)?, &wd, temperature)?;
        let t = targets.narrow(0, start, len)?;
        let lp = token_logprobs(&logits, &t)?;
        if tracked {
            // log Σ exp = x[target] − log p(target), from the same rounded logits.
            let picked = logits
                .gather(&t.unsqueeze(1)?.contiguous()?, 1)?
                .squeeze(1)?;
            lse.push((picked.to_dtype(DType::F32)? - &lp)?);
        }
        if entropy != Entropy::Skip {
            ents.push(entropies(&logits)?);
        }
        logprobs.push(lp);
    }
    let logprobs = Tensor::cat(&logprobs, 0)?;
    let entropies = (entropy != Entropy::Skip)
        .then(|| Tensor::cat(&ents, 0))
        .transpose()?;
    if !tracked {
        return Ok(TokenLogprobs {
            logprobs,
            entropies,
        });
    }
    let mut op = LinearLogprob {
        targets: targets.clone(),
        temperature,
        lse: Tensor::cat(&lse, 0)?,
        entropies: None,
        chunking,
    };
    match entropies {
        Some(entropies) if entropy == Entropy::Trainable => {
            // One op for both: [n, 2], log-probs then entropies.
            let both = Tensor::stack(&[&logprobs, &entropies], 1)?;
            op.entropies = Some(entropies);
            let both = h.apply_op3(weight, &both, op)?;
            Ok(TokenLogprobs {
                logprobs: both.narrow(1, 0, 1)?.squeeze(1)?,
                entropies: Some(both.narrow(1, 1, 1)?.squeeze(1)?),
            })
        }
        entropies => Ok(TokenLogprobs {
            logprobs: h.apply_op3(weight, &logprobs, op)?,
            entropies,
        }),
    }
}

/// `h · weightᵀ / temperature` in the operands' dtype (the scaling as the tempered policy's).
fn scaled_logits(h: &Tensor, weight: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let logits = matmul(h, &weight.t()?).map_err(candle_core::Error::wrap)?;
    if temperature == 1.0 {
        return Ok(logits);
    }
    logits.affine(1.0 / temperature, 0.0)
}

/// `(h, weight, log-probs computed beforehand)` → the log-probs (`[n]`, or `[n, 2]` with the
/// trainable entropies beside them), with the backward pass of [`linear_token_logprobs`]. The
/// forward pass is a copy: the values were computed in chunks outside the op, which only
/// attaches the gradient.
struct LinearLogprob {
    targets: Tensor,
    temperature: f64,
    /// f32 `[n]`: each row's log Σ exp(logits / T), from the forward pass.
    lse: Tensor,
    /// f32 `[n]`: each row's entropy, when the output carries it as a second column.
    entropies: Option<Tensor>,
    chunking: Chunking,
}

fn whole(layout: &Layout) -> candle_core::Result<()> {
    match layout.contiguous_offsets() {
        Some((0, _)) => Ok(()),
        _ => candle_core::bail!("linear-token-logprob: the log-probs must be a whole tensor"),
    }
}

impl CustomOp3 for LinearLogprob {
    fn name(&self) -> &'static str {
        "linear-token-logprob"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        logprobs: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        whole(layout)?;
        Ok((logprobs.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        logprobs: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        whole(layout)?;
        Ok((logprobs.try_clone(layout)?, layout.shape().clone()))
    }

    /// For each block of the vocabulary: its logits z (divided by T) recomputed,
    /// p = exp(z − lse), the logits' gradient (g · (onehot(target) − p) − e · p · (z − lse + H))
    /// / T for the gradients g of the log-probs and e of the entropies H, and from it the hidden
    /// states' gradient (summed over blocks) and the block's rows of the weight's gradient.
    fn bwd(
        &self,
        h: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, weight) = (h.detach(), weight.detach());
        let (n, vocab) = (h.dim(0)?, weight.dim(0)?);
        let inv_t = 1.0 / self.temperature;
        // g / T and e / T per row, as columns.
        let grad = grad.to_dtype(DType::F32)?.affine(inv_t, 0.0)?;
        let (g, e) = match &self.entropies {
            None => (grad.unsqueeze(1)?, None),
            Some(_) => (grad.narrow(1, 0, 1)?, Some(grad.narrow(1, 1, 1)?)),
        };
        let minus_g = g.neg()?;
        let lse = self.lse.unsqueeze(1)?;
        // H − lse per row, for the entropies' term.
        let h_minus_lse = match &self.entropies {
            Some(entropies) => Some((entropies - &self.lse)?.unsqueeze(1)?),
            None => None,
        };
        let targets = self.targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let g_rows = g.squeeze(1)?.contiguous()?.to_vec1::<f32>()?;
        let dweight = Tensor::zeros(weight.shape(), weight.dtype(), weight.device())?;
        let mut dh: Option<Tensor> = None;
        for start in (0..vocab).step_by(self.chunking.vocab) {
            let len = self.chunking.vocab.min(vocab - start);
            let block = weight.narrow(0, start, len)?;
            let logits = scaled_logits(&h, &block, self.temperature)?;
            let z = logits.to_dtype(DType::F32)?;
            let p = z.broadcast_sub(&lse)?.exp()?;
            let dlogits = match (&e, &h_minus_lse) {
                (Some(e), Some(h_minus_lse)) => {
                    // −p · (g + e · (z − lse + H))
                    let coef = z.broadcast_add(h_minus_lse)?.broadcast_mul(e)?;
                    (p * coef.broadcast_add(&g)?)?.neg()?
                }
                _ => p.broadcast_mul(&minus_g)?,
            };
            // + g / T at each row's target, where it falls in this block.
            let (index, source): (Vec<u32>, Vec<f32>) = targets
                .iter()
                .zip(&g_rows)
                .map(|(&t, &g)| match (t as usize).checked_sub(start) {
                    Some(i) if i < len => (i as u32, g),
                    _ => (0, 0.0),
                })
                .unzip();
            let device = h.device();
            dlogits.scatter_add_set(
                &Tensor::from_vec(index, (n, 1), device)?,
                &Tensor::from_vec(source, (n, 1), device)?,
                1,
            )?;
            let dlogits = dlogits.to_dtype(h.dtype())?;
            // Summed in f32: bf16 partial sums over hundreds of blocks would lose digits.
            let part = matmul(&dlogits, &block)
                .map_err(candle_core::Error::wrap)?
                .to_dtype(DType::F32)?;
            dh = Some(match dh {
                Some(sum) => (sum + part)?,
                None => part,
            });
            let dblock = matmul(&dlogits.t()?, &h).map_err(candle_core::Error::wrap)?;
            dweight.slice_set(&dblock.contiguous()?, 0, start)?;
        }
        let dh = match dh {
            Some(dh) => dh.to_dtype(h.dtype())?,
            None => h.zeros_like()?,
        };
        Ok((Some(dh), Some(dweight), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var, D};

    use super::*;
    use crate::test_util::{assert_central_differences, random, rel_diff, to_vec};

    const ROWS: usize = 37;
    const HIDDEN: usize = 24;
    const VOCAB: usize = 101;

    fn inputs() -> (Var, Var, Tensor) {
        let h = Var::from_tensor(&random(&[ROWS, HIDDEN], 1, 1.0)).unwrap();
        let w = Var::from_tensor(&random(&[VOCAB, HIDDEN], 2, 1.0)).unwrap();
        let targets: Vec<u32> = (0..ROWS).map(|i| (i * 37 % VOCAB) as u32).collect();
        (h, w, Tensor::from_vec(targets, ROWS, &Device::Cpu).unwrap())
    }

    /// Small chunks and blocks, so that both loops take several steps and a last short one.
    const SMALL: Chunking = Chunking { rows: 8, vocab: 30 };

    /// The log-probs and entropies, chunked or from whole logits through candle's ops.
    fn apply(
        (h, w, t): &(Var, Var, Tensor),
        dtype: DType,
        temperature: f64,
        fused: bool,
    ) -> (Tensor, Tensor) {
        let (h, w) = (
            h.as_tensor().to_dtype(dtype).unwrap(),
            w.as_tensor().to_dtype(dtype).unwrap(),
        );
        if fused {
            let out = chunked(&h, &w, t, temperature, Entropy::Trainable, SMALL).unwrap();
            return (out.logprobs, out.entropies.unwrap());
        }
        let logits = scaled_logits(&h, &w, temperature)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let picked = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let entropy = (logp.exp().unwrap() * &logp)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .neg()
            .unwrap();
        (picked, entropy)
    }

    /// Σ lp ⊙ r + Σ H ⊙ r' for fixed random r, r' (an entropy bonus's kind of loss).
    fn loss((logprobs, entropies): (&Tensor, Option<&Tensor>)) -> Tensor {
        let r = random(logprobs.dims(), 99, 1.0);
        let l = (logprobs * r).unwrap().sum_all().unwrap();
        match entropies {
            Some(h) => (l + (h * random(h.dims(), 98, 1.0)).unwrap().sum_all().unwrap()).unwrap(),
            None => l,
        }
    }

    fn grads(vars: &(Var, Var, Tensor), out: (&Tensor, Option<&Tensor>)) -> [Tensor; 2] {
        let store = loss(out).backward().unwrap();
        [&vars.0, &vars.1].map(|v| store.get(v.as_tensor()).expect("a gradient").clone())
    }

    #[test]
    fn matches_whole_logits_through_candles_ops() {
        for temperature in [1.0, 0.7] {
            for (dtype, tolerance) in [(DType::F32, 2e-6), (DType::BF16, 2e-2)] {
                let vars = inputs();
                let (lp, ent) = apply(&vars, dtype, temperature, true);
                let (lp_ref, ent_ref) = apply(&vars, dtype, temperature, false);
                let what = format!("T={temperature} {dtype:?}");
                assert!(rel_diff(&lp, &lp_ref) <= tolerance, "{what} log-probs");
                assert!(rel_diff(&ent, &ent_ref) <= tolerance, "{what} entropies");
                let ours = grads(&vars, (&lp, Some(&ent)));
                let theirs = grads(&vars, (&lp_ref, Some(&ent_ref)));
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    let d = rel_diff(a, b);
                    assert!(d <= 2.0 * tolerance, "{what} gradient {i}: {d}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let vars = inputs();
        let both = |vars: &(Var, Var, Tensor)| {
            let (lp, ent) = apply(vars, DType::F32, 0.7, true);
            loss((&lp, Some(&ent)))
        };
        let store = both(&vars).backward().unwrap();
        let analytic = [&vars.0, &vars.1].map(|v| store.get(v.as_tensor()).unwrap().clone());
        for (var, grad) in [&vars.0, &vars.1].into_iter().zip(&analytic) {
            assert_central_differences(var, grad, 41, "head", || both(&vars));
        }
    }

    #[test]
    fn chunking_does_not_change_the_results() {
        let vars = inputs();
        let (h, w) = (vars.0.as_tensor(), vars.1.as_tensor());
        let run = |chunking: Chunking| {
            let out = chunked(h, w, &vars.2, 1.0, Entropy::Trainable, chunking).unwrap();
            let ent = out.entropies.unwrap();
            let mut all = vec![to_vec(&out.logprobs), to_vec(&ent)];
            all.extend(grads(&vars, (&out.logprobs, Some(&ent))).iter().map(to_vec));
            all
        };
        let small = run(SMALL);
        let whole = run(Chunking::new(ROWS, VOCAB));
        for (a, b) in small.iter().zip(&whole) {
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-6 * scale, "{diff}");
        }
    }

    #[test]
    fn untracked_inputs_give_detached_log_probs_and_bad_shapes_are_errors() {
        let (h, w, t) = inputs();
        let out = linear_token_logprobs(
            &h.as_tensor().detach(),
            &w.as_tensor().detach(),
            &t,
            1.0,
            Entropy::Skip,
        )
        .unwrap();
        assert!(!out.logprobs.track_op());
        assert!(out.entropies.is_none());
        let err = linear_token_logprobs(
            h.as_tensor(),
            &w.as_tensor().t().unwrap(),
            &t,
            1.0,
            Entropy::Skip,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("do not match"), "{err}");
    }
}
