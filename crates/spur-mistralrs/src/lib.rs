//! spur-mistralrs: the mistral.rs 0.8.1 generation engine behind spur's
//! [`Engine`](spur_lm::Engine) trait, for evaluating a fixed checkpoint.
//!
//! [`MistralRsEngine::load`] reads the same local files as spur's candle engine (a GGUF file
//! or a Hugging Face checkpoint folder), with no network and no hub token. mistral.rs runs the
//! forward passes, the KV cache and the batching of concurrent requests; spur feeds it its own
//! token ids and chooses every token itself.
//!
//! # What it honours
//! - **Identical inputs.** Prompts go in as spur's token ids (mistral.rs's `CompletionTokens`
//!   requests), so mistral.rs's own tokenizer (for GGUF files it ignores
//!   `tokenizer.ggml.pre`) never encodes a prompt.
//! - **Token choice, seeds and log-probs.** mistral.rs 0.8.1 returns completions as text
//!   without token ids; its sampler has one engine-wide RNG (seeded 0), reports log10
//!   probabilities before top-k/top-p renormalisation, and for greedy decoding the log10 of a
//!   raw logit. None of that is used: a logits processor per sequence sees the exact logits
//!   mistral.rs computed, draws the token with spur's rules (temperature, top-k, top-p) from a
//!   random stream that depends only on (request seed, sample index, step), records the token
//!   and its natural-log probability under the sampling distribution (the plain log-softmax for
//!   greedy decoding, as in the candle engine), and leaves mistral.rs only that token to take.
//!   So [`EngineCapabilities`] reports per-request seeds and natural log-probs as honoured. The
//!   same seed gives the same tokens whatever else is batched, up to float rounding: batching
//!   changes the shapes of mistral.rs's matrix products, and a last-bit change in the logits
//!   flips a token only when a draw lands on a boundary (greedy: at a near-tie). The random
//!   stream differs from the candle engine's, so seeded samples are not the candle engine's.
//! - **Ends.** EOS tokens (spur's tokenizer), stop strings and `max_new_tokens` end a
//!   completion exactly as in the candle engine: `token_ids` keep an ending EOS token, `text`
//!   drops it, a stop string keeps the tokens that completed it. If mistral.rs ends a sequence
//!   on a token that its own metadata (generation config, chat template) calls end-of-sequence
//!   but spur's tokenizer does not, the completion ends there with [`FinishReason::Eos`].
//!
//! # What it does not do
//! - OLMo2 (mistral.rs has no OLMo2 model): loading one fails with a clear error.
//! - Weight updates: mistral.rs keeps its own copy of the weights; new weights mean writing a
//!   checkpoint and loading a new engine. The trainer's rollouts use the candle engine.
//! - Hugging Face `config.json` files must be complete (mistral.rs requires `hidden_act`).
//!
//! # Runtime
//! mistral.rs runs its scheduler on a thread of its own; the engine keeps a small
//! current-thread tokio runtime to talk to it, so [`Engine::generate`] blocks and must not be
//! called from inside an async runtime. CPU matrix products run on the rayon/gemm thread
//! pools (`RAYON_NUM_THREADS`). On CPU activations are f32 (mistral.rs's GGUF builder would
//! choose f16); other devices use mistral.rs's automatic dtype (bf16 on an H100) and its paged
//! attention, with KV blocks for [`MistralRsOptions::kv_tokens_per_sequence`] tokens per
//! sequence.

mod choose;
mod error;

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mistralrs::core::{
    GGUFLoaderBuilder, GGUFSpecificConfig, Loader, MistralRsBuilder, NormalLoaderBuilder,
    NormalSpecificConfig, RequestMessage,
};
use mistralrs::{
    Constraint, CustomLogitsProcessor, DefaultSchedulerMethod, DeviceMapSetting, MemoryGpuConfig,
    ModelDType, NormalRequest, PagedAttentionConfig, PagedCacheType, Request, Response,
    SchedulerConfig, StopTokens, TokenSource,
};
use spur_lm::engine::{Completion, Engine, EngineCapabilities, FinishReason, GenerationRequest};
use spur_lm::{Architecture, Device, ModelConfig, ModelFiles, Tokenizer};

use crate::choose::{Chosen, TokenChooser};
pub use crate::error::Error;

