//! Stages: what a node of the DAG does when it runs.
//!
//! A stage reads its inputs' artifacts and external files and writes its own
//! artifacts into a fresh directory; the executor decides when and where it
//! runs, and the store publishes what it wrote. Stages know nothing of
//! scheduling, caching or clusters.

mod command;
mod data;
mod eval;
pub mod interrupt;
mod label;
pub mod memory;
mod model;
mod probe;
mod reward;
mod rollout;
mod shell;
mod update;

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use spur_plan::{External, Node, Role, StageKind};

pub use command::CommandStage;
pub use eval::{EvalStage, RECORDS_FILE as EVAL_RECORDS_FILE};
pub use label::LabelStage;
pub use probe::{ProbeMetrics, ProbeStage};
pub use reward::RewardStage;
pub use rollout::RolloutStage;
pub use update::UpdateStage;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("command exited with {status}; last lines of {log}:\n{tail}")]
    CommandFailed {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("input {role:?} ({path}) is missing `{artifact}`: {why}")]
    MissingInput {
        role: Role,
        path: PathBuf,
        artifact: String,
        why: String,
    },
    #[error(transparent)]
    Params(#[from] spur_core::node_params::ParamsError),
    #[error("`{kind}` stages are not available in this build of spur")]
    Unavailable { kind: StageKind },
    #[error("{0}")]
    Failed(String),
}

/// The device class a node needs; accelerator nodes are serialised per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Cpu,
    Accelerator,
}

/// State a worker keeps between the consecutive nodes of a fused run chain
/// (e.g. a loaded model), one slot per type.
#[derive(Default)]
pub struct Session {
    slots: HashMap<std::any::TypeId, Box<dyn Any + Send>>,
}

impl Session {
    pub fn get_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.slots
            .get_mut(&std::any::TypeId::of::<T>())
            .and_then(|b| b.downcast_mut())
    }

    pub fn remove<T: Any + Send>(&mut self) {
        self.slots.remove(&std::any::TypeId::of::<T>());
    }

    pub fn insert<T: Any + Send>(&mut self, value: T) {
        self.slots
            .insert(std::any::TypeId::of::<T>(), Box::new(value));
    }
}

/// An input node as a stage sees it.
#[derive(Debug, Clone)]
pub struct InputDir {
    pub role: Role,
    pub node: spur_plan::Hash,
    /// Its published artifacts.
    pub out: PathBuf,
}

/// Everything a stage may read or write while running one node.
pub struct NodeContext<'a> {
    pub node: &'a Node,
    pub inputs: Vec<InputDir>,
    pub externals: Vec<&'a External>,
    /// Where to write artifacts (a temporary directory until published).
    pub out: &'a Path,
    /// Where to write a log (kept beside the artifacts, not hashed).
    pub log: &'a Path,
    /// Devices assigned to an accelerator node (e.g. `0`), empty for CPU.
    pub devices: &'a [String],
    pub session: &'a mut Session,
}

impl NodeContext<'_> {
    pub fn input(&self, role: Role) -> Option<&InputDir> {
        self.inputs.iter().find(|i| i.role == role)
    }

    /// The node's parameters as its stage's struct (`spur_core::node_params`), which the plan
    /// wrote with every default applied; an unknown or missing field is an error.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        Ok(spur_core::node_params::from_value(
            self.node.kind,
            &self.node.params,
        )?)
    }
}

pub trait Stage: Send + Sync {
    fn kind(&self) -> StageKind;

    /// Bump when the stage's output for the same inputs changes.
    fn version(&self) -> u32;

    fn resource(&self, _node: &Node) -> Resource {
        Resource::Cpu
    }

    /// Large artifacts the materialisation policy may delete once a later
    /// step supersedes them (e.g. policy checkpoints).
    fn prunable(&self) -> &'static [&'static str] {
        &[]
    }

    /// Files that must exist in `out` when the stage returns.
    fn declared_outputs(&self, _node: &Node) -> Vec<String> {
        Vec::new()
    }

    /// Compute the node; returns its metrics (a JSON object).
    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<serde_json::Value, StageError>;
}

/// Version of a stage whose output goes through spur-lm's numerics (sampling or scoring): its
/// own logic version combined with [`spur_lm::NUMERICS_VERSION`], so a kernel's rounding change
/// re-keys every such stage. (Old single-number versions were at most 5; these start at 1000.)
pub(crate) const fn numerics_stage_version(own: u32, numerics: u32) -> u32 {
    own * 1000 + numerics
}

/// The stage implementations this build knows, by kind.
pub struct Registry {
    stages: HashMap<StageKind, Box<dyn Stage>>,
}

impl Registry {
    pub fn empty() -> Registry {
        Registry {
            stages: HashMap::new(),
        }
    }

    /// Every stage of this build.
    pub fn with_builtin() -> Registry {
        let mut r = Registry::empty();
        r.add(Box::new(CommandStage));
        r.add(Box::new(RolloutStage));
        r.add(Box::new(RewardStage));
        r.add(Box::new(UpdateStage));
        r.add(Box::new(EvalStage));
        r.add(Box::new(LabelStage));
        r.add(Box::new(ProbeStage));
        r
    }

    pub fn add(&mut self, stage: Box<dyn Stage>) {
        self.stages.insert(stage.kind(), stage);
    }

    pub fn get(&self, kind: StageKind) -> Option<&dyn Stage> {
        self.stages.get(&kind).map(|b| b.as_ref())
    }

    /// Implementation version of `kind`.
    pub fn version(&self, kind: StageKind) -> u32 {
        self.get(kind).map_or(0, Stage::version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_stage_versions_follow_the_numerics_version() {
        let registry = Registry::with_builtin();
        let numerics = spur_lm::NUMERICS_VERSION;
        // Versions before they were derived from the numerics version.
        let old = [
            (StageKind::Label, 4),
            (StageKind::Rollout, 5),
            (StageKind::Eval, 5),
        ];
        for (kind, old) in old {
            let version = registry.version(kind);
            let own = version / 1000;
            assert!(own >= 1, "{kind:?}");
            assert_eq!(version, numerics_stage_version(own, numerics), "{kind:?}");
            assert_ne!(
                numerics_stage_version(own, numerics + 1),
                version,
                "{kind:?} must move with the numerics version"
            );
            assert_ne!(version, old, "{kind:?} must not reuse its stale cache");
        }
    }

    #[test]
    fn missing_pinned_model_names_the_path_it_tried() {
        let source = |path: &str| spur_spec::Source {
            path: Some(path.into()),
            hub: None,
            pip: None,
            file: None,
            revision: None,
        };
        let ext = External {
            key: "models.smol".into(),
            kind: spur_plan::ExternalKind::Model,
            hash: spur_plan::Hash([7; 32]),
            local: None,
            sources: vec![source("models/smol.gguf"), source("/abs/smol.gguf")],
            pinned: true,
        };
        let msg = model::model_spec(&ext).unwrap_err().to_string();
        for part in ["models.smol", "models/smol.gguf", "/abs/smol.gguf"] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
    }
}
