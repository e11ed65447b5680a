//! Peak memory: an estimate from a model's shapes before any work, and the measured peak of a
//! process or device while work runs.
//!
//! The estimate counts the tensors spur's own passes keep alive, op by op as `model.rs` writes
//! them (candle keeps every intermediate of a differentiable pass until the loss's backward
//! pass has run), so it follows the code rather than a rule of thumb: weights, gradients and
//! optimizer moments; per decoder layer the activations of one micro-batch (all layers, or with
//! checkpointing each layer's input plus one layer's graph); the vocabulary-sized tensors of
//! the log-softmax; the transients of the backward pass and of Adam; and for sampling the KV
//! cache of the batch, each prompt once. docs/performance.md compares it with measured peaks.

use candle_core::{DType, Device};
use serde::Serialize;

use crate::config::{Architecture, ModelConfig};

/// What an update (training) pass holds.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateShape {
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer update: from two on, the gradients accumulated so far are
    /// held beside the ones being computed.
    pub micro_batches: usize,
    /// Tokens per sequence (prompt + completion), the padded length.
    pub sequence_tokens: usize,
    /// Positions per sequence whose logits are taken (the completion's).
    pub logit_positions: usize,
    /// f32 or bf16.
    pub compute: DType,
    pub checkpoint_activations: bool,
    /// Dtype of Adam's two moments (f32, or bf16 to save a quarter of the static memory).
    pub moments: DType,
    /// An entropy bonus in the loss (differentiated through the whole distribution).
    pub entropy_bonus: bool,
}

/// Estimated peak bytes, by part. `total` is the peak: not every part is at its largest at
/// the same moment (Adam's transients come after the activations are freed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub kv_cache: u64,
    /// What the device or process holds before any tensor (CUDA context, code, allocator).
    pub runtime: u64,
    pub total: u64,
}

/// Parameters of a model of `config`.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    crate::model::parameter_shapes(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum()
}

