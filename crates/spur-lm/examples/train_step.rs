//! Times one training forward + backward pass of a 4-layer Qwen2-shaped model with random
//! weights on 4 sequences of 256 tokens (packed, logits where each predicts its next token), in
//! f32 and bf16, with and without activation checkpointing, and prints each one's step time and
//! peak memory.
//!
//! `MALLOC_MMAP_THRESHOLD_=65536 cargo run -p spur-lm --example train_step` (the dev profile
//! optimises every crate; the threshold returns freed activations to the system, so the peak
//! RSS is the pass's own).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use spur_lm::memory::PeakMemory;
use spur_lm::model::parameter_shapes;
use spur_lm::{Architecture, ModelConfig, PackedSequences, Transformer};

const ROWS: usize = 4;
const TOKENS: usize = 256;
const STEPS: usize = 3;

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 8192,
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 64,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![1],
    }
}

/// The model with deterministic random weights (norm weights near 1, the rest small).
fn model() -> spur_lm::Result<Transformer> {
    let config = config();
    let mut state = 1u64;
    let mut tensors = HashMap::new();
    for (name, shape) in parameter_shapes(&config) {
        let n: usize = shape.iter().product();
        let (center, scale) = if name.contains("norm") {
            (1.0, 0.1)
        } else {
            (0.0, 0.05)
        };
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                center + ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Transformer::from_tensors(config, tensors, Path::new("random"), &Device::Cpu)
}

/// One forward + backward pass: mean log-prob of each next token.
fn step(model: &Transformer, batch: &PackedSequences, targets: &Tensor) -> spur_lm::Result<()> {
    let (logits, tape) = model.forward_for_gradient(batch)?;
    let loss = spur_lm::token_logprobs::token_logprobs(&logits, targets)?.mean_all()?;
    let grads = match tape {
        Some(tape) => tape.backward(&loss)?,
        None => loss.backward()?,
    };
    drop(grads);
    Ok(())
}

fn main() -> spur_lm::Result<()> {
    let mut model = model()?;
    let ids: Vec<u32> = (0..ROWS * TOKENS)
        .map(|i| (i * 7919 % 8191) as u32 + 1)
        .collect();
    let sequences: Vec<&[u32]> = ids.chunks(TOKENS).collect();
    let batch = PackedSequences::new(&sequences, &vec![0..TOKENS - 1; ROWS], &Device::Cpu)?;
    let targets: Vec<u32> = sequences.iter().flat_map(|s| s[1..].to_vec()).collect();
    let targets = Tensor::new(targets, &Device::Cpu)?;
    println!(
        "{ROWS}×{TOKENS} tokens, {} threads; median of {STEPS} steps",
        spur_lm::cpu_threads()
    );
    for dtype in [DType::F32, DType::BF16] {
        for checkpointing in [false, true] {
            model.set_compute_dtype(dtype)?;
            model.set_activation_checkpointing(checkpointing);
            step(&model, &batch, &targets)?; // warm-up
            let mut times = Vec::new();
            let mut peak = 0;
            for _ in 0..STEPS {
                let memory = PeakMemory::start(&Device::Cpu);
                let start = Instant::now();
                step(&model, &batch, &targets)?;
                times.push(start.elapsed().as_secs_f64());
                peak = peak.max(memory.finish().unwrap_or(0));
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{:?} checkpointing={checkpointing:<5}  step {:.3} s  peak RSS {:.0} MiB",
                dtype,
                times[STEPS / 2],
                peak as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
