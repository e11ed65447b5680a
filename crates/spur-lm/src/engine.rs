//! Generation engines: one trait, and the candle implementation that decodes batches of
//! sequences with a KV cache from the same [`Transformer`] the trainer updates.
//!
//! A second implementation (mistral.rs) can be added behind the same trait; it would report
//! through [`EngineCapabilities`] what it cannot honour (per-request seeds, natural-log
//! log-probabilities) so that callers refuse such settings up front.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::choose_tokens::choose_tokens;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;

/// How to sample one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling mass; 1 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation ends once the generated text contains one of these.
    pub stop_strings: Vec<String>,
    /// Sample i of a request draws from an RNG seeded with (seed, i) alone.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

/// One prompt to complete `n` times.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub n: usize,
    pub params: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token (it is the last of `token_ids`).
    Eos,
    /// The text reached a stop string (the tokens that completed it are kept).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// One sampled completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    /// Generated tokens, an ending EOS token included.
    pub token_ids: Vec<u32>,
    /// Natural-log probability of each token under the distribution it was drawn from
    /// (temperature, top-k and top-p applied, renormalised). For greedy decoding, where that
    /// distribution is a point mass, it is the model's plain log-softmax instead.
    pub logprobs: Vec<f32>,
    /// Decoded `token_ids`, without an ending EOS token.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// What an engine honours exactly; callers refuse settings an engine cannot honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineCapabilities {
    /// Same request seed → same tokens, whatever else is in the batch.
    pub per_request_seed: bool,
    /// `Completion::logprobs` are natural logs under the sampling distribution.
    pub natural_logprobs: bool,
}

/// A text generator over one model.
pub trait Engine {
    /// Short name used in experiment files (`candle`, later `mistralrs`).
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> EngineCapabilities;
    fn tokenizer(&self) -> &Tokenizer;
    /// Completions of all requests, ordered by (prompt_index, sample_index).
    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Completion>>;
}

/// Batched decoding with candle.
pub struct CandleEngine {
    model: Arc<Transformer>,
    tokenizer: Arc<Tokenizer>,
    max_batch: usize,
}

/// Per-sequence random numbers: SplitMix64, seeded from (request seed, sample index) only,
/// so a sequence's draws do not depend on which other sequences share its batch.
struct SeqRng(u64);

