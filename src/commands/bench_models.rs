//! `spur bench models`: prefill and decode speed of a model on this machine, for the f32
//! (trainable) weights and the quantised GGUF weights, in the shape llama.cpp's `llama-bench`
//! and `llama-batched-bench` measure (one prompt, then `steps` decode steps for each of `batch`
//! sequences). `scripts/bench-vs-llamacpp.sh` runs both in one go and prints the ratios. The
//! measurement is `spur_lm::bench::ModelBench`; this file parses arguments and prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spur_lm::bench::ModelBench;
use spur_lm::{LoadOptions, ModelFiles, Precision};

#[derive(clap::Args, Debug)]
pub struct ModelsBench {
    /// Model spec: `default`, a local path or a hub id.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Weights to measure: f32, quantized (GGUF only) or both.
    #[arg(long, default_value = "both")]
    pub precision: String,
    /// Decode batch sizes, comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Decode steps per sequence.
    #[arg(long, default_value_t = 128)]
    pub steps: usize,
    /// Problems file (JSONL with `problem`); the prompt is one problem in the model's chat
    /// template. Default: MATH-500 from ../shared/data (or $SPUR_SHARED_DATA).
    #[arg(long)]
    pub problems: Option<PathBuf>,
    /// Which problem (0-based line). MATH-500 problem 138 is 111 tokens for SmolLM2.
    #[arg(long, default_value_t = 138)]
    pub problem: usize,
    /// Also time the whole candle engine (sampling at T=1) at the largest batch.
    #[arg(long)]
    pub engine: bool,
    /// `auto`, `cpu`, `cuda` or `cuda:N` (see `spur sample --device`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn problem_text(args: &ModelsBench) -> Result<String> {
    let path = match &args.problems {
        Some(p) => p.clone(),
        None => std::env::var_os("SPUR_SHARED_DATA")
            .map_or_else(|| PathBuf::from("../shared/data"), PathBuf::from)
            .join("math500.jsonl"),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (pass --problems FILE)", path.display()))?;
    let line = text.lines().nth(args.problem).with_context(|| {
        format!(
            "{} has no line {} (--problem)",
            path.display(),
            args.problem + 1
        )
    })?;
    let row: Value = serde_json::from_str(line)
        .with_context(|| format!("{}:{}: not JSON", path.display(), args.problem + 1))?;
    row["problem"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{}:{}: no `problem` key", path.display(), args.problem + 1))
}

pub fn run(args: ModelsBench) -> Result<ExitCode> {
    if args.batches.is_empty() || args.batches.contains(&0) || args.steps == 0 {
        bail!("--batches and --steps must be at least 1");
    }
    let cache_dir = LoadOptions::default().cache_dir;
    let files = spur_lm::resolve(&args.model, &cache_dir)?;
    let precisions = match (args.precision.as_str(), &files) {
        ("f32", _) => vec![Precision::F32],
        ("quantized", ModelFiles::Gguf { .. }) => vec![Precision::Quantized],
        ("both", ModelFiles::Gguf { .. }) => vec![Precision::F32, Precision::Quantized],
        ("both", _) => vec![Precision::F32],
        ("quantized", _) => bail!("--precision quantized needs a GGUF model"),
        (other, _) => bail!("--precision {other:?}: expected f32, quantized or both"),
    };
    let problem = problem_text(&args)?;
    let bench = ModelBench {
        device: spur_lm::device(&args.device)?,
        batches: args.batches.clone(),
        steps: args.steps,
        engine: args.engine,
    };
    let mut results = Vec::new();
    for precision in precisions {
        let result = bench
            .measure(&files, precision, &problem)
            .with_context(|| format!("measuring {:?} ({precision:?})", args.model))?;
        if !args.json {
            println!(
                "{precision:?}: load {:.1} s, prompt {} tokens, prefill {:.0} tok/s, peak RSS {:.2} GB (decode: above)",
                result.load_s,
                result.prompt_tokens,
                result.prefill_tok_s,
                result.peak_rss_bytes.unwrap_or(0) as f64 / 1e9,
            );
            if let Some(engine) = &result.engine {
                println!(
                    "{precision:?}: engine, {} samples at T=1 (prefill included): {:.1} tok/s",
                    engine.samples, engine.tok_s
                );
            }
        }
        results.push(result);
    }
    if args.json {
        let prompt_tokens = results.first().map(|r| r.prompt_tokens);
        let out = json!({
            "model": args.model,
            "prompt_tokens": prompt_tokens,
            "threads": spur_lm::cpu_threads(),
            "device": args.device,
            "steps": args.steps,
            "results": results,
        });
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}
