//! The `rollout` stage: step k's prompts, sampled with the current policy.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spur_lm::{Engine, FinishReason, GenerationRequest, SamplingParams};
use spur_plan::{Role, StageKind};

use crate::data::{self, Problem};
use crate::model::{self, failed};
use crate::param::Params;
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

/// What a rollout node's params ask for, read before any work.
struct Settings {
    seed: u64,
    prompts: usize,
    samples: usize,
    max_prompt_tokens: usize,
    /// Without the template's stop strings and the per-group seed.
    sampling: SamplingParams,
}

fn settings(params: &Value) -> Result<Settings, StageError> {
    let p = Params::new(StageKind::Rollout, params);
    Ok(Settings {
        seed: p.u64("seed")?,
        prompts: p.usize("rollout.prompts_per_step")?,
        samples: p.usize("rollout.samples_per_prompt")?,
        max_prompt_tokens: p.usize("rollout.max_prompt_tokens")?,
        sampling: SamplingParams {
            temperature: p.f64("rollout.temperature")?,
            top_p: p.f64("rollout.top_p")?,
            top_k: p.usize("rollout.top_k")?,
            max_new_tokens: p.usize("rollout.max_response_tokens")?,
            stop_strings: Vec::new(),
            seed: 0,
        },
    })
}

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
fn problems(ctx: &NodeContext<'_>) -> Result<Vec<Problem>, StageError> {
    let params = &ctx.node.params;
    let p = Params::new(StageKind::Rollout, params);
    match &params["problems"] {
        Value::Object(o) if o.contains_key("one_shot") => Ok(vec![Problem {
            index: 0,
            problem: p.str("problems.one_shot.problem")?.to_string(),
            answer: p.str("problems.one_shot.answer")?.to_string(),
            id: None,
            subject: None,
            level: None,
        }]),
        Value::String(s) if s == "incorrect_labels" => {
            let labels = ctx
                .input(Role::Labels)
                .ok_or_else(|| failed("an `incorrect` rollout needs the label node"))?;
            let labels: Vec<crate::label::Label> =
                model::read_json(&labels.out.join(crate::label::LABELS_FILE))?;
            let all = data::load(&model::dataset_path(ctx)?, &params["dataset"])?;
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
        _ => data::load(&model::dataset_path(ctx)?, &params["dataset"]),
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
        let params = ctx.node.params.clone();
        let step = ctx.node.step;
        let Settings {
            seed,
            prompts: n_prompts,
            samples: n_samples,
            max_prompt_tokens: max_prompt,
            sampling,
        } = settings(&params)?;
        let pool = problems(ctx)?;
        let chosen: Vec<Problem> = draw(pool.len(), n_prompts, seed, step)
            .into_iter()
            .map(|i| pool[i].clone())
            .collect();
        let template = model::template(&Params::new(StageKind::Rollout, &params))?;
        let out = ctx.out.to_path_buf();
        let policy = model::ensure_policy(ctx, None)?;
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
    use serde_json::json;

    use super::{draw, settings};

    #[test]
    fn every_rollout_parameter_is_required() {
        let params = json!({
            "rollout": spur_spec::to_json(&spur_spec::RolloutParams::default()),
            "seed": 42,
        });
        let s = settings(&params).unwrap();
        assert_eq!((s.prompts, s.samples, s.max_prompt_tokens), (64, 16, 1024));
        assert_eq!(s.sampling.max_new_tokens, 3072);
        for key in ["prompts_per_step", "temperature", "max_response_tokens"] {
            let mut missing = params.clone();
            missing["rollout"].as_object_mut().unwrap().remove(key);
            let err = settings(&missing)
                .err()
                .expect("a missing parameter is an error");
            assert_eq!(
                err.to_string(),
                format!("the rollout node's parameter `rollout.{key}` is missing")
            );
        }
    }

    #[test]
    fn draws_without_replacement_within_an_epoch() {
        let mut seen: Vec<usize> = (1..=5).flat_map(|s| draw(10, 2, 7, s)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(draw(10, 2, 7, 3), draw(10, 2, 7, 3));
        assert_ne!(draw(10, 4, 7, 1), draw(10, 4, 8, 1));
    }
}
