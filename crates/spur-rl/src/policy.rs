//! What the trainer needs from a model, and per-token log-probs of completions from its logits.
//!
//! A batch of (prompt, completion) pairs is scored as [`PackedSequences`]: the pairs back to
//! back in one row, without padding, each attending only to itself, with logits only at the
//! positions that predict completion tokens.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use spur_lm::{PackedSequences, TokenLogprobs};

use crate::{Error, Result};

/// A trainable causal language model. `Sync`, so that a training step can run on the compute
/// pool ([`spur_lm::on_compute_pool`]).
pub trait Policy: Sync {
    /// The trainable weights with unique, stable names (the checkpoint keys), in a fixed order.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// Logits at the positions `batch` asks for, `[n, vocab]` in its order, where position j of
    /// a sequence predicts its token j + 1. Must be differentiable with respect to every var
    /// (see STACK-NOTES: fused candle ops cut gradients silently).
    fn forward_logits(&self, batch: &PackedSequences) -> Result<Tensor>;

    /// [`Policy::forward_logits`] for a pass whose gradient will not be taken (π_old and
    /// reference log-probs), detached. A policy may keep less memory for it than for a
    /// differentiable pass.
    fn scoring_logits(&self, batch: &PackedSequences) -> Result<Tensor> {
        Ok(self.forward_logits(batch)?.detach())
    }

    /// [`Policy::forward_logits`] for a pass whose gradient will be taken, with how to take it.
    /// A policy that keeps less than the whole graph (activation checkpointing) returns a
    /// [`Backprop::Staged`] that recomputes what it dropped.
    fn training_logits(&self, batch: &PackedSequences) -> Result<(Tensor, Backprop<'_>)> {
        Ok((self.forward_logits(batch)?, Backprop::Graph))
    }

    /// The log-probs of `targets` (u32 `[n]`, the tokens the positions of `batch` predict)
    /// under the logits divided by `temperature`, with their entropies when `entropy` is set,
    /// without a gradient and without the logits of every position at once. `None`: the policy
    /// has no such pass, and callers take [`Policy::scoring_logits`]. A policy that has one
    /// must also have [`Policy::training_token_logprobs`], computing the same numbers.
    fn scoring_token_logprobs(
        &self,
        _batch: &PackedSequences,
        _targets: &Tensor,
        _temperature: f64,
        _entropy: bool,
    ) -> Result<Option<TokenLogprobs>> {
        Ok(None)
    }

    /// [`Policy::scoring_token_logprobs`] for a pass whose gradient will be taken, with the
    /// entropies `entropy` asks for (trainable ones differentiable too), and how to take it.
    /// `None`: callers take [`Policy::training_logits`].
    fn training_token_logprobs(
        &self,
        _batch: &PackedSequences,
        _targets: &Tensor,
        _temperature: f64,
        _entropy: Entropy,
    ) -> Result<Option<(TokenLogprobs, Backprop<'_>)>> {
        Ok(None)
    }

    fn device(&self) -> Device;
}

/// A policy at a sampling temperature: its logits divided by `temperature`, the distribution
/// a rollout at that temperature drew its tokens from. At temperature 1 the logits are the
/// policy's own, untouched.
pub struct Tempered<'a> {
    policy: &'a dyn Policy,
    temperature: f64,
}

impl<'a> Tempered<'a> {
    pub fn new(policy: &'a dyn Policy, temperature: f64) -> Self {
        Self {
            policy,
            temperature,
        }
    }

    fn scale(&self, logits: Tensor) -> Result<Tensor> {
        if self.temperature == 1.0 {
            return Ok(logits);
        }
        Ok(logits.affine(1.0 / self.temperature, 0.0)?)
    }
}

