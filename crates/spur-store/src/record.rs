//! Run records: one JSON document per run under `cache/runs/<run id>.json`, rewritten
//! atomically when an invocation starts and ends. They say what a run is (its cell, its
//! parameters, the experiment file's hash), how far it got, and where its results came from
//! (code, machine, input hashes). `spur report` and `spur status` read them back as this type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spur_core::node_params::RewardSpec;

/// What a run's last invocation recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// An invocation is computing it (or died without saying otherwise).
    Running,
    /// Every node is cached.
    Finished,
    /// A node failed; `error` says which and why.
    Failed,
    /// Stopped before the end (a signal, a time limit, another run's failure).
    Stopped,
}

impl RunStatus {
    /// The status a run ends an invocation with. A run whose nodes are all cached finished,
    /// whatever else happened; otherwise a stop (signal, time limit) is not a failure, and a
    /// run that neither failed nor completed was stopped (another run's failure stopped it).
    pub fn after(complete: bool, failed: bool, stopped: bool) -> RunStatus {
        match (complete, stopped, failed) {
            (true, _, _) => RunStatus::Finished,
            (false, true, _) => RunStatus::Stopped,
            (false, false, true) => RunStatus::Failed,
            (false, false, false) => RunStatus::Stopped,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
        }
    }
}

/// Whether a node's result is in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Cached,
    Pending,
}

/// One node of a run, as the record lists it (in the run's execution order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node id, hex.
    pub id: String,
    /// The stage kind's name (`rollout`, `eval`, …).
    pub kind: String,
    pub step: u32,
    /// Used by other runs too.
    pub shared: bool,
    /// An eval node's evaluation name (`math500`).
    pub eval: Option<String>,
    pub status: NodeState,
    /// From the node's manifest, once cached.
    pub seconds: Option<f64>,
    pub finished_at: Option<String>,
    pub metrics: Option<Value>,
}

/// The experiment file a run came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRef {
    pub path: String,
    pub name: String,
    /// sha256 of the file's bytes.
    pub sha256: String,
}

/// The git state of the experiment's workspace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GitState {
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub dirty: bool,
    /// sha256 of the uncommitted diff against HEAD, when dirty.
    pub diff_sha256: Option<String>,
    pub workdir: Option<String>,
}

/// The machine a record was written on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Host {
    pub name: Option<String>,
    pub cpu: Option<String>,
    pub cores: Option<usize>,
    pub os: String,
    pub arch: String,
}

/// Where a run's results came from. Informational: a field an older spur did not write reads
/// as empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    pub spur_version: String,
    /// sha256 of the Cargo.lock spur was built with.
    pub cargo_lock_sha256: String,
    pub host: Host,
    /// The GPUs `nvidia-smi` listed (name, driver).
    pub accelerators: Vec<String>,
    /// `None` outside a git repository.
    pub git: Option<GitState>,
    /// External input key (`models.smollm2`) → its content hash.
    pub inputs: BTreeMap<String, String>,
}

/// One run's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub experiment: ExperimentRef,
    /// Axis name → value, in grid order.
    pub cell: Map<String, Value>,
    /// The run's resolved parameters, as the spur that ran it wrote them (kept as JSON so a
    /// record stays readable after the parameter set grows).
    pub params: Value,
    pub reward: Option<RewardSpec>,
    /// When the first invocation that computed this run started.
    pub first_started_at: String,
    /// When the latest one started.
    pub started_at: String,
    pub finished_at: Option<String>,
    pub nodes_done: usize,
    pub nodes_total: usize,
    pub provenance: Provenance,
    pub nodes: Vec<NodeEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_not_a_failure_and_a_complete_run_finished() {
        use RunStatus::*;
        assert_eq!(RunStatus::after(true, true, true), Finished);
        assert_eq!(RunStatus::after(false, true, true), Stopped);
        assert_eq!(RunStatus::after(false, true, false), Failed);
        assert_eq!(RunStatus::after(false, false, false), Stopped);
    }
}
