//! `spur bench train-ops`: each fused training op (RMS norm, rotary embedding, SwiGLU, and
//! Adam's in-place update) on a device against its CPU kernel, and timed against candle's
//! composite ops (`spur_lm::bench::check_train_ops` and `spur_rl::optim::check_adam` measure;
//! this file parses arguments and prints).
//! `scripts/gpu-check.sh` runs it on a lent GPU, where it is the CUDA kernels' test.

use std::process::ExitCode;

use anyhow::{Context, Result};
use spur_lm::bench::{check_train_ops, TrainOpShapes};

#[derive(clap::Args, Debug)]
pub struct TrainOpsBench {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Packed tokens per op (rows of the norm and SwiGLU, positions of the rotary embedding);
    /// the widths are Qwen2.5-Math-1.5B's. 2,492 is a micro-batch of 4 × 623 tokens.
    #[arg(long, default_value_t = 2492)]
    pub tokens: usize,
    /// Weights of the var Adam updates: by default one MLP projection of Qwen2.5-Math-1.5B
    /// (1,536 × 8,960).
    #[arg(long, default_value_t = 1536 * 8960)]
    pub adam_elements: usize,
    /// Print one JSON object (`device`, `tokens`, `all_agree`, `checks`: one per op and dtype)
    /// instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TrainOpsBench) -> Result<ExitCode> {
    let device = spur_lm::device(&args.device)?;
    if args.tokens == 0 || args.adam_elements == 0 {
        anyhow::bail!("--tokens and --adam-elements must be at least 1");
    }
    let mut checks = check_train_ops(&device, &TrainOpShapes::qwen_1_5b(args.tokens))
        .with_context(|| format!("checking the fused training ops on {}", args.device))?;
    checks.extend(
        spur_rl::optim::check_adam(&device, args.adam_elements)
            .with_context(|| format!("checking Adam's in-place update on {}", args.device))?,
    );
    let all_agree = checks.iter().all(|c| c.agrees);
    if args.json {
        let report = serde_json::json!({
            "device": args.device,
            "tokens": args.tokens,
            "all_agree": all_agree,
            "checks": checks,
        });
        println!("{report}");
    } else {
        println!(
            "{:<17} {:<5} {:>12} {:>12} {:>6} {:>10} {:>13} {:>7}",
            "op",
            "dtype",
            "fwd error",
            "grad error",
            "agree",
            "fused ms",
            "composite ms",
            "speedup"
        );
        for c in &checks {
            println!(
                "{:<17} {:<5} {:>12.2e} {:>12.2e} {:>6} {:>10.2} {:>13.2} {:>6.2}x",
                c.op,
                c.dtype,
                c.forward_error,
                c.gradient_error,
                if c.agrees { "yes" } else { "NO" },
                c.fused_ms,
                c.composite_ms,
                c.composite_ms / c.fused_ms
            );
        }
    }
    // A disagreement is a failed check: the exit status says so to scripts.
    Ok(if all_agree {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: a fused op disagrees with its CPU kernel beyond its tolerance");
        ExitCode::FAILURE
    })
}