impl Policy for Tempered<'_> {
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.policy.named_vars()
    }

    fn forward_logits(&self, batch: &PackedSequences) -> Result<Tensor> {
        self.scale(self.policy.forward_logits(batch)?)
    }

    fn scoring_logits(&self, batch: &PackedSequences) -> Result<Tensor> {
        self.scale(self.policy.scoring_logits(batch)?)
    }

    fn training_logits(&self, batch: &PackedSequences) -> Result<(Tensor, Backprop<'_>)> {
        // The scaling is part of the graph between the policy's logits and the loss, so a
        // staged backward pass (which starts from the loss) goes through it.
        let (logits, backprop) = self.policy.training_logits(batch)?;
        Ok((self.scale(logits)?, backprop))
    }

    fn scoring_token_logprobs(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> Result<Option<TokenLogprobs>> {
        let temperature = temperature * self.temperature;
        self.policy
            .scoring_token_logprobs(batch, targets, temperature, entropy)
    }

    fn training_token_logprobs(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: Entropy,
    ) -> Result<Option<(TokenLogprobs, Backprop<'_>)>> {
        let temperature = temperature * self.temperature;
        self.policy
            .training_token_logprobs(batch, targets, temperature, entropy)
    }

    fn device(&self) -> Device {
        self.policy.device()
    }
}

/// A policy's own backward pass: the gradients of the loss it is given.
pub type StagedBackward<'a> = Box<dyn FnOnce(&Tensor) -> Result<GradStore> + 'a>;

/// How to get the gradients of a loss computed from a training pass's logits.
pub enum Backprop<'a> {
    /// The logits hold the whole graph: `loss.backward()`.
    Graph,
    /// The policy's own backward pass, given the loss.
    Staged(StagedBackward<'a>),
}

impl Backprop<'_> {
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        match self {
            Backprop::Graph => Ok(loss.backward()?),
            Backprop::Staged(backward) => backward(loss),
        }
    }
}

/// Whether and how to compute the per-token entropy of the policy.
pub use spur_lm::Entropy;

/// Log-probs of the completion tokens of a batch, left-aligned and padded: all `[batch, T]`
/// with T the longest completion (at least 1).
pub struct SeqLogprobs {
    pub logprobs: Tensor,
    pub entropy: Option<Tensor>,
    /// f32, 1 on completion tokens, 0 on padding.
    pub mask: Tensor,
}

/// What a pass gives per position: the logits, or the policy's own token log-probs.
enum Scores {
    Logits(Tensor),
    Tokens(TokenLogprobs),
}

/// log π(completion token k | prompt, completion[..k]) for each `(prompt, completion)` pair,
/// with one forward pass over the packed concatenations. Neither part may be empty.
pub fn sequence_logprobs(
    policy: &dyn Policy,
    seqs: &[(&[u32], &[u32])],
    entropy: Entropy,
) -> Result<SeqLogprobs> {
    scored(policy, seqs, entropy, |batch, _| {
        Ok(Scores::Logits(policy.forward_logits(batch)?))
    })
}

/// [`sequence_logprobs`] without a gradient (detached), through
/// [`Policy::scoring_token_logprobs`] or else [`Policy::scoring_logits`].
pub fn scoring_logprobs(policy: &dyn Policy, seqs: &[(&[u32], &[u32])]) -> Result<Tensor> {
    Ok(scoring(policy, seqs, Entropy::Skip)?.logprobs)
}

/// [`scoring_logprobs`] with the per-token entropy of the policy's distribution, for metrics.
pub fn scoring_logprobs_entropy(
    policy: &dyn Policy,
    seqs: &[(&[u32], &[u32])],
) -> Result<SeqLogprobs> {
    scoring(policy, seqs, Entropy::Metric)
}

fn scoring(
    policy: &dyn Policy,
    seqs: &[(&[u32], &[u32])],
    entropy: Entropy,
) -> Result<SeqLogprobs> {
    scored(policy, seqs, entropy, |batch, targets| {
        let wanted = entropy == Entropy::Metric;
        Ok(
            match policy.scoring_token_logprobs(batch, targets, 1.0, wanted)? {
                Some(tokens) => Scores::Tokens(tokens),
                None => Scores::Logits(policy.scoring_logits(batch)?),
            },
        )
    })
}