impl SeqRng {
    fn new(seed: u64, sample_index: u64) -> Self {
        let mut rng = SeqRng(seed ^ 0x5350_5552_5f4c_4d00);
        let mixed = rng.next_u64() ^ sample_index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        SeqRng(mixed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from `logits` with spur's sampling rules; `draw` gives the uniform
/// number in [0, 1) (called only when sampling, not for greedy decoding). Returns the token
/// with its log-probability (see [`Completion::logprobs`]). Every engine chooses tokens here,
/// so their seeds and log-probs mean the same thing.
pub fn choose_token(
    logits: &[f32],
    params: &SamplingParams,
    draw: impl FnOnce() -> f64,
) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if params.temperature == 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
        let log_z = logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
        return (best as u32, (logits[best] as f64 - max - log_z) as f32);
    }
    let t = params.temperature;
    let mut cands: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .collect();
    // Larger weight first; ties broken by token id so that the order is deterministic.
    let desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && params.top_k < cands.len() {
        cands.select_nth_unstable_by(params.top_k - 1, desc);
        cands.truncate(params.top_k);
    }
    if params.top_p < 1.0 {
        let total: f64 = cands.iter().map(|c| c.1).sum();
        // The nucleus is usually small: sort only the top few unless they fall short.
        let head = cands.len().min(64);
        if head < cands.len() {
            cands.select_nth_unstable_by(head - 1, desc);
        }
        let head_mass: f64 = cands[..head].iter().map(|c| c.1).sum();
        if head_mass >= params.top_p * total {
            cands.truncate(head);
        }
        cands.sort_unstable_by(desc);
        let mut acc = 0.0;
        let mut keep = cands.len();
        for (i, c) in cands.iter().enumerate() {
            acc += c.1;
            if acc >= params.top_p * total {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep);
    }
    let kept: f64 = cands.iter().map(|c| c.1).sum();
    let target = draw() * kept;
    let mut acc = 0.0;
    let mut chosen = cands[cands.len() - 1];
    for &c in &cands {
        acc += c.1;
        if acc > target {
            chosen = c;
            break;
        }
    }
    (chosen.0, (chosen.1 / kept).ln() as f32)
}

/// Checks requests against the sampling rules and `config` (context length, vocabulary);
/// the error names the first bad request.
pub fn validate_requests(requests: &[GenerationRequest], config: &ModelConfig) -> Result<()> {
    let context = config.max_position_embeddings;
    for (i, r) in requests.iter().enumerate() {
        let p = &r.params;
        let problem = if r.prompt_ids.is_empty() {
            Some("the prompt is empty".to_string())
        } else if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            Some(format!(
                "temperature {} must be finite and >= 0",
                p.temperature
            ))
        } else if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            Some(format!("top_p {} must be in (0, 1]", p.top_p))
        } else if p.max_new_tokens == 0 {
            Some("max_new_tokens must be at least 1".to_string())
        } else if r.prompt_ids.len() + p.max_new_tokens > context {
            Some(format!(
                "{} prompt tokens + {} new tokens exceed the model's context of {context}",
                r.prompt_ids.len(),
                p.max_new_tokens
            ))
        } else {
            r.prompt_ids
                .iter()
                .find(|&&t| t as usize >= config.vocab_size)
                .map(|t| format!("token id {t} is outside the vocabulary"))
        };
        if let Some(problem) = problem {
            return Err(Error::Request(format!("request {i}: {problem}")));
        }
    }
    Ok(())
}

/// One sequence being generated.
struct Sequence {
    prompt_index: usize,
    sample_index: usize,
    rng: SeqRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// Appends a sampled token and decides whether the sequence is finished.
    fn push(
        &mut self,
        token: u32,
        logprob: f32,
        params: &SamplingParams,
        tokenizer: &Tokenizer,
        stop_window: usize,
    ) -> Result<()> {
        self.tokens.push(token);
        self.logprobs.push(logprob);
        if tokenizer.eos_token_ids().contains(&token) {
            self.finish = Some(FinishReason::Eos);
        } else if !params.stop_strings.is_empty() && {
            // A stop string can only have been completed by the newest token, so the text of
            // the last few tokens suffices.
            let from = self.tokens.len().saturating_sub(stop_window);
            let tail = tokenizer.decode(&self.tokens[from..])?;
            params
                .stop_strings
                .iter()
                .any(|s| tail.contains(s.as_str()))
        } {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= params.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        Ok(())
    }
}

/// Whether a decode step's tokens are chosen where its `logits` are, without copying them to
/// the host: on CUDA with `SPUR_CUDA_KERNELS=1` (the kernel is unchecked), when no active
/// request truncates its distribution (top-k, top-p), as the paper's sampling does not.
fn chooses_on_device<'a>(
    logits: &Tensor,
    active: &'a [Sequence],
    params: impl Fn(&'a Sequence) -> &'a SamplingParams,
) -> bool {
    logits.device().is_cuda()
        && crate::unchecked_cuda_kernels()
        && active.iter().all(|q| {
            let p = params(q);
            p.top_k == 0 && p.top_p >= 1.0
        })
}

/// How many trailing tokens can hold a stop string of `params` (decoded after each token).
fn stop_window(params: &SamplingParams) -> usize {
    params
        .stop_strings
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(0)
        + 2
}

/// The sequences waiting for a row, in (prompt, sample) order, and the prefilled caches of the
/// prompts they start from: each prompt is prefilled once, when its first sample starts.
struct Queue<'a, I: Iterator<Item = (usize, usize)>> {
    requests: &'a [GenerationRequest],
    model: &'a Transformer,
    tokenizer: &'a Tokenizer,
    waiting: std::iter::Peekable<I>,
    prefills: HashMap<usize, (KvCache, Vec<f32>)>,
}

