//! GRPO for spur: the objective of "Spurious Rewards" (arXiv 2506.10947) as its code computed it,
//! on candle tensors with autograd, plus the Adam optimiser, the update step and checkpoints that
//! resume bit-identically on CPU.
//!
//! The pieces, in the order data flows through them:
//! - [`objective`]: group advantages and the clipped token loss of one micro-batch;
//! - [`loss_json`]: `spur loss`, the objective for log-probs given as JSON (same code path);
//! - [`policy`]: the small trait a trainable model implements, and per-token log-probs from logits
//!   ([`lm`] implements it for spur-lm's transformer);
//! - [`optim`]: Adam(W) with f32 or bf16 moments, gradient-norm clipping and learning-rate
//!   schedules (updated in place, `adam_in_place`);
//! - [`trainer`]: one GRPO step over a scored rollout (mini-batches, micro-batches, metrics),
//!   on one worker or data-parallel over several ([`collective`] sums their gradients);
//! - [`checkpoint`]: weights, optimiser moments, RNG state and step on disk.

mod adam_in_place;
pub mod bench;
pub mod checkpoint;
pub mod collective;
mod error;
pub mod lm;
pub mod loss_json;
pub mod objective;
pub mod optim;
pub mod policy;
mod rng;
pub mod trainer;

pub use collective::{Collective, Solo, ThreadGroup};
pub use error::{Error, Result};
pub use loss_json::{loss_from_json, LossOutput};
pub use objective::{
    group_advantages, micro_batch_objective, sample_std, Advantage, Aggregation, KlEstimator,
    MicroBatch, MicroBatchOutput, MiniBatchShape, ObjectiveConfig, TokenStats,
};
pub use optim::{load_precision, precision_dtype, Adam, AdamConfig, LrSchedule};
pub use policy::{
    scoring_logprobs, scoring_logprobs_entropy, sequence_logprobs, training_logprobs, Backprop,
    Policy, SeqLogprobs, Tempered,
};
pub use rng::{splitmix64, Rng};
/// The input of a [`Policy`]'s passes.
pub use spur_lm::PackedSequences;
pub use trainer::{
    Rollout, RolloutGroup, RolloutSample, StepMetrics, StepTimings, TrainConfig, Trainer,
};
