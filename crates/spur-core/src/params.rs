//! The parameters of a run that the stages read, with the paper's defaults: one set of types
//! and defaults for the experiment file (spur-spec parses into them), the plan (which copies
//! them into each node's parameters) and the stages and trainer (which read them back).

use serde::{Deserialize, Serialize};

/// A run's seed unless the file sets one.
pub const DEFAULT_SEED: u64 = 42;

/// A dtype of computation or storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutParams {
    pub prompts_per_step: u32,
    pub samples_per_prompt: u32,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: u32,
    pub max_prompt_tokens: u32,
    pub max_response_tokens: u32,
}

impl Default for RolloutParams {
    fn default() -> Self {
        RolloutParams {
            prompts_per_step: 64,
            samples_per_prompt: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_prompt_tokens: 1024,
            max_response_tokens: 3072,
        }
    }
}

/// How rewards of one prompt group become advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    /// (r − mean) / (std + 1e-9), unbiased std: the paper's code.
    #[default]
    Grpo,
    /// r − mean (Dr. GRPO drops the std division).
    DrGrpo,
}

/// How token losses are reduced to the loss of a mini-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Token mean over each micro-batch, averaged over the micro-batches of the mini-batch
    /// (the paper's code: packed micro-batches with gradient accumulation).
    #[default]
    TokenMean,
    /// Mean over the mini-batch's sequences of each sequence's token mean (the GRPO paper).
    SeqMean,
    /// Sum of all token losses divided by (sequences × `norm_length`): Dr. GRPO's constant
    /// normaliser, which gives every token the same weight whatever its response's length.
    /// `token_sum_const` is the name `spur loss` has always accepted.
    #[serde(alias = "token_sum_const")]
    SeqSumConst,
}

/// Estimator of KL(π‖π_ref) per token, from the log-probs of the sampled token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// log π − log π_ref (OpenRLHF's default).
    #[default]
    K1,
    /// exp(log π_ref − log π) − (log π_ref − log π) − 1: non-negative, lower variance.
    K3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateParams {
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u32,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Rollouts per optimizer update (1024 / 128 = 8 updates per step).
    pub mini_batch: u32,
    /// Rollouts per forward/backward pass (gradient accumulation unit).
    pub micro_batch: u32,
    /// PPO clipping; `false` removes the clip term (loss −ρ·A).
    pub clip: bool,
    pub eps_low: f64,
    pub eps_high: f64,
    pub advantage: Advantage,
    pub aggregation: Aggregation,
    /// Dr. GRPO's constant length for `seq_sum_const`; unset, the run's
    /// `rollout.max_response_tokens`.
    pub norm_length: Option<u32>,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub entropy_coef: f64,
    /// Keep only each decoder layer's input in the forward pass and recompute the layer in
    /// the backward pass: the same gradients for a fraction of the activation memory.
    pub checkpoint_activations: bool,
    /// Storage dtype of Adam's two moments (`bf16` saves a quarter of the static memory).
    pub moments: Precision,
}

impl Default for UpdateParams {
    fn default() -> Self {
        UpdateParams {
            lr: 5e-7,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.0,
            grad_clip: 1.0,
            mini_batch: 128,
            micro_batch: 4,
            clip: true,
            eps_low: 0.2,
            eps_high: 0.2,
            advantage: Advantage::Grpo,
            aggregation: Aggregation::TokenMean,
            norm_length: None,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K1,
            entropy_coef: 0.0,
            checkpoint_activations: false,
            moments: Precision::F32,
        }
    }
}

/// When an evaluation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalAt {
    /// Step 0, every `eval_every` steps, and the end.
    Every,
    /// Step 0 and the end.
    StartEnd,
    /// The end only.
    End,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalParams {
    /// Name from the `datasets` block.
    pub dataset: Option<String>,
    pub temperature: f64,
    pub top_p: f64,
    /// Samples per problem (avg@k / pass@k when > 1).
    pub samples: u32,
    pub max_tokens: u32,
    pub at: EvalAt,
    /// Seed for sampled evals; fixed so every arm sees the same eval noise.
    pub seed: u64,
    /// The grader behind the headline `accuracy`; every response is graded by all three.
    pub grader: GraderName,
}

/// A grader, by the name spur-math gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraderName {
    /// The paper's Qwen2.5-Math extraction and PRM800K grader.
    #[default]
    Paper,
    /// The paper's grader with its plain failures fixed.
    Strict,
    /// Math-Verify 0.9's semantics.
    MathVerify,
}

impl GraderName {
    pub const NAMES: [&'static str; 3] = ["paper", "strict", "math_verify"];
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            dataset: None,
            temperature: 0.0,
            top_p: 1.0,
            samples: 1,
            max_tokens: 3072,
            at: EvalAt::Every,
            seed: 0,
            grader: GraderName::Paper,
        }
    }
}

/// A fixed probe of the policy after every update: the first `prompts` problems of `dataset`,
/// the base model's greedy response to each (computed once, at step 0), and `samples` sampled
/// responses per prompt at the rollout temperature. It measures what the paper's clipping
/// argument is about: entropy, the probability of the base model's mode, and how often samples
/// repeat that mode's opening.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeParams {
    /// Name from the `datasets` block; none turns the probe off.
    pub dataset: Option<String>,
    pub prompts: u32,
    pub samples: u32,
    /// Response cap of the greedy and the sampled responses.
    pub max_tokens: u32,
    /// How many leading tokens of the greedy response make its "opening".
    pub opening_tokens: u32,
    /// Seed of the probe's samples; the same in every run, so that runs differ only by their
    /// weights.
    pub seed: u64,
}

impl Default for ProbeParams {
    fn default() -> Self {
        ProbeParams {
            dataset: None,
            prompts: 8,
            samples: 4,
            max_tokens: 64,
            opening_tokens: 8,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Materialize {
    /// Keep the policy checkpoint of every Nth step (the latest is always kept).
    pub checkpoint_every: u32,
}

impl Default for Materialize {
    fn default() -> Self {
        Materialize {
            checkpoint_every: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Candle,
    Mistralrs,
}

/// How a problem becomes a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// The model's own chat template.
    #[default]
    Model,
    /// Qwen2.5-Math chat template with the "reason step by step" system prompt.
    QwenMath,
    /// The R1 `<think>/<answer>` template for base models (stop at `</answer>`).
    R1,
    /// `template_text`, with `{problem}` replaced.
    Custom,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneShotExample {
    pub problem: String,
    pub answer: String,
}