/// How to run mistral.rs.
#[derive(Clone, Debug)]
pub struct MistralRsOptions {
    /// Where the model runs (CPU by default; a CUDA device with the `cuda` feature).
    pub device: Device,
    /// Most sequences mistral.rs decodes together. Default 1: mistral.rs 0.8.1's batched
    /// decoding of sequences of different lengths was measured wrong on the CPU (greedy
    /// continuations of 50 MATH-500 prompts split from spur's with a median gap of 5.8 nats at
    /// 32, against near-ties only at 1, which was also twice as fast); on a GPU mistral.rs
    /// computes in bf16, whose rounding hides whether batching is right (docs/cuda.md).
    pub max_num_seqs: usize,
    /// On CUDA, paged attention's KV-cache blocks hold `max_num_seqs` times this many tokens
    /// (default 4096: a 1024-token prompt and a 3072-token response, the paper's limits).
    pub kv_tokens_per_sequence: usize,
}

impl Default for MistralRsOptions {
    fn default() -> Self {
        MistralRsOptions {
            device: Device::Cpu,
            max_num_seqs: 1,
            kv_tokens_per_sequence: 4096,
        }
    }
}

/// Generation with mistral.rs over one loaded model.
pub struct MistralRsEngine {
    model: mistralrs::Model,
    runtime: tokio::runtime::Runtime,
    tokenizer: Arc<Tokenizer>,
    config: ModelConfig,
    max_num_seqs: usize,
    next_id: AtomicUsize,
}

