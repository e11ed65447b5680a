//! Training throughput of one GRPO update on SmolLM2-135M (f32, CPU) and its model FLOPs
//! utilisation against this CPU's measured f32 GEMM peak.
//!
//!     cargo run --release -p spur-rl --example update_bench
//!
//! Environment: SPUR_BENCH_ROLLOUTS (default 8), SPUR_BENCH_PROMPT (prompt tokens, 111 — a
//! MATH-500 problem in the chat template), SPUR_BENCH_COMPLETION (256), SPUR_BENCH_MICRO (4),
//! SPUR_BENCH_MODEL (a spur-lm model spec, default `default`). Tokens are random ids: speed
//! does not depend on their values.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use spur_lm::{load_model, LoadOptions};
use spur_rl::policy::Entropy;
use spur_rl::{
    sequence_logprobs, Policy, Rng, Rollout, RolloutGroup, RolloutSample, TrainConfig, Trainer,
};

// The allocator and setting of the `spur` binary (src/main.rs): without them a third of a step
// goes to the kernel zeroing pages that were freed and faulted back in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best f32 matmul throughput over a few square sizes, in FLOP/s.
fn gemm_peak() -> candle_core::Result<f64> {
    let mut best = 0.0f64;
    for n in [512usize, 1024, 2048] {
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        a.matmul(&b)?; // warm-up
        let reps = (4096 / n).max(2);
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                a.matmul(&b)?;
            }
            let flops = 2.0 * (n * n * n) as f64 * reps as f64;
            best = best.max(flops / t.elapsed().as_secs_f64());
        }
        println!("gemm {n}x{n}x{n}: best so far {:.1} GFLOP/s", best / 1e9);
    }
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: sets an allocator option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let rollouts = env("SPUR_BENCH_ROLLOUTS", 8);
    let prompt_len = env("SPUR_BENCH_PROMPT", 111);
    let completion_len = env("SPUR_BENCH_COMPLETION", 256);
    let micro = env("SPUR_BENCH_MICRO", 4);
    let spec = std::env::var("SPUR_BENCH_MODEL").unwrap_or_else(|_| "default".into());

    let peak = gemm_peak()?;
    let loaded = load_model(&spec, &LoadOptions::default())?;
    let model = loaded.model;
    let params: usize = Policy::named_vars(&model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let vocab = model.config().vocab_size as u64;
    println!(
        "model {spec}: {params} parameters, {} threads",
        candle_core::utils::get_num_threads()
    );

    // Groups of 4 samples with rewards 1, 0, 0, 1: every group carries a gradient.
    let mut rng = Rng::new(1);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(vocab) as u32).collect() };
    let mut groups = Vec::new();
    for g in 0..rollouts.div_ceil(4) {
        let prompt = ids(prompt_len);
        let n = (rollouts - 4 * g).min(4);
        let samples = (0..n)
            .map(|s| RolloutSample {
                completion: ids(completion_len),
                reward: (s % 3 == 0) as u8 as f64,
                old_logprobs: None,
                text: None,
            })
            .collect();
        groups.push(RolloutGroup { prompt, samples });
    }
    // π_old as the sampler would hand it over, so the timed step is forward + backward + Adam.
    let start = Instant::now();
    for group in &mut groups {
        let seqs: Vec<(&[u32], &[u32])> = group
            .samples
            .iter()
            .map(|s| (&group.prompt[..], &s.completion[..]))
            .collect();
        let old = sequence_logprobs(&model, &seqs, Entropy::Skip)?;
        let rows = old.logprobs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (s, row) in group.samples.iter_mut().zip(rows) {
            s.old_logprobs = Some(row);
        }
    }
    let score_s = start.elapsed().as_secs_f64();
    let rollout = Rollout { groups };

    let cfg = TrainConfig {
        mini_batch: rollouts,
        micro_batch: micro,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &model)?;
    let start = Instant::now();
    let metrics = trainer.step(&model, None, &rollout)?;
    let step_s = start.elapsed().as_secs_f64();

    let tokens = rollouts * (prompt_len + completion_len);
    let flops = 6.0 * params as f64 * tokens as f64;
    println!(
        "scoring (forward only, {rollouts} rollouts): {score_s:.2} s, {:.0} tokens/s",
        tokens as f64 / score_s
    );
    println!(
        "update step: {rollouts} rollouts x ({prompt_len} prompt + {completion_len} completion) \
         tokens, micro-batch {micro}, {} update(s): {step_s:.2} s",
        metrics.updates
    );
    println!(
        "training throughput: {:.0} tokens/s ({:.0} completion tokens/s)",
        tokens as f64 / step_s,
        (rollouts * completion_len) as f64 / step_s
    );
    println!(
        "model FLOPs 6*N*T = {:.3e}: {:.1} GFLOP/s = {:.1}% of the measured peak {:.1} GFLOP/s",
        flops,
        flops / step_s / 1e9,
        100.0 * flops / step_s / peak,
        peak / 1e9
    );
    println!(
        "grad norm {:.4}, loss {:.5}",
        metrics.grad_norm, metrics.loss
    );
    Ok(())
}
