//! Nodes of the stage DAG and their identities.

use std::sync::Arc;

use serde_json::Value;
use spur_core::node_params::{self, EvalNodeParams};
use spur_core::{Hash, StageKind};

use crate::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub role: Role,
    /// Index into `Plan::nodes`.
    pub node: u32,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: Hash,
    pub kind: StageKind,
    pub version: u32,
    /// Training step (0 for step-independent nodes).
    pub step: u32,
    /// The parameters this stage reads (shared between a run's steps).
    pub params: Arc<Value>,
    pub inputs: Vec<Input>,
    /// Indices into `Plan::externals`.
    pub externals: Vec<u32>,
    /// Indices of the runs that use this node, ascending.
    pub runs: Vec<u32>,
}

impl Node {
    /// An eval node's evaluation name (`math500`); `None` for other nodes.
    pub fn eval_name(&self) -> Option<String> {
        (self.kind == StageKind::Eval)
            .then(|| node_params::from_value::<EvalNodeParams>(self.kind, &self.params).ok())
            .flatten()
            .map(|p| p.name)
    }
}
