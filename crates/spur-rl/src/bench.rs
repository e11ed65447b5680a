//! Training throughput of one GRPO update step (forward, backward, Adam) and its model FLOPs
//! utilisation, 6 × parameters × tokens / time, against the matrix-product peak this device
//! reaches in the same run: the library half of `spur bench update`, which
//! `scripts/gpu-check.sh` sets beside the same step in PyTorch.
//!
//! Tokens are pseudo-random ids (speed does not depend on their values): id number i, counted
//! over each group's prompt and then its completions in order, is SplitMix64(i) mod vocabulary
//! size, a rule `scripts/gpu_check.py torch-update` repeats, so that both steps see the same
//! tokens and their gradient norms can be compared. Groups of four samples get rewards 1, 0,
//! 0, 1, so that every group carries a gradient.

use std::time::Instant;

use candle_core::DType;
use serde::Serialize;
use spur_core::params::Precision;
use spur_lm::bench::matmul_peak;
use spur_lm::memory::{self, MemoryEstimate, PeakMemory, UpdateShape};
use spur_lm::LoadOptions;

use crate::trainer::StepTimings;
use crate::{
    load_precision, precision_dtype, scoring_logprobs, splitmix64, AdamConfig, Error, Policy,
    Result, Rollout, RolloutGroup, RolloutSample, TrainConfig, Trainer,
};

/// The step to measure.
#[derive(Clone, Debug)]
pub struct UpdateBench {
    /// Model spec: `default`, a local path or a hub id.
    pub model: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Rollouts in the step (all in one mini-batch: one optimizer update).
    pub rollouts: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Rollouts per forward/backward pass.
    pub micro_batch: usize,
    /// Let f32 matrix products on CUDA use TF32 tensor cores.
    pub tf32: bool,
    /// The compute dtype (bf16: over f32 master weights).
    pub precision: Precision,
    pub checkpoint_activations: bool,
    /// Storage dtype of Adam's moments.
    pub moments: Precision,
}

/// What one step measured (the JSON `spur bench update --json` prints).
#[derive(Clone, Debug, Serialize)]
pub struct UpdateMeasurement {
    pub model: String,
    pub device: String,
    pub tf32: bool,
    pub precision: Precision,
    pub checkpoint_activations: bool,
    pub moments: Precision,
    pub parameters: usize,
    pub rollouts: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub micro_batch: usize,
    pub tokens: usize,
    /// Computing π_old before the step (forward only).
    pub score_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub flops_per_s: f64,
    pub peak_f32_flops_per_s: f64,
    /// Measured on accelerators only (the rating a GPU is sold by).
    pub peak_bf16_flops_per_s: Option<f64>,
    pub mfu_f32: f64,
    pub mfu_bf16: Option<f64>,
    pub grad_norm: f64,
    pub loss: f64,
    /// Forward, backward and optimizer time of the step.
    pub phases: Option<StepTimings>,
    /// Device memory at its peak over the step (the process's resident high-water mark on a
    /// CPU).
    pub peak_memory_bytes: Option<u64>,
    pub estimated_memory_bytes: u64,
    pub estimated_memory: MemoryEstimate,
}

