//! One decoder-only transformer for Llama, Qwen2 and OLMo2, written with differentiable ops only
//! (candle's composite softmax; spur's RMS norm, rotary embedding and SwiGLU from
//! [`crate::train_ops`], each with its own backward pass), so that the model that samples
//! rollouts is also the policy the trainer differentiates. KV-cache (decoding) passes, which
//! take no gradient, use candle's and spur's fused kernels without a backward pass instead.
//!
//! Weights are either trainable f32 [`Var`]s held in a [`VarMap`] (loaded from safetensors or a
//! dequantised GGUF) or, for fast evaluation, the quantised GGUF tensors behind [`QMatMul`].
//!
//! A trainable model computes in f32 or in bf16 ([`Transformer::set_compute_dtype`]). In bf16 the
//! f32 vars stay the master weights: each pass casts them (a differentiable cast, so gradients
//! reach the f32 vars in f32), while RMS norms and attention softmaxes are computed in f32, as
//! PyTorch's autocast does. With activation checkpointing
//! ([`Transformer::set_activation_checkpointing`]) a training pass keeps only each decoder layer's
//! input, and [`LayerTape::backward`] recomputes one layer at a time.
//!
//! Training and scoring passes run over [`PackedSequences`]: several sequences back to back in
//! one row with no padding, each with its own positions and attending only to itself, and logits
//! only where they are asked for. [`Transformer::forward`] takes a right-padded batch and gives
//! logits at every position.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::VarMap;

use crate::config::{Architecture, ModelConfig};
use crate::decode_attention::{DecodeAttention, PromptColumns};
use crate::decode_matmul::DecodeMatmul;
use crate::decode_silu::SiluMul;
use crate::error::{Error, Result};
use crate::head_logprobs::{self, Entropy, TokenLogprobs};
use crate::kv_cache::{KvCache, SharedPrompts};
use crate::quant::QuantMatrix;
use crate::train_attention;
use crate::train_ops::{self, RopeStyle};

/// Up to this many rows a decoding pass's dense matmul on the CPU uses spur's decode kernel
/// ([`crate::decode_matmul`]); above, `gemm`'s packed micro-kernel is faster.
const DECODE_ROWS: usize = 64;

/// A projection `y = x Wᵀ (+ b)`, dense (trainable) or quantised.
#[derive(Debug)]
enum Linear {
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Quantised weights on the CPU, in a layout spur's own kernel reads (see
    /// [`crate::quant`]: candle's Q4_1 kernel is ~3× slower).
    QuantCpu {
        weight: QuantMatrix,
        bias: Option<Tensor>,
    },
    /// Other quantised weights: candle's kernels.
    Quant {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

/// `a · b` in the operands' dtype. candle's CPU matmul has no bf16 kernel, so there bf16
/// operands are multiplied in f32 and the result rounded back to bf16: bf16 inputs with f32
/// sums, what bf16 tensor cores compute, so CPU tests exercise the GPU's arithmetic.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        let product = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        return Ok(product.to_dtype(DType::BF16)?);
    }
    Ok(a.matmul(b)?)
}

impl Linear {
    /// A detached copy of a dense projection with its weights in `dtype`.
    fn cast(&self, dtype: DType) -> Result<Linear> {
        match self {
            Linear::Dense { weight, bias } => Ok(Linear::Dense {
                weight: weight.detach().to_dtype(dtype)?,
                bias: bias
                    .as_ref()
                    .map(|b| b.detach().to_dtype(dtype))
                    .transpose()?,
            }),
            _ => Err(Error::Request(
                "quantised weights compute in f32 and are not cast".into(),
            )),
        }
    }

    /// The dense weight and bias (none for quantised projections).
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Linear::Dense { weight, bias } => std::iter::once(weight).chain(bias).collect(),
            _ => Vec::new(),
        }
    }

    fn quantized(weight: QTensor, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            if let Some(weight) = QuantMatrix::from_qtensor(&weight)? {
                return Ok(Linear::QuantCpu { weight, bias });
            }
        }
        Ok(Linear::Quant {
            weight: QMatMul::from_qtensor(weight)?,
            bias,
        })
    }

    /// `decoding`: no gradient will be taken (a KV-cache pass), so kernels without a backward
    /// pass may be used.
    fn forward(&self, x: &Tensor, decoding: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        // One 2-D matmul over all rows: the weight is read once per call, whatever the batch.
        let x2 = x.reshape((rows, in_dim))?;
        let (y, bias) = match self {
            Linear::Dense { weight, bias }
                if decoding
                    && rows <= DECODE_ROWS
                    && weight.device().is_cpu()
                    && weight.dtype() == DType::F32
                    && x.dtype() == DType::F32 =>
            {
                (
                    x2.contiguous()?.apply_op2_no_bwd(weight, &DecodeMatmul)?,
                    bias,
                )
            }
            Linear::Dense { weight, bias } => {
                (matmul(&x2, &weight.to_dtype(x.dtype())?.t()?)?, bias)
            }
            Linear::QuantCpu { weight, bias } => {
                let x = x2.flatten_all()?.to_vec1::<f32>()?;
                let y = weight.matmul(&x, rows);
                (
                    Tensor::from_vec(y, (rows, weight.rows()), x2.device())?,
                    bias,
                )
            }
            Linear::Quant { weight, bias } => (weight.forward(&x2)?, bias),
        };
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Llama/Qwen2: norm before attention. OLMo2: none.
    input_norm: Option<Tensor>,
    /// Llama/Qwen2: norm before the MLP. OLMo2: norm of the attention output.
    post_attention_norm: Tensor,
    /// OLMo2 only: norm of the MLP output.
    post_feedforward_norm: Option<Tensor>,
    /// OLMo2 only: RMS norms over the whole q and k projections.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

impl Layer {
    /// Every weight tensor of the layer (the ones a layer's backward pass gives gradients to).
    fn tensors(&self) -> Vec<&Tensor> {
        let projections = [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ];
        let norms = [
            self.input_norm.as_ref(),
            Some(&self.post_attention_norm),
            self.post_feedforward_norm.as_ref(),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
        ];
        projections
            .into_iter()
            .flat_map(Linear::tensors)
            .chain(norms.into_iter().flatten())
            .collect()
    }

    /// A detached copy in `dtype` (the fused norm kernels take their weight in the input's
    /// dtype).
    fn cast(&self, dtype: DType) -> Result<Layer> {
        let norm = |t: &Option<Tensor>| t.as_ref().map(|t| t.detach().to_dtype(dtype)).transpose();
        Ok(Layer {
            q: self.q.cast(dtype)?,
            k: self.k.cast(dtype)?,
            v: self.v.cast(dtype)?,
            o: self.o.cast(dtype)?,
            gate: self.gate.cast(dtype)?,
            up: self.up.cast(dtype)?,
            down: self.down.cast(dtype)?,
            input_norm: norm(&self.input_norm)?,
            post_attention_norm: self.post_attention_norm.detach().to_dtype(dtype)?,
            post_feedforward_norm: norm(&self.post_feedforward_norm)?,
            q_norm: norm(&self.q_norm)?,
            k_norm: norm(&self.k_norm)?,
        })
    }
}

/// A decoding pass's view of one layer's cache: the rows' own keys and values, the column the
/// pass writes from, each row's left padding, and the prompts the rows continue.
struct LayerCache<'a> {
    kv: &'a mut (Tensor, Tensor),
    offset: usize,
    pad: &'a [usize],
    prompts: Option<(&'a (Tensor, Tensor), &'a SharedPrompts)>,
    rows_on_device: Option<&'a Tensor>,
}

