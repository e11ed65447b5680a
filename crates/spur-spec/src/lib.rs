//! Experiment files: YAML → a validated [`Experiment`] whose grid is expanded
//! into one [`Run`] per cell.
//!
//! Every problem found is reported with its file, line, column and key path,
//! plus a hint where one helps; an experiment with any problem is rejected
//! whole, so nothing runs on half-valid input.

mod ctx;
mod error;
mod grid;
mod locate;
mod params;
mod schema;
mod subst;
mod validate;

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value;

pub use error::{did_you_mean, one_of, SpecError, SpecErrors};
pub use locate::{Locations, Pos};
pub use params::{param_paths, RunParams};
pub use schema::{CommandDef, DatasetDef, ModelDef, RewardDef, Source};
pub use spur_core::params::{
    Advantage, Aggregation, Engine, EvalAt, EvalParams, GraderName, KlEstimator, LrSchedule,
    Materialize, OneShotExample, Precision, ProbeParams, RolloutParams, TemplateKind, UpdateParams,
};
pub use spur_core::scalar_text;
pub use subst::{references, substitute_str};

use ctx::Ctx;
use schema::ExperimentFile;
use spur_core::node_params::RewardSpec;

/// The built-in model stages, in the order a training step runs them.
pub const BUILTIN_STAGES: [&str; 4] = ["rollout", "reward", "update", "eval"];

/// A validated experiment: definitions plus one run per grid cell.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The file as given on the command line.
    pub path: PathBuf,
    /// Directory that relative paths in the file are resolved against.
    pub dir: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// The file's bytes (recorded and hashed by callers).
    pub text: String,
    pub models: IndexMap<String, ModelDef>,
    pub datasets: IndexMap<String, DatasetDef>,
    pub rewards: IndexMap<String, RewardDef>,
    pub commands: IndexMap<String, CommandDef>,
    /// Whether runs train (rollout → reward → update per step).
    pub trains: bool,
    /// Whether runs evaluate (`eval` in the pipeline).
    pub evaluates: bool,
    /// Commands in the pipeline, in dependency order.
    pub command_order: Vec<String>,
    pub runs: Vec<Run>,
    /// The `executor:` block, for executors to read.
    pub executor: Option<Value>,
}

/// One grid cell, fully resolved.
#[derive(Debug, Clone)]
pub struct Run {
    /// Axis name → value, in grid order.
    pub cell: IndexMap<String, Value>,
    pub params: RunParams,
    /// The merged parameter tree (for `${path}` lookups).
    pub tree: Value,
    /// The run's reward, typed, with `${...}` resolved (if the run trains).
    pub reward: Option<RewardSpec>,
}

impl Run {
    /// Resolve `${name}`: an axis first, then a parameter path, as written in the file (a value
    /// keeps the form it was written in), else at its default.
    pub fn lookup(&self, name: &str) -> Option<Value> {
        if let Some(v) = self.cell.get(name) {
            return Some(v.clone());
        }
        let at = |tree: &Value| {
            name.split('.')
                .try_fold(tree, |cur, part| cur.get(part))
                .cloned()
        };
        at(&self.tree).or_else(|| at(&to_json(&self.params)))
    }

    /// `key=value,…` label used in progress output and `--only`.
    pub fn label(&self) -> String {
        if self.cell.is_empty() {
            return "(defaults)".to_string();
        }
        self.cell
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar_text(v)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Read and validate an experiment file.
pub fn load(path: &Path) -> Result<Experiment, SpecErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(path, "", format!("cannot read the experiment file: {e}"))
            .with_hint(Some("check the path".into()))
    })?;
    parse(&text, path)
}

/// Validate an experiment given its text; `path` is used in messages and to
/// resolve relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Experiment, SpecErrors> {
    let ctx = Ctx {
        path,
        text,
        loc: Locations::index(text),
    };
    let file: ExperimentFile = {
        let de = serde_yaml::Deserializer::from_str(text);
        match serde_path_to_error::deserialize(de) {
            Ok(file) => file,
            Err(e) => {
                // serde stops at a duplicate key but places it at the start of its mapping;
                // the index knows where each duplicate is written.
                let mut errors = ctx.duplicate_keys();
                let err = ctx.serde_error(e);
                let duplicate = ["duplicate entry", "duplicate field"]
                    .iter()
                    .any(|d| err.message.contains(d));
                if errors.is_empty() || !duplicate {
                    errors.push(err);
                }
                return Err(SpecErrors(errors));
            }
        }
    };
    let mut errors = ctx.duplicate_keys();
    let exp = validate::validate(&ctx, file, &mut errors);
    match exp {
        Some(exp) if errors.is_empty() => Ok(exp),
        _ => Err(SpecErrors(errors)),
    }
}

/// Parameters as JSON for canonical hashing and display.
pub fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("spec types serialise to JSON")
}
