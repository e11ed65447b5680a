//! The parameters of one node, one struct per stage: what the plan writes (canonically, into
//! the node id) and what the stage reads back, with unknown fields refused.
//!
//! Each struct holds exactly what its stage reads, so that two runs which differ elsewhere
//! share the node. The plan fills them from the resolved run, with every default already
//! applied; a stage never falls back to a default of its own.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::params::{
    Engine, EvalParams, GraderName, OneShotExample, Precision, ProbeParams, RolloutParams,
    TemplateKind, UpdateParams,
};
use crate::StageKind;

/// The node's parameters as JSON, the form a node carries: the plan digests it into the
/// node's id, the cache's manifest records it, and a Slurm job hands it to its compute node.
pub fn to_value<T: Serialize>(params: &T) -> Value {
    serde_json::to_value(params).expect("node parameters serialise to JSON")
}

/// A node's parameters, read as its stage's struct.
pub fn from_value<T: DeserializeOwned>(kind: StageKind, params: &Value) -> Result<T, ParamsError> {
    T::deserialize(params).map_err(|e| ParamsError {
        kind,
        why: e.to_string(),
    })
}

/// Whether `params` read as the struct of `kind`'s stage: the plan and the stages agree on
/// every node.
pub fn check(kind: StageKind, params: &Value) -> Result<(), ParamsError> {
    match kind {
        StageKind::Rollout => from_value::<RolloutNodeParams>(kind, params).map(drop),
        StageKind::Reward => from_value::<RewardNodeParams>(kind, params).map(drop),
        StageKind::Update => from_value::<UpdateNodeParams>(kind, params).map(drop),
        StageKind::Eval => from_value::<EvalNodeParams>(kind, params).map(drop),
        StageKind::Label => from_value::<LabelNodeParams>(kind, params).map(drop),
        StageKind::Probe => from_value::<ProbeNodeParams>(kind, params).map(drop),
        StageKind::Command => from_value::<CommandNodeParams>(kind, params).map(drop),
    }
}

/// Parameters that do not read as their stage's struct: a plan from another version of spur,
/// or a hand-edited one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {} node's parameters: {why}", kind.name())]
pub struct ParamsError {
    pub kind: StageKind,
    pub why: String,
}

/// What of a model definition changes a model node's results (not its name or sources,
/// which enter the id as the weights' content hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelView {
    pub template: TemplateKind,
    pub template_text: Option<String>,
    /// The dtype the run's policy computes in.
    pub precision: Precision,
    /// Evaluations only: the engine that samples them. Rollouts, labels, probes and updates
    /// always run on candle (GRPO needs natural-log log-probs, per-sample seeds and the
    /// trainer's weights in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
}

/// What of a dataset definition changes results (not its name or sources, which enter the id
/// as the file's content hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetView {
    /// Field holding the problem text (unset: `problem`, else `prompt`).
    pub problem_field: Option<String>,
    /// Field holding the reference answer (unset: `answer`).
    pub answer_field: Option<String>,
    pub offset: usize,
    pub limit: Option<usize>,
}

/// Which training problems a rollout samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Problems {
    /// The whole dataset; every reward arm but two shares the rollout.
    All,
    /// Only the problems whose majority-vote label is wrong (the `incorrect` reward).
    IncorrectLabels,
    /// One example, repeated (the `one_shot` reward).
    OneShot(OneShotExample),
}

/// `rollout`: one step's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutNodeParams {
    pub rollout: RolloutParams,
    pub seed: u64,
    pub dataset: DatasetView,
    pub model: ModelView,
    pub problems: Problems,
}

/// The precision a `label` node samples in; the only model setting it reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelModel {
    pub precision: Precision,
}

/// How a `label` node turns a problem into a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelTemplate {
    /// The problem text as is.
    Raw,
}

/// `label`: majority-vote labels of the training problems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelNodeParams {
    pub samples: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
    pub dataset: DatasetView,
    pub template: LabelTemplate,
    pub seed: u64,
    pub model: LabelModel,
}

/// A run's reward definition, resolved: `${…}` substituted, γ a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// A reward expression in [`crate::RewardExpr`]'s grammar.
    pub kind: String,
    /// Probability of reward 1 for `random`.
    pub gamma: Option<f64>,
    /// The shell template of a `command` reward, as written.
    pub command: Option<String>,
    /// Answer extraction: `default`, `r1` or `box_only`.
    pub style: Option<String>,
    /// The grader's name (unset: `paper`).
    pub grader: Option<String>,
    pub label_model: Option<String>,
    pub label_samples: Option<u32>,
    pub example: Option<OneShotExample>,
}

