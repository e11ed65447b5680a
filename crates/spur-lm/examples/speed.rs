//! Tokens per second of the default model (SmolLM2-135M-Instruct) on this machine: prefill of
//! a 111-token chat prompt, then 128 decode steps at batch 1 and batch 16, for the f32
//! (trainable) weights and the quantised Q4_1 weights; plus the full engine (sampling
//! included) at batch 16.
//!
//!     cargo run -p spur-lm --example speed [-- --steps 128 --batch 16 --only f32|quantized]
//!
//! The workspace builds every package at opt-level 3 even in the dev profile.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use spur_lm::engine::{CandleEngine, Engine, GenerationRequest, SamplingParams};
use spur_lm::model::KvCache;
use spur_lm::{load_model, LoadOptions, LoadedModel, Precision, PromptTemplate};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn problem() -> String {
    let data = std::env::var_os("SPUR_SHARED_DATA").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
        std::path::PathBuf::from,
    );
    let text = std::fs::read_to_string(data.join("math500.jsonl")).expect("math500.jsonl");
    // Problem 138: 111 tokens in SmolLM2's chat template.
    let row: serde_json::Value = serde_json::from_str(text.lines().nth(138).unwrap()).unwrap();
    row["problem"].as_str().unwrap().to_string()
}

fn decode_steps(loaded: &LoadedModel, prompt_cache: &KvCache, batch: usize, steps: usize) -> f64 {
    let rows: Vec<&KvCache> = (0..batch).map(|_| prompt_cache).collect();
    let mut cache = KvCache::stack(&rows, steps).unwrap();
    let start = Instant::now();
    let mut next = vec![198u32; batch];
    for _ in 0..steps {
        let input = Tensor::new(next.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logits = loaded.model.forward_cached(&input, &mut cache).unwrap();
        next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    }
    (batch * steps) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let steps = arg("--steps", 128);
    let batch = arg("--batch", 16);
    println!("threads: {}", candle_core::utils::get_num_threads());
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    let precisions = match only.map(String::as_str) {
        Some("f32") => vec![Precision::F32],
        Some("quantized") => vec![Precision::Quantized],
        _ => vec![Precision::F32, Precision::Quantized],
    };
    for precision in precisions {
        let options = LoadOptions {
            precision,
            ..LoadOptions::default()
        };
        let t0 = Instant::now();
        let loaded = load_model("default", &options).unwrap();
        let load_s = t0.elapsed().as_secs_f64();
        let prompt = PromptTemplate::Chat { system: None }
            .render(&loaded.tokenizer, &problem())
            .unwrap();
        let ids = loaded.tokenizer.encode(&prompt).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        // Best of three prefills (the first warms caches and thread pools).
        let mut prefill = 0f64;
        let mut cache = None;
        for _ in 0..3 {
            let mut c = loaded.model.new_cache(1, ids.len()).unwrap();
            let start = Instant::now();
            loaded.model.forward_cached(&input, &mut c).unwrap();
            prefill = prefill.max(ids.len() as f64 / start.elapsed().as_secs_f64());
            cache = Some(c);
        }
        let cache = cache.unwrap();
        let d1 = decode_steps(&loaded, &cache, 1, steps);
        let dn = decode_steps(&loaded, &cache, batch, steps);
        println!(
            "{precision:?}: load {load_s:.1} s, prompt {} tokens, prefill {prefill:.0} tok/s, decode batch 1 {d1:.1} tok/s, batch {batch} {dn:.1} tok/s",
            ids.len()
        );
        let LoadedModel {
            model, tokenizer, ..
        } = loaded;
        let engine = CandleEngine::new(Arc::new(model), Arc::new(tokenizer)).with_max_batch(batch);
        let request = GenerationRequest {
            prompt_ids: ids,
            n: batch,
            params: SamplingParams {
                temperature: 1.0,
                max_new_tokens: steps,
                seed: 1,
                ..SamplingParams::default()
            },
        };
        let start = Instant::now();
        let out = engine.generate(&[request]).unwrap();
        let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
        println!(
            "{precision:?}: engine, {batch} samples at T=1 (prefill included): {generated} tokens, {:.1} tok/s",
            generated as f64 / start.elapsed().as_secs_f64()
        );
    }
}
