//! The policy probe: a fixed yardstick for what GRPO does to a policy's own habits.
//!
//! The `probe` stage runs once per model (step 0): it takes the first prompts of a dataset and
//! the base model's greedy response to each, its mode. Every update then [`measure`]s its new
//! weights against that reference: the policy's entropy, the log-probability it gives the
//! base model's mode, and how often its samples begin the way the mode begins. These are the
//! quantities of the paper's clipping argument (clipping concentrates the policy on modes it
//! already rates highly), measured on the same prompts and sampling seeds in every run, so runs
//! differ only by their weights.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use spur_core::node_params::ProbeNodeParams;
use spur_lm::{CandleEngine, Engine, GenerationRequest, SamplingParams, Tokenizer, Transformer};
use spur_plan::StageKind;
use spur_rl::Tempered;

use crate::model::{self, failed};
use crate::{data, NodeContext, Resource, Stage, StageError};

pub const PROBE_FILE: &str = "probe.json";

/// Sequences scored per forward pass: logits are `[tokens, vocab]`, so this bounds their size.
const SCORING_CHUNK: usize = 8;

/// How the probe samples; the same at step 0 and after every update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    pub samples: usize,
    pub max_tokens: usize,
    pub opening_tokens: usize,
    pub seed: u64,
    /// The rollouts' sampling distribution: the policy GRPO trains.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub stop_strings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbePrompt {
    /// Row of the problem in the dataset file.
    pub index: usize,
    pub prompt_ids: Vec<u32>,
    /// The base model's greedy response (an ending EOS token included).
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
}

/// What the `probe` node writes: the settings and the base model's modes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeReference {
    pub settings: ProbeSettings,
    pub prompts: Vec<ProbePrompt>,
}

/// One measurement of a policy against a [`ProbeReference`]. Entropies are in nats per token,
/// of the policy at the sampling temperature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeMetrics {
    pub prompts: usize,
    pub samples: usize,
    /// Mean entropy over the tokens of the policy's own samples: the policy's entropy.
    pub entropy: f64,
    /// Mean entropy over the tokens of the base model's greedy responses.
    pub greedy_entropy: f64,
    /// Mean log-prob per token of the base model's greedy responses.
    pub greedy_logprob: f64,
    /// Mean over prompts of the greedy response's whole log-prob.
    pub greedy_sequence_logprob: f64,
    /// Share of samples that begin with the greedy response's first `opening_tokens` tokens.
    pub opening_repeat: f64,
    /// Share of samples identical to the greedy response.
    pub greedy_repeat: f64,
    /// Mean sample length in tokens.
    pub response_length: f64,
}

/// Whether `sample` begins as `greedy` does: its first `opening` tokens, or all of a shorter
/// greedy response.
pub fn repeats_opening(sample: &[u32], greedy: &[u32], opening: usize) -> bool {
    let k = opening.min(greedy.len());
    sample.len() >= k && sample[..k] == greedy[..k]
}

/// Per-sequence sums of log-probs and entropies, and token counts, in chunks.
fn score(
    model: &Transformer,
    temperature: f64,
    seqs: &[(&[u32], &[u32])],
) -> Result<Vec<(f64, f64, usize)>, StageError> {
    // Greedy sampling (T = 0) trains the policy at T = 1, as the trainer scores it.
    let t = if temperature == 0.0 { 1.0 } else { temperature };
    let policy = Tempered::new(model, t);
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(SCORING_CHUNK) {
        let scored = spur_rl::scoring_logprobs_entropy(&policy, chunk).map_err(failed)?;
        let rows = |t: &spur_lm::Tensor| -> Result<Vec<Vec<f32>>, StageError> {
            t.to_dtype(spur_lm::DType::F32)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(failed)
        };
        let logprobs = rows(&scored.logprobs)?;
        let entropy = scored
            .entropy
            .as_ref()
            .ok_or_else(|| failed("the scoring pass returned no entropy"))?;
        let entropy = rows(entropy)?;
        for ((_, completion), (lp, h)) in chunk.iter().zip(logprobs.iter().zip(&entropy)) {
            let n = completion.len();
            let sum = |row: &[f32]| row[..n].iter().map(|&x| f64::from(x)).sum::<f64>();
            out.push((sum(lp), sum(h), n));
        }
    }
    Ok(out)
}

