//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::error::{Error, Result};

/// The transformer families spur runs. They share one implementation in [`crate::model`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM2: pre-norm, SwiGLU, no biases.
    Llama,
    /// Qwen2 / Qwen2.5 / Qwen2.5-Math: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// OLMo 2: norms after attention and MLP (not before), RMS norm over q and k.
    Olmo2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Olmo2 => "olmo2",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Architecture::Llama),
            "qwen2" | "qwen2forcausallm" => Some(Architecture::Qwen2),
            "olmo2" | "olmo2forcausallm" => Some(Architecture::Olmo2),
            _ => None,
        }
    }
}

/// Llama 3.1-style rope frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// An `eos_token_id` entry: one id, a list of ids, or absent.
fn eos_ids(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// The EOS ids of a Hugging Face `generation_config.json`, which may name ids (often the
/// end-of-turn token) that config.json lacks.
pub fn generation_eos_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    Ok(eos_ids(&json["eos_token_id"]))
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        Self::from_hf_value(&json, path)
    }

    pub(crate) fn from_hf_value(json: &Value, path: &Path) -> Result<Self> {
        let arch_name = json["model_type"]
            .as_str()
            .or_else(|| json["architectures"][0].as_str())
            .ok_or_else(|| {
                Error::bad_file(path, "neither `model_type` nor `architectures` is set")
            })?;
        let architecture =
            Architecture::from_name(arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.to_string(),
            })?;
        let usize_key = |key: &str| -> Result<usize> {
            json[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::bad_file(path, format!("missing or non-integer `{key}`")))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = match json.get("num_key_value_heads") {
            Some(v) if !v.is_null() => usize_key("num_key_value_heads")?,
            _ => num_attention_heads,
        };
        let head_dim = match json.get("head_dim") {
            Some(v) if !v.is_null() => usize_key("head_dim")?,
            _ => hidden_size / num_attention_heads,
        };
        let rope_scaling = match json.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(scaling) => {
                let kind = scaling["rope_type"]
                    .as_str()
                    .or_else(|| scaling["type"].as_str())
                    .unwrap_or("?");
                if kind != "llama3" {
                    return Err(Error::bad_file(
                        path,
                        format!("rope_scaling type {kind:?} is not supported (only \"llama3\")"),
                    ));
                }
                let f = |key: &str| {
                    scaling[key].as_f64().ok_or_else(|| {
                        Error::bad_file(path, format!("rope_scaling.{key} is missing"))
                    })
                };
                Some(Llama3RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?
                        as usize,
                })
            }
        };
        let eos_token_ids = eos_ids(&json["eos_token_id"]);
        let config = ModelConfig {
            architecture,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: json["rope_theta"].as_f64().unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            max_position_embeddings: json["max_position_embeddings"].as_u64().unwrap_or(4096)
                as usize,
            tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
            bos_token_id: json["bos_token_id"].as_u64().map(|v| v as u32),
            eos_token_ids,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the hyper-parameters from GGUF metadata (`<arch>.block_count` etc.).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::bad_file(path, "GGUF metadata lacks general.architecture"))?
            .clone();
        let architecture =
            Architecture::from_name(&arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
            })?;
        let get = |key: &str| md.get(&format!("{arch_name}.{key}"));
        let int = |key: &str| -> Result<usize> {
            get(key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::bad_file(path, format!("GGUF metadata lacks {arch_name}.{key}"))
                })
        };
        let float = |key: &str| get(key).and_then(|v| v.to_f32().ok()).map(f64::from);
        let hidden_size = int("embedding_length")?;
        let num_attention_heads = int("attention.head_count")?;
        let num_key_value_heads = int("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = int("rope.dimension_count").unwrap_or(hidden_size / num_attention_heads);
        let token_count = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len());
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(e) => token_count.ok_or(e)?,
        };
        let token_id = |key: &str| {
            md.get(key).and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_u64().ok().map(|v| v as u32))
            })
        };
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            max_position_embeddings: int("context_length").unwrap_or(4096),
            // Tied when the file has no separate output head.
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::bad_file(
                path,
                format!(
                    "{} attention heads cannot be grouped over {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::bad_file(
                path,
                "head_dim must be even for rotary embeddings",
            ));
        }
        Ok(())
    }

    /// The `config.json` a Hugging Face loader (and [`ModelConfig::from_hf_json`]) reads back.
    pub fn to_hf_json(&self) -> Value {
        let (model_type, class) = match self.architecture {
            Architecture::Llama => ("llama", "LlamaForCausalLM"),
            Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Architecture::Olmo2 => ("olmo2", "Olmo2ForCausalLM"),
        };
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(s) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
        };
        serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            // Every supported architecture uses SwiGLU; other readers (mistral.rs,
            // transformers) require the key.
            "hidden_act": "silu",
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        })
    }

    /// Rotary inverse frequencies, one per pair of head dimensions.
    pub(crate) fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let orig = s.original_max_position_embeddings as f64;
            let low_wavelen = orig / s.low_freq_factor;
            let high_wavelen = orig / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (orig / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }
}