/// Which keys each query of a pass attends to.
enum Attend {
    /// An additive mask, [b or 1, 1, 1, t, keys]: causal, and in a cached pass also hiding each
    /// row's left padding.
    Mask(Tensor),
    /// Sequences of these lengths back to back in one row: causal attention within each and
    /// none across. `causal` is the causal mask of the longest; each sequence uses its top-left
    /// corner.
    Packed { lengths: Vec<usize>, causal: Tensor },
    /// The same through [`train_attention::packed_attention`], one op that holds no scores.
    PackedFused { lengths: Vec<usize> },
}

/// What a pass runs over: the tokens, their rotary tables, which keys each query attends to,
/// and where logits are wanted (rows of the flattened positions; `None`: every position).
struct PassInputs {
    tokens: Tensor,
    rope_cs: (Tensor, Tensor),
    attend: Attend,
    logit_rows: Option<Tensor>,
    /// For spur's CUDA decode attention: each row's own left padding, prompt and prompt
    /// padding, u32 [b, 3] on the device, uploaded once per step for every layer.
    decode_rows: Option<Tensor>,
}

/// Sequences laid back to back in one row, for a training or scoring pass without padding:
/// positions restart at 0 at each sequence, attention stays within each sequence, and logits
/// are computed only at the positions asked for.
#[derive(Clone, Debug)]
pub struct PackedSequences {
    tokens: Tensor,
    lengths: Vec<usize>,
    logit_rows: Tensor,
}

impl PackedSequences {
    /// `sequences` packed into one row on `device`, with logits wanted at positions
    /// `logits_at[i]` of sequence i (counted from the sequence's first token).
    pub fn new(sequences: &[&[u32]], logits_at: &[Range<usize>], device: &Device) -> Result<Self> {
        if sequences.len() != logits_at.len() {
            return Err(Error::Request(format!(
                "{} sequences but {} ranges of logit positions",
                sequences.len(),
                logits_at.len()
            )));
        }
        let mut tokens = Vec::with_capacity(sequences.iter().map(|s| s.len()).sum());
        let mut logit_rows = Vec::new();
        for (i, (sequence, wanted)) in sequences.iter().zip(logits_at).enumerate() {
            if sequence.is_empty() {
                return Err(Error::Request(format!("sequence {i} is empty")));
            }
            if wanted.start > wanted.end || wanted.end > sequence.len() {
                return Err(Error::Request(format!(
                    "logits at positions {wanted:?} of sequence {i}, which has {} tokens",
                    sequence.len()
                )));
            }
            logit_rows.extend(wanted.clone().map(|p| (tokens.len() + p) as u32));
            tokens.extend_from_slice(sequence);
        }
        if logit_rows.is_empty() {
            return Err(Error::Request(
                "packed sequences with no position to compute logits at".into(),
            ));
        }
        let (total, wanted) = (tokens.len(), logit_rows.len());
        Ok(PackedSequences {
            tokens: Tensor::from_vec(tokens, (1, total), device)?,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            logit_rows: Tensor::from_vec(logit_rows, wanted, device)?,
        })
    }

    /// The token ids, u32 [1, Σ lengths].
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Where logits are wanted, as positions of the packed row, in the order the logits come
    /// back: u32 `[n]`.
    pub fn logit_rows(&self) -> &Tensor {
        &self.logit_rows
    }
}

/// A decoder-only language model.
pub struct Transformer {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope_style: RopeStyle,
    inv_freq: Vec<f64>,
    varmap: Option<VarMap>,
    device: Device,
    /// Dtype of activations and matrix products: f32, or bf16 over the f32 master weights.
    compute: DType,
    /// Training passes keep only each layer's input and recompute the layer in the backward.
    checkpoint_activations: bool,
}

