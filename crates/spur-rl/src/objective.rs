//! The GRPO objective: group advantages and the clipped surrogate loss of one micro-batch.
//!
//! Everything that makes a loss value or a gradient goes through [`micro_batch_objective`]; the
//! trainer and `spur loss` both call it, so what `spur loss` prints is what the trainer optimises.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use spur_core::params::{RolloutParams, UpdateParams};

use crate::{Error, Result};

pub use spur_core::params::{Advantage, Aggregation, KlEstimator};

/// The switches of the objective. Defaults are the paper's code's (ε = 0.2 both sides, clipping
/// on, GRPO advantages, token-mean aggregation, no KL, no entropy bonus).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    pub eps_low: f64,
    pub eps_high: f64,
    /// `false` removes the clip term: the token loss becomes −ρ·A (the paper's ablation).
    pub clip: bool,
    pub advantage: Advantage,
    pub aggregation: Aggregation,
    /// The constant length of [`Aggregation::SeqSumConst`]; the paper's response cap.
    pub norm_length: usize,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    /// Weight of the entropy bonus (the loss subtracts `entropy_coef` × token entropy).
    pub entropy_coef: f64,
}

impl Default for ObjectiveConfig {
    /// The experiment file's defaults, with `norm_length` at the default response cap.
    fn default() -> Self {
        ObjectiveConfig::new(
            &UpdateParams::default(),
            RolloutParams::default().max_response_tokens,
        )
    }
}

impl ObjectiveConfig {
    /// The objective a run's `update` parameters ask for; `max_response_tokens` is Dr. GRPO's
    /// constant unless `update.norm_length` sets it.
    pub fn new(update: &UpdateParams, max_response_tokens: u32) -> Self {
        ObjectiveConfig {
            eps_low: update.eps_low,
            eps_high: update.eps_high,
            clip: update.clip,
            advantage: update.advantage,
            aggregation: update.aggregation,
            norm_length: update.norm_length.unwrap_or(max_response_tokens) as usize,
            kl_coef: update.kl_coef,
            kl_estimator: update.kl_estimator,
            entropy_coef: update.entropy_coef,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        // ε_low = 1 puts the lower bound at 0: ρ = exp(·) never reaches it.
        if !(0.0..=1.0).contains(&self.eps_low) {
            return bad(format!("eps_low must be in [0, 1], got {}", self.eps_low));
        }
        if !(self.eps_high >= 0.0 && self.eps_high.is_finite()) {
            return bad(format!(
                "eps_high must be finite and >= 0, got {}",
                self.eps_high
            ));
        }
        if self.norm_length == 0 {
            return bad("norm_length must be at least 1".into());
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return bad(format!(
                "kl_coef must be finite and >= 0, got {}",
                self.kl_coef
            ));
        }
        if !(self.entropy_coef >= 0.0 && self.entropy_coef.is_finite()) {
            return bad(format!(
                "entropy_coef must be finite and >= 0, got {}",
                self.entropy_coef
            ));
        }
        Ok(())
    }
}

/// Advantages of one prompt group, one per sample, given to every token of that sample.
///
/// Equal rewards (including a group of one) give zero advantages exactly, as the paper's code
/// does up to rounding: such a group carries no learning signal.
pub fn group_advantages(rewards: &[f64], kind: Advantage) -> Vec<f64> {
    let n = rewards.len();
    if n == 0 || rewards.iter().all(|&r| r == rewards[0]) {
        return vec![0.0; n];
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    match kind {
        Advantage::DrGrpo => rewards.iter().map(|r| r - mean).collect(),
        Advantage::Grpo => {
            let std = sample_std(rewards);
            rewards.iter().map(|r| (r - mean) / (std + 1e-9)).collect()
        }
    }
}

/// Standard deviation with Bessel's correction (divides by n − 1), as `torch.std` computes it
/// for the paper's advantages (and TRL's and verl's GRPO); 0 for fewer than two values. The
/// one definition of a reward std in spur: advantages, the trainer's and the reward stage's
/// `reward_std` metrics all use it.
pub fn sample_std(xs: &[f64]) -> f64 {
    let n = xs.len();
    if n < 2 {
        return 0.0;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let ss = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
    (ss / (n - 1) as f64).sqrt()
}

/// The size of the mini-batch a micro-batch belongs to; the aggregations divide by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MiniBatchShape {
    pub micro_batches: usize,
    pub sequences: usize,
}

/// One micro-batch of B responses padded to T tokens. All tensors are `[B, T]` except
/// `advantages` (`[B]`). Padding positions have `mask` 0 and must hold finite values.
pub struct MicroBatch<'a> {
    /// log π(token) under the current policy; the gradient flows into it.
    pub logprobs: &'a Tensor,
    pub old_logprobs: &'a Tensor,
    /// Needed when `kl_coef > 0`.
    pub ref_logprobs: Option<&'a Tensor>,
    /// Per-token entropy of the current policy; needed when `entropy_coef > 0`, reported when given.
    pub entropy: Option<&'a Tensor>,
    pub mask: &'a Tensor,
    pub advantages: &'a Tensor,
}

/// Sums over the response tokens of a micro-batch, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TokenStats {
    pub tokens: f64,
    /// Tokens whose gradient the lower clip removed (A < 0, ρ < 1 − ε_low).
    pub clipped_low: f64,
    /// Tokens whose gradient the upper clip removed (A > 0, ρ > 1 + ε_high).
    pub clipped_high: f64,
    /// Σ (ρ − 1) − log ρ: the k3 estimate of KL(π_old‖π), always ≥ 0.
    pub approx_kl: f64,
    /// Σ KL estimate to the reference (0 when there is none).
    pub ref_kl: f64,
    /// Σ entropy (0 when no entropy was given).
    pub entropy: f64,
}

