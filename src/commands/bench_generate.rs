//! `spur bench generate`: end-to-end generation speed of an engine (candle or mistral.rs), in
//! the shape of Hugging Face `generate`: `batch` greedy sequences of one prompt, prefill
//! included, each decoded to `--max-tokens`. It is the measurement `scripts/gpu-check.sh` sets
//! against PyTorch/transformers on the same GPU; `spur bench models` times the model's own
//! prefill and decode steps instead. The measurement is `spur_lm::bench::Generation`;
//! this file loads the engine, parses arguments and prints.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;
use spur_lm::bench::Generation;
use spur_lm::memory;
use spur_lm::{DType, LoadOptions, Precision};

#[derive(clap::Args, Debug)]
pub struct GenerateBench {
    /// Model spec: `default`, a local path or a hub id.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// `candle` or `mistralrs` (in a build with that feature).
    #[arg(long, default_value = "candle")]
    pub engine: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Sequences generated together, comma-separated; each size is one timed run.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// The prompt, fed to the model as is (no chat template), so that another framework can
    /// tokenise the same text to the same ids.
    #[arg(long)]
    pub prompt: String,
    /// Most sequences the engine decodes together (default: the largest batch, so that each
    /// batch is one).
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Let f32 matrix products on CUDA use TF32 tensor cores (candle engine).
    #[arg(long)]
    pub tf32: bool,
    /// Compute dtype of the candle engine: `f32`, or `bf16` (bf16 weights copy, activations
    /// and KV cache over the f32 master weights, as a trained policy samples).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub precision: String,
    /// Sampling temperature; 0 decodes greedily (every sequence then has the same length).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of sampled runs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time each batch as static batches of `--max-sequences` rows, one after the other
    /// (each decoding until its longest sequence ends, as Hugging Face `generate` batches):
    /// the measure of continuous batching, with `--temperature` above 0.
    #[arg(long)]
    pub compare_static: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateBench) -> Result<ExitCode> {
    if args.batches.is_empty() || args.batches.contains(&0) || args.max_tokens == 0 {
        bail!("--batches and --max-tokens must be at least 1");
    }
    super::sample::check_engine(&args.engine)?;
    spur_lm::allow_tf32(args.tf32);
    let options = LoadOptions {
        device: spur_lm::device(&args.device)?,
        precision: match args.precision.as_str() {
            "bf16" => Precision::Bf16,
            _ => Precision::F32,
        },
        ..LoadOptions::default()
    };
    let device = options.device.clone();
    let files = spur_lm::resolve(&args.model, &options.cache_dir)?;
    let config = (args.engine == "candle")
        .then(|| spur_lm::model_config(&files))
        .transpose()?;
    let compute = if options.precision == Precision::Bf16 {
        DType::BF16
    } else {
        DType::F32
    };
    let largest = args.batches.iter().copied().max().unwrap_or(1);
    let started = Instant::now();
    let engine = super::sample::load_engine(
        &args.engine,
        files,
        &options,
        Some(args.max_sequences.unwrap_or(largest)),
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let tokenizer = engine.tokenizer();
    let prompt_ids = tokenizer.encode(&args.prompt)?;
    // The memory model's figure for the candle engine's sampling (a trainable model).
    let estimate = |batch: usize| {
        config.as_ref().map(|c| {
            let shape = memory::SampleShape {
                batch,
                // Every sequence of a run continues the one prompt.
                samples_per_prompt: batch,
                prompt_tokens: prompt_ids.len(),
                new_tokens: args.max_tokens,
            };
            memory::rollout_bytes(c, &shape, compute, &device).total
        })
    };
    eprintln!(
        "{} engine on {}: loaded in {load_s:.1} s, prompt {} tokens",
        engine.name(),
        args.device,
        prompt_ids.len()
    );
    let generation = Generation {
        prompt_ids: &prompt_ids,
        batches: &args.batches,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        static_rows: args
            .compare_static
            .then(|| args.max_sequences.unwrap_or(largest)),
    };
    let rows = generation.measure(engine.as_ref(), &device, estimate)?;
    if args.json {
        let out = json!({
            "engine": engine.name(),
            "model": args.model,
            "device": args.device,
            "tf32": args.tf32,
            "precision": args.precision,
            "load_s": load_s,
            "prompt_tokens": prompt_ids.len(),
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "runs": rows,
        });
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}
