//! A run's model nodes: rollout → reward → update per step, the labels and probe they read,
//! and the evaluations at their steps. One builder per stage makes that stage's parameters
//! from the resolved run; `model_chain` places the nodes.

use spur_core::node_params::{
    DatasetView, EvalNodeParams, EvalSettings, LabelModel, LabelNodeParams, LabelTemplate,
    ModelView, ProbeNodeParams, ProbeSampling, ProbeSettings, Problems, RewardNodeParams,
    RewardSpec, RolloutNodeParams, SampledAt, UpdateNodeParams,
};
use spur_core::params::{EvalParams, LrSchedule};
use spur_core::{RewardBase, RewardExpr};
use spur_spec::{Experiment, Run};

use crate::{Chain, Input, NodeParams, Role, RunCtx, StageKind};

/// Majority-vote labels take this many samples per problem unless the reward says (the paper's).
const DEFAULT_LABEL_SAMPLES: u32 = 64;

/// One evaluation of a run, before its nodes are placed.
struct PlannedEval {
    params: NodeParams,
    /// Its dataset, an index into the externals.
    dataset: u32,
    /// The steps it runs at, ascending.
    steps: Vec<u32>,
}

/// A node's policy: the previous update's weights, or (at the first step) the model's own.
fn policy_inputs(policy: Option<u32>, model_ext: u32) -> (Vec<Input>, Vec<u32>) {
    match policy {
        Some(node) => (
            vec![Input {
                role: Role::Policy,
                node,
            }],
            vec![],
        ),
        None => (vec![], vec![model_ext]),
    }
}

