//! The `rollout` stage: step k's prompts, sampled with the current policy.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spur_core::node_params::{Problems, RolloutNodeParams};
use spur_lm::{Engine, FinishReason, GenerationRequest, SamplingParams};
use spur_plan::{Role, StageKind};

use crate::data::{self, Problem};
use crate::model::{self, failed};
use crate::{NodeContext, Resource, Stage, StageError};

pub const ROLLOUT_FILE: &str = "rollout.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    /// Row of the problem in the dataset file.
    pub index: usize,
    pub problem: String,
    pub answer: String,
    pub prompt_sha256: String,
    pub prompt_ids: Vec<u32>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutArtifact {
    pub step: u32,
    pub groups: Vec<Group>,
}

pub struct RolloutStage;

/// `take` problem positions for step `step`: consecutive slices of a
/// sequence of per-epoch permutations, so problems are drawn without
/// replacement within an epoch, deterministically from the seed.
pub fn draw(n: usize, take: usize, seed: u64, step: u32) -> Vec<usize> {
    let start = (step as usize - 1) * take;
    let mut out = Vec::with_capacity(take);
    let mut epoch_cache: Option<(usize, Vec<usize>)> = None;
    for pos in start..start + take {
        let (epoch, i) = (pos / n, pos % n);
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            for j in (1..n).rev() {
                let r = spur_math::sample_seed(seed, &[epoch as u64, j as u64]) as usize % (j + 1);
                perm.swap(j, r);
            }
            epoch_cache = Some((epoch, perm));
        }
        out.push(epoch_cache.as_ref().expect("set above").1[i]);
    }
    out
}

/// The problems a rollout draws from, after the reward's data choice.
fn problems(ctx: &NodeContext<'_>, params: &RolloutNodeParams) -> Result<Vec<Problem>, StageError> {
    match &params.problems {
        Problems::OneShot(example) => Ok(vec![Problem {
            index: 0,
            problem: example.problem.clone(),
            answer: example.answer.clone(),
            id: None,
            subject: None,
            level: None,
        }]),
        Problems::IncorrectLabels => {
            let labels = ctx
                .input(Role::Labels)
                .ok_or_else(|| failed("an `incorrect` rollout needs the label node"))?;
            let labels: Vec<crate::label::Label> =
                model::read_json(&labels.out.join(crate::label::LABELS_FILE))?;
            let all = data::load(&model::dataset_path(ctx)?, &params.dataset)?;
            // Train on problems whose majority label is wrong, against that label.
            let kept: Vec<Problem> = all
                .into_iter()
                .filter_map(|mut p| {
                    let l = labels.iter().find(|l| l.index == p.index)?;
                    (!l.label_correct && !l.label.is_empty()).then(|| {
                        p.answer = l.label.clone();
                        p
                    })
                })
                .collect();
            if kept.is_empty() {
                return Err(failed("no problem has a wrong majority label: the `incorrect` reward has nothing to train on"));
            }
            Ok(kept)
        }
        Problems::All => data::load(&model::dataset_path(ctx)?, &params.dataset),
    }
}

impl Stage for RolloutStage {
    fn kind(&self) -> StageKind {
        StageKind::Rollout
    }

    fn version(&self) -> u32 {
        // Samples through spur-lm's decode path: numerics changes are spur_lm::NUMERICS_VERSION.
        crate::numerics_stage_version(1, spur_lm::NUMERICS_VERSION)
    }

    fn resource(&self, _node: &spur_plan::Node) -> Resource {
        Resource::Accelerator
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![ROLLOUT_FILE.into()]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params: RolloutNodeParams = ctx.params()?;
        let r = &params.rollout;
        let (seed, step) = (params.seed, ctx.node.step);
        let n_samples = r.samples_per_prompt as usize;
        let sampling = SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k as usize,
            max_new_tokens: r.max_response_tokens as usize,
            stop_strings: Vec::new(),
            seed: 0,
        };
        let pool = problems(ctx, &params)?;
        let chosen: Vec<Problem> = draw(pool.len(), r.prompts_per_step as usize, seed, step)
            .into_iter()
            .map(|i| pool[i].clone())
            .collect();
        let template = model::template(&params.model)?;
        let max_prompt = r.max_prompt_tokens as usize;
        let out = ctx.out.to_path_buf();
        let policy = model::ensure_policy(ctx, params.model.precision, None)?;
        let engine = spur_lm::CandleEngine::new(policy.model.clone(), policy.tokenizer.clone());
        let mut groups = Vec::with_capacity(chosen.len());
        let mut requests = Vec::with_capacity(chosen.len());
        for (g, p) in chosen.iter().enumerate() {
            let (prompt, ids) =
                model::encode_prompt(&template, &policy.tokenizer, &p.problem, max_prompt)?;
            requests.push(GenerationRequest {
                prompt_ids: ids.clone(),
                n: n_samples,
                params: SamplingParams {
                    stop_strings: template.stop_strings(),
                    seed: spur_math::sample_seed(seed, &[step as u64, g as u64]),
                    ..sampling.clone()
                },
            });
            groups.push(Group {
                index: p.index,
                problem: p.problem.clone(),
                answer: p.answer.clone(),
                prompt_sha256: hex::encode(Sha256::digest(prompt.as_bytes())),
                prompt_ids: ids,
                samples: Vec::with_capacity(n_samples),
            });
        }
        let started = Instant::now();
        let completions = engine.generate(&requests).map_err(failed)?;
        let seconds = started.elapsed().as_secs_f64();
        let mut tokens = 0usize;
        let mut truncated = 0usize;
        for c in completions {
            tokens += c.token_ids.len();
            truncated += usize::from(c.finish_reason == FinishReason::Length);
            groups[c.prompt_index].samples.push(Sample {
                token_ids: c.token_ids,
                logprobs: c.logprobs,
                text: c.text,
                finish_reason: c.finish_reason,
            });
        }
        let n = (groups.len() * n_samples).max(1) as f64;
        model::write_json(&out.join(ROLLOUT_FILE), &RolloutArtifact { step, groups })?;
        Ok(json!({
            "samples": n,
            "mean_length": tokens as f64 / n,
            "truncated": truncated as f64 / n,
            "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::draw;

    #[test]
    fn draws_without_replacement_within_an_epoch() {
        let mut seen: Vec<usize> = (1..=5).flat_map(|s| draw(10, 2, 7, s)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(draw(10, 2, 7, 3), draw(10, 2, 7, 3));
        assert_ne!(draw(10, 4, 7, 1), draw(10, 4, 8, 1));
    }
}
