//! Peak memory of a model node before it runs: its model's shapes and its own parameters, read
//! as the stages read them, counted by [`spur_lm::memory`]. `spur plan --json` prints it, and
//! `spur run` refuses a node whose estimate exceeds its device, saying which settings would
//! make it fit.

use spur_core::node_params::{
    self, DatasetView, EvalNodeParams, LabelNodeParams, ProbeNodeParams, Problems,
    RolloutNodeParams, UpdateNodeParams,
};
use spur_core::params::{Engine, Precision};
use spur_lm::memory::{rollout_bytes, update_bytes, MemoryEstimate, SampleShape, UpdateShape};
use spur_lm::{CandleEngine, DType, Device, ModelConfig, PromptTemplate, Tokenizer};
use spur_plan::{External, ExternalKind, Node, Plan, Role, StageKind};
use spur_rl::precision_dtype;

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
        shape: SampleShape,
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

/// A model node's parameters, read as its stage reads them.
enum ModelNode {
    Rollout(RolloutNodeParams),
    Update(UpdateNodeParams),
    Eval(EvalNodeParams),
    Label(LabelNodeParams),
    Probe(ProbeNodeParams),
}

impl ModelNode {
    /// `None` for nodes that load no model and parameters this build does not read.
    fn of(node: &Node) -> Option<ModelNode> {
        fn read<T: serde::de::DeserializeOwned>(node: &Node) -> Option<T> {
            node_params::from_value(node.kind, &node.params).ok()
        }
        Some(match node.kind {
            StageKind::Rollout => ModelNode::Rollout(read(node)?),
            StageKind::Update => ModelNode::Update(read(node)?),
            StageKind::Eval => ModelNode::Eval(read(node)?),
            StageKind::Label => ModelNode::Label(read(node)?),
            StageKind::Probe => ModelNode::Probe(read(node)?),
            StageKind::Reward | StageKind::Command => return None,
        })
    }

    fn precision(&self) -> Precision {
        match self {
            ModelNode::Rollout(p) => p.model.precision,
            ModelNode::Update(p) => p.model.precision,
            ModelNode::Eval(p) => p.model.precision,
            ModelNode::Label(p) => p.model.precision,
            ModelNode::Probe(p) => p.model.precision,
        }
    }
}

/// The prompts a model node feeds its model: a dataset's problems (or a one-shot problem)
/// under the node's template, cut to the rollout's prompt budget. Nodes that read the same
/// prompts have the same [`PromptSet::key`], so callers measure each set once.
pub struct PromptSet {
    /// The dataset file and which of its rows and fields; `None` for a one-shot problem.
    dataset: Option<(std::path::PathBuf, DatasetView)>,
    /// The one-shot problem, when there is no dataset.
    problem: Option<String>,
    template: PromptTemplate,
    /// `max_prompt_tokens` for rollouts and probes; eval and label prompts are whole.
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
        let dataset_file = || {
            n.externals
                .iter()
                .map(|&e| &plan.externals[e as usize])
                .find(|e| e.kind == ExternalKind::Dataset)?
                .local
                .clone()
        };
        let (view, problem, template, budget) = match ModelNode::of(n)? {
            ModelNode::Rollout(p) => {
                let problem = match &p.problems {
                    Problems::OneShot(example) => Some(example.problem.clone()),
                    Problems::All | Problems::IncorrectLabels => None,
                };
                let budget = Some(p.rollout.max_prompt_tokens as usize);
                (p.dataset, problem, model::template(&p.model).ok()?, budget)
            }
            ModelNode::Probe(p) => {
                let budget = Some(p.rollout.max_prompt_tokens as usize);
                (p.dataset, None, model::template(&p.model).ok()?, budget)
            }
            ModelNode::Eval(p) => (p.dataset, None, model::template(&p.model).ok()?, None),
            ModelNode::Label(p) => (p.dataset, None, crate::label::template(p.template), None),
            ModelNode::Update(_) => return None,
        };
        let dataset = match problem {
            Some(_) => None,
            None => Some((dataset_file()?, view)),
        };
        Some(PromptSet {
            dataset,
            problem,
            template,
            budget,
        })
    }

    /// Identifies the prompts (and the budget they are cut to) apart from the tokenizer.
    pub fn key(&self) -> String {
        format!(
            "{:?}",
            (&self.dataset, &self.problem, &self.template, self.budget)
        )
    }

    /// The longest prompt in `tokenizer`'s tokens, cut to the budget. Every problem of the
    /// dataset counts: which ones a step draws is not known before it runs.
    pub fn longest(&self, tokenizer: &Tokenizer) -> Option<usize> {
        let problems = match (&self.dataset, &self.problem) {
            (Some((path, view)), _) => data::load(path, view)
                .ok()?
                .into_iter()
                .map(|p| p.problem)
                .collect(),
            (None, problem) => vec![problem.clone()?],
        };
        let mut longest = 0;
        for problem in problems {
            let prompt = self.template.render(tokenizer, &problem).ok()?;
            longest = longest.max(tokenizer.encode(&prompt).ok()?.len());
        }
        Some(self.budget.map_or(longest, |b| longest.min(b)))
    }
}

