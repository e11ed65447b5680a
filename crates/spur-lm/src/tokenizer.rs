//! Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE rebuilt from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// GPT-2's split pattern, which byte-level pre-tokenizers apply when `use_regex` is on.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Turn terminators of the chat formats spur meets (ChatML/Qwen, Llama 3, Phi-3, Gemma). A
/// model that holds one as a special token ends its turn with it, whatever its config names as
/// EOS: a base model's config often names only `<|endoftext|>`, yet under a ChatML prompt (the
/// qwen-math template, or its own chat template) it closes its answer with `<|im_end|>`.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"];

/// A tokenizer with the special tokens and chat template of its model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_file(path, format!("tokenizer: {e}"))
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v["content"].as_str().map(str::to_string))
}

impl Tokenizer {
    /// Loads `tokenizer.json`, with chat template and special tokens from
    /// `tokenizer_config.json`; `config_eos` are the eos ids of the model's config.json (and
    /// generation_config.json). Generation also ends at `tokenizer_config.json`'s eos token
    /// and at an end-of-turn token of the vocabulary.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        config_eos: &[u32],
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| tok_err(tokenizer_json, e))?;
        let mut tok = Tokenizer {
            inner,
            eos_token_ids: config_eos.to_vec(),
            bos_token: None,
            eos_token: None,
            chat_template: None,
        };
        if let Some(path) = tokenizer_config {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
            tok.bos_token = token_string(&json["bos_token"]);
            tok.eos_token = token_string(&json["eos_token"]);
            tok.chat_template = match &json["chat_template"] {
                Value::String(s) => Some(s.clone()),
                // Newer files list named templates; the unnamed chat one is "default".
                Value::Array(items) => items
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str().map(str::to_string)),
                _ => None,
            };
        }
        if let Some(eos) = tok
            .eos_token
            .as_deref()
            .and_then(|t| tok.inner.token_to_id(t))
        {
            if !tok.eos_token_ids.contains(&eos) {
                tok.eos_token_ids.push(eos);
            }
        }
        if tok.eos_token.is_none() {
            tok.eos_token = tok
                .eos_token_ids
                .first()
                .and_then(|&id| tok.inner.id_to_token(id));
        }
        tok.add_end_of_turn();
        Ok(tok)
    }

    /// Adds the special end-of-turn tokens of the vocabulary (see [`END_OF_TURN`]) to the ids
    /// that end a generation.
    fn add_end_of_turn(&mut self) {
        let added = self.inner.get_added_tokens_decoder();
        for name in END_OF_TURN {
            let Some(id) = self.inner.token_to_id(name) else {
                continue;
            };
            let special = added.get(&id).is_some_and(|t| t.special);
            if special && !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
    }

    /// Rebuilds the tokenizer of a GGUF file from `tokenizer.ggml.*` metadata: a byte-level BPE
    /// with the pre-tokenizer named by `tokenizer.ggml.pre`; every token whose type is not
    /// "normal" (1) is registered as special so that it is matched whole in text.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
        let list = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| tok_err(path, format!("GGUF metadata lacks {key}")))
        };
        let id = |key: &str| {
            md.get(key).and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_u64().ok().map(|v| v as u32))
            })
        };
        let model = string("tokenizer.ggml.model").unwrap_or_default();
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!("tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\")"),
            ));
        }
        let tokens = list("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(|e| tok_err(path, e))?;
        let merges = list("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let m = v.to_string().map_err(|e| tok_err(path, e))?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(path, format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| tok_err(path, e))?
                .iter()
                .map(|t| t.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let pre = string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(path, e))?
            .into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, false, true).into(),
            // SmolLM/StarCoder: every digit on its own, then GPT-2's split.
            "smollm" | "starcoder" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, false, true).into(),
            ])
            .into(),
            "llama-bpe" | "llama3" | "dbrx" => {
                Sequence::new(vec![split(LLAMA3_SPLIT)?, ByteLevel::new(false, false, false).into()])
                    .into()
            }
            "qwen2" => {
                Sequence::new(vec![split(QWEN2_SPLIT)?, ByteLevel::new(false, false, false).into()])
                    .into()
            }
            other => {
                return Err(tok_err(
                    path,
                    format!("pre-tokenizer tokenizer.ggml.pre = {other:?} is not supported (smollm, gpt2, llama-bpe, qwen2)"),
                ))
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t != 1)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let mut tok = Tokenizer {
            inner,
            eos_token_ids: eos.into_iter().collect(),
            bos_token: name(bos),
            eos_token: name(eos),
            chat_template: string("tokenizer.chat_template"),
        };
        tok.add_end_of_turn();
        Ok(tok)
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become
    /// their ids; nothing is added (chat templates write BOS themselves where a model wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Ids that end a generation: the model's EOS ids and its end-of-turn token.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The model's own Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer (e.g. to save it as tokenizer.json).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
