//! Peak memory of a model node before it runs: its model's shapes and its own parameters, read
//! as the stages read them, counted by [`spur_lm::memory`]. `spur plan --json` prints it, and
//! `spur run` refuses a node whose estimate exceeds its device, saying which settings would
//! make it fit.

use serde_json::Value;
use spur_lm::memory::{rollout_bytes, update_bytes, MemoryEstimate, UpdateShape};
use spur_lm::{CandleEngine, DType, Device, ModelConfig, Tokenizer};
use spur_plan::{External, ExternalKind, Plan, Role, StageKind};

use crate::param::Params;
use crate::{data, model};

/// Eval and label prompts are not truncated; when their dataset cannot be read yet they are
/// counted at the paper's prompt budget.
const UNTRUNCATED_PROMPT_TOKENS: usize = 1024;

/// The settings an experiment can change to make a node fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `precision`: the run's compute dtype.
    pub compute: DType,
    /// `update.checkpoint_activations`.
    pub checkpoint: bool,
    /// `update.moments`: Adam's moment dtype (held by the session between steps, so it
    /// counts for the rollouts and evals of a training chain too).
    pub moments: DType,
    /// `update.micro_batch`.
    pub micro_batch: usize,
}

/// What a model node holds, apart from the settings.
enum Work {
    Update {
        micro_batches_of: usize,
        sequence_tokens: usize,
        logit_positions: usize,
        entropy_bonus: bool,
        reference_model: bool,
    },
    Sample {
        batch: usize,
        sequence_tokens: usize,
        /// Whether the session holds the trainer's moments (after a step has run).
        trainer_state: bool,
    },
}

/// A model node's estimated peak and the settings it was estimated under.
pub struct NodeMemory {
    pub settings: Settings,
    pub estimate: MemoryEstimate,
    work: Work,
}

/// The model external whose shapes `node` computes with: its own, or (after step 1) the one
/// at the start of its chain of `Policy` inputs.
pub fn model_external(plan: &Plan, node: u32) -> Option<&External> {
    let mut at = &plan.nodes[node as usize];
    loop {
        if let Some(&e) = at
            .externals
            .iter()
            .find(|&&e| plan.externals[e as usize].kind == ExternalKind::Model)
        {
            return Some(&plan.externals[e as usize]);
        }
        let policy = at.inputs.iter().find(|i| i.role == Role::Policy)?;
        at = &plan.nodes[policy.node as usize];
    }
}

/// The spur-lm spec of a model external's weights (see [`spur_lm::resolve`]).
pub fn model_spec(ext: &External) -> Option<String> {
    crate::model::model_spec(ext).ok()
}

/// The prompts a model node feeds its model: a dataset's problems (or a one-shot problem)
/// under the node's template, cut to the rollout's prompt budget. Nodes that read the same
/// prompts have the same [`PromptSet::key`], so callers measure each set once.
pub struct PromptSet {
    /// The dataset file; `None` for a one-shot problem.
    dataset: Option<std::path::PathBuf>,
    /// The node whose params hold the dataset view, template and budget.
    params: Value,
    kind: StageKind,
    /// `max_prompt_tokens` for rollouts; eval and label prompts are whole.
    budget: Option<usize>,
}

impl PromptSet {
    /// The prompts of `node`: its own, or for an update those of the rollout it trains on.
    /// `None` for nodes without prompts and datasets not on this machine.
    pub fn of(plan: &Plan, node: u32) -> Option<PromptSet> {
        let mut n = &plan.nodes[node as usize];
        if n.kind == StageKind::Update {
            let rollout = n.inputs.iter().find(|i| i.role == Role::Rollout)?;
            n = &plan.nodes[rollout.node as usize];
        }
        if !matches!(
            n.kind,
            StageKind::Rollout | StageKind::Eval | StageKind::Label | StageKind::Probe
        ) {
            return None;
        }
        let params = n.params.as_ref().clone();
        let one_shot = params["problems"].get("one_shot").is_some();
        let dataset = if one_shot {
            None
        } else {
            let ext = n
                .externals
                .iter()
                .map(|&e| &plan.externals[e as usize])
                .find(|e| e.kind == ExternalKind::Dataset)?;
            Some(ext.local.clone()?)
        };
        let budget = match n.kind {
            StageKind::Rollout | StageKind::Probe => {
                Some(u(&params["rollout"], "max_prompt_tokens")?)
            }
            _ => None,
        };
        Some(PromptSet {
            dataset,
            params,
            kind: n.kind,
            budget,
        })
    }

    /// Identifies the prompts (and the budget they are cut to) apart from the tokenizer.
    pub fn key(&self) -> String {
        let p = &self.params;
        serde_json::json!([
            self.dataset,
            p["dataset"],
            p["problems"],
            p["model"]["template"],
            p["model"]["template_text"],
            p["template"],
            self.budget,
        ])
        .to_string()
    }