impl TokenStats {
    pub fn add(&mut self, other: &TokenStats) {
        self.tokens += other.tokens;
        self.clipped_low += other.clipped_low;
        self.clipped_high += other.clipped_high;
        self.approx_kl += other.approx_kl;
        self.ref_kl += other.ref_kl;
        self.entropy += other.entropy;
    }
}

pub struct MicroBatchOutput {
    /// This micro-batch's share of the mini-batch loss (a scalar): the mini-batch loss is the
    /// sum of its micro-batches' shares, so backward on each share accumulates the gradient.
    pub loss: Tensor,
    pub stats: TokenStats,
}

/// The loss of one micro-batch as its share of the mini-batch loss, with its token statistics.
///
/// Token loss: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) with ρ = exp(log π − log π_old), written as
/// "clipped tokens get the constant −clip(ρ)A, the others −ρA", which is the same value and the
/// same gradient (at ρ exactly on a bound both forms give −ρA's gradient) without relying on how
/// `min` splits ties. Computed in f32 (f64 when the log-probs are f64, for gradient checks).
pub fn micro_batch_objective(
    cfg: &ObjectiveConfig,
    mb: &MicroBatch,
    shape: MiniBatchShape,
) -> Result<MicroBatchOutput> {
    let dtype = match mb.logprobs.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let lp = mb.logprobs.to_dtype(dtype)?;
    let old = mb.old_logprobs.to_dtype(dtype)?;
    let mask = mb.mask.to_dtype(dtype)?;
    let (b, t) = lp.dims2()?;
    let adv = mb
        .advantages
        .to_dtype(dtype)?
        .reshape((b, 1))?
        .broadcast_as((b, t))?
        .contiguous()?;

    let log_ratio = (&lp - &old)?;
    let ratio = log_ratio.exp()?;
    let unclipped = ratio.mul(&adv)?.neg()?;
    let ratio_d = ratio.detach();
    let mut stats = TokenStats {
        tokens: sum_f64(&mask)?,
        approx_kl: sum_f64(&(((&ratio_d - 1.0)? - log_ratio.detach())?.mul(&mask))?)?,
        ..TokenStats::default()
    };

    let mut token_loss = if cfg.clip {
        let (lo, hi) = (1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
        let high = ratio_d.gt(hi)?.mul(&adv.gt(0.0)?)?;
        let low = ratio_d.lt(lo)?.mul(&adv.lt(0.0)?)?;
        stats.clipped_high = sum_f64(&high.to_dtype(dtype)?.mul(&mask)?)?;
        stats.clipped_low = sum_f64(&low.to_dtype(dtype)?.mul(&mask)?)?;
        let clipped_loss = ratio_d.clamp(lo, hi)?.mul(&adv)?.neg()?;
        (&high + &low)?.where_cond(&clipped_loss, &unclipped)?
    } else {
        unclipped
    };

    if cfg.kl_coef > 0.0 {
        let reference = mb.ref_logprobs.ok_or_else(|| {
            Error::Config("kl_coef > 0 needs reference log-probs (a reference model)".into())
        })?;
        let reference = reference.to_dtype(dtype)?;
        let kl = match cfg.kl_estimator {
            KlEstimator::K1 => (&lp - &reference)?,
            KlEstimator::K3 => {
                let d = (&reference - &lp)?;
                ((d.exp()? - &d)? - 1.0)?
            }
        };
        stats.ref_kl = sum_f64(&kl.detach().mul(&mask)?)?;
        token_loss = (token_loss + (kl * cfg.kl_coef)?)?;
    }
    if let Some(entropy) = mb.entropy {
        let entropy = entropy.to_dtype(dtype)?;
        stats.entropy = sum_f64(&entropy.detach().mul(&mask)?)?;
        if cfg.entropy_coef > 0.0 {
            token_loss = (token_loss - (entropy * cfg.entropy_coef)?)?;
        }
    } else if cfg.entropy_coef > 0.0 {
        return Err(Error::Config(
            "entropy_coef > 0 needs the policy's per-token entropy".into(),
        ));
    }

    let masked = token_loss.mul(&mask)?;
    let loss = match cfg.aggregation {
        Aggregation::TokenMean => {
            let tokens = stats.tokens.max(1.0);
            (masked.sum_all()? / (tokens * shape.micro_batches as f64))?
        }
        Aggregation::SeqMean => {
            let lengths = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (masked.sum(1)?.div(&lengths)?.sum_all()? / shape.sequences as f64)?
        }
        Aggregation::SeqSumConst => {
            let norm = shape.sequences as f64 * cfg.norm_length as f64;
            (masked.sum_all()? / norm)?
        }
    };
    Ok(MicroBatchOutput { loss, stats })
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_follow_the_papers_formula() {
        // rewards [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75 / 3 + 3 · 0.0625 / 3) = 0.5.
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], Advantage::Grpo);
        let want = [0.75 / (0.5 + 1e-9), -0.25 / (0.5 + 1e-9)];
        assert_eq!(a, vec![want[0], want[1], want[1], want[1]]);
        let d = group_advantages(&[1.0, 0.0, 0.0, 0.0], Advantage::DrGrpo);
        assert_eq!(d, vec![0.75, -0.25, -0.25, -0.25]);
    }

    #[test]
    fn reward_std_is_the_sample_std() {
        // Σ(r − 0.25)² = 0.75 over n − 1 = 3: 0.5 (the population std would be 0.433).
        assert_eq!(sample_std(&[1.0, 0.0, 0.0, 0.0]), 0.5);
        assert_eq!(sample_std(&[3.0]), 0.0);
        assert_eq!(sample_std(&[]), 0.0);
    }

    #[test]
    fn equal_rewards_and_single_samples_give_zero() {
        for kind in [Advantage::Grpo, Advantage::DrGrpo] {
            assert_eq!(group_advantages(&[0.1, 0.1, 0.1], kind), vec![0.0; 3]);
            assert_eq!(group_advantages(&[1.0], kind), vec![0.0]);
            assert!(group_advantages(&[], kind).is_empty());
        }
    }

    #[test]
    fn config_validation_names_the_bad_value() {
        let bad = ObjectiveConfig {
            eps_low: 1.5,
            ..ObjectiveConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("eps_low"));
        assert!(ObjectiveConfig::default().validate().is_ok());
    }
}
