//! Greedy agreement between the mistral.rs engine and spur's candle engine on the embedded
//! SmolLM2 (Q4_1 GGUF): the first N MATH-500 problems in the model's chat template, T tokens
//! each, decoded as one batch by each engine (candle over the quantised weights and over the
//! dequantised f32 weights, mistral.rs over the GGUF with f32 activations).
//!
//! ```text
//! cargo run -p spur-mistralrs --example agreement -- [N=50] [T=64] [MAX_NUM_SEQS=32]
//! ```
//!
//! Prints whether mistral.rs's own tokenizer agrees with spur's on the prompts, tokens/s of
//! each engine, and for each pair of engines the share of prompts whose first T tokens are
//! identical, where the others first differ, and how close the two differing tokens are there
//! under the f32 model (a small log-probability margin is a near-tie that float rounding can
//! flip).

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use spur_lm::{
    load_model, CandleEngine, Completion, Engine, GenerationRequest, LoadOptions, Precision,
    PromptTemplate, SamplingParams, Tensor, Transformer,
};
use spur_mistralrs::{MistralRsEngine, MistralRsOptions};

fn shared_data() -> PathBuf {
    std::env::var_os("SPUR_SHARED_DATA").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
        PathBuf::from,
    )
}

fn problems(n: usize) -> Result<Vec<String>, Box<dyn Error>> {
    let path = shared_data().join("math500.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (set SPUR_SHARED_DATA)", path.display()))?;
    text.lines()
        .take(n)
        .enumerate()
        .map(|(i, line)| {
            let row: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
            let problem = row["problem"]
                .as_str()
                .ok_or_else(|| format!("{}:{}: no problem field", path.display(), i + 1))?;
            Ok(problem.to_string())
        })
        .collect()
}

/// First position where two continuations differ (None: identical).
fn divergence(a: &Completion, b: &Completion) -> Option<usize> {
    let common = a.token_ids.len().min(b.token_ids.len());
    (0..common)
        .find(|&i| a.token_ids[i] != b.token_ids[i])
        .or((a.token_ids.len() != b.token_ids.len()).then_some(common))
}

/// Log-softmax of the f32 model's next-token logits after `context`.
fn log_softmax_after(model: &Transformer, context: &[u32]) -> Result<Vec<f32>, Box<dyn Error>> {
    let mut cache = model.new_cache(1, context.len())?;
    let input = Tensor::new(context, model.device())?.unsqueeze(0)?;
    let logits: Vec<f32> = model
        .forward_cached(&input, &mut cache)?
        .squeeze(0)?
        .to_vec1()?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    Ok(logits.iter().map(|&l| l - log_z).collect())
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    if std::env::var_os("SPUR_MISTRALRS_LOG").is_some() {
        mistralrs::core::initialize_logging();
    }
    let n: usize = args.next().map_or(Ok(50), |s| s.parse())?;
    let max_new_tokens: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let max_num_seqs: usize = args
        .next()
        .map_or(Ok(MistralRsOptions::default().max_num_seqs), |s| s.parse())?;

    let quantized = load_model(
        "default",
        &LoadOptions {
            precision: Precision::Quantized,
            ..LoadOptions::default()
        },
    )?;
    let f32_model = load_model("default", &LoadOptions::default())?;
    let files = quantized.files.clone();
    let tokenizer = Arc::new(quantized.tokenizer);
    let template = PromptTemplate::Chat { system: None };
    let texts: Vec<String> = problems(n)?
        .iter()
        .map(|p| template.render(&tokenizer, p))
        .collect::<Result<_, _>>()?;
    let requests: Vec<GenerationRequest> = texts
        .iter()
        .map(|t| {
            Ok(GenerationRequest {
                prompt_ids: tokenizer.encode(t)?,
                n: 1,
                params: SamplingParams {
                    temperature: 0.0,
                    max_new_tokens,
                    ..SamplingParams::default()
                },
            })
        })
        .collect::<Result<_, spur_lm::Error>>()?;
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt_ids.len()).sum();
    println!(
        "{} MATH-500 prompts (chat template, {:.1} tokens on average), greedy, {max_new_tokens} new tokens",
        requests.len(),
        prompt_tokens as f64 / requests.len() as f64
    );

    let start = Instant::now();
    let options = MistralRsOptions {
        max_num_seqs,
        ..MistralRsOptions::default()
    };
    let mistral = MistralRsEngine::load(&files, tokenizer.clone(), &options)?;
    println!(
        "mistral.rs loaded in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let mut same = 0;
    for (text, request) in texts.iter().zip(&requests) {
        if mistral.mistralrs_tokenize(text)? == request.prompt_ids {
            same += 1;
        }
    }
    println!(
        "mistral.rs's own GGUF tokenizer equals spur's on {same}/{} prompts (generation feeds spur's ids either way)",
        texts.len()
    );

    let candle_q = CandleEngine::new(Arc::new(quantized.model), tokenizer.clone());
    let reference = Arc::new(f32_model.model);
    let candle_f32 = CandleEngine::new(reference.clone(), Arc::new(f32_model.tokenizer));
    let engines: [(&str, &dyn Engine); 3] = [
        ("mistralrs (GGUF, f32 activations)", &mistral),
        ("candle (Q4_1 weights)", &candle_q),
        ("candle (f32 weights)", &candle_f32),
    ];
    let mut outputs = Vec::new();
    println!("\nengine                              new tokens   seconds   tokens/s (batch {}, prefill included)", requests.len());
    for (name, engine) in engines {
        let start = Instant::now();
        let completions = engine.generate(&requests)?;
        let seconds = start.elapsed().as_secs_f64();
        let generated: usize = completions.iter().map(|c| c.token_ids.len()).sum();
        println!(
            "{name:<35} {generated:>10} {seconds:>9.1} {:>10.1}",
            generated as f64 / seconds
        );
        outputs.push(completions);
    }

    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let (name_a, name_b) = (engines[a].0, engines[b].0);
        let mut buckets = vec![0usize; max_new_tokens.div_ceil(8)];
        let mut identical = 0;
        let mut margins = Vec::new();
        for ((x, y), request) in outputs[a].iter().zip(&outputs[b]).zip(&requests) {
            match divergence(x, y) {
                None => identical += 1,
                Some(i) => {
                    let last = buckets.len() - 1;
                    buckets[(i / 8).min(last)] += 1;
                    if i < x.token_ids.len() && i < y.token_ids.len() {
                        let mut context = request.prompt_ids.clone();
                        context.extend_from_slice(&x.token_ids[..i]);
                        let lp = log_softmax_after(&reference, &context)?;
                        let (ta, tb) = (x.token_ids[i] as usize, y.token_ids[i] as usize);
                        margins.push((lp[ta] - lp[tb]).abs());
                    }
                }
            }
        }
        println!("\n{name_a} vs {name_b}:");
        println!(
            "  first {max_new_tokens} tokens identical: {identical}/{} ({:.0}%)",
            requests.len(),
            100.0 * identical as f64 / requests.len() as f64
        );
        let histogram: Vec<String> = buckets
            .iter()
            .enumerate()
            .map(|(i, count)| format!("{}-{}: {count}", i * 8, i * 8 + 7))
            .collect();
        println!("  first divergence at token: {}", histogram.join(", "));
        if !margins.is_empty() {
            margins.sort_by(f32::total_cmp);
            println!(
                "  |log p(token A) - log p(token B)| under the f32 model at the divergence: median {:.4}, max {:.4} (nats)",
                margins[margins.len() / 2],
                margins[margins.len() - 1]
            );
        }
    }
    Ok(())
}