/// The largest single parameter tensor (the embedding, in every supported architecture).
fn largest_tensor(config: &ModelConfig) -> u64 {
    crate::model::parameter_shapes(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(0)
}

/// Bytes the runtime holds before any tensor: on CUDA the context and cuBLAS workspaces (about
/// 0.5 GiB on an H100/H200 with CUDA 13), on the CPU the binary and allocator (~100 MiB).
fn runtime_bytes(device: &Device) -> u64 {
    if device.is_cpu() {
        100 << 20
    } else {
        512 << 20
    }
}

fn size(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// Bytes one decoder layer's differentiable forward pass keeps for a micro-batch, counting each
/// intermediate `model.rs` creates (views are free; casts to the same dtype are free).
///
/// `emulated`: bf16 on the CPU, whose products keep f32 copies of both operands and of the
/// result (`model.rs`'s `matmul`). `fused`: which of spur's training kernels serve the pass.
fn layer_activation_bytes(
    c: &ModelConfig,
    batch: u64,
    tokens: u64,
    compute: DType,
    emulated: bool,
    fused: Fused,
) -> u64 {
    let cs = size(compute);
    let f32s = 4;
    let bf16 = compute != DType::F32;
    let rows = batch * tokens;
    let (d, hd) = (c.hidden_size as u64, c.head_dim as u64);
    let (q, kv) = (
        c.num_attention_heads as u64 * hd,
        c.num_key_value_heads as u64 * hd,
    );
    let inter = c.intermediate_size as u64;
    let bias = c.architecture == Architecture::Qwen2;
    let olmo = c.architecture == Architecture::Olmo2;

    // RMS norm over `width` features. Fused: its output. Composite: f32 cast, square,
    // normalised, scaled (f32), cast back.
    let norm = |width: u64| {
        if fused.ops {
            rows * width * cs
        } else {
            rows * width * (3 * f32s + if bf16 { f32s + cs } else { 0 })
        }
    };
    // A projection: its output, a bias add, and in bf16 the cast of its f32 master weight.
    let linear = |out: u64, inp: u64, with_bias: bool| {
        rows * out * cs * (1 + with_bias as u64)
            + if bf16 { out * inp * cs } else { 0 }
            + if emulated {
                f32s * (rows * (inp + out) + out * inp)
            } else {
                0
            }
    };
    let mut bytes = 0;
    // Norms: Llama/Qwen2 before attention and MLP; OLMo2 after both, plus q/k norms.
    bytes += if olmo {
        2 * norm(d) + norm(q) + norm(kv)
    } else {
        2 * norm(d)
    };
    bytes += linear(q, d, bias) + 2 * linear(kv, d, bias) + linear(d, q, false);
    // q, k, v: contiguous copies; q and k rotated (fused: one output each; composite: four
    // products and sums, and one concatenation).
    bytes += rows * cs * (q + 2 * kv);
    bytes += rows * cs * (q + kv) * if fused.ops { 1 } else { 4 };
    if fused.attention {
        // The attention's output, already in the output projection's layout, and its
        // log-sum-exps.
        bytes += rows * cs * q;
        bytes += rows * c.num_attention_heads as u64 * f32s;
    } else {
        // k's second contiguous copy.
        bytes += rows * cs * kv;
        let scores = batch * c.num_attention_heads as u64 * tokens * tokens;
        // Scores: product, (f32 cast), scale, mask, softmax's shift, exp and division, (cast
        // back).
        bytes += scores * (cs + 5 * f32s + if bf16 { f32s + cs } else { 0 });
        if emulated {
            // The scores' and the probabilities' products: f32 operands and results.
            bytes += f32s * (2 * scores + rows * (2 * q + 2 * kv));
        }
        // The attention output's transposed copy.
        bytes += rows * cs * q;
    }
    // The residual sums.
    bytes += rows * cs * 2 * d;
    // MLP: gate, up, the gating (fused: one output; composite: silu and the product), down.
    let gating = if fused.ops { 1 } else { 2 };
    bytes += linear(inter, d, false) * 2 + rows * inter * cs * gating + linear(d, inter, false);
    bytes
}

/// Which of spur's training kernels serve a pass.
#[derive(Clone, Copy)]
struct Fused {
    /// `train_ops`' RMS norm, rotary embedding and SwiGLU: each keeps only its inputs and
    /// writes one output.
    ops: bool,
    /// `train_attention`'s packed attention: its output and one f32 log-sum-exp per query and
    /// head instead of the scores.
    attention: bool,
}

/// Peak bytes of one update step (forward, backward and Adam over one micro-batch at a time).
pub fn update_bytes(config: &ModelConfig, shape: &UpdateShape, device: &Device) -> MemoryEstimate {
    let params = parameter_count(config);
    let largest = largest_tensor(config);
    let layers = config.num_hidden_layers as u64;
    let (b, t) = (shape.micro_batch as u64, shape.sequence_tokens as u64);
    let cs = size(shape.compute);
    let bf16 = shape.compute != DType::F32;
    let d = config.hidden_size as u64;
    let vocab = config.vocab_size as u64;

    let weights = 4 * params;
    let gradients = 4 * params * if shape.micro_batches > 1 { 2 } else { 1 };
    let optimizer = 2 * size(shape.moments) * params;

    let emulated = bf16 && device.is_cpu();
    let fused = Fused {
        ops: crate::train_ops::has_kernels(device, shape.compute),
        attention: crate::train_attention::has_kernel(device, shape.compute),
    };
    let layer = layer_activation_bytes(config, b, t, shape.compute, emulated, fused);
    // The backward pass adds the gradients of the activations it walks: candle creates each as
    // zeros plus a sum and frees it once consumed. With candle's composite ops that is a
    // quarter of the activations at the peak; the fused ops' backward passes write their
    // gradients directly, and the peak is the forward pass's activations (both measured on
    // SmolLM2-135M on the CPU, docs/performance.md).
    let backward_extra = |bytes: u64| {
        if fused.ops && fused.attention {
            bytes
        } else {
            bytes * 5 / 4
        }
    };
    // One layer is differentiated at a time. Fused, its attention's backward pass holds f32
    // copies of q, k, v, the output and its gradient, and the gradients of q, k and v twice
    // (its tasks' and their scatter); composite, its softmax's backward pass holds about eight
    // f32 tensors of the attention scores' size (each op's gradient, its zeros and sum;
    // measured on the tiny test models, where attention dominates).
    let attention_backward = if fused.attention {
        let (q, kv) = (
            (config.num_attention_heads * config.head_dim) as u64,
            (config.num_key_value_heads * config.head_dim) as u64,
        );
        4 * b * t * (5 * q + 6 * kv)
    } else {
        8 * 4 * b * config.num_attention_heads as u64 * t * t
    };
    let layer_stack = attention_backward
        + if shape.checkpoint_activations {
            // Each layer's input, the top leaf, and one layer's graph while it is recomputed.
            (layers + 1) * b * t * d * cs + backward_extra(layer)
        } else {
            backward_extra(layers * layer)
        };
    // Embedding rows (f32 gather, cast), final norm over the logit positions.
    let logit_rows = b * shape.logit_positions as u64;
    let edges = b * t * d * (4 + if bf16 { cs } else { 0 }) + logit_rows * d * 5 * 4;
    // The head (`head_logprobs`): the logits are computed a chunk of rows at a time, and
    // the backward pass holds about five f32 tensors of one block of the vocabulary (the
    // recomputed logits, the probabilities, the logits' gradient and its casts; seven with an
    // entropy bonus, whose gradient needs two more), and the head weight's gradient in the
    // compute dtype; in bf16 the weight's cast too.
    let head_weight = if bf16 { vocab * d * cs } else { 0 };
    let blocks = if shape.entropy_bonus { 7 } else { 5 };
    let vocab_part = blocks
        * (logit_rows * vocab * 4).min(crate::head_logprobs::CHUNK_BYTES as u64)
        + vocab * d * cs
        + head_weight;
    let activations = layer_stack + edges + vocab_part;

    // Peak of the backward pass: everything above at once. Peak of Adam: weights, gradients,
    // moments, and on GPUs about six temporaries of the tensor being updated (the CPU updates
    // in place, spur-rl's `adam_in_place`).
    let backward_peak = weights + gradients + optimizer + activations;
    let in_place = device.is_cpu() || (device.is_cuda() && crate::unchecked_cuda_kernels());
    let adam_transients = if in_place { 0 } else { 6 * 4 * largest };
    let adam_peak = weights + gradients + optimizer + adam_transients;
    let runtime = runtime_bytes(device);
    MemoryEstimate {
        weights,
        gradients,
        optimizer,
        activations,
        kv_cache: 0,
        runtime,
        total: runtime + backward_peak.max(adam_peak),
    }
}

/// What a sampling pass decodes.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleShape {
    /// Sequences decoded together (the engine's batch).
    pub batch: usize,
    /// Completions of each prompt: rows continuing one prompt share its keys and values.
    pub samples_per_prompt: usize,
    /// Tokens of the longest prompt.
    pub prompt_tokens: usize,
    /// Most new tokens per completion.
    pub new_tokens: usize,
}

impl SampleShape {
    /// Prompts the engine holds at once: those of a full batch, one more whose last rows
    /// still run while the next prompt's rows join, and the next prompt's prefill.
    pub fn prompts_held(&self) -> usize {
        let batch = self.batch.max(1);
        (batch.div_ceil(self.samples_per_prompt.max(1)) + 1).min(batch) + 1
    }
}

/// Peak bytes of sampling `shape` from a trainable model computing in `compute`: the f32
/// master weights, a copy in the compute dtype when it differs, and the KV cache: each held
/// prompt once, and each row's own completion (grown geometrically: up to 1.5×).
pub fn rollout_bytes(
    config: &ModelConfig,
    shape: &SampleShape,
    compute: DType,
    device: &Device,
) -> MemoryEstimate {
    let params = parameter_count(config);
    let cs = size(compute);
    let weights = 4 * params
        + if compute != DType::F32 {
            cs * params
        } else {
            0
        };
    let b = shape.batch as u64;
    let prompt = shape.prompt_tokens as u64;
    let kv_token = 2 * (config.num_key_value_heads * config.head_dim) as u64 * cs;
    let layers = config.num_hidden_layers as u64;
    let prompts = shape.prompts_held() as u64 * prompt;
    let kv_cache = layers * kv_token * (prompts + b * shape.new_tokens as u64 * 3 / 2);
    // One step's logits (f32) and their host copy. Without spur's decode attention, candle's
    // gathers one layer's prompt columns for every row; its CUDA kernel keeps one layer's
    // scores (f32) instead.
    let mut activations = b * config.vocab_size as u64 * (cs + 4);
    if device.is_cuda() && crate::unchecked_cuda_kernels() {
        let columns = prompt + shape.new_tokens as u64;
        activations += b * config.num_attention_heads as u64 * columns * 4;
    } else if !(device.is_cpu() && compute == DType::F32) {
        activations += b * prompt * kv_token;
    }
    let runtime = runtime_bytes(device);
    MemoryEstimate {
        weights,
        gradients: 0,
        optimizer: 0,
        activations,
        kv_cache,
        runtime,
        total: runtime + weights + kv_cache + activations,
    }
}

/// Bytes `device` holds in all: the machine's physical memory for the CPU (`MemTotal`), the
/// card's memory for a GPU. `None` where it cannot be read.
pub fn capacity(device: &Device) -> Option<u64> {
    if device.is_cpu() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        return Some(kib * 1024);
    }
    device_capacity(device)
}

