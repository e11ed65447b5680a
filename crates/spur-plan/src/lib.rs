//! From a validated experiment to a DAG of content-addressed stage nodes.
//!
//! A node's id is sha256 over a canonical encoding of: its stage kind, the
//! stage's implementation version, a digest of the parameters that stage
//! actually reads, the training step, its inputs' ids (with their roles) and
//! the content hashes of the external files it reads. Nodes with equal ids are
//! one node, which is how a model's step-0 eval or a (model, seed)'s first
//! rollout is shared by every reward arm: those stages never read the reward.
//!
//! Nodes are stored in topological order (every dependency comes first).

mod command_chain;
mod external;
mod model_chain;
mod node;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use spur_spec::{Experiment, Run};

pub use external::{External, ExternalError, ExternalKind, Hasher};
pub use node::{Input, Node};
pub use spur_core::{Hash, Role, StageKind};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error("commands.{command}.run: `${{{name}}}` names no grid axis, parameter or built-in variable (out, step, prev, inputs.<name>, or a command it needs)")]
    UnknownReference { command: String, name: String },
}

/// Implementation version of each stage kind, supplied by the stage registry;
/// bumping one invalidates exactly that kind's nodes and their dependents.
pub type Versions<'a> = dyn Fn(StageKind) -> u32 + Sync + 'a;

/// A run: one grid cell and the nodes it needs, in execution order.
#[derive(Debug, Clone)]
pub struct PlanRun {
    /// First 16 hex digits of sha256 over the run's node ids.
    pub id: String,
    pub index: usize,
    /// `axis=value,…`, for progress lines and job names.
    pub label: String,
    /// Keep the policy checkpoint of every Nth step (`materialize.checkpoint_every`);
    /// the others are pruned once the next step's exists.
    pub checkpoint_every: u32,
    /// Indices into [`Plan::nodes`], in execution order.
    pub nodes: Vec<u32>,
}

/// What execution needs of the experiment besides its nodes, so that an
/// executor reads the plan alone.
#[derive(Debug, Clone)]
pub struct PlanExperiment {
    pub name: String,
    /// The file as given on the command line.
    pub path: PathBuf,
    /// The `executor:` block, as written, for the executor to read.
    pub executor: Option<Value>,
}

#[derive(Debug)]
pub struct Plan {
    pub experiment: PlanExperiment,
    pub runs: Vec<PlanRun>,
    pub nodes: Vec<Node>,
    pub externals: Vec<External>,
    index: HashMap<Hash, u32>,
}

impl Plan {
    pub fn node(&self, id: &Hash) -> Option<&Node> {
        self.index.get(id).map(|&i| &self.nodes[i as usize])
    }

    pub fn position(&self, id: &Hash) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// Nodes used by more than one run.
    pub fn shared_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.runs.len() > 1).count()
    }
}

/// Plan every run of the experiment.
pub fn plan(
    exp: &Experiment,
    versions: &Versions<'_>,
    hasher: &Hasher<'_>,
) -> Result<Plan, PlanError> {
    let externals = external::collect(exp, hasher)?;
    let ext_index: HashMap<&str, u32> = externals
        .iter()
        .enumerate()
        .map(|(i, e)| (e.key.as_str(), i as u32))
        .collect();
    let ctx = RunCtx {
        exp,
        versions,
        externals: &externals,
        ext_index: &ext_index,
    };
    // Each run's chain is independent: build them in parallel, then merge.
    let drafts: Vec<Vec<Node>> = exp
        .runs
        .par_iter()
        .map(|run| ctx.run_nodes(run))
        .collect::<Result<_, _>>()?;

    let total: usize = drafts.iter().map(Vec::len).sum();
    let mut nodes: Vec<Node> = Vec::with_capacity(total);
    let mut index: HashMap<Hash, u32> = HashMap::with_capacity(total);
    let mut runs = Vec::with_capacity(drafts.len());
    for (r, draft) in drafts.into_iter().enumerate() {
        let mut run_hasher = Sha256::new();
        let mut order = Vec::with_capacity(draft.len());
        // Draft inputs index into the draft; remap them to global positions.
        let mut local_to_global = Vec::with_capacity(draft.len());
        for mut node in draft {
            run_hasher.update(node.id.0);
            let global = match index.get(&node.id) {
                Some(&g) => g,
                None => {
                    for input in &mut node.inputs {
                        input.node = local_to_global[input.node as usize];
                    }
                    let g = nodes.len() as u32;
                    index.insert(node.id, g);
                    nodes.push(node);
                    g
                }
            };
            let runs_of = &mut nodes[global as usize].runs;
            if runs_of.last() != Some(&(r as u32)) {
                runs_of.push(r as u32);
            }
            local_to_global.push(global);
            order.push(global);
        }
        runs.push(PlanRun {
            id: hex::encode(&run_hasher.finalize()[..8]),
            index: r,
            label: exp.runs[r].label(),
            checkpoint_every: exp.runs[r].params.materialize.checkpoint_every,
            nodes: order,
        });
    }
    Ok(Plan {
        experiment: PlanExperiment {
            name: exp.name.clone(),
            path: exp.path.clone(),
            executor: exp.executor.clone(),
        },
        runs,
        nodes,
        externals,
        index,
    })
}

struct RunCtx<'a> {
    exp: &'a Experiment,
    versions: &'a Versions<'a>,
    externals: &'a [External],
    ext_index: &'a HashMap<&'a str, u32>,
}

/// Builds one run's nodes; inputs refer to positions in the run's own list.
struct Chain<'a> {
    ctx: &'a RunCtx<'a>,
    nodes: Vec<Node>,
}

