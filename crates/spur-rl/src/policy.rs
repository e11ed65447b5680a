//! What the trainer needs from a model, and per-token log-probs of completions from its logits.

use candle_core::{Device, Tensor, Var, D};

use crate::{Error, Result};

/// A trainable causal language model. `Sync`, so that a training step can run on the compute
/// pool ([`spur_lm::on_compute_pool`]).
pub trait Policy: Sync {
    /// The trainable weights with unique, stable names (the checkpoint keys), in a fixed order.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// Logits at positions `start..len`: `input_ids` u32 `[batch, len]`, right-padded, to
    /// `[batch, len - start, vocab]`, where position j predicts token j + 1. Must be
    /// differentiable with respect to every var (see STACK-NOTES: fused candle ops cut
    /// gradients silently).
    fn forward_logits(&self, input_ids: &Tensor, start: usize) -> Result<Tensor>;

    fn device(&self) -> Device;
}

/// Whether and how to compute the per-token entropy of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entropy {
    Skip,
    /// As a metric: computed from detached log-probs, no gradient.
    Metric,
    /// For the entropy bonus: part of the graph.
    Trainable,
}

/// Log-probs of the completion tokens of a batch, left-aligned and padded: all `[batch, T]`
/// with T the longest completion (at least 1).
pub struct SeqLogprobs {
    pub logprobs: Tensor,
    pub entropy: Option<Tensor>,
    /// f32, 1 on completion tokens, 0 on padding.
    pub mask: Tensor,
}

/// log π(completion token k | prompt, completion[..k]) for each `(prompt, completion)` pair,
/// with one forward pass over the right-padded concatenations. Neither part may be empty.
pub fn sequence_logprobs(
    policy: &dyn Policy,
    seqs: &[(&[u32], &[u32])],
    entropy: Entropy,
) -> Result<SeqLogprobs> {
    if seqs.is_empty() {
        return Err(Error::Rollout("no sequences to score".into()));
    }
    if let Some(i) = seqs.iter().position(|(p, c)| p.is_empty() || c.is_empty()) {
        return Err(Error::Rollout(format!(
            "sequence {i} has an empty prompt or completion; the first completion token needs a \
             prompt to condition on, and an empty completion has nothing to train"
        )));
    }
    let device = policy.device();
    let b = seqs.len();
    let len = seqs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    let width_out = seqs.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
    // Only the logits from the earliest position that predicts a completion token onwards are
    // needed: the policy skips the vocabulary projection and log-softmax before it.
    let start = seqs.iter().map(|(p, _)| p.len()).min().unwrap_or(1) - 1;
    let width = len - 1 - start;

    let mut ids = Vec::with_capacity(b * len);
    let mut index = Vec::with_capacity(b * width_out);
    let mut mask = Vec::with_capacity(b * width_out);
    for (prompt, completion) in seqs {
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(completion);
        ids.resize(ids.len() + len - prompt.len() - completion.len(), 0);
        for k in 0..width_out {
            let inside = k < completion.len();
            index.push(if inside {
                (prompt.len() - 1 - start + k) as u32
            } else {
                0
            });
            mask.push(inside as u8 as f32);
        }
    }
    let ids = Tensor::from_vec(ids, (b, len), &device)?;
    let index = Tensor::from_vec(index, (b, width_out), &device)?;
    let mask = Tensor::from_vec(mask, (b, width_out), &device)?;

    // The last position predicts nothing.
    let logits = policy.forward_logits(&ids, start)?.narrow(1, 0, width)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = ids
        .narrow(1, start + 1, width)?
        .contiguous()?
        .unsqueeze(2)?;
    let token_logp = logp.gather(&targets, 2)?.squeeze(2)?;
    let logprobs = token_logp.gather(&index, 1)?;
    let entropy = match entropy {
        Entropy::Skip => None,
        Entropy::Metric | Entropy::Trainable => {
            let logp = match entropy {
                Entropy::Metric => logp.detach(),
                _ => logp,
            };
            let h = logp.exp()?.mul(&logp)?.sum(D::Minus1)?.neg()?;
            Some(h.gather(&index, 1)?)
        }
    };
    Ok(SeqLogprobs {
        logprobs,
        entropy,
        mask,
    })
}