#[cfg(feature = "cuda")]
fn device_capacity(device: &Device) -> Option<u64> {
    let context = device
        .as_cuda_device()
        .ok()?
        .cuda_stream()
        .context()
        .clone();
    context.mem_get_info().ok().map(|(_, total)| total as u64)
}

#[cfg(not(feature = "cuda"))]
fn device_capacity(_device: &Device) -> Option<u64> {
    None
}

/// Tracks the peak memory in use while work runs: on the CPU the process's resident high-water
/// mark (reset at the start, Linux's `clear_refs`), on CUDA the device memory in use, sampled
/// every millisecond by a thread.
pub struct PeakMemory {
    inner: Inner,
}

enum Inner {
    Process,
    #[cfg(feature = "cuda")]
    Device {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        sampler: std::thread::JoinHandle<u64>,
    },
    Unavailable,
}

impl PeakMemory {
    /// Starts tracking on `device`.
    pub fn start(device: &Device) -> Self {
        if device.is_cpu() {
            // "5" resets the peak resident set size to the current one.
            let inner = match std::fs::write("/proc/self/clear_refs", "5") {
                Ok(()) => Inner::Process,
                Err(_) => Inner::Unavailable,
            };
            return PeakMemory { inner };
        }
        PeakMemory {
            inner: device_sampler(device).unwrap_or(Inner::Unavailable),
        }
    }

