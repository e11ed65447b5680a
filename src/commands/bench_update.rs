//! `spur bench update`: training throughput of one GRPO update step and its model FLOPs
//! utilisation (`spur_rl::bench::UpdateBench` measures; this file parses arguments and prints).
//! `scripts/gpu-check.sh` runs it beside the same step in PyTorch.

use std::process::ExitCode;

use anyhow::{Context, Result};
use spur_rl::bench::UpdateBench as Step;
use spur_spec::Precision;

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

fn precision(name: &str) -> Precision {
    match name {
        "bf16" => Precision::Bf16,
        _ => Precision::F32,
    }
}

pub fn run(args: UpdateBench) -> Result<ExitCode> {
    let step = Step {
        model: args.model.clone(),
        device: args.device.clone(),
        rollouts: args.rollouts,
        prompt_tokens: args.prompt_tokens,
        completion_tokens: args.completion_tokens,
        micro_batch: args.micro_batch,
        tf32: args.tf32,
        precision: precision(&args.precision),
        checkpoint_activations: args.checkpoint_activations,
        moments: precision(&args.moments),
    };
    let m = step
        .measure()
        .with_context(|| format!("measuring an update step of {:?}", args.model))?;
    if args.json {
        println!("{}", serde_json::to_string(&m)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (tokens, step_s, achieved) = (m.tokens, m.step_s, m.flops_per_s);
    println!(
        "model {}: {} parameters on {}, {} CPU threads",
        args.model,
        m.parameters,
        args.device,
        spur_lm::cpu_threads()
    );
    println!(
        "scoring (forward only, {} rollouts): {:.2} s, {:.0} tokens/s",
        args.rollouts,
        m.score_s,
        tokens as f64 / m.score_s
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
        "model FLOPs 6*N*T = {:.3e}: {:.1} GFLOP/s = {:.1}% of the measured f32 peak \
         ({:.1} GFLOP/s)",
        achieved * step_s,
        achieved / 1e9,
        100.0 * m.mfu_f32,
        m.peak_f32_flops_per_s / 1e9
    );
    if let Some(peak) = m.peak_bf16_flops_per_s {
        println!(
            "                 = {:.1}% of the measured bf16 peak ({:.1} TFLOP/s)",
            100.0 * achieved / peak,
            peak / 1e12
        );
    }
    println!("grad norm {:.4}, loss {:.5}", m.grad_norm, m.loss);
    if let Some(t) = &m.phases {
        println!(
            "phases: forward {:.2} s, backward {:.2} s, optimizer {:.2} s",
            t.forward_s, t.backward_s, t.optimizer_s
        );
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let measured = match m.peak_memory_bytes {
        Some(b) => format!("{:.2} GiB", gib(b)),
        None => "not measurable here".to_string(),
    };
    println!(
        "peak memory over the step ({}): {measured}; estimated {:.2} GiB",
        if spur_lm::device(&args.device)?.is_cpu() {
            "resident set"
        } else {
            "device"
        },
        gib(m.estimated_memory_bytes)
    );
    Ok(ExitCode::SUCCESS)
}