/// [`sequence_logprobs`] for a pass whose gradient will be taken, with how to take it: through
/// [`Policy::training_token_logprobs`], or else [`Policy::training_logits`].
pub fn training_logprobs<'p>(
    policy: &'p dyn Policy,
    seqs: &[(&[u32], &[u32])],
    entropy: Entropy,
) -> Result<(SeqLogprobs, Backprop<'p>)> {
    let mut backprop = Backprop::Graph;
    let logprobs = scored(policy, seqs, entropy, |batch, targets| {
        if let Some((tokens, how)) = policy.training_token_logprobs(batch, targets, 1.0, entropy)? {
            backprop = how;
            return Ok(Scores::Tokens(tokens));
        }
        let (logits, how) = policy.training_logits(batch)?;
        backprop = how;
        Ok(Scores::Logits(logits))
    })?;
    Ok((logprobs, backprop))
}

fn scored(
    policy: &dyn Policy,
    seqs: &[(&[u32], &[u32])],
    entropy: Entropy,
    score: impl FnOnce(&PackedSequences, &Tensor) -> Result<Scores>,
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
    let width = seqs.iter().map(|(_, c)| c.len()).max().unwrap_or(1);

    // Logits only at the positions that predict a completion token: from the prompt's last
    // token to the completion's second to last.
    let sequences: Vec<Vec<u32>> = seqs.iter().map(|(p, c)| [*p, *c].concat()).collect();
    let sequences: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    let wanted: Vec<_> = seqs
        .iter()
        .map(|(p, c)| p.len() - 1..p.len() + c.len() - 1)
        .collect();
    let batch = PackedSequences::new(&sequences, &wanted, &device)
        .map_err(|e| Error::Policy(Box::new(e)))?;
    let targets: Vec<u32> = seqs.iter().flat_map(|(_, c)| c.iter().copied()).collect();
    let n = targets.len();
    // The completions' log-probs left-aligned in rows of `width`: padding reads entry n, a zero.
    let mut index = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    let mut first = 0;
    for (_, completion) in seqs {
        for k in 0..width {
            let inside = k < completion.len();
            index.push(if inside { first + k } else { n } as u32);
            mask.push(inside as u8 as f32);
        }
        first += completion.len();
    }
    let index = Tensor::from_vec(index, b * width, &device)?;
    let mask = Tensor::from_vec(mask, (b, width), &device)?;
    let targets = Tensor::from_vec(targets, n, &device)?;

    let (token_logp, entropy) = match score(&batch, &targets)? {
        Scores::Tokens(tokens) => (tokens.logprobs, tokens.entropies),
        Scores::Logits(logits) => from_logits(&logits, &targets, entropy)?,
    };
    let padded = |per_token: Tensor| -> Result<Tensor> {
        let zero = Tensor::zeros(1, per_token.dtype(), &device)?;
        Ok(Tensor::cat(&[per_token, zero], 0)?
            .index_select(&index, 0)?
            .reshape((b, width))?)
    };
    Ok(SeqLogprobs {
        logprobs: padded(token_logp)?,
        entropy: entropy.map(padded).transpose()?,
        mask,
    })
}

/// The targets' log-probs `[n]` under `logits` `[n, vocab]`, and the entropies `entropy` asks
/// for.
fn from_logits(
    logits: &Tensor,
    targets: &Tensor,
    entropy: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    let fused = matches!(logits.dtype(), DType::F32 | DType::BF16);
    Ok(if entropy == Entropy::Trainable || !fused {
        // The entropy bonus differentiates the whole distribution, and the fused op reads
        // f32 and bf16 only (f64 policies are for exact tests): candle's composite ops.
        let logits = match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
            _ => logits.clone(),
        };
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let token_logp = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let h = match entropy {
            Entropy::Skip => None,
            Entropy::Metric => Some(logp.detach()),
            Entropy::Trainable => Some(logp),
        }
        .map(|logp| logp.exp()?.mul(&logp)?.sum(D::Minus1)?.neg())
        .transpose()?;
        (token_logp, h)
    } else {
        // One fused op: no vocabulary-sized tensor besides the logits is kept.
        let token_logp = spur_lm::token_logprobs::token_logprobs(logits, targets)
            .map_err(|e| Error::Policy(Box::new(e)))?;
        let h = match entropy {
            Entropy::Metric => Some(
                spur_lm::token_logprobs::entropies(&logits.detach())
                    .map_err(|e| Error::Policy(Box::new(e)))?,
            ),
            _ => None,
        };
        (token_logp, h)
    })
}