/// The probe's metrics for `model` (the policy after `step` updates; 0 for the base model).
pub fn measure(
    model: &Arc<Transformer>,
    tokenizer: &Arc<Tokenizer>,
    reference: &ProbeReference,
    step: u64,
) -> Result<ProbeMetrics, StageError> {
    let s = &reference.settings;
    let prompts = &reference.prompts;
    if prompts.is_empty() {
        return Err(failed("the probe has no prompts"));
    }
    let engine = CandleEngine::new(model.clone(), tokenizer.clone());
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p.prompt_ids.clone(),
            n: s.samples,
            params: SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                max_new_tokens: s.max_tokens,
                stop_strings: s.stop_strings.clone(),
                seed: spur_math::sample_seed(s.seed, &[step, i as u64]),
            },
        })
        .collect();
    let samples = engine.generate(&requests).map_err(failed)?;

    let (mut opening, mut whole, mut length) = (0usize, 0usize, 0usize);
    for c in &samples {
        let greedy = &prompts[c.prompt_index].greedy_ids;
        opening += usize::from(repeats_opening(&c.token_ids, greedy, s.opening_tokens));
        whole += usize::from(&c.token_ids == greedy);
        length += c.token_ids.len();
    }
    let scored_samples: Vec<(&[u32], &[u32])> = samples
        .iter()
        .filter(|c| !c.token_ids.is_empty())
        .map(|c| {
            (
                prompts[c.prompt_index].prompt_ids.as_slice(),
                c.token_ids.as_slice(),
            )
        })
        .collect();
    let scored_greedy: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .filter(|p| !p.greedy_ids.is_empty())
        .map(|p| (p.prompt_ids.as_slice(), p.greedy_ids.as_slice()))
        .collect();
    let per_token = |sums: &[(f64, f64, usize)], pick: fn(&(f64, f64, usize)) -> f64| {
        let tokens: usize = sums.iter().map(|s| s.2).sum();
        sums.iter().map(pick).sum::<f64>() / tokens.max(1) as f64
    };
    let on_samples = score(model, s.temperature, &scored_samples)?;
    let on_greedy = score(model, s.temperature, &scored_greedy)?;
    let n = samples.len().max(1) as f64;
    Ok(ProbeMetrics {
        prompts: prompts.len(),
        samples: samples.len(),
        entropy: per_token(&on_samples, |s| s.1),
        greedy_entropy: per_token(&on_greedy, |s| s.1),
        greedy_logprob: per_token(&on_greedy, |s| s.0),
        greedy_sequence_logprob: on_greedy.iter().map(|s| s.0).sum::<f64>()
            / on_greedy.len().max(1) as f64,
        opening_repeat: opening as f64 / n,
        greedy_repeat: whole as f64 / n,
        response_length: length as f64 / n,
    })
}

/// The probe reference a node reads: its `Probe` input's file.
pub fn read_reference(ctx: &NodeContext<'_>) -> Result<Option<ProbeReference>, StageError> {
    ctx.input(spur_plan::Role::Probe)
        .map(|i| model::read_json(&i.out.join(PROBE_FILE)))
        .transpose()
}

pub struct ProbeStage;

impl Stage for ProbeStage {
    fn kind(&self) -> StageKind {
        StageKind::Probe
    }

    fn version(&self) -> u32 {
        // Samples through spur-lm's decode path: numerics changes are spur_lm::NUMERICS_VERSION.
        crate::numerics_stage_version(1, spur_lm::NUMERICS_VERSION)
    }

    fn resource(&self, _node: &spur_plan::Node) -> Resource {
        Resource::Accelerator
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![PROBE_FILE.into()]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params: ProbeNodeParams = ctx.params()?;
        let (probe, sampling) = (&params.probe, &params.rollout);
        let count = probe.prompts as usize;
        let max_prompt = sampling.max_prompt_tokens as usize;
        let template = model::template(&params.model)?;
        let settings = ProbeSettings {
            samples: probe.samples as usize,
            max_tokens: probe.max_tokens as usize,
            opening_tokens: probe.opening_tokens as usize,
            seed: probe.seed,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k as usize,
            stop_strings: template.stop_strings(),
        };
        let problems = data::load(&model::dataset_path(ctx)?, &params.dataset)?;
        if problems.is_empty() {
            return Err(failed("the probe's dataset has no problems"));
        }
        let out = ctx.out.to_path_buf();
        let policy = model::ensure_policy(ctx, params.model.precision, None)?;
        let mut requests = Vec::new();
        for p in problems.iter().take(count) {
            // Cut as rollouts cut.
            let (_, ids) =
                model::encode_prompt(&template, &policy.tokenizer, &p.problem, max_prompt)?;
            requests.push(GenerationRequest {
                prompt_ids: ids,
                n: 1,
                params: SamplingParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    max_new_tokens: settings.max_tokens,
                    stop_strings: settings.stop_strings.clone(),
                    seed: 0,
                },
            });
        }
        let engine = CandleEngine::new(policy.model.clone(), policy.tokenizer.clone());
        let greedy = engine.generate(&requests).map_err(failed)?;
        let mut prompts: Vec<ProbePrompt> = problems
            .iter()
            .zip(&requests)
            .map(|(p, r)| ProbePrompt {
                index: p.index,
                prompt_ids: r.prompt_ids.clone(),
                greedy_ids: Vec::new(),
                greedy_text: String::new(),
            })
            .collect();
        for c in greedy {
            prompts[c.prompt_index].greedy_ids = c.token_ids;
            prompts[c.prompt_index].greedy_text = c.text;
        }
        let reference = ProbeReference { settings, prompts };
        model::write_json(&out.join(PROBE_FILE), &reference)?;
        let metrics = measure(&policy.model, &policy.tokenizer, &reference, 0)?;
        serde_json::to_value(metrics).map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::repeats_opening;

    #[test]
    fn an_opening_is_the_first_tokens_or_a_whole_short_response() {
        assert!(repeats_opening(&[1, 2, 3, 9], &[1, 2, 3, 4], 3));
        assert!(!repeats_opening(&[1, 2, 9, 4], &[1, 2, 3, 4], 3));
        // A greedy response shorter than the opening must be repeated whole.
        assert!(repeats_opening(&[1, 2, 7], &[1, 2], 8));
        assert!(!repeats_opening(&[1], &[1, 2], 8));
    }
}