/// `reward`: one step's rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardNodeParams {
    pub reward: RewardSpec,
    /// The values a command reward's template reads, by name.
    pub vars: Map<String, Value>,
    pub seed: u64,
}

/// The rollouts an update trains on, as far as the objective cares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampledAt {
    /// The temperature the rollouts were sampled at; the trainer scores at it.
    pub temperature: f64,
    /// Their response cap: Dr. GRPO's constant unless `update.norm_length` sets it.
    pub max_response_tokens: u32,
}

/// `update`: one GRPO step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateNodeParams {
    pub update: UpdateParams,
    pub rollout: SampledAt,
    pub seed: u64,
    pub model: ModelView,
    /// The run's step count, which a non-constant learning-rate schedule spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_steps: Option<u32>,
}

/// An evaluation's settings: a run's `evals.<name>` without when it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// The dataset's name (its content enters the id as a hash).
    pub dataset: Option<String>,
    pub temperature: f64,
    pub top_p: f64,
    /// Samples per problem (avg@k / pass@k when > 1).
    pub samples: u32,
    pub max_tokens: u32,
    pub seed: u64,
    /// The grader behind the headline `accuracy`.
    pub grader: GraderName,
}

impl From<&EvalParams> for EvalSettings {
    fn from(e: &EvalParams) -> Self {
        EvalSettings {
            dataset: e.dataset.clone(),
            temperature: e.temperature,
            top_p: e.top_p,
            samples: e.samples,
            max_tokens: e.max_tokens,
            seed: e.seed,
            grader: e.grader,
        }
    }
}

/// `eval`: one evaluation of one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalNodeParams {
    /// The evaluation's name in the run (`math500`).
    pub name: String,
    pub eval: EvalSettings,
    pub dataset: DatasetView,
    pub model: ModelView,
}

/// A probe's settings: a run's `probe` without the dataset's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    pub prompts: u32,
    pub samples: u32,
    pub max_tokens: u32,
    pub opening_tokens: u32,
    pub seed: u64,
}

impl From<&ProbeParams> for ProbeSettings {
    fn from(p: &ProbeParams) -> Self {
        ProbeSettings {
            prompts: p.prompts,
            samples: p.samples,
            max_tokens: p.max_tokens,
            opening_tokens: p.opening_tokens,
            seed: p.seed,
        }
    }
}

/// How the probe samples and cuts its prompts: the run's rollout settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u32,
    pub max_prompt_tokens: u32,
}

impl From<&RolloutParams> for ProbeSampling {
    fn from(r: &RolloutParams) -> Self {
        ProbeSampling {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            max_prompt_tokens: r.max_prompt_tokens,
        }
    }
}

/// `probe`: the base model's greedy responses to the probe prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeNodeParams {
    pub probe: ProbeSettings,
    pub rollout: ProbeSampling,
    pub dataset: DatasetView,
    pub model: ModelView,
}

/// `command`: one run of a shell rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandNodeParams {
    /// The command's name in the file.
    pub command: String,
    /// Its position in the pipeline's dependency order.
    pub index: usize,
    /// The template, as written; the stage substitutes it once, quoting each value.
    pub run: String,
    /// The values the template reads, by name.
    pub vars: Map<String, Value>,
    /// The names of its declared input files, in the order of the node's externals.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub needs: Vec<String>,
    pub per_step: bool,
    pub accelerator: bool,
    pub version: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn problems_read_as_the_plan_has_always_written_them() {
        assert_eq!(to_value(&Problems::All), json!("all"));
        assert_eq!(
            to_value(&Problems::IncorrectLabels),
            json!("incorrect_labels")
        );
        let one = Problems::OneShot(OneShotExample {
            problem: "1+1".into(),
            answer: "2".into(),
        });
        assert_eq!(
            to_value(&one),
            json!({"one_shot": {"problem": "1+1", "answer": "2"}})
        );
    }

    #[test]
    fn an_unknown_or_missing_field_is_refused_with_the_stage_named() {
        let mut probe = to_value(&ProbeSettings::from(&ProbeParams::default()));
        probe["extra"] = json!(1);
        let err = from_value::<ProbeSettings>(StageKind::Probe, &probe).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("the probe node's parameters: unknown field `extra`"));
        let err =
            from_value::<SampledAt>(StageKind::Update, &json!({"temperature": 1.0})).unwrap_err();
        assert!(err
            .to_string()
            .contains("missing field `max_response_tokens`"));
    }
}
