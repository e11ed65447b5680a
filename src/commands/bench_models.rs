//! `spur bench models`: prefill and decode speed of a model on this machine, for the f32
//! (trainable) weights and the quantised GGUF weights, in the shape llama.cpp's `llama-bench`
//! and `llama-batched-bench` measure (one prompt, then `steps` decode steps for each of `batch`
//! sequences). `scripts/bench-vs-llamacpp.sh` runs both in one go and prints the ratios.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spur_lm::engine::{CandleEngine, Engine, GenerationRequest, SamplingParams};
use spur_lm::{KvCache, LoadOptions, LoadedModel, ModelFiles, Precision, Tensor};

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

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Best of three prefills of `ids` at batch 1 (the first warms caches and thread pools).
fn prefill(loaded: &LoadedModel, ids: &[u32]) -> Result<(f64, KvCache)> {
    let input = Tensor::new(ids, loaded.model.device())?.unsqueeze(0)?;
    let mut best = 0f64;
    let mut cache = None;
    for _ in 0..3 {
        let mut c = loaded.model.new_cache(1, ids.len())?;
        let start = Instant::now();
        loaded.model.forward_cached(&input, &mut c)?;
        best = best.max(ids.len() as f64 / start.elapsed().as_secs_f64());
        cache = Some(c);
    }
    Ok((best, cache.expect("three prefills ran")))
}

/// Aggregate tokens/s of `steps` greedy decode steps for `batch` copies of the prompt.
fn decode(loaded: &LoadedModel, prompt: &KvCache, batch: usize, steps: usize) -> Result<f64> {
    let rows: Vec<&KvCache> = (0..batch).map(|_| prompt).collect();
    let mut cache = KvCache::stack(&rows, steps)?;
    // A newline token as the first input: every row then follows its own greedy path.
    let newline = loaded.tokenizer.encode("\n")?.first().copied().unwrap_or(0);
    let mut next = vec![newline; batch];
    let start = Instant::now();
    for _ in 0..steps {
        let input = Tensor::new(next.as_slice(), loaded.model.device())?.unsqueeze(1)?;
        let logits = loaded.model.forward_cached(&input, &mut cache)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
}

fn measure(
    args: &ModelsBench,
    files: &ModelFiles,
    precision: Precision,
    problem: &str,
) -> Result<Value> {
    let options = LoadOptions {
        precision,
        device: spur_lm::device(&args.device)?,
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let loaded = spur_lm::load_files(files.clone(), &options)
        .with_context(|| format!("loading {:?} ({precision:?})", args.model))?;
    let load_s = started.elapsed().as_secs_f64();
    let prompt =
        spur_lm::PromptTemplate::Chat { system: None }.render(&loaded.tokenizer, problem)?;
    let ids = loaded.tokenizer.encode(&prompt)?;
    let (prefill_tok_s, cache) = prefill(&loaded, &ids)?;
    eprintln!(
        "{precision:?}: prefill of {} tokens: {prefill_tok_s:.0} tok/s",
        ids.len()
    );
    let mut decode_rows = Vec::new();
    for &batch in &args.batches {
        let tok_s = decode(&loaded, &cache, batch, args.steps)?;
        eprintln!("{precision:?}: decode batch {batch}: {tok_s:.1} tok/s");
        decode_rows.push(json!({"batch": batch, "tok_s": tok_s}));
    }
    let mut result = json!({
        "precision": match precision { Precision::F32 => "f32", Precision::Bf16 => "bf16", Precision::Quantized => "quantized" },
        "load_s": load_s,
        "prompt_tokens": ids.len(),
        "prefill_tok_s": prefill_tok_s,
        "decode": decode_rows,
    });
    if args.engine {
        let batch = args.batches.iter().copied().max().unwrap_or(1);
        let LoadedModel {
            model, tokenizer, ..
        } = loaded;
        let engine = CandleEngine::new(Arc::new(model), Arc::new(tokenizer)).with_max_batch(batch);
        let request = GenerationRequest {
            prompt_ids: ids,
            n: batch,
            params: SamplingParams {
                temperature: 1.0,
                max_new_tokens: args.steps,
                seed: 1,
                ..SamplingParams::default()
            },
        };
        let start = Instant::now();
        let out = engine.generate(&[request])?;
        let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
        result["engine"] = json!({
            "samples": batch,
            "tokens": generated,
            "tok_s": generated as f64 / start.elapsed().as_secs_f64(),
        });
    }
    result["peak_rss_bytes"] = json!(peak_rss_bytes());
    Ok(result)
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
    let mut results = Vec::new();
    for precision in precisions {
        let result = measure(&args, &files, precision, &problem)?;
        if !args.json {
            println!(
                "{precision:?}: load {:.1} s, prompt {} tokens, prefill {:.0} tok/s, peak RSS {:.2} GB (decode: above)",
                result["load_s"].as_f64().unwrap_or(0.0),
                result["prompt_tokens"],
                result["prefill_tok_s"].as_f64().unwrap_or(0.0),
                result["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e9,
            );
            if let Some(engine) = result.get("engine") {
                println!(
                    "{precision:?}: engine, {} samples at T=1 (prefill included): {:.1} tok/s",
                    engine["samples"],
                    engine["tok_s"].as_f64().unwrap_or(0.0)
                );
            }
        }
        results.push(result);
    }
    if args.json {
        let prompt_tokens = results
            .first()
            .map(|r| r["prompt_tokens"].clone())
            .unwrap_or(Value::Null);
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