/// The Hugging Face tensor names and shapes a model of `config` needs, in a stable order.
pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let c = config;
    let (d, hd) = (c.hidden_size, c.head_dim);
    let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("self_attn.q_proj.weight", vec![q_out, d]);
        push("self_attn.k_proj.weight", vec![kv_out, d]);
        push("self_attn.v_proj.weight", vec![kv_out, d]);
        push("self_attn.o_proj.weight", vec![d, q_out]);
        if c.architecture == Architecture::Qwen2 {
            push("self_attn.q_proj.bias", vec![q_out]);
            push("self_attn.k_proj.bias", vec![kv_out]);
            push("self_attn.v_proj.bias", vec![kv_out]);
        }
        push("mlp.gate_proj.weight", vec![c.intermediate_size, d]);
        push("mlp.up_proj.weight", vec![c.intermediate_size, d]);
        push("mlp.down_proj.weight", vec![d, c.intermediate_size]);
        push("post_attention_layernorm.weight", vec![d]);
        match c.architecture {
            Architecture::Llama | Architecture::Qwen2 => {
                push("input_layernorm.weight", vec![d]);
            }
            Architecture::Olmo2 => {
                push("post_feedforward_layernorm.weight", vec![d]);
                push("self_attn.q_norm.weight", vec![q_out]);
                push("self_attn.k_norm.weight", vec![kv_out]);
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    }
    out
}

/// Whether a pass uses candle's fused kernels, which have no backward pass, for its small ops
/// (RMS norms, rotary embeddings, the attention softmax): only a pass that takes no gradient
/// (`decoding`, a KV-cache pass). On the CPU those ops were a sixth of a decode step; on CUDA,
/// where decoding is bound by kernel launches, each fused kernel replaces three to six.
fn fused(decoding: bool) -> bool {
    decoding
}

/// Whether spur's own CPU decoding kernels (weight products, attention over the cache, gating)
/// serve a pass over `x`: no gradient, on the CPU, in f32.
fn cpu_kernels(decoding: bool, x: &Tensor) -> bool {
    decoding && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether spur's decode attention serves a one-position cache pass over `q`: on the CPU in
/// f32, and on CUDA in f32 or bf16 when its unchecked kernel is asked for
/// ([`crate::unchecked_cuda_kernels`]).
fn decode_attention_kernel(decoding: bool, q: &Tensor) -> bool {
    let cuda = q.device().is_cuda()
        && matches!(q.dtype(), DType::F32 | DType::BF16)
        && crate::unchecked_cuda_kernels();
    cpu_kernels(decoding, q) || (decoding && cuda)
}

/// RMS norm of the last dimension. `decoding`: no gradient will be taken.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, decoding: bool) -> Result<Tensor> {
    if fused(decoding) {
        // candle's kernel: one pass instead of six ops, each with its own allocation.
        return Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &weight.to_dtype(x.dtype())?,
            eps as f32,
        )?);
    }
    train_ops::rms_norm(x, weight, eps)
}

/// Rotary embedding of `x` ([b, heads, t, d]) with `cos`/`sin` of shape [b, t, d/2].
/// `decoding`: no gradient will be taken.
fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
    decoding: bool,
) -> Result<Tensor> {
    if fused(decoding) {
        // candle's kernels (same products and sums as spur's, without a backward pass).
        let x = x.contiguous()?;
        return Ok(match style {
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
        });
    }
    train_ops::rope(x, cos, sin, style)
}

/// Softmax attention of queries `q` [b, heads, t, hd] over keys and values
/// [b, kv_heads, keys, hd] in one or more segments whose keys the additive `mask` (broadcast to
/// [b, kv_heads, heads / kv_heads, t, all keys]) covers in order: [b, heads, t, hd].
fn scaled_attention(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    mask: &Tensor,
    decoding: bool,
) -> Result<Tensor> {
    let (b, heads, t, hd) = q.dims4()?;
    let kv_heads = segments[0].0.dim(1)?;
    let n_rep = heads / kv_heads;
    // Grouped-query attention without copying k/v: the n_rep query heads that share a
    // key/value head are stacked along the query axis.
    let q = q.contiguous()?.reshape((b, kv_heads, n_rep * t, hd))?;
    let scores = (segments.iter())
        .map(|(k, _)| matmul(&q, &k.t()?))
        .collect::<Result<Vec<_>>>()?;
    // Scores, mask and softmax in f32 whatever the pass's dtype, as autocast does.
    let scores = Tensor::cat(&scores, 3)?.to_dtype(DType::F32)?;
    let keys = scores.dim(3)?;
    let scores = (scores * (1.0 / (hd as f64).sqrt()))?
        .reshape((b, kv_heads, n_rep, t, keys))?
        .broadcast_add(mask)?;
    // On CUDA one kernel instead of five launches; the CPU keeps the composite softmax
    // its cached rollouts were sampled with (a fused kernel sums in another order).
    let probs = if fused(decoding) && !scores.device().is_cpu() {
        candle_nn::ops::softmax_last_dim(&scores)?
    } else {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    };
    let probs = probs.reshape((b, kv_heads, n_rep * t, keys))?;
    let out = if let [(_, v)] = segments {
        matmul(&probs.to_dtype(v.dtype())?, v)?
    } else {
        // Each segment's weighted values, summed in f32.
        let mut sum: Option<Tensor> = None;
        let mut at = 0;
        for (_, v) in segments {
            let n = v.dim(2)?;
            let p = probs.narrow(3, at, n)?.contiguous()?.to_dtype(v.dtype())?;
            let part = matmul(&p, v)?.to_dtype(DType::F32)?;
            sum = Some(match sum {
                Some(s) => (s + part)?,
                None => part,
            });
            at += n;
        }
        let v_dtype = segments[0].1.dtype();
        sum.expect("at least one segment").to_dtype(v_dtype)?
    };
    Ok(out.reshape((b, heads, t, hd))?)
}

