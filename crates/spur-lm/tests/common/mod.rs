//! Tiny random-weight checkpoints, written by the tests themselves.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use spur_lm::model::parameter_shapes;
use spur_lm::{Architecture, ModelConfig};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

pub const SPECIALS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        vocab_size: 260,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 512,
        // Llama ties its head; the others carry an lm_head.
        tie_word_embeddings: architecture == Architecture::Llama,
        bos_token_id: None,
        eos_token_ids: vec![257],
    }
}

/// Deterministic pseudo-random values in [-scale, scale].
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

pub fn random_tensors(config: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    parameter_shapes(config)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let mut v = values(n, seed * 1000 + i as u64, 0.3);
            if name.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

/// A byte-level BPE over the 256 byte symbols (no merges) plus the chat specials.
pub fn tiny_tokenizer() -> tokenizers::Tokenizer {
    let vocab: Vocab = ByteLevel::alphabet()
        .into_iter()
        .collect::<std::collections::BTreeSet<char>>()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(&specials);
    tok
}

/// Writes a Hugging Face checkpoint directory: config.json, tokenizer.json,
/// tokenizer_config.json (ChatML template) and model.safetensors in `dtype`.
pub fn write_checkpoint(dir: &Path, config: &ModelConfig, seed: u64, dtype: DType) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config.to_hf_json()).unwrap(),
    )
    .unwrap();
    let tok = tiny_tokenizer();
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(257));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let chat = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": chat, "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = random_tensors(config, seed)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}