impl MistralRsEngine {
    /// Loads `files` into mistral.rs. `tokenizer` must be spur's tokenizer of the same files
    /// (e.g. from [`spur_lm::load_files`]): it decides EOS, stop strings and the returned text.
    /// Loading reads the whole model (about 3 s for the default SmolLM2 on this 2-core CPU).
    pub fn load(
        files: &ModelFiles,
        tokenizer: Arc<Tokenizer>,
        options: &MistralRsOptions,
    ) -> Result<Self, Error> {
        let max_num_seqs = NonZeroUsize::new(options.max_num_seqs).ok_or(Error::NoSequences)?;
        let (loader, origin, config) = match files {
            ModelFiles::Gguf { path } => gguf_loader(path)?,
            ModelFiles::HuggingFace {
                config, tokenizer, ..
            } => hf_loader(config, tokenizer)?,
        };
        if config.architecture == Architecture::Olmo2 {
            return Err(Error::UnsupportedArchitecture {
                path: origin,
                arch: config.architecture.name().to_string(),
            });
        }
        // mistral.rs's GGUF path picks f16 activations on CPU; f32 is faster there and
        // matches spur's candle engine.
        let dtype = if options.device.is_cpu() {
            ModelDType::F32
        } else {
            ModelDType::Auto
        };
        // On CUDA, paged attention: without it mistral.rs joins and splits every sequence's KV
        // cache at each step (on an H100, batch 1 went from 86 to 154 tok/s with it).
        let paged_attention = (cfg!(feature = "cuda") && !options.device.is_cpu())
            .then(|| {
                let tokens = max_num_seqs.get() * options.kv_tokens_per_sequence;
                PagedAttentionConfig::new(
                    None,
                    MemoryGpuConfig::ContextSize(tokens),
                    PagedCacheType::Auto,
                )
            })
            .transpose()
            .map_err(|e| Error::Load {
                path: origin.clone(),
                message: format!("paged attention: {e:#}"),
            })?;
        let pipeline = loader
            .load_model_from_hf(
                None,
                TokenSource::None,
                &dtype,
                &options.device,
                true,
                DeviceMapSetting::dummy(),
                None,
                paged_attention,
            )
            .map_err(|e| Error::Load {
                path: origin.clone(),
                message: format!("{e:#}"),
            })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        // A pipeline loaded with paged attention carries its KV-cache layout.
        let cache_config =
            runtime.block_on(async { pipeline.lock().await.get_metadata().cache_config.clone() });
        let scheduler = match cache_config {
            Some(config) => SchedulerConfig::PagedAttentionMeta {
                max_num_seqs: max_num_seqs.get(),
                config,
            },
            None => SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(max_num_seqs),
            },
        };
        // No prefix cache: it handed a later sequence a context that was not its prompt
        // (measured: the 33rd of 50 MATH-500 prompts, all sharing the chat template's
        // prefix), and it would make a request's numbers depend on what ran before it.
        let runner = runtime.block_on(
            MistralRsBuilder::new(pipeline, scheduler, false, None)
                .with_no_prefix_cache(true)
                .build(),
        );
        Ok(MistralRsEngine {
            model: mistralrs::Model::new(runner),
            runtime,
            tokenizer,
            config,
            max_num_seqs: max_num_seqs.get(),
            next_id: AtomicUsize::new(0),
        })
    }

    /// mistral.rs's own tokenization of `text` (special tokens written in the text matched,
    /// nothing added, like [`Tokenizer::encode`]). Generation never uses it; it shows whether
    /// mistral.rs's tokenizer agrees with spur's (for GGUF files it ignores
    /// `tokenizer.ggml.pre`).
    pub fn mistralrs_tokenize(&self, text: &str) -> spur_lm::Result<Vec<u32>> {
        let text = either::Either::Right(text.to_string());
        self.runtime
            .block_on(self.model.tokenize(text, None, false, false, None))
            .map_err(|e| engine_failure(format!("tokenizing failed: {e}")))
    }

    /// The request for one sample; the chooser decides its tokens.
    fn request(
        &self,
        prompt: &GenerationRequest,
        chooser: Arc<TokenChooser>,
        response: tokio::sync::mpsc::Sender<Response>,
    ) -> Request {
        let params = &prompt.params;
        // The chooser leaves one token with a finite logit, so greedy is exact; stop strings
        // are also given to mistral.rs so that it stops decoding (spur decides where).
        let sampling_params = mistralrs::SamplingParams {
            temperature: Some(0.0),
            max_len: Some(params.max_new_tokens),
            stop_toks: (!params.stop_strings.is_empty())
                .then(|| StopTokens::Seqs(params.stop_strings.clone())),
            n_choices: 1,
            ..mistralrs::SamplingParams::neutral()
        };
        Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt.prompt_ids.clone()),
            sampling_params,
            response,
            return_logprobs: false,
            is_streaming: false,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![chooser as Arc<dyn CustomLogitsProcessor>]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }))
    }

    /// Turns what the chooser recorded, and how mistral.rs ended, into a completion.
    fn completion(
        &self,
        prompt_index: usize,
        sample_index: usize,
        chosen: Chosen,
        mistralrs_reason: &str,
    ) -> spur_lm::Result<Completion> {
        let finish = match (chosen.finish, mistralrs_reason) {
            (Some(finish), _) => finish,
            // mistral.rs stopped on a token its metadata calls end-of-sequence.
            (None, "stop") if !chosen.tokens.is_empty() => FinishReason::Eos,
            (None, reason) => {
                return Err(engine_failure(format!(
                    "prompt {prompt_index} sample {sample_index}: mistral.rs ended with \
                     {reason:?} after {} tokens, before spur's end rules applied",
                    chosen.tokens.len()
                )))
            }
        };
        let text_ids = match finish {
            FinishReason::Eos => &chosen.tokens[..chosen.tokens.len() - 1],
            _ => &chosen.tokens[..],
        };
        Ok(Completion {
            prompt_index,
            sample_index,
            text: self.tokenizer.decode(text_ids)?,
            token_ids: chosen.tokens,
            logprobs: chosen.logprobs,
            finish_reason: finish,
        })
    }
}