impl Transformer {
    /// Builds a trainable model from f32-convertible tensors keyed by Hugging Face names.
    /// Every tensor becomes a [`Var`] in the model's [`VarMap`].
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        origin: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut vars: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: origin.to_path_buf(),
                tensor: name.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: origin.to_path_buf(),
                    tensor: name,
                    expected: shape,
                    actual: t.dims().to_vec(),
                });
            }
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
            vars.insert(name.clone(), var.as_tensor().clone());
            varmap
                .data()
                .lock()
                .expect("VarMap lock poisoned")
                .insert(name, var);
        }
        let take = |name: &str| vars[name].clone();
        let dense = |name: &str, bias: bool| Linear::Dense {
            weight: take(&format!("{name}.weight")),
            bias: bias.then(|| take(&format!("{name}.bias"))),
        };
        let is_qwen = config.architecture == Architecture::Qwen2;
        let is_olmo = config.architecture == Architecture::Olmo2;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Layer {
                    q: dense(&format!("{p}.self_attn.q_proj"), is_qwen),
                    k: dense(&format!("{p}.self_attn.k_proj"), is_qwen),
                    v: dense(&format!("{p}.self_attn.v_proj"), is_qwen),
                    o: dense(&format!("{p}.self_attn.o_proj"), false),
                    gate: dense(&format!("{p}.mlp.gate_proj"), false),
                    up: dense(&format!("{p}.mlp.up_proj"), false),
                    down: dense(&format!("{p}.mlp.down_proj"), false),
                    input_norm: (!is_olmo).then(|| take(&format!("{p}.input_layernorm.weight"))),
                    post_attention_norm: take(&format!("{p}.post_attention_layernorm.weight")),
                    post_feedforward_norm: is_olmo
                        .then(|| take(&format!("{p}.post_feedforward_layernorm.weight"))),
                    q_norm: is_olmo.then(|| take(&format!("{p}.self_attn.q_norm.weight"))),
                    k_norm: is_olmo.then(|| take(&format!("{p}.self_attn.k_norm.weight"))),
                }
            })
            .collect();
        let embed = take("model.embed_tokens.weight");
        let lm_head = Linear::Dense {
            weight: if config.tie_word_embeddings {
                embed.clone()
            } else {
                take("lm_head.weight")
            },
            bias: None,
        };
        Ok(Transformer {
            inv_freq: config.rope_inv_freq(),
            embed,
            layers,
            norm: take("model.norm.weight"),
            lm_head,
            rope_style: RopeStyle::Half,
            varmap: Some(varmap),
            device: device.clone(),
            config,
            compute: DType::F32,
            checkpoint_activations: false,
        })
    }

    /// Builds the fast, non-trainable model that multiplies by the quantised GGUF weights.
    /// `tensors` are keyed by GGUF names; Llama q/k rows stay in llama.cpp's permuted order.
    pub(crate) fn from_qtensors(
        config: ModelConfig,
        mut tensors: HashMap<String, QTensor>,
        origin: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| Error::MissingTensor {
                path: origin.to_path_buf(),
                tensor: name.to_string(),
            })
        };
        let plain = |take: &mut dyn FnMut(&str) -> Result<QTensor>, name: &str| -> Result<Tensor> {
            Ok(take(name)?.dequantize(device)?)
        };
        let is_qwen = config.architecture == Architecture::Qwen2;
        let is_olmo = config.architecture == Architecture::Olmo2;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("blk.{i}");
            let mut quant = |name: &str, bias: bool| -> Result<Linear> {
                let bias = if bias {
                    Some(take(&format!("{p}.{name}.bias"))?.dequantize(device)?)
                } else {
                    None
                };
                Linear::quantized(take(&format!("{p}.{name}.weight"))?, bias, device)
            };
            let q = quant("attn_q", is_qwen)?;
            let k = quant("attn_k", is_qwen)?;
            let v = quant("attn_v", is_qwen)?;
            let o = quant("attn_output", false)?;
            let gate = quant("ffn_gate", false)?;
            let up = quant("ffn_up", false)?;
            let down = quant("ffn_down", false)?;
            let layer = if is_olmo {
                Layer {
                    q,
                    k,
                    v,
                    o,
                    gate,
                    up,
                    down,
                    input_norm: None,
                    post_attention_norm: plain(
                        &mut take,
                        &format!("{p}.post_attention_norm.weight"),
                    )?,
                    post_feedforward_norm: Some(plain(
                        &mut take,
                        &format!("{p}.post_ffw_norm.weight"),
                    )?),
                    q_norm: Some(plain(&mut take, &format!("{p}.attn_q_norm.weight"))?),
                    k_norm: Some(plain(&mut take, &format!("{p}.attn_k_norm.weight"))?),
                }
            } else {
                Layer {
                    q,
                    k,
                    v,
                    o,
                    gate,
                    up,
                    down,
                    input_norm: Some(plain(&mut take, &format!("{p}.attn_norm.weight"))?),
                    post_attention_norm: plain(&mut take, &format!("{p}.ffn_norm.weight"))?,
                    post_feedforward_norm: None,
                    q_norm: None,
                    k_norm: None,
                }
            };
            layers.push(layer);
        }
        let embed_q = take("token_embd.weight")?;
        let embed = embed_q.dequantize(device)?;
        let head = if config.tie_word_embeddings {
            embed_q
        } else {
            take("output.weight")?
        };
        let lm_head = Linear::quantized(head, None, device)?;
        let norm = plain(&mut take, "output_norm.weight")?;
        let rope_style = if config.architecture == Architecture::Llama {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Half
        };
        Ok(Transformer {
            inv_freq: config.rope_inv_freq(),
            embed,
            layers,
            norm,
            lm_head,
            rope_style,
            varmap: None,
            device: device.clone(),
            config,
            compute: DType::F32,
            checkpoint_activations: false,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when the weights are trainable f32 vars (not the quantised fast path).
    pub fn is_trainable(&self) -> bool {
        self.varmap.is_some()
    }

    /// Computes in `dtype`: f32, or bf16 over the f32 master weights (trainable models only;
    /// bf16 on the GPU uses tensor cores). Logits are returned in f32 either way.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        match dtype {
            DType::F32 => {}
            DType::BF16 if self.is_trainable() => {}
            DType::BF16 => {
                return Err(Error::Request(
                    "bf16 compute needs trainable weights; quantised weights compute in f32".into(),
                ))
            }
            other => {
                return Err(Error::Request(format!(
                    "compute dtype {other:?}: expected f32 or bf16"
                )))
            }
        }
        self.compute = dtype;
        Ok(())
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// With checkpointing, [`Transformer::forward_for_gradient`] keeps one tensor per decoder
    /// layer instead of the layer's whole graph; the backward pass recomputes each layer.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpoint_activations = on;
    }

    pub fn activation_checkpointing(&self) -> bool {
        self.checkpoint_activations
    }

    /// For a model that computes in another dtype than its weights', a detached copy whose
    /// projections are cast once to the compute dtype, so that decode steps do not cast every
    /// weight again; `None` when this model decodes as it is. Take it per generation: it does
    /// not see later updates of the vars.
    pub fn decoding_copy(&self) -> Result<Option<Transformer>> {
        if self.compute == DType::F32 {
            return Ok(None);
        }
        let dtype = self.compute;
        Ok(Some(Transformer {
            config: self.config.clone(),
            embed: self.embed.detach(),
            layers: self
                .layers
                .iter()
                .map(|l| l.cast(dtype))
                .collect::<Result<_>>()?,
            norm: self.norm.detach().to_dtype(dtype)?,
            lm_head: self.lm_head.cast(dtype)?,
            rope_style: self.rope_style,
            inv_freq: self.inv_freq.clone(),
            varmap: None,
            device: self.device.clone(),
            compute: dtype,
            checkpoint_activations: false,
        }))
    }

    /// The trainable weights, keyed by Hugging Face tensor names; `None` for a quantised model.
    /// Updating a var in place (e.g. with an optimizer) changes what this model computes.
    pub fn varmap(&self) -> Option<&VarMap> {
        self.varmap.as_ref()
    }

    /// The trainable weights as (name, var), sorted by name; empty for a quantised model.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let Some(varmap) = &self.varmap else {
            return Vec::new();
        };
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// cos and sin of shape [b, t, d/2] for per-row positions `positions[row][j]`.
    fn rope_tables(&self, positions: &[Vec<usize>]) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &pos in row {
                for &f in &self.inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), &self.device)?.to_dtype(self.compute)?;
        let sin = Tensor::from_vec(sin, (b, t, half), &self.device)?.to_dtype(self.compute)?;
        Ok((cos, sin))
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        attend: &Attend,
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let decoding = cache.is_some();
        let mut q = layer.q.forward(x, decoding)?;
        let mut k = layer.k.forward(x, decoding)?;
        let v = layer.v.forward(x, decoding)?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps, decoding)?;
            k = rms_norm(&k, kn, c.rms_norm_eps, decoding)?;
        }
        let q = q.reshape((b, t, heads, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, kv_heads, hd))?.transpose(1, 2)?;
        let v = v
            .reshape((b, t, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (cos, sin) = rope_cs;
        let q = rope(&q.contiguous()?, cos, sin, self.rope_style, decoding)?;
        let k = rope(&k.contiguous()?, cos, sin, self.rope_style, decoding)?.contiguous()?;
        let (k, v, cache) = match cache {
            None => (k, v, None),
            Some(cache) => {
                let (ck, cv) = &mut *cache.kv;
                ck.slice_set(&k, 2, cache.offset)?;
                cv.slice_set(&v, 2, cache.offset)?;
                let end = cache.offset + t;
                (ck.narrow(2, 0, end)?, cv.narrow(2, 0, end)?, Some(cache))
            }
        };
        if let (1, Some(cache), true) = (t, &cache, decode_attention_kernel(decoding, &q)) {
            let op = DecodeAttention {
                pad: cache.pad.to_vec(),
                scale: 1.0 / (hd as f32).sqrt(),
                prompts: cache.prompts.map(|((pk, pv), shared)| PromptColumns {
                    k: pk.clone(),
                    v: pv.clone(),
                    width: shared.cache.len,
                    pad: shared.cache.pad.clone(),
                    of_row: shared.of_row.clone(),
                }),
                rows_on_device: cache.rows_on_device.cloned(),
            };
            // [b, heads, 1, hd] has the memory order of [b, 1, heads·hd].
            let out = q
                .apply_op3_no_bwd(&k, &v, &op)?
                .reshape((b, t, heads * hd))?;
            return layer.o.forward(&out, decoding);
        }
        let out = match attend {
            Attend::PackedFused { lengths } => {
                // Already [b, t, heads · hd].
                let out = train_attention::packed_attention(&q, &k, &v, lengths)?;
                return layer.o.forward(&out, decoding);
            }
            Attend::Mask(mask) => {
                // Rows that continue shared prompts see their prompt's columns first, gathered
                // here one layer at a time (a CUDA decode kernel would read them in place).
                let mut segments = Vec::with_capacity(2);
                if let Some(((pk, pv), shared)) = cache.and_then(|c| c.prompts) {
                    let width = shared.cache.len;
                    let gather = |x: &Tensor| x.narrow(2, 0, width)?.index_select(&shared.index, 0);
                    segments.push((gather(pk)?, gather(pv)?));
                }
                segments.push((k, v));
                scaled_attention(&q, &segments, mask, decoding)?
            }
            Attend::Packed { lengths, causal } => {
                let mut outs = Vec::with_capacity(lengths.len());
                let mut offset = 0;
                for &n in lengths {
                    let part = |t: &Tensor| t.narrow(2, offset, n)?.contiguous();
                    let mask = causal.narrow(3, 0, n)?.narrow(4, 0, n)?;
                    outs.push(scaled_attention(
                        &part(&q)?,
                        &[(part(&k)?, part(&v)?)],
                        &mask,
                        decoding,
                    )?);
                    offset += n;
                }
                Tensor::cat(&outs, 2)?
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        layer.o.forward(&out, decoding)
    }

    fn mlp(layer: &Layer, x: &Tensor, decoding: bool) -> Result<Tensor> {
        let gate = layer.gate.forward(x, decoding)?;
        let up = layer.up.forward(x, decoding)?;
        let h = if cpu_kernels(decoding, &gate) {
            gate.contiguous()?
                .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)?
        } else if decoding {
            // Where spur's decode kernel does not serve (bf16, CUDA): candle's ops, as before.
            (gate.silu()? * up)?
        } else {
            train_ops::swiglu(&gate, &up)?
        };
        layer.down.forward(&h, decoding)
    }

    /// Embeddings of `tokens` (u32 [b, t]) in the compute dtype: [b, t, hidden].
    fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        Ok(self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?
            .to_dtype(self.compute)?)
    }

    /// One decoder layer: residual stream in, residual stream out.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        pass: &PassInputs,
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let decoding = cache.is_some();
        let (rope_cs, attend) = (&pass.rope_cs, &pass.attend);
        match &layer.input_norm {
            Some(input_norm) => {
                let h = rms_norm(x, input_norm, eps, decoding)?;
                let h = (x + self.attention(layer, &h, rope_cs, attend, cache)?)?;
                let h_norm = rms_norm(&h, &layer.post_attention_norm, eps, decoding)?;
                let m = Self::mlp(layer, &h_norm, decoding)?;
                Ok((h + m)?)
            }
            None => {
                let a = self.attention(layer, x, rope_cs, attend, cache)?;
                let h = (x + rms_norm(&a, &layer.post_attention_norm, eps, decoding)?)?;
                let ff_norm = layer
                    .post_feedforward_norm
                    .as_ref()
                    .expect("OLMo2 layers have a post-feedforward norm");
                let m = Self::mlp(layer, &h, decoding)?;
                Ok((&h + rms_norm(&m, ff_norm, eps, decoding)?)?)
            }
        }
    }

    fn run_layers(&self, pass: &PassInputs, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let t = pass.tokens.dim(1)?;
        let mut x = self.embed_tokens(&pass.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| LayerCache {
                kv: &mut c.layers[i],
                offset: c.len,
                pad: c.pad.as_slice(),
                prompts: (c.prompts.as_deref()).map(|shared| (&shared.cache.layers[i], shared)),
                rows_on_device: pass.decode_rows.as_ref(),
            });
            x = self.layer_forward(layer, &x, pass, layer_cache)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(x)
    }

    /// Logits at every position of a right-padded batch of full sequences.
    ///
    /// `tokens`: u32 [batch, seq]. Returns f32 [batch, seq, vocab]; the logits at position j
    /// predict token j+1. With causal attention and right padding, positions of a row before
    /// its padding do not depend on the padding; the caller masks padded positions out.
    /// Differentiable.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        crate::on_compute_pool(|| {
            let pass = self.padded_inputs(tokens)?;
            let x = self.run_layers(&pass, None)?;
            Ok(self.head(&x, None)?.to_dtype(DType::F32)?)
        })
    }

    /// Logits at the positions `batch` asks for, f32 [n, vocab] in its order. Training needs
    /// logits only where completions are predicted; skipping the other positions saves the
    /// largest matmul there (the vocabulary projection) and its log-softmax. Differentiable.
    pub fn forward_packed(&self, batch: &PackedSequences) -> Result<Tensor> {
        crate::on_compute_pool(|| {
            let pass = self.packed_inputs(batch)?;
            let x = self.run_layers(&pass, None)?;
            Ok(self
                .head(&x, pass.logit_rows.as_ref())?
                .to_dtype(DType::F32)?)
        })
    }

    /// Inputs of a pass over the right-padded batch `tokens` (u32 [b, t]): positions from 0 in
    /// every row, causal attention, logits everywhere.
    fn padded_inputs(&self, tokens: &Tensor) -> Result<PassInputs> {
        let (b, t) = tokens.dims2()?;
        Ok(PassInputs {
            tokens: tokens.clone(),
            rope_cs: self.rope_tables(&vec![(0..t).collect(); b])?,
            attend: Attend::Mask(self.causal_mask(t)?),
            logit_rows: None,
            decode_rows: None,
        })
    }

    /// Inputs of a pass over packed sequences: positions restart at each sequence, attention
    /// stays within it.
    fn packed_inputs(&self, batch: &PackedSequences) -> Result<PassInputs> {
        let positions: Vec<usize> = batch.lengths.iter().flat_map(|&n| 0..n).collect();
        let lengths = batch.lengths.clone();
        let attend = if train_attention::has_kernel(&self.device, self.compute) {
            Attend::PackedFused { lengths }
        } else {
            let longest = lengths.iter().copied().max().unwrap_or(0);
            Attend::Packed {
                lengths,
                causal: self.causal_mask(longest)?,
            }
        };
        Ok(PassInputs {
            tokens: batch.tokens.clone(),
            rope_cs: self.rope_tables(&[positions])?,
            attend,
            logit_rows: Some(batch.logit_rows.clone()),
            decode_rows: None,
        })
    }

    /// The additive causal mask of `t` positions, [1, 1, 1, t, t].
    fn causal_mask(&self, t: usize) -> Result<Tensor> {
        let mut mask = vec![0f32; t * t];
        for q in 0..t {
            for k in q + 1..t {
                mask[q * t + k] = f32::NEG_INFINITY;
            }
        }
        Ok(Tensor::from_vec(mask, (1, 1, 1, t, t), &self.device)?)
    }

    /// Logits of the last layer's output `x` ([b, t, hidden]) in the compute dtype: at every
    /// position ([b, t, vocab]), or at rows `logit_rows` of the flattened positions ([n, vocab]).
    fn head(&self, x: &Tensor, logit_rows: Option<&Tensor>) -> Result<Tensor> {
        self.lm_head
            .forward(&self.final_norm(x, logit_rows)?, false)
    }

    /// The final norm of the last layer's output `x` ([b, t, hidden]), at every position or at
    /// rows `logit_rows` of the flattened positions ([n, hidden]).
    fn final_norm(&self, x: &Tensor, logit_rows: Option<&Tensor>) -> Result<Tensor> {
        let x = match logit_rows {
            None => x.clone(),
            Some(rows) => {
                let (b, t, hidden) = x.dims3()?;
                x.reshape((b * t, hidden))?.index_select(rows, 0)?
            }
        };
        rms_norm(&x, &self.norm, self.config.rms_norm_eps, false)
    }

    /// Whether the head is dense without a bias (every trainable model's), the head
    /// [`head_logprobs`] computes chunk by chunk. Quantised heads give logits only.
    pub fn has_chunked_head(&self) -> bool {
        matches!(self.lm_head, Linear::Dense { bias: None, .. })
    }

    /// Log-probs of `targets` (u32 [n]) under the head's logits of the normed states `h`
    /// ([n, hidden]) divided by `temperature`, and the entropies `entropy` asks for, chunk by
    /// chunk ([`head_logprobs`]).
    fn head_logprobs(
        &self,
        h: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: Entropy,
    ) -> Result<TokenLogprobs> {
        let Linear::Dense { weight, bias: None } = &self.lm_head else {
            return Err(Error::Request(
                "the head is quantised or has a bias: take its logits (forward_packed)".into(),
            ));
        };
        let weight = weight.to_dtype(h.dtype())?;
        head_logprobs::linear_token_logprobs(h, &weight, targets, temperature, entropy)
    }

    /// [`Transformer::forward_packed`] for a pass whose gradient will be taken, with logits in
    /// the compute dtype: with activation checkpointing on, they hold only the graph above the
    /// last decoder layer and the [`LayerTape`] each layer's input; without it, the tape is
    /// `None` and the logits hold the whole graph (`loss.backward()` as usual).
    pub fn forward_for_gradient(
        &self,
        batch: &PackedSequences,
    ) -> Result<(Tensor, Option<LayerTape<'_>>)> {
        crate::on_compute_pool(|| {
            let (x, rows, tape) = self.layers_for_gradient(batch)?;
            Ok((self.head(&x, Some(&rows))?, tape))
        })
    }

    /// The log-probs of `targets` (u32 [n], the tokens the positions `batch` asks for predict)
    /// at `temperature`, for a pass whose gradient will be taken, as
    /// [`Transformer::forward_for_gradient`] but without the logits of every position at once
    /// ([`head_logprobs`]), and the entropies `entropy` asks for. Only for a model with
    /// [`Transformer::has_chunked_head`].
    pub fn token_logprobs_for_gradient(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: Entropy,
    ) -> Result<(TokenLogprobs, Option<LayerTape<'_>>)> {
        crate::on_compute_pool(|| {
            let (x, rows, tape) = self.layers_for_gradient(batch)?;
            let h = self.final_norm(&x, Some(&rows))?;
            Ok((self.head_logprobs(&h, targets, temperature, entropy)?, tape))
        })
    }

    /// The decoder layers over `batch` for a pass whose gradient will be taken: the last
    /// layer's output, the logit rows, and with checkpointing the tape to differentiate it by.
    fn layers_for_gradient(
        &self,
        batch: &PackedSequences,
    ) -> Result<(Tensor, Tensor, Option<LayerTape<'_>>)> {
        let pass = self.packed_inputs(batch)?;
        let rows = batch.logit_rows.clone();
        if !self.checkpoint_activations {
            return Ok((self.run_layers(&pass, None)?, rows, None));
        }
        let mut inputs = Vec::with_capacity(self.layers.len());
        let x = self.detached_layers(&pass, |x| inputs.push(x.clone()))?;
        let top = Var::from_tensor(&x)?;
        let x = top.as_tensor().clone();
        let tape = LayerTape {
            model: self,
            pass,
            inputs,
            top,
        };
        Ok((x, rows, Some(tape)))
    }

    /// [`Transformer::forward_packed`] without a gradient: each layer's graph is dropped as
    /// soon as the layer is computed, so a scoring pass (π_old, a reference model) holds one
    /// layer's activations at a time instead of all of them. Detached logits in the compute
    /// dtype.
    pub fn forward_no_grad(&self, batch: &PackedSequences) -> Result<Tensor> {
        crate::on_compute_pool(|| {
            let pass = self.packed_inputs(batch)?;
            let x = self.detached_layers(&pass, |_| {})?;
            Ok(self.head(&x, pass.logit_rows.as_ref())?.detach())
        })
    }

    /// [`Transformer::forward_no_grad`]'s log-probs of `targets` at `temperature` (and with
    /// `entropy` their entropies), computed as [`Transformer::token_logprobs_for_gradient`]
    /// computes them, chunk by chunk: the same numbers, without a gradient. Only for a model
    /// with [`Transformer::has_chunked_head`].
    pub fn token_logprobs_no_grad(
        &self,
        batch: &PackedSequences,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
    ) -> Result<TokenLogprobs> {
        crate::on_compute_pool(|| {
            let pass = self.packed_inputs(batch)?;
            let x = self.detached_layers(&pass, |_| {})?;
            let h = self.final_norm(&x, pass.logit_rows.as_ref())?;
            let entropy = if entropy {
                Entropy::Metric
            } else {
                Entropy::Skip
            };
            self.head_logprobs(&h, targets, temperature, entropy)
        })
    }

    /// The decoder layers over `pass` with every layer's output detached (its graph freed at
    /// once); `keep` sees each layer's input.
    fn detached_layers(&self, pass: &PassInputs, mut keep: impl FnMut(&Tensor)) -> Result<Tensor> {
        let mut x = self.embed_tokens(&pass.tokens)?.detach();
        for layer in &self.layers {
            keep(&x);
            x = self.layer_forward(layer, &x, pass, None)?.detach();
        }
        Ok(x)
    }

    /// Log-probabilities of `targets` ([batch, seq] u32) under the logits at the same positions
    /// of `tokens`: out[b, j] = log p(targets[b, j] | tokens[b, ..=j]). Differentiable.
    pub fn token_logprobs(&self, tokens: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(tokens)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok(logp
            .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
            .squeeze(D::Minus1)?)
    }

    /// Log-probability of each next token of `tokens` ([batch, seq]): [batch, seq - 1], where
    /// out[b, j] = log p(tokens[b, j+1] | tokens[b, ..=j]). Differentiable.
    pub fn sequence_logprobs(&self, tokens: &Tensor) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let inputs = tokens.narrow(1, 0, t - 1)?;
        let targets = tokens.narrow(1, 1, t - 1)?;
        self.token_logprobs(&inputs, &targets)
    }

    /// An empty cache for `batch` rows with room for `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::empty(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.compute,
            &self.device,
        )
    }

    /// Feeds `tokens` (u32 [batch, t]) after the positions held in `cache`, appends their keys
    /// and values, and returns the logits of the last fed position, f32 [batch, vocab].
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        crate::on_compute_pool(|| self.forward_cached_in_pool(tokens, cache))
    }

    fn forward_cached_in_pool(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if b != cache.batch_size() {
            return Err(Error::Request(format!(
                "{b} rows of tokens for a cache of {} rows",
                cache.batch_size()
            )));
        }
        cache.reserve(t)?;
        let total = cache.len + t;
        // Mask columns: the prompts' (when rows continue shared prompts), then the rows' own.
        let (width, prompt_pads) = match cache.prompts.as_deref() {
            Some(shared) => {
                let pads = shared.of_row.iter().map(|&p| shared.cache.pad[p]).collect();
                (shared.cache.len, pads)
            }
            None => (0, vec![0; b]),
        };
        let columns = width + total;
        let mut positions = Vec::with_capacity(b);
        let mut mask = vec![0f32; b * t * columns];
        for (row, (&pad, &prompt_pad)) in cache.pad.iter().zip(&prompt_pads).enumerate() {
            let before = width - prompt_pad + cache.len - pad;
            positions.push((0..t).map(|j| before + j).collect::<Vec<_>>());
            for j in 0..t {
                let own = width + pad..=width + cache.len + j;
                for col in 0..columns {
                    if !(own.contains(&col) || (prompt_pad..width).contains(&col)) {
                        mask[(row * t + j) * columns + col] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let decode_rows = if t == 1 && self.device.is_cuda() && crate::unchecked_cuda_kernels() {
            let of_row = |row: usize| cache.prompts.as_deref().map_or(0, |s| s.of_row[row]);
            let rows: Vec<u32> = (0..b)
                .flat_map(|row| [cache.pad[row], of_row(row), prompt_pads[row]].map(|x| x as u32))
                .collect();
            Some(Tensor::from_vec(rows, (b, 3), &self.device)?)
        } else {
            None
        };
        let pass = PassInputs {
            tokens: tokens.clone(),
            rope_cs: self.rope_tables(&positions)?,
            attend: Attend::Mask(Tensor::from_vec(mask, (b, 1, 1, t, columns), &self.device)?),
            logit_rows: None,
            decode_rows,
        };
        let x = self.run_layers(&pass, Some(cache))?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let last = rms_norm(&last, &self.norm, self.config.rms_norm_eps, true)?;
        Ok(self.lm_head.forward(&last, true)?.to_dtype(DType::F32)?)
    }
}

/// What a checkpointed training pass kept: each decoder layer's input (detached) and the
/// leaf the logits were computed from.
pub struct LayerTape<'a> {
    model: &'a Transformer,
    pass: PassInputs,
    inputs: Vec<Tensor>,
    top: Var,
}

impl LayerTape<'_> {
    /// Gradients of `loss`, a scalar computed from the pass's logits, with respect to every
    /// var: the graph above the layers first, then each layer recomputed from its input (last
    /// layer first) and differentiated as the vector-Jacobian product with the gradient that
    /// reached its output, then the embedding. One layer's graph is alive at a time.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        crate::on_compute_pool(|| self.backward_in_pool(loss))
    }

    fn backward_in_pool(self, loss: &Tensor) -> Result<GradStore> {
        let model = self.model;
        let mut grads = loss.backward()?;
        let Some(mut upstream) = grads.remove(self.top.as_tensor()) else {
            return Err(Error::Request(
                "the loss does not depend on the checkpointed pass's logits".into(),
            ));
        };
        for (layer, input) in model.layers.iter().zip(&self.inputs).rev() {
            let x = Var::from_tensor(input)?;
            let out = model.layer_forward(layer, x.as_tensor(), &self.pass, None)?;
            let mut layer_grads = (out * &upstream)?.sum_all()?.backward()?;
            accumulate(&mut grads, &mut layer_grads, layer.tensors())?;
            upstream = layer_grads.remove(x.as_tensor()).ok_or_else(|| {
                Error::Request("a decoder layer's output does not depend on its input".into())
            })?;
        }
        let embedded = model.embed_tokens(&self.pass.tokens)?;
        let mut embed_grads = (embedded * &upstream)?.sum_all()?.backward()?;
        accumulate(&mut grads, &mut embed_grads, [&model.embed])?;
        Ok(grads)
    }
}

/// Moves the gradients of `tensors` from `from` into `into`, adding where `into` already holds
/// one (tied embeddings get gradients from the head and from the embedding).
fn accumulate<'t>(
    into: &mut GradStore,
    from: &mut GradStore,
    tensors: impl IntoIterator<Item = &'t Tensor>,
) -> Result<()> {
    for tensor in tensors {
        if let Some(g) = from.remove(tensor) {
            let sum = match into.remove(tensor) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            into.insert(tensor, sum);
        }
    }
    Ok(())
}