impl<I: Iterator<Item = (usize, usize)>> Queue<'_, I> {
    /// The next waiting sequence, with its first token sampled from its prompt's logits. One
    /// that ends on that token (an EOS, a one-token cap) goes to `done` and the next is taken.
    fn next(&mut self, done: &mut Vec<Sequence>) -> Result<Option<Sequence>> {
        for (p, s) in self.waiting.by_ref() {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.prefills.entry(p) {
                slot.insert(CandleEngine::prefill(
                    self.model,
                    &self.requests[p].prompt_ids,
                )?);
            }
            let params = &self.requests[p].params;
            let mut seq = Sequence {
                prompt_index: p,
                sample_index: s,
                rng: SeqRng::new(params.seed, s as u64),
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: None,
            };
            let (token, logprob) =
                choose_token(&self.prefills[&p].1, params, || seq.rng.next_f64());
            seq.push(token, logprob, params, self.tokenizer, stop_window(params))?;
            if seq.finish.is_none() {
                return Ok(Some(seq));
            }
            done.push(seq);
        }
        Ok(None)
    }

    /// The prefilled cache of a started sequence's prompt (until [`Queue::forget_started`]).
    fn prompt(&self, seq: &Sequence) -> &KvCache {
        &self.prefills[&seq.prompt_index].0
    }

    /// Drops the prefills no waiting sequence starts from: sequences start in prompt order,
    /// so only the next one's prompt is still needed.
    fn forget_started(&mut self) {
        let next = self.waiting.peek().map(|&(p, _)| p);
        self.prefills.retain(|&p, _| Some(p) == next);
    }
}

impl CandleEngine {
    /// Sequences decoded together unless [`CandleEngine::with_max_batch`] says otherwise.
    pub const DEFAULT_MAX_BATCH: usize = 32;

    /// An engine over `model`. Sharing the `Arc` with a trainer means each generation uses
    /// the weights as they are at that moment, with no copy.
    pub fn new(model: Arc<Transformer>, tokenizer: Arc<Tokenizer>) -> Self {
        CandleEngine {
            model,
            tokenizer,
            max_batch: Self::DEFAULT_MAX_BATCH,
        }
    }

    /// Most sequences decoded together; bounds KV-cache memory.
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    pub fn model(&self) -> &Arc<Transformer> {
        &self.model
    }

    /// Runs the prompt once; returns its cache and the logits of its last position.
    fn prefill(model: &Transformer, prompt: &[u32]) -> Result<(KvCache, Vec<f32>)> {
        let mut cache = model.new_cache(1, prompt.len())?;
        let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
        let logits = model.forward_cached(&input, &mut cache)?;
        let logits = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((cache, logits))
    }
}

impl Engine for CandleEngine {
    fn name(&self) -> &'static str {
        "candle"
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

    fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Completion>> {
        crate::on_compute_pool(|| self.generate_in_pool(requests))
    }
}