/// The sha256 of `v`'s canonical JSON: compact, object keys sorted at every level.
///
/// Sorted explicitly: serde_json keeps a map's insertion order when any crate in the build
/// turns on its `preserve_order` feature (mistralrs-core's dependencies do), and a node id
/// must not depend on which crates a build happens to include.
fn digest(v: &Value) -> Hash {
    let mut bytes = Vec::new();
    write_canonical(v, &mut bytes);
    Hash(Sha256::digest(bytes).into())
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("strings serialise");
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(out, scalar).expect("JSON values serialise"),
    }
}

/// A stage's node parameters, serialised and digested once, then shared by the nodes of every
/// step that reads them.
struct NodeParams {
    value: Arc<Value>,
    digest: Hash,
}

impl NodeParams {
    fn new<T: serde::Serialize>(params: &T) -> Self {
        let value = spur_core::node_params::to_value(params);
        NodeParams {
            digest: digest(&value),
            value: Arc::new(value),
        }
    }
}

impl Chain<'_> {
    fn push(
        &mut self,
        kind: StageKind,
        step: u32,
        params: &NodeParams,
        inputs: Vec<Input>,
        externals: Vec<u32>,
    ) -> u32 {
        let version = (self.ctx.versions)(kind);
        let mut h = Sha256::new();
        h.update(b"spur-node\0");
        h.update(kind.name().as_bytes());
        h.update([0]);
        h.update(version.to_le_bytes());
        h.update(params.digest.0);
        h.update(step.to_le_bytes());
        h.update((inputs.len() as u32).to_le_bytes());
        for input in &inputs {
            h.update(input.role.tag());
            h.update(self.nodes[input.node as usize].id.0);
        }
        h.update((externals.len() as u32).to_le_bytes());
        for &e in &externals {
            h.update(self.ctx.externals[e as usize].hash.0);
        }
        self.nodes.push(Node {
            id: Hash(h.finalize().into()),
            kind,
            version,
            step,
            params: Arc::clone(&params.value),
            inputs,
            externals,
            runs: Vec::new(),
        });
        (self.nodes.len() - 1) as u32
    }
}

impl RunCtx<'_> {
    fn ext(&self, key: &str) -> u32 {
        self.ext_index[key]
    }

    fn run_nodes(&self, run: &Run) -> Result<Vec<Node>, PlanError> {
        let mut chain = Chain {
            ctx: self,
            nodes: Vec::new(),
        };
        if self.exp.trains || self.exp.evaluates {
            self.model_chain(run, &mut chain);
        }
        self.command_chain(run, &mut chain)?;
        Ok(chain.nodes)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The bytes a node id hashes are the same whatever order a map's keys were inserted in,
    /// and whatever serde_json features the build turned on.
    #[test]
    fn the_params_digest_is_canonical_json() {
        let a = json!({"b": 1, "a": {"d": [1, {"z": 0, "y": 1.5}], "c": "x\"y"}});
        let mut b = serde_json::Map::new();
        b.insert(
            "a".into(),
            json!({"c": "x\"y", "d": [1, {"y": 1.5, "z": 0}]}),
        );
        b.insert("b".into(), json!(1));
        let want = br#"{"a":{"c":"x\"y","d":[1,{"y":1.5,"z":0}]},"b":1}"#;
        assert_eq!(digest(&a), Hash(Sha256::digest(want).into()));
        assert_eq!(digest(&Value::Object(b)), digest(&a));
    }

    /// Every node the plan makes, of every stage kind, reads back as its stage's parameter
    /// struct, with nothing left over.
    #[test]
    fn every_nodes_params_read_as_its_stages_struct() {
        let dir = std::env::temp_dir().join(format!("spur-plan-kinds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["m.gguf", "train.jsonl", "test.jsonl", "prep.py"] {
            std::fs::write(dir.join(name), name).unwrap();
        }
        let text = "\
models:
  m: {sources: [{path: m.gguf}], template: custom, template_text: 'Q: {problem}'}
datasets:
  train: {sources: [{path: train.jsonl}], limit: 4, problem_field: question}
  test: {sources: [{path: test.jsonl}], offset: 1}
rewards:
  gt: {kind: ground_truth}
  mv: {kind: majority_vote, label_samples: 4}
  inc: {kind: incorrect}
  one: {kind: one_shot, example: {problem: '1+1', answer: '2'}}
  mine: {kind: command, command: 'python3 r.py ${update.lr}'}
  rnd: {kind: random, gamma: '${g}'}
defaults:
  model: m
  train_data: train
  steps: 2
  precision: bf16
  update: {lr_schedule: cosine, warmup_steps: 1, kl_coef: 0.1, moments: bf16}
  probe: {dataset: test, prompts: 2}
  evals:
    test: {dataset: test, samples: 4, temperature: 0.6, grader: strict}
pipeline: [rollout, reward, update, eval, prep]
commands:
  prep:
    run: python3 ${inputs.script} --seed ${seed} --out ${out}/x
    inputs: {script: prep.py}
    outputs: [x]
    per_step: true
grid:
  reward: [gt, mv, inc, one, mine, rnd]
  g: [0.25]
";
        let exp = spur_spec::parse(text, &dir.join("exp.yaml")).unwrap();
        let plan = plan(&exp, &|_| 1, &|_: &std::path::Path| Ok(Hash([0; 32]))).unwrap();
        let mut kinds = std::collections::BTreeSet::new();
        for node in &plan.nodes {
            spur_core::node_params::check(node.kind, &node.params)
                .unwrap_or_else(|e| panic!("{e}: {}", node.params));
            kinds.insert(node.kind);
        }
        assert_eq!(kinds.len(), StageKind::ALL.len(), "{kinds:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
