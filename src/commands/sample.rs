//! `spur sample`: look at what a model writes before putting it in an experiment.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use spur_lm::engine::{CandleEngine, Engine, GenerationRequest, SamplingParams};
use spur_lm::{LoadOptions, ModelFiles, Precision, PromptTemplate};

#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// `default` (the embedded SmolLM2-135M-Instruct), a local path (GGUF file or Hugging Face
    /// checkpoint directory) or a hub id such as Qwen/Qwen2.5-Math-1.5B.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// One prompt (a problem; the template turns it into the model's input).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A JSONL file of prompts: per line a JSON string, or an object with "prompt" or "problem".
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generation engine: `candle`, or `mistralrs` in a build with that feature.
    #[arg(long, default_value = "candle")]
    pub engine: String,
    /// Most sequences decoded together (default: candle 32, mistral.rs 1; see docs/models.md).
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// `chat` (the model's own template), `qwen-math`, `r1`, `raw`, or a Jinja template
    /// string that uses `{{ problem }}`.
    #[arg(long, default_value = "chat")]
    pub template: String,
    /// System prompt for the `chat` template (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Extra stop strings (repeatable); the r1 template adds `</answer>`.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Weights: `auto` (quantised for a GGUF file and at most three sequences, else f32),
    /// `f32`, `bf16` (f32 weights computing in bf16, as a bf16 policy samples) or `quantized`.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// `auto` (the GPU when this build has CUDA and the machine one), `cpu`, `cuda` or
    /// `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print one JSON object per sample instead of text.
    #[arg(long)]
    pub json: bool,
}

fn read_prompts(args: &SampleArgs) -> anyhow::Result<Vec<String>> {
    if let Some(p) = &args.prompt {
        return Ok(vec![p.clone()]);
    }
    let path = args
        .prompts
        .as_ref()
        .context("give --prompt or --prompts")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let prompt = match &value {
            serde_json::Value::String(s) => s.clone(),
            obj => obj["prompt"]
                .as_str()
                .or_else(|| obj["problem"].as_str())
                .with_context(|| {
                    format!(
                        "{}:{}: expected a string or an object with \"prompt\" or \"problem\"",
                        path.display(),
                        i + 1
                    )
                })?
                .to_string(),
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

pub fn run(args: SampleArgs) -> anyhow::Result<ExitCode> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    if args.max_sequences == Some(0) {
        bail!("--max-sequences must be at least 1");
    }
    check_engine(&args.engine)?;
    let prompts = read_prompts(&args)?;
    let mut options = LoadOptions {
        device: spur_lm::device(&args.device)?,
        ..LoadOptions::default()
    };
    let files = spur_lm::resolve(&args.model, &options.cache_dir)?;
    // Decoding from the quantised weights is faster up to 3 sequences at once, from the f32
    // weights from 4 on (`spur bench models --batches 1,2,3,4,8`, docs/performance.md).
    let few_sequences = prompts.len() * args.n <= 3;
    options.precision = match (args.precision.as_str(), &files) {
        ("auto", ModelFiles::Gguf { .. }) if few_sequences => Precision::Quantized,
        ("quantized", _) => Precision::Quantized,
        ("auto", _) | ("f32", _) => Precision::F32,
        ("bf16", _) => Precision::Bf16,
        (other, _) => bail!("--precision {other:?}: expected auto, f32, bf16 or quantized"),
    };
    let started = Instant::now();
    let engine = load_engine(&args.engine, files, &options, args.max_sequences)
        .with_context(|| format!("loading model {:?}", args.model))?;
    eprintln!(
        "loaded {} ({} engine, {:?}) in {:.1} s",
        args.model,
        engine.name(),
        options.precision,
        started.elapsed().as_secs_f64()
    );
    let tokenizer = engine.tokenizer();
    let template = match (PromptTemplate::parse(&args.template), &args.system) {
        (PromptTemplate::Chat { .. }, system) => PromptTemplate::Chat {
            system: system.clone(),
        },
        (_, Some(_)) => bail!("--system applies only to the chat template"),
        (t, None) => t,
    };
    let mut stop_strings = template.stop_strings();
    stop_strings.extend(args.stop.iter().cloned());
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_tokens,
        stop_strings,
        seed: args.seed,
    };
    let mut requests = Vec::with_capacity(prompts.len());
    for problem in &prompts {
        let text = template.render(tokenizer, problem)?;
        requests.push(GenerationRequest {
            prompt_ids: tokenizer.encode(&text)?,
            n: args.n,
            params: params.clone(),
        });
    }
    let started = Instant::now();
    let completions = engine.generate(&requests)?;
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = completions.iter().map(|c| c.token_ids.len()).sum();
    let mut out = std::io::stdout().lock();
    for c in &completions {
        if args.json {
            let line = serde_json::json!({
                "prompt_index": c.prompt_index,
                "sample_index": c.sample_index,
                "text": c.text,
                "token_ids": c.token_ids,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "=== prompt {} · sample {} · {} tokens · {} ===",
                c.prompt_index,
                c.sample_index,
                c.token_ids.len(),
                serde_json::to_value(c.finish_reason)?
                    .as_str()
                    .unwrap_or("?"),
            )?;
            writeln!(out, "{}", c.text)?;
        }
    }
    eprintln!(
        "{generated} tokens in {seconds:.1} s ({:.1} tok/s, {} engine)",
        generated as f64 / seconds.max(1e-9),
        engine.name()
    );
    Ok(ExitCode::SUCCESS)
}

/// Loads `files` into the named engine, which [`check_engine`] has accepted.
/// `max_sequences` overrides how many sequences the engine decodes together (candle: 32,
/// mistral.rs: 1).
pub(crate) fn load_engine(
    engine: &str,
    files: ModelFiles,
    options: &LoadOptions,
    max_sequences: Option<usize>,
) -> anyhow::Result<Box<dyn Engine>> {
    #[cfg(feature = "mistralrs")]
    if engine == "mistralrs" {
        let tokenizer = Arc::new(spur_lm::load_tokenizer(&files)?);
        let mut mistral_options = spur_mistralrs::MistralRsOptions {
            device: options.device.clone(),
            ..Default::default()
        };
        if let Some(n) = max_sequences {
            mistral_options.max_num_seqs = n;
        }
        let engine = spur_mistralrs::MistralRsEngine::load(&files, tokenizer, &mistral_options)?;
        return Ok(Box::new(engine));
    }
    debug_assert_eq!(engine, "candle", "callers check the engine first");
    let loaded = spur_lm::load_files(files, options)?;
    let engine = CandleEngine::new(Arc::new(loaded.model), Arc::new(loaded.tokenizer));
    Ok(Box::new(match max_sequences {
        Some(n) => engine.with_max_batch(n),
        None => engine,
    }))
}

/// Fails unless this build has the named engine; called before any model is fetched.
pub(crate) fn check_engine(engine: &str) -> anyhow::Result<()> {
    let available: &[&str] = if cfg!(feature = "mistralrs") {
        &["candle", "mistralrs"]
    } else {
        &["candle"]
    };
    if !available.contains(&engine) {
        bail!(
            "engine {engine:?} is not available in this build (available: {}; mistral.rs needs a \
             build with `--features mistralrs`)",
            available.join(", ")
        );
    }
    Ok(())
}