impl Engine for MistralRsEngine {
    fn name(&self) -> &'static str {
        "mistralrs"
    }

    fn capabilities(&self) -> EngineCapabilities {
        EngineCapabilities {
            per_request_seed: true,
            natural_logprobs: true,
        }
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn generate(&self, requests: &[GenerationRequest]) -> spur_lm::Result<Vec<Completion>> {
        spur_lm::validate_requests(requests, &self.config)?;
        let sender = self
            .model
            .inner()
            .get_sender(None)
            .map_err(|e| engine_failure(format!("no engine to send requests to: {e:?}")))?;
        self.runtime.block_on(async {
            // At most `max_num_seqs` sequences are in flight: mistral.rs batches them, and with
            // more queued (waiting in its scheduler) it was measured to return wrong tokens.
            let order: Vec<(usize, usize)> = requests
                .iter()
                .enumerate()
                .flat_map(|(p, r)| (0..r.n).map(move |s| (p, s)))
                .collect();
            let mut in_flight = std::collections::VecDeque::new();
            let mut next = 0;
            let mut completions = Vec::with_capacity(order.len());
            while completions.len() < order.len() {
                while next < order.len() && in_flight.len() < self.max_num_seqs {
                    let (p, s) = order[next];
                    let r = &requests[p];
                    let chooser = Arc::new(TokenChooser::new(
                        r.prompt_ids.clone(),
                        r.params.clone(),
                        s,
                        self.tokenizer.clone(),
                    ));
                    // Answers are read in request order. With one slot per channel, a
                    // 50-prompt run whose 33rd sequence failed stalled instead of reporting
                    // the failure (mistral.rs's engine awaits each send); with eight it was
                    // reported.
                    let (tx, rx) = tokio::sync::mpsc::channel(8);
                    sender
                        .send(self.request(r, chooser.clone(), tx))
                        .await
                        .map_err(|_| engine_failure("the mistral.rs engine has stopped".into()))?;
                    in_flight.push_back((p, s, chooser, rx));
                    next += 1;
                }
                let Some((p, s, chooser, mut rx)) = in_flight.pop_front() else {
                    break;
                };
                let response = rx.recv().await.ok_or_else(|| {
                    engine_failure(format!("prompt {p} sample {s}: mistral.rs sent no answer"))
                })?;
                let reason = match response {
                    Response::CompletionDone(done) => match done.choices.into_iter().next() {
                        Some(choice) => choice.finish_reason,
                        None => {
                            return Err(engine_failure(format!(
                                "prompt {p} sample {s}: mistral.rs answered without a completion"
                            )))
                        }
                    },
                    Response::InternalError(e) | Response::ValidationError(e) => {
                        return Err(engine_failure(format!("prompt {p} sample {s}: {e}")))
                    }
                    Response::CompletionModelError(e, _) | Response::ModelError(e, _) => {
                        return Err(engine_failure(format!("prompt {p} sample {s}: {e}")))
                    }
                    _ => {
                        return Err(engine_failure(format!(
                            "prompt {p} sample {s}: mistral.rs sent an answer of another kind"
                        )))
                    }
                };
                completions.push(self.completion(p, s, chooser.take(), &reason)?);
            }
            Ok(completions)
        })
    }
}

fn engine_failure(message: String) -> spur_lm::Error {
    spur_lm::Error::Candle(candle_core::Error::msg(format!("mistral.rs: {message}")))
}

/// mistral.rs reads a GGUF as (folder, file names); with no tokenizer model id it takes the
/// tokenizer and chat template from the GGUF metadata and touches no hub.
fn gguf_loader(path: &Path) -> Result<(Box<dyn Loader>, std::path::PathBuf, ModelConfig), Error> {
    let gguf = spur_lm::weights::GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&gguf.content, path)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Load {
            path: path.to_path_buf(),
            message: "the file name is not valid UTF-8".into(),
        })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let loader = GGUFLoaderBuilder::new(
        None,
        None,
        dir.to_string_lossy().into_owned(),
        vec![name.to_string()],
        GGUFSpecificConfig { topology: None },
        false,
        None,
    )
    .build();
    Ok((loader, path.to_path_buf(), config))
}

/// A Hugging Face checkpoint is read from its folder; the architecture comes from config.json.
fn hf_loader(
    config_path: &Path,
    tokenizer_path: &Path,
) -> Result<(Box<dyn Loader>, std::path::PathBuf, ModelConfig), Error> {
    let config = ModelConfig::from_hf_json(config_path)?;
    let dir = config_path.parent().unwrap_or(Path::new("."));
    let loader = NormalLoaderBuilder::new(
        NormalSpecificConfig::default(),
        None,
        Some(tokenizer_path.to_string_lossy().into_owned()),
        Some(dir.to_string_lossy().into_owned()),
        false,
        None,
    )
    .build(None)
    .map_err(|e| Error::Load {
        path: config_path.to_path_buf(),
        message: format!("{e:#}"),
    })?;
    Ok((loader, config_path.to_path_buf(), config))
}
