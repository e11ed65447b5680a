//! Reading weight files: safetensors (f32/f16/bf16) and GGUF (any quantisation candle reads).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::model::parameter_shapes;

/// Loads the tensors the model needs from one or many safetensors files, as f32.
pub fn read_safetensors(
    paths: &[PathBuf],
    config: &ModelConfig,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let wanted: HashSet<String> = parameter_shapes(config)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut out = HashMap::new();
    for path in paths {
        // SAFETY: the file is mapped read-only; spur does not modify weight files while a
        // model is loading.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                Error::bad_file(
                    path,
                    format!("not a readable safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
        for (name, view) in st.tensors() {
            if !wanted.contains(&name) {
                continue;
            }
            let dtype = view.dtype();
            use safetensors::Dtype as S;
            if !matches!(dtype, S::F32 | S::F16 | S::BF16) {
                return Err(Error::UnsupportedDtype {
                    path: path.clone(),
                    tensor: name,
                    dtype: format!("{dtype:?}"),
                });
            }
            let t = st
                .load(&name, device)
                .map_err(|e| Error::bad_file(path, format!("tensor {name}: {e}")))?;
            out.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(out)
}

/// An opened GGUF file whose header has been read and whose size has been checked.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            Error::bad_file(
                path,
                format!("not a readable GGUF file (truncated or corrupt?): {e}"),
            )
        })?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > size {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "truncated: tensor {name} needs bytes up to {end} but the file has {size}"
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    fn qtensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor {name}: {e}")))
    }

    /// All tensors, quantised as stored, keyed by GGUF name.
    pub fn qtensors(&mut self, device: &Device) -> Result<HashMap<String, QTensor>> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut out = HashMap::new();
        for name in names {
            let t = self.qtensor(&name, device)?;
            out.insert(name, t);
        }
        Ok(out)
    }

    /// All model tensors dequantised to f32 and keyed by Hugging Face name. Llama q/k rows are
    /// put back from llama.cpp's interleaved order into Hugging Face order.
    pub fn dequantized_hf_tensors(
        &mut self,
        config: &ModelConfig,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut out = HashMap::new();
        for name in names {
            let Some(hf) = gguf_to_hf_name(&name, config.architecture) else {
                continue;
            };
            let mut t = self.qtensor(&name, device)?.dequantize(device)?;
            if config.architecture == Architecture::Llama {
                if hf.ends_with("q_proj.weight") {
                    t = unpermute_rows(&t, config.num_attention_heads)?;
                } else if hf.ends_with("k_proj.weight") {
                    t = unpermute_rows(&t, config.num_key_value_heads)?;
                }
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

/// Inverse of llama.cpp's converter permutation of q/k rows: per head, rows are stored as
/// (pair, 2) and Hugging Face keeps them as (2, pair).
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let per_head = rows / heads;
    Ok(w.reshape((heads, per_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn gguf_to_hf_name(name: &str, arch: Architecture) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (index, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf_part = match (part, arch) {
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", Architecture::Olmo2) => "post_attention_layernorm",
        ("post_ffw_norm", Architecture::Olmo2) => "post_feedforward_layernorm",
        ("attn_q_norm", Architecture::Olmo2) => "self_attn.q_norm",
        ("attn_k_norm", Architecture::Olmo2) => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{index}.{hf_part}.{kind}"))
}
