//! spur's token choice inside mistral.rs's decoding loop.
//!
//! mistral.rs 0.8.1 returns completions as text with per-token strings, never token ids, and
//! its sampler has one engine-wide RNG and reports log10 values (for greedy decoding, the log10
//! of a raw logit). So each sequence gets a [`TokenChooser`], a mistral.rs logits processor: it
//! sees the exact logits mistral.rs computed for that sequence, draws the next token with
//! spur's sampling rules and a per-sequence seed, records token and natural-log probability, and
//! hands back logits that leave only that token, which mistral.rs's argmax then appends.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use mistralrs::CustomLogitsProcessor;
use spur_lm::{choose_token, FinishReason, SamplingParams, Tokenizer};

/// What a chooser has decided for its sequence so far.
#[derive(Debug, Default)]
pub(crate) struct Chosen {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Set once spur's rules end the sequence (EOS, stop string, length).
    pub finish: Option<FinishReason>,
}

/// Chooses the tokens of one sequence (sample `sample_index` of a request).
pub(crate) struct TokenChooser {
    prompt: Vec<u32>,
    params: SamplingParams,
    sample_index: u64,
    tokenizer: Arc<Tokenizer>,
    chosen: Mutex<Chosen>,
}

impl TokenChooser {
    pub fn new(
        prompt: Vec<u32>,
        params: SamplingParams,
        sample_index: usize,
        tokenizer: Arc<Tokenizer>,
    ) -> Self {
        TokenChooser {
            prompt,
            params,
            sample_index: sample_index as u64,
            tokenizer,
            chosen: Mutex::new(Chosen::default()),
        }
    }

    pub fn take(&self) -> Chosen {
        std::mem::take(&mut *self.chosen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies spur's end rules after `chosen.tokens` grew by one token.
    fn finish_after_push(&self, chosen: &Chosen) -> candle_core::Result<Option<FinishReason>> {
        let last = chosen.tokens[chosen.tokens.len() - 1];
        if self.tokenizer.eos_token_ids().contains(&last) {
            return Ok(Some(FinishReason::Eos));
        }
        if !self.params.stop_strings.is_empty() {
            // Only the newest token can have completed a stop string: decoding a short tail
            // suffices (a token decodes to at least one byte).
            let window = self.params.stop_strings.iter().map(String::len).max();
            let from = chosen.tokens.len().saturating_sub(window.unwrap_or(0) + 2);
            let tail = self
                .tokenizer
                .decode(&chosen.tokens[from..])
                .map_err(candle_core::Error::msg)?;
            if self.params.stop_strings.iter().any(|s| tail.contains(s)) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if chosen.tokens.len() >= self.params.max_new_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }
}

impl CustomLogitsProcessor for TokenChooser {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let mut chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let generated = context
            .strip_prefix(self.prompt.as_slice())
            .ok_or_else(|| {
                candle_core::Error::msg(
                    "mistral.rs passed a context that does not start with the prompt",
                )
            })?;
        let step = generated.len();
        if step > chosen.tokens.len() || generated != &chosen.tokens[..step] {
            candle_core::bail!(
                "mistral.rs continued with tokens {:?}, but spur chose {:?}",
                generated,
                chosen.tokens
            );
        }
        if chosen.finish.is_some() && step == chosen.tokens.len() {
            // spur's rules have ended the sequence; mistral.rs notices a stop string one token
            // later, and that extra token is discarded.
            return Ok(logits.clone());
        }
        // A repeated step (mistral.rs recomputing a sequence) replaces what came after it.
        chosen.tokens.truncate(step);
        chosen.logprobs.truncate(step);
        let values = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (token, logprob) = choose_token(&values, &self.params, || {
            uniform(self.params.seed, self.sample_index, step as u64)
        });
        chosen.tokens.push(token);
        chosen.logprobs.push(logprob);
        chosen.finish = self.finish_after_push(&chosen)?;
        let mut only = vec![f32::NEG_INFINITY; values.len()];
        only[token as usize] = 0.0;
        Tensor::from_vec(only, values.len(), logits.device())
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform draw in [0, 1) for one step of one sample: a function of (seed, sample, step)
/// alone, so a sequence's draws do not depend on what else mistral.rs batches with it.
pub(crate) fn uniform(seed: u64, sample_index: u64, step: u64) -> f64 {
    let z = mix(mix(mix(seed) ^ sample_index) ^ step);
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_with_its_log_softmax() {
        let logits = [1.0f32, 3.0, 3.0, -2.0];
        let (token, logprob) = choose_token(&logits, &params(0.0, 0, 1.0), || 0.5);
        assert_eq!(token, 1);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_restrict_and_renormalise() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        // top-k 2 keeps tokens 3 and 2; draws below their split pick 3.
        let p3 = 1.0 / (1.0 + (-1.0f64).exp());
        let (token, logprob) = choose_token(&logits, &params(1.0, 2, 1.0), || p3 - 1e-9);
        assert_eq!(token, 3);
        assert!((logprob as f64 - p3.ln()).abs() < 1e-6);
        let (token, logprob) = choose_token(&logits, &params(1.0, 2, 1.0), || p3 + 1e-9);
        assert_eq!(token, 2);
        assert!((logprob as f64 - (1.0 - p3).ln()).abs() < 1e-6);
        // A nucleus smaller than the top token's mass keeps that token alone.
        let (token, logprob) = choose_token(&logits, &params(1.0, 0, 0.1), || 0.99);
        assert_eq!((token, logprob), (3, 0.0));
    }

    #[test]
    fn draws_depend_only_on_seed_sample_and_step() {
        assert_eq!(uniform(7, 1, 3), uniform(7, 1, 3));
        let draws = [
            uniform(7, 1, 3),
            uniform(8, 1, 3),
            uniform(7, 2, 3),
            uniform(7, 1, 4),
        ];
        for (i, a) in draws.iter().enumerate() {
            assert!((0.0..1.0).contains(a));
            for b in &draws[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
