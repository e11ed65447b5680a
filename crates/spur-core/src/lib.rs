//! The vocabulary every layer of spur shares: content hashes, stage kinds,
//! the roles a node's inputs play, how a parameter value reads as text, the
//! reward grammar, a run's parameters with their defaults (`params`) and each
//! stage's node parameters (`node_params`).
//! A leaf crate, so that the cache (spur-store), the planner and the stages
//! can all name a node without depending on one another.

use std::fmt;

pub mod node_params;
pub mod params;
pub mod reward;

pub use reward::{RewardBase, RewardExpr, RewardKindError, RewardTerm};

/// A sha256 digest: a node id or a content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.hex()[..12])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageKind {
    Rollout,
    Reward,
    Update,
    Eval,
    /// Majority-vote labels for `majority_vote` / `incorrect` rewards.
    Label,
    /// The base model's greedy responses to a run's probe prompts: the fixed
    /// reference its updates measure the policy against.
    Probe,
    Command,
}

impl StageKind {
    pub const ALL: [StageKind; 7] = [
        StageKind::Rollout,
        StageKind::Reward,
        StageKind::Update,
        StageKind::Eval,
        StageKind::Label,
        StageKind::Probe,
        StageKind::Command,
    ];

    /// Whether the stage loads a model (and so has a peak memory worth estimating).
    pub fn loads_model(self) -> bool {
        matches!(
            self,
            StageKind::Rollout
                | StageKind::Update
                | StageKind::Eval
                | StageKind::Label
                | StageKind::Probe
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Rollout => "rollout",
            StageKind::Reward => "reward",
            StageKind::Update => "update",
            StageKind::Eval => "eval",
            StageKind::Label => "label",
            StageKind::Probe => "probe",
            StageKind::Command => "command",
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an input is to the node that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The policy weights after the previous step (absent at step 1: the
    /// model's own weights are an external input then).
    Policy,
    Rollout,
    Reward,
    Labels,
    /// The previous step of the same per-step command.
    Prev,
    /// The run's step-0 probe (its prompts and the base model's greedy responses).
    Probe,
    /// The i-th entry of a command's `needs`.
    Need(u16),
}

impl Role {
    /// Bytes hashed into the reader's id.
    pub fn tag(self) -> [u8; 3] {
        match self {
            Role::Policy => [1, 0, 0],
            Role::Rollout => [2, 0, 0],
            Role::Reward => [3, 0, 0],
            Role::Labels => [4, 0, 0],
            Role::Prev => [5, 0, 0],
            Role::Probe => [7, 0, 0],
            Role::Need(i) => {
                let [a, b] = i.to_le_bytes();
                [6, a, b]
            }
        }
    }
}

/// A parameter value as a user wrote it: a string without quotes, anything
/// else as JSON (`0.5`, `true`). Labels, `${…}` substitution and the values a
/// command stage hands to its shell all read values this way.
pub fn scalar_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