    /// The peak in bytes since [`PeakMemory::start`]; `None` where it cannot be read.
    pub fn finish(self) -> Option<u64> {
        match self.inner {
            Inner::Process => {
                let status = std::fs::read_to_string("/proc/self/status").ok()?;
                let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            }
            #[cfg(feature = "cuda")]
            Inner::Device { stop, sampler } => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                sampler.join().ok()
            }
            Inner::Unavailable => None,
        }
    }
}

#[cfg(feature = "cuda")]
fn device_sampler(device: &Device) -> Option<Inner> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let context = device
        .as_cuda_device()
        .ok()?
        .cuda_stream()
        .context()
        .clone();
    let in_use = move || -> Option<u64> {
        let (free, total) = context.mem_get_info().ok()?;
        Some((total - free) as u64)
    };
    in_use()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(in_use().unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        peak.max(in_use().unwrap_or(0))
    });
    Some(Inner::Device { stop, sampler })
}

#[cfg(not(feature = "cuda"))]
fn device_sampler(_device: &Device) -> Option<Inner> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Math-7B's shapes.
    fn qwen_7b() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn prompts_held_while_sampling() {
        let held = |batch, samples_per_prompt| {
            SampleShape {
                batch,
                samples_per_prompt,
                prompt_tokens: 1,
                new_tokens: 1,
            }
            .prompts_held()
        };
        // A full batch's prompts, one more still finishing, and the next one's prefill.
        assert_eq!(held(64, 16), 6);
        assert_eq!(held(32, 16), 4);
        assert_eq!(held(4, 8), 3);
        // No sharing: every row its own prompt, and the next prefill.
        assert_eq!(held(32, 1), 33);
        assert_eq!(held(1, 1), 2);
    }

    #[test]
    fn rows_of_one_prompt_hold_it_once() {
        let config = qwen_7b();
        let kv = |samples_per_prompt| {
            let shape = SampleShape {
                batch: 64,
                samples_per_prompt,
                prompt_tokens: 1024,
                new_tokens: 3072,
            };
            rollout_bytes(&config, &shape, DType::BF16, &Device::Cpu).kv_cache
        };
        // 28 layers × keys and values × 4 heads × 128 dims × 2 bytes.
        let per_token = 28 * 2 * 4 * 128 * 2;
        let (alone, grouped) = (kv(1), kv(16));
        assert_eq!(alone - grouped, (65 - 6) * 1024 * per_token);
        // The paper's 64 rows: 0.35 GB of prompts beside 16.9 GB of completions (with room
        // to grow); a copy of the prompt in every row made it 22.5 GB in all.
        assert_eq!(grouped, (6 * 1024 + 64 * 3072 * 3 / 2) * per_token);
    }
}