    /// The longest prompt in `tokenizer`'s tokens, cut to the budget. Every problem of the
    /// dataset counts: which ones a step draws is not known before it runs.
    pub fn longest(&self, tokenizer: &Tokenizer) -> Option<usize> {
        let template = match self.kind {
            StageKind::Label => {
                crate::label::template(&Params::new(self.kind, &self.params)).ok()?
            }
            kind => model::template(&Params::new(kind, &self.params)).ok()?,
        };
        let problems = match &self.dataset {
            Some(path) => data::load(path, &self.params["dataset"])
                .ok()?
                .into_iter()
                .map(|p| p.problem)
                .collect(),
            None => vec![self.params["problems"]["one_shot"]["problem"]
                .as_str()?
                .to_string()],
        };
        let mut longest = 0;
        for problem in problems {
            let prompt = template.render(tokenizer, &problem).ok()?;
            longest = longest.max(tokenizer.encode(&prompt).ok()?.len());
        }
        Some(self.budget.map_or(longest, |b| longest.min(b)))
    }
}

fn u(v: &Value, key: &str) -> Option<usize> {
    v.get(key)?.as_u64().map(|n| n as usize)
}

fn dtype(v: &Value) -> Option<DType> {
    match v.as_str()? {
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// The `update` node whose trainer state a node's session holds, if any.
fn trainer_update(plan: &Plan, node: u32) -> Option<&Value> {
    let n = &plan.nodes[node as usize];
    let policy = n.inputs.iter().find(|i| i.role == Role::Policy)?;
    let update = &plan.nodes[policy.node as usize];
    (update.kind == StageKind::Update).then(|| update.params.as_ref())
}

/// The estimate of `node` under its own settings; `None` for nodes that load no model, for
/// evaluations on another engine, and for parameters this build does not know. `prompt_tokens`
/// is the longest prompt of its [`PromptSet`] when known; otherwise prompts count at their
/// budget.
pub fn estimate(
    plan: &Plan,
    node: u32,
    config: &ModelConfig,
    device: &Device,
    prompt_tokens: Option<usize>,
) -> Option<NodeMemory> {
    let n = &plan.nodes[node as usize];
    let p = n.params.as_ref();
    let compute = dtype(&p["model"]["precision"])?;
    let trainer = trainer_update(plan, node);
    let moments = match (n.kind, trainer) {
        (StageKind::Update, _) => dtype(&p["update"]["moments"])?,
        (_, Some(update)) => dtype(&update["update"]["moments"])?,
        _ => DType::F32,
    };
    let (work, checkpoint, micro_batch) = match n.kind {
        StageKind::Update => {
            let up = &p["update"];
            let rollout = n.inputs.iter().find(|i| i.role == Role::Rollout)?;
            let r = &plan.nodes[rollout.node as usize].params["rollout"];
            let rollouts = u(r, "prompts_per_step")? * u(r, "samples_per_prompt")?;
            let work = Work::Update {
                micro_batches_of: u(up, "mini_batch")?.min(rollouts),
                sequence_tokens: prompt_tokens.unwrap_or(u(r, "max_prompt_tokens")?)
                    + u(r, "max_response_tokens")?,
                logit_positions: u(r, "max_response_tokens")?,
                entropy_bonus: up["entropy_coef"].as_f64()? != 0.0,
                reference_model: up["kl_coef"].as_f64()? > 0.0,
            };
            (
                work,
                up["checkpoint_activations"].as_bool()?,
                u(up, "micro_batch")?,
            )
        }
        StageKind::Rollout => {
            let r = &p["rollout"];
            let sequences = u(r, "prompts_per_step")? * u(r, "samples_per_prompt")?;
            let work = Work::Sample {
                batch: sequences.min(CandleEngine::DEFAULT_MAX_BATCH),
                sequence_tokens: prompt_tokens.unwrap_or(u(r, "max_prompt_tokens")?)
                    + u(r, "max_response_tokens")?,
                trainer_state: trainer.is_some(),
            };
            (work, false, 1)
        }
        StageKind::Eval => {
            if p["model"]["engine"].as_str() != Some("candle") {
                return None;
            }
            let e = &p["eval"];
            let problems = u(&p["dataset"], "limit").unwrap_or(usize::MAX);
            let work = Work::Sample {
                batch: problems
                    .saturating_mul(u(e, "samples")?)
                    .min(CandleEngine::DEFAULT_MAX_BATCH),
                sequence_tokens: prompt_tokens.unwrap_or(UNTRUNCATED_PROMPT_TOKENS)
                    + u(e, "max_tokens")?,
                trainer_state: trainer.is_some(),
            };
            (work, false, 1)
        }
        StageKind::Label => {
            let problems = u(&p["dataset"], "limit").unwrap_or(usize::MAX);
            let work = Work::Sample {
                batch: problems
                    .saturating_mul(u(p, "samples")?)
                    .min(CandleEngine::DEFAULT_MAX_BATCH),
                sequence_tokens: prompt_tokens.unwrap_or(UNTRUNCATED_PROMPT_TOKENS)
                    + u(p, "max_tokens")?,
                trainer_state: false,
            };
            (work, false, 1)
        }
        StageKind::Probe => {
            // The base model's greedy responses, then `samples` per prompt in one batch.
            let probe = &p["probe"];
            let work = Work::Sample {
                batch: u(probe, "prompts")?
                    .saturating_mul(u(probe, "samples")?)
                    .min(CandleEngine::DEFAULT_MAX_BATCH),
                sequence_tokens: prompt_tokens.unwrap_or(u(&p["rollout"], "max_prompt_tokens")?)
                    + u(probe, "max_tokens")?,
                trainer_state: false,
            };
            (work, false, 1)
        }
        StageKind::Reward | StageKind::Command => return None,
    };
    let settings = Settings {
        compute,
        checkpoint,
        moments,
        micro_batch,
    };
    let estimate = bytes(&work, &settings, config, device);
    Some(NodeMemory {
        settings,
        estimate,
        work,
    })
}

fn bytes(work: &Work, s: &Settings, config: &ModelConfig, device: &Device) -> MemoryEstimate {
    let params = spur_lm::memory::parameter_count(config);
    let moments = 2 * s.moments.size_in_bytes() as u64 * params;
    match *work {
        Work::Update {
            micro_batches_of,
            sequence_tokens,
            logit_positions,
            entropy_bonus,
            reference_model,
        } => {
            let shape = UpdateShape {
                micro_batch: s.micro_batch.min(micro_batches_of).max(1),
                micro_batches: micro_batches_of.div_ceil(s.micro_batch.max(1)),
                sequence_tokens,
                logit_positions,
                compute: s.compute,
                checkpoint_activations: s.checkpoint,
                moments: s.moments,
                entropy_bonus,
            };
            let mut m = update_bytes(config, &shape, device);
            if reference_model {
                // The KL penalty's frozen copy of the model, loaded in f32.
                m.weights += 4 * params;
                m.total += 4 * params;
            }
            m
        }
        Work::Sample {
            batch,
            sequence_tokens,
            trainer_state,
        } => {
            let mut m = rollout_bytes(config, batch, sequence_tokens, s.compute, device);
            if trainer_state {
                m.optimizer += moments;
                m.total += moments;
            }
            m
        }
    }
}

/// The smallest change of settings under which `memory`'s node fits in `capacity` bytes, with
/// its estimate: fewest settings changed first, then the largest micro-batch. `None` when no
/// setting makes it fit.
pub fn fitting_settings(
    memory: &NodeMemory,
    config: &ModelConfig,
    device: &Device,
    capacity: u64,
) -> Option<(Settings, u64)> {
    let now = memory.settings;
    let is_update = matches!(memory.work, Work::Update { .. });
    let mut micro_batches = vec![now.micro_batch];
    if is_update {
        let mut m = now.micro_batch;
        while m > 1 {
            m /= 2;
            micro_batches.push(m);
        }
    }
    let checkpoints: &[bool] = if is_update && !now.checkpoint {
        &[false, true]
    } else {
        &[now.checkpoint]
    };
    let mut candidates = Vec::new();
    for &checkpoint in checkpoints {
        for compute in [now.compute, DType::BF16] {
            for moments in [now.moments, DType::BF16] {
                for &micro_batch in &micro_batches {
                    candidates.push(Settings {
                        compute,
                        checkpoint,
                        moments,
                        micro_batch,
                    });
                }
            }
        }
    }
    let changes = |s: &Settings| {
        (s.compute != now.compute) as u32
            + (s.checkpoint != now.checkpoint) as u32
            + (s.moments != now.moments) as u32
            + (s.micro_batch != now.micro_batch) as u32
    };
    candidates
        .into_iter()
        .filter(|s| changes(s) > 0)
        .map(|s| (s, bytes(&memory.work, &s, config, device).total))
        .filter(|&(_, total)| total <= capacity)
        .min_by_key(|(s, _)| (changes(s), std::cmp::Reverse(s.micro_batch)))
}

/// The experiment keys that turn `from` into `to`, as a user writes them.
pub fn describe_change(from: &Settings, to: &Settings) -> Vec<String> {
    let name = |d: DType| if d == DType::BF16 { "bf16" } else { "f32" };
    let mut out = Vec::new();
    if to.compute != from.compute {
        out.push(format!("precision: {}", name(to.compute)));
    }
    if to.checkpoint != from.checkpoint {
        out.push(format!("update.checkpoint_activations: {}", to.checkpoint));
    }
    if to.moments != from.moments {
        out.push(format!("update.moments: {}", name(to.moments)));
    }
    if to.micro_batch != from.micro_batch {
        out.push(format!("update.micro_batch: {}", to.micro_batch));
    }
    out
}