impl UpdateBench {
    fn random_rollout(&self, vocab: u64) -> Rollout {
        let mut index = 0u64;
        let mut ids = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| {
                    index += 1;
                    (splitmix64(index) % vocab) as u32
                })
                .collect()
        };
        let mut groups = Vec::new();
        for g in 0..self.rollouts.div_ceil(4) {
            let prompt = ids(self.prompt_tokens);
            let n = (self.rollouts - 4 * g).min(4);
            let samples = (0..n)
                .map(|s| RolloutSample {
                    completion: ids(self.completion_tokens),
                    reward: (s % 3 == 0) as u8 as f64,
                    old_logprobs: None,
                    text: None,
                })
                .collect();
            groups.push(RolloutGroup { prompt, samples });
        }
        Rollout { groups }
    }

    /// Loads the model, scores π_old as the sampler would hand it over, and times one step of
    /// forward + backward + Adam.
    pub fn measure(&self) -> Result<UpdateMeasurement> {
        if self.rollouts == 0 || self.micro_batch == 0 || self.completion_tokens == 0 {
            return Err(Error::Config(
                "rollouts, micro-batch and completion tokens must be at least 1".into(),
            ));
        }
        spur_lm::allow_tf32(self.tf32);
        let options = LoadOptions {
            device: spur_lm::device(&self.device)?,
            precision: load_precision(self.precision),
            ..LoadOptions::default()
        };
        let device = options.device.clone();
        let peak_f32 = matmul_peak(&device, DType::F32)?;
        let peak_bf16 = if device.is_cpu() {
            None
        } else {
            Some(matmul_peak(&device, DType::BF16)?)
        };
        let mut model = spur_lm::load_model(&self.model, &options)?.model;
        model.set_activation_checkpointing(self.checkpoint_activations);
        let parameters: usize = Policy::named_vars(&model)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let mut rollout = self.random_rollout(model.config().vocab_size as u64);

        let start = Instant::now();
        for group in &mut rollout.groups {
            let seqs: Vec<(&[u32], &[u32])> = group
                .samples
                .iter()
                .map(|s| (&group.prompt[..], &s.completion[..]))
                .collect();
            let old = scoring_logprobs(&model, &seqs)?;
            let rows = old.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (s, row) in group.samples.iter_mut().zip(rows) {
                s.old_logprobs = Some(row);
            }
        }
        let score_s = start.elapsed().as_secs_f64();

        let cfg = TrainConfig {
            mini_batch: self.rollouts,
            micro_batch: self.micro_batch,
            optimizer: AdamConfig {
                moments: self.moments,
                ..AdamConfig::default()
            },
            ..TrainConfig::default()
        };
        let estimate = memory::update_bytes(
            model.config(),
            &UpdateShape {
                micro_batch: self.micro_batch.min(self.rollouts),
                micro_batches: self.rollouts.div_ceil(self.micro_batch),
                sequence_tokens: self.prompt_tokens + self.completion_tokens,
                logit_positions: self.completion_tokens + 1,
                compute: model.compute_dtype(),
                checkpoint_activations: self.checkpoint_activations,
                moments: precision_dtype(self.moments),
                entropy_bonus: cfg.objective.entropy_coef > 0.0,
            },
            &device,
        );
        device.synchronize()?;
        let peak = PeakMemory::start(&device);
        let mut trainer = Trainer::new(cfg, &model)?;
        // Phase times cost one device synchronisation per phase (a few per micro-batch).
        trainer.set_timing(true);
        let start = Instant::now();
        let metrics = trainer.step(&model, None, &rollout)?;
        device.synchronize()?;
        let step_s = start.elapsed().as_secs_f64();
        let peak_memory_bytes = peak.finish();

        let tokens = self.rollouts * (self.prompt_tokens + self.completion_tokens);
        let flops_per_s = 6.0 * parameters as f64 * tokens as f64 / step_s;
        Ok(UpdateMeasurement {
            model: self.model.clone(),
            device: self.device.clone(),
            tf32: self.tf32,
            precision: self.precision,
            checkpoint_activations: self.checkpoint_activations,
            moments: self.moments,
            parameters,
            rollouts: self.rollouts,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            micro_batch: self.micro_batch,
            tokens,
            score_s,
            step_s,
            tokens_per_s: tokens as f64 / step_s,
            flops_per_s,
            peak_f32_flops_per_s: peak_f32,
            peak_bf16_flops_per_s: peak_bf16,
            mfu_f32: flops_per_s / peak_f32,
            mfu_bf16: peak_bf16.map(|p| flops_per_s / p),
            grad_norm: metrics.grad_norm,
            loss: metrics.loss,
            phases: trainer.last_timings().cloned(),
            peak_memory_bytes,
            estimated_memory_bytes: estimate.total,
            estimated_memory: estimate,
        })
    }
}