impl CandleEngine {
    fn generate_in_pool(&self, requests: &[GenerationRequest]) -> Result<Vec<Completion>> {
        validate_requests(requests, self.model.config())?;
        // A bf16 policy decodes from one bf16 copy of its current weights per call.
        let copy = self.model.decoding_copy()?;
        let model: &Transformer = copy.as_ref().unwrap_or(&self.model);
        let tokenizer = &*self.tokenizer;
        let order: Vec<(usize, usize)> = requests
            .iter()
            .enumerate()
            .flat_map(|(p, r)| (0..r.n).map(move |s| (p, s)))
            .collect();
        // Continuous batching: up to `max_batch` sequences decode together, and a finished
        // sequence's row goes to the next waiting one, so the batch stays full while any
        // wait. With no more sequences than `max_batch`, nothing joins later.
        let mut queue = Queue {
            requests,
            model,
            tokenizer,
            waiting: order.into_iter().peekable(),
            prefills: HashMap::new(),
        };
        let mut done: Vec<Sequence> = Vec::new();
        let mut active: Vec<Sequence> = Vec::new();
        while active.len() < self.max_batch {
            match queue.next(&mut done)? {
                Some(q) => active.push(q),
                None => break,
            }
        }
        if !active.is_empty() {
            // Rows continue their prompt's prefill, each prompt held once.
            let rows: Vec<(usize, &KvCache)> = (active.iter())
                .map(|q| (q.prompt_index, queue.prompt(q)))
                .collect();
            let mut cache = KvCache::continuing(&rows, 64)?;
            queue.forget_started();
            while !active.is_empty() {
                let last: Vec<u32> = active
                    .iter()
                    .map(|q| q.tokens[q.tokens.len() - 1])
                    .collect();
                let input = Tensor::new(last, model.device())?.unsqueeze(1)?;
                let logits = model.forward_cached(&input, &mut cache)?;
                // Each sequence's uniform draw, from its own stream (greedy choices ignore
                // it).
                let draws: Vec<f64> = active.iter_mut().map(|q| q.rng.next_f64()).collect();
                let params = |q: &Sequence| &requests[q.prompt_index].params;
                let choices: Vec<(u32, f32)> = if chooses_on_device(&logits, &active, params) {
                    let temperatures: Vec<f64> =
                        active.iter().map(|q| params(q).temperature).collect();
                    choose_tokens(&logits, &draws, &temperatures)?
                } else {
                    // The softmaxes over the vocabulary on the host, in parallel: on one
                    // thread they cost a tenth of a batch-64 step.
                    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                    (active.par_iter().zip(&logits).zip(draws))
                        .map(|((q, row), draw)| choose_token(row, params(q), || draw))
                        .collect()
                };
                for (q, (token, logprob)) in active.iter_mut().zip(choices) {
                    let params = &requests[q.prompt_index].params;
                    q.push(token, logprob, params, tokenizer, stop_window(params))?;
                }
                if active.iter().all(|q| q.finish.is_none()) {
                    continue;
                }
                // Finished rows go to waiting sequences while any wait; the rest leave.
                let mut keep = Vec::with_capacity(active.len());
                for (r, row) in active.iter_mut().enumerate() {
                    if row.finish.is_some() {
                        let Some(next) = queue.next(&mut done)? else {
                            continue;
                        };
                        cache.restart_row(r, next.prompt_index, queue.prompt(&next))?;
                        done.push(std::mem::replace(row, next));
                    }
                    keep.push(r);
                }
                queue.forget_started();
                if keep.len() < active.len() {
                    // Rows that took a waiting sequence hold an unfinished one now.
                    let (running, finished): (Vec<_>, Vec<_>) = std::mem::take(&mut active)
                        .into_iter()
                        .partition(|q| q.finish.is_none());
                    done.extend(finished);
                    active = running;
                    if !active.is_empty() {
                        cache.retain_rows(&keep)?;
                    }
                }
            }
        }
        done.sort_by_key(|q| (q.prompt_index, q.sample_index));
        done.into_iter()
            .map(|seq| {
                let text_ids = match seq.finish {
                    Some(FinishReason::Eos) => &seq.tokens[..seq.tokens.len() - 1],
                    _ => &seq.tokens[..],
                };
                Ok(Completion {
                    prompt_index: seq.prompt_index,
                    sample_index: seq.sample_index,
                    text: tokenizer.decode(text_ids)?,
                    token_ids: seq.tokens,
                    logprobs: seq.logprobs,
                    finish_reason: seq.finish.unwrap_or(FinishReason::Length),
                })
            })
            .collect()
    }
}