impl RunCtx<'_> {
    /// rollout → reward → update per step, evals at their steps.
    pub(crate) fn model_chain(&self, run: &Run, chain: &mut Chain) {
        let p = &run.params;
        let model_name = p.model.as_deref().unwrap_or_default();
        let model_ext = self.ext(&format!("models.{model_name}"));
        let evals: Vec<PlannedEval> = if self.exp.evaluates {
            p.evals
                .iter()
                .map(|(name, e)| self.planned_eval(run, name, e))
                .collect()
        } else {
            Vec::new()
        };
        let eval_at = |chain: &mut Chain, step: u32, policy: Option<u32>| {
            for e in evals
                .iter()
                .filter(|e| e.steps.binary_search(&step).is_ok())
            {
                let (inputs, mut exts) = policy_inputs(policy, model_ext);
                exts.push(e.dataset);
                chain.push(StageKind::Eval, step, &e.params, inputs, exts);
            }
        };
        eval_at(chain, 0, None);
        if !self.exp.trains {
            return;
        }

        let train = p.train_data.as_deref().unwrap_or_default();
        let train_ext = self.ext(&format!("datasets.{train}"));
        let reward = run
            .reward
            .as_ref()
            .expect("a training run has a resolved reward");
        // The spec has refused kinds that do not parse.
        let expr = RewardExpr::parse(&reward.kind).ok();
        let rollout = self.rollout_params(run, reward, expr.as_ref());
        let reads_labels = rollout.problems == Problems::IncorrectLabels;
        let rollout = NodeParams::new(&rollout);
        let label = expr
            .as_ref()
            .is_some_and(RewardExpr::needs_labels)
            .then(|| {
                let label_model = reward.label_model.as_deref().unwrap_or(model_name);
                let params = NodeParams::new(&self.label_params(run, reward));
                let exts = vec![self.ext(&format!("models.{label_model}")), train_ext];
                chain.push(StageKind::Label, 0, &params, vec![], exts)
            });
        let scoring = NodeParams::new(&reward_params(run, reward));
        let update = NodeParams::new(&self.update_params(run));
        // The probe's reference is computed once and shared by every run of the model that
        // probes the same prompts alike.
        let probe = p.probe.dataset.as_deref().map(|ds| {
            let params = NodeParams::new(&self.probe_params(run, ds));
            let exts = vec![model_ext, self.ext(&format!("datasets.{ds}"))];
            chain.push(StageKind::Probe, 0, &params, vec![], exts)
        });

        let mut policy: Option<u32> = None;
        for step in 1..=p.steps {
            let (pol_inputs, pol_exts) = policy_inputs(policy, model_ext);
            let mut rollout_inputs = pol_inputs.clone();
            if let (Some(node), true) = (label, reads_labels) {
                rollout_inputs.push(Input {
                    role: Role::Labels,
                    node,
                });
            }
            let mut rollout_exts = pol_exts.clone();
            rollout_exts.push(train_ext);
            let sampled = chain.push(
                StageKind::Rollout,
                step,
                &rollout,
                rollout_inputs,
                rollout_exts,
            );

            let mut reward_inputs = vec![Input {
                role: Role::Rollout,
                node: sampled,
            }];
            reward_inputs.extend(label.map(|node| Input {
                role: Role::Labels,
                node,
            }));
            let scored = chain.push(StageKind::Reward, step, &scoring, reward_inputs, vec![]);

            let mut update_inputs = pol_inputs;
            update_inputs.push(Input {
                role: Role::Rollout,
                node: sampled,
            });
            update_inputs.push(Input {
                role: Role::Reward,
                node: scored,
            });
            update_inputs.extend(probe.map(|node| Input {
                role: Role::Probe,
                node,
            }));
            // A KL penalty compares against the model's own weights at every step.
            let update_exts = if p.update.kl_coef > 0.0 {
                vec![model_ext]
            } else {
                pol_exts
            };
            let updated = chain.push(StageKind::Update, step, &update, update_inputs, update_exts);
            policy = Some(updated);
            eval_at(chain, step, policy);
        }
    }

    fn model_view(&self, run: &Run) -> ModelView {
        let def = &self.exp.models[run.params.model.as_deref().unwrap_or_default()];
        ModelView {
            template: def.template,
            template_text: def.template_text.clone(),
            precision: run.params.precision,
            engine: None,
        }
    }

    fn planned_eval(&self, run: &Run, name: &str, e: &EvalParams) -> PlannedEval {
        let ds = e.dataset.as_deref().unwrap_or_default();
        let model = &self.exp.models[run.params.model.as_deref().unwrap_or_default()];
        let params = EvalNodeParams {
            name: name.to_string(),
            eval: EvalSettings::from(e),
            dataset: dataset_view(self.exp, ds),
            // Only evaluations use the model's `engine`.
            model: ModelView {
                engine: Some(model.engine),
                ..self.model_view(run)
            },
        };
        PlannedEval {
            params: NodeParams::new(&params),
            dataset: self.ext(&format!("datasets.{ds}")),
            steps: run.params.eval_steps(e.at),
        }
    }

    fn rollout_params(
        &self,
        run: &Run,
        reward: &RewardSpec,
        expr: Option<&RewardExpr>,
    ) -> RolloutNodeParams {
        let p = &run.params;
        // Most rewards leave the training problems alone, so the rollout does not read the
        // reward and is shared by every arm. Two change them: `incorrect` trains only on
        // problems whose majority label is wrong, `one_shot` on a single example.
        let uses = |base: RewardBase| expr.is_some_and(|e| e.uses(base));
        let problems = match &reward.example {
            _ if uses(RewardBase::Incorrect) => Problems::IncorrectLabels,
            // The spec has refused a `one_shot` reward without its example.
            Some(example) if uses(RewardBase::OneShot) => Problems::OneShot(example.clone()),
            _ => Problems::All,
        };
        RolloutNodeParams {
            rollout: p.rollout.clone(),
            seed: p.seed,
            dataset: dataset_view(self.exp, p.train_data.as_deref().unwrap_or_default()),
            model: self.model_view(run),
            problems,
        }
    }

    /// Majority-vote labels: raw prompts at T = 1, the same for every run of the model.
    fn label_params(&self, run: &Run, reward: &RewardSpec) -> LabelNodeParams {
        let p = &run.params;
        LabelNodeParams {
            samples: reward.label_samples.unwrap_or(DEFAULT_LABEL_SAMPLES),
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: p.rollout.max_response_tokens,
            dataset: dataset_view(self.exp, p.train_data.as_deref().unwrap_or_default()),
            template: LabelTemplate::Raw,
            seed: 0,
            model: LabelModel {
                precision: p.precision,
            },
        }
    }

    fn update_params(&self, run: &Run) -> UpdateNodeParams {
        let p = &run.params;
        UpdateNodeParams {
            update: p.update.clone(),
            // The trainer scores at the rollouts' temperature, and Dr. GRPO's constant
            // defaults to their response cap.
            rollout: SampledAt {
                temperature: p.rollout.temperature,
                max_response_tokens: p.rollout.max_response_tokens,
            },
            seed: p.seed,
            model: self.model_view(run),
            schedule_steps: (p.update.lr_schedule != LrSchedule::Constant).then_some(p.steps),
        }
    }

    fn probe_params(&self, run: &Run, dataset: &str) -> ProbeNodeParams {
        let p = &run.params;
        ProbeNodeParams {
            probe: ProbeSettings::from(&p.probe),
            rollout: ProbeSampling::from(&p.rollout),
            dataset: dataset_view(self.exp, dataset),
            model: self.model_view(run),
        }
    }
}

/// A command reward's template stays as written; `vars` holds the values it reads, which the
/// reward stage hands to the shell as it does for command stages.
fn reward_params(run: &Run, reward: &RewardSpec) -> RewardNodeParams {
    let vars = reward
        .command
        .iter()
        .flat_map(|c| spur_spec::references(c))
        .filter_map(|n| Some((n.clone(), run.lookup(&n)?)))
        .collect();
    RewardNodeParams {
        reward: reward.clone(),
        vars,
        seed: run.params.seed,
    }
}

/// What of a dataset definition affects results (not its name or sources).
fn dataset_view(exp: &Experiment, name: &str) -> DatasetView {
    let d = &exp.datasets[name];
    DatasetView {
        problem_field: d.problem_field.clone(),
        answer_field: d.answer_field.clone(),
        offset: d.offset,
        limit: d.limit,
    }
}
