//! `spur bench update`: training throughput of one GRPO update step (forward, backward, Adam)
//! and its model FLOPs utilisation, 6 × parameters × tokens / time, against the matrix-product
//! peak this device reaches in the same run (f32 on the CPU; f32 and bf16 on a GPU, where the
//! bf16 peak is what the card is rated by). `scripts/gpu-check.sh` runs it beside the same step
//! in PyTorch.
//!
//! Tokens are pseudo-random ids (speed does not depend on their values): id number i, counted
//! over each group's prompt and then its completions in order, is SplitMix64(i) mod vocabulary
//! size, a rule `scripts/gpu_check.py torch-update` repeats, so that both steps see the same
//! tokens and their gradient norms can be compared. Groups of four samples get rewards 1, 0,
//! 0, 1, so that every group carries a gradient.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use spur_lm::memory::{self, PeakMemory};
use spur_lm::{DType, Device, LoadOptions, Precision, Tensor};
use spur_rl::{
    scoring_logprobs, splitmix64, AdamConfig, Policy, Rollout, RolloutGroup, RolloutSample,
    TrainConfig, Trainer,
};

#[derive(clap::Args, Debug)]
pub struct UpdateBench {
    /// Model spec: `default`, a local path or a hub id.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Rollouts in the step (all in one mini-batch: one optimizer update).
    #[arg(long, default_value_t = 8)]
    pub rollouts: usize,
    /// Prompt tokens per rollout (111: a MATH-500 problem in SmolLM2's chat template).
    #[arg(long, default_value_t = 111)]
    pub prompt_tokens: usize,
    /// Completion tokens per rollout.
    #[arg(long, default_value_t = 256)]
    pub completion_tokens: usize,
    /// Rollouts per forward/backward pass.
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Let f32 matrix products on CUDA use TF32 tensor cores.
    #[arg(long)]
    pub tf32: bool,
    /// Compute dtype: `f32`, or `bf16` over f32 master weights (bf16 tensor cores on a GPU).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub precision: String,
    /// Keep only each decoder layer's input in the forward pass; the backward pass recomputes
    /// the layer.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Storage dtype of Adam's moments.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub moments: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Best matrix-product throughput of `dtype` over a few square sizes on `device`, in FLOP/s.
fn matmul_peak(device: &Device, dtype: DType) -> Result<f64> {
    let sizes: &[usize] = if device.is_cpu() {
        &[512, 1024, 2048]
    } else {
        &[4096, 8192]
    };
    let mut best = 0.0f64;
    for &n in sizes {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
        a.matmul(&b)?; // warm-up
        device.synchronize()?;
        let reps = if device.is_cpu() {
            (4096 / n).max(2)
        } else {
            20
        };
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                a.matmul(&b)?;
            }
            device.synchronize()?;
            let flops = 2.0 * (n * n * n) as f64 * reps as f64;
            best = best.max(flops / t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

fn random_rollout(args: &UpdateBench, vocab: u64) -> Rollout {
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
    for g in 0..args.rollouts.div_ceil(4) {
        let prompt = ids(args.prompt_tokens);
        let n = (args.rollouts - 4 * g).min(4);
        let samples = (0..n)
            .map(|s| RolloutSample {
                completion: ids(args.completion_tokens),
                reward: (s % 3 == 0) as u8 as f64,
                old_logprobs: None,
                text: None,
            })
            .collect();
        groups.push(RolloutGroup { prompt, samples });
    }
    Rollout { groups }
}

pub fn run(args: UpdateBench) -> Result<ExitCode> {
    if args.rollouts == 0 || args.micro_batch == 0 || args.completion_tokens == 0 {
        bail!("--rollouts, --micro-batch and --completion-tokens must be at least 1");
    }
    spur_lm::allow_tf32(args.tf32);
    let bf16 = args.precision == "bf16";
    let options = LoadOptions {
        device: spur_lm::device(&args.device)?,
        precision: if bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        },
        ..LoadOptions::default()
    };
    let device = options.device.clone();
    let peak_f32 = matmul_peak(&device, DType::F32)?;
    let peak_bf16 = if device.is_cpu() {
        None
    } else {
        Some(matmul_peak(&device, DType::BF16)?)
    };
    let loaded = spur_lm::load_model(&args.model, &options)
        .with_context(|| format!("loading model {:?}", args.model))?;
    let mut model = loaded.model;
    model.set_activation_checkpointing(args.checkpoint_activations);
    let params: usize = Policy::named_vars(&model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let mut rollout = random_rollout(&args, model.config().vocab_size as u64);

    // π_old as the sampler would hand it over, so the timed step is forward + backward + Adam.
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

    let moments = if args.moments == "bf16" {
        spur_spec::Precision::Bf16
    } else {
        spur_spec::Precision::F32
    };
    let cfg = TrainConfig {
        mini_batch: args.rollouts,
        micro_batch: args.micro_batch,
        optimizer: AdamConfig {
            moments,
            ..AdamConfig::default()
        },
        ..TrainConfig::default()
    };
    let estimate = memory::update_bytes(
        model.config(),
        &memory::UpdateShape {
            micro_batch: args.micro_batch.min(args.rollouts),
            micro_batches: args.rollouts.div_ceil(args.micro_batch),
            sequence_tokens: args.prompt_tokens + args.completion_tokens,
            logit_positions: args.completion_tokens + 1,
            compute: model.compute_dtype(),
            checkpoint_activations: args.checkpoint_activations,
            moments: spur_rl::moment_dtype(moments),
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
    let peak_memory = peak.finish();

    let tokens = args.rollouts * (args.prompt_tokens + args.completion_tokens);
    let flops = 6.0 * params as f64 * tokens as f64;
    let achieved = flops / step_s;
    let result = json!({
        "model": args.model,
        "device": args.device,
        "tf32": args.tf32,
        "precision": args.precision,
        "checkpoint_activations": args.checkpoint_activations,
        "moments": args.moments,
        "parameters": params,
        "rollouts": args.rollouts,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "micro_batch": args.micro_batch,
        "tokens": tokens,
        "score_s": score_s,
        "step_s": step_s,
        "tokens_per_s": tokens as f64 / step_s,
        "flops_per_s": achieved,
        "peak_f32_flops_per_s": peak_f32,
        "peak_bf16_flops_per_s": peak_bf16,
        "mfu_f32": achieved / peak_f32,
        "mfu_bf16": peak_bf16.map(|p| achieved / p),
        "grad_norm": metrics.grad_norm,
        "loss": metrics.loss,
        "phases": trainer.last_timings(),
        "peak_memory_bytes": peak_memory,
        "estimated_memory_bytes": estimate.total,
        "estimated_memory": estimate,
    });
    if args.json {
        println!("{result}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model {}: {params} parameters on {}, {} CPU threads",
        args.model,
        args.device,
        spur_lm::cpu_threads()
    );
    println!(
        "scoring (forward only, {} rollouts): {score_s:.2} s, {:.0} tokens/s",
        args.rollouts,
        tokens as f64 / score_s
    );
    println!(
        "update step: {} rollouts x ({} prompt + {} completion) tokens, micro-batch {}: \
         {step_s:.2} s, {:.0} tokens/s",
        args.rollouts,
        args.prompt_tokens,
        args.completion_tokens,
        args.micro_batch,
        tokens as f64 / step_s
    );
    println!(
        "model FLOPs 6*N*T = {flops:.3e}: {:.1} GFLOP/s = {:.1}% of the measured f32 peak \
         ({:.1} GFLOP/s)",
        achieved / 1e9,
        100.0 * achieved / peak_f32,
        peak_f32 / 1e9
    );
    if let Some(peak) = peak_bf16 {
        println!(
            "                 = {:.1}% of the measured bf16 peak ({:.1} TFLOP/s)",
            100.0 * achieved / peak,
            peak / 1e12
        );
    }
    println!(
        "grad norm {:.4}, loss {:.5}",
        metrics.grad_norm, metrics.loss
    );
    if let Some(t) = trainer.last_timings() {
        println!(
            "phases: forward {:.2} s, backward {:.2} s, optimizer {:.2} s",
            t.forward_s, t.backward_s, t.optimizer_s
        );
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let measured = match peak_memory {
        Some(b) => format!("{:.2} GiB", gib(b)),
        None => "not measurable here".to_string(),
    };
    println!(
        "peak memory over the step ({}): {measured}; estimated {:.2} GiB",
        if device.is_cpu() {
            "resident set"
        } else {
            "device"
        },
        gib(estimate.total)
    );
    Ok(ExitCode::SUCCESS)
}