/// The `update` node whose trainer state a node's session holds, if any.
fn trainer_update(plan: &Plan, node: u32) -> Option<UpdateNodeParams> {
    let n = &plan.nodes[node as usize];
    let policy = n.inputs.iter().find(|i| i.role == Role::Policy)?;
    match ModelNode::of(&plan.nodes[policy.node as usize])? {
        ModelNode::Update(p) => Some(p),
        _ => None,
    }
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
    let params = ModelNode::of(n)?;
    let compute = precision_dtype(params.precision());
    let trainer = trainer_update(plan, node);
    let moments = match (&params, &trainer) {
        (ModelNode::Update(p), _) | (_, Some(p)) => precision_dtype(p.update.moments),
        _ => DType::F32,
    };
    let (work, checkpoint, micro_batch) = match &params {
        ModelNode::Update(p) => {
            let up = &p.update;
            let rollout = n.inputs.iter().find(|i| i.role == Role::Rollout)?;
            let ModelNode::Rollout(rollout) = ModelNode::of(&plan.nodes[rollout.node as usize])?
            else {
                return None;
            };
            let r = &rollout.rollout;
            let rollouts = r.prompts_per_step as usize * r.samples_per_prompt as usize;
            let work = Work::Update {
                micro_batches_of: (up.mini_batch as usize).min(rollouts),
                sequence_tokens: prompt_tokens.unwrap_or(r.max_prompt_tokens as usize)
                    + r.max_response_tokens as usize,
                logit_positions: r.max_response_tokens as usize,
                entropy_bonus: up.entropy_coef != 0.0,
                reference_model: up.kl_coef > 0.0,
            };
            (work, up.checkpoint_activations, up.micro_batch as usize)
        }
        ModelNode::Rollout(p) => {
            let r = &p.rollout;
            let sequences = r.prompts_per_step as usize * r.samples_per_prompt as usize;
            let work = Work::Sample {
                shape: SampleShape {
                    batch: sequences.min(CandleEngine::DEFAULT_MAX_BATCH),
                    samples_per_prompt: r.samples_per_prompt as usize,
                    prompt_tokens: prompt_tokens.unwrap_or(r.max_prompt_tokens as usize),
                    new_tokens: r.max_response_tokens as usize,
                },
                trainer_state: trainer.is_some(),
            };
            (work, false, 1)
        }
        ModelNode::Eval(p) => {
            if p.model.engine != Some(Engine::Candle) {
                return None;
            }
            let problems = p.dataset.limit.unwrap_or(usize::MAX);
            let work = Work::Sample {
                shape: SampleShape {
                    batch: problems
                        .saturating_mul(p.eval.samples as usize)
                        .min(CandleEngine::DEFAULT_MAX_BATCH),
                    samples_per_prompt: p.eval.samples as usize,
                    prompt_tokens: prompt_tokens.unwrap_or(UNTRUNCATED_PROMPT_TOKENS),
                    new_tokens: p.eval.max_tokens as usize,
                },
                trainer_state: trainer.is_some(),
            };
            (work, false, 1)
        }
        ModelNode::Label(p) => {
            let problems = p.dataset.limit.unwrap_or(usize::MAX);
            let work = Work::Sample {
                shape: SampleShape {
                    batch: problems
                        .saturating_mul(p.samples as usize)
                        .min(CandleEngine::DEFAULT_MAX_BATCH),
                    samples_per_prompt: p.samples as usize,
                    prompt_tokens: prompt_tokens.unwrap_or(UNTRUNCATED_PROMPT_TOKENS),
                    new_tokens: p.max_tokens as usize,
                },
                trainer_state: false,
            };
            (work, false, 1)
        }
        ModelNode::Probe(p) => {
            // The base model's greedy responses, then `samples` per prompt in one batch.
            let probe = &p.probe;
            let work = Work::Sample {
                shape: SampleShape {
                    batch: (probe.prompts as usize)
                        .saturating_mul(probe.samples as usize)
                        .min(CandleEngine::DEFAULT_MAX_BATCH),
                    samples_per_prompt: probe.samples as usize,
                    prompt_tokens: prompt_tokens.unwrap_or(p.rollout.max_prompt_tokens as usize),
                    new_tokens: probe.max_tokens as usize,
                },
                trainer_state: false,
            };
            (work, false, 1)
        }
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
            ref shape,
            trainer_state,
        } => {
            let mut m = rollout_bytes(config, shape, s.compute, device);
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
