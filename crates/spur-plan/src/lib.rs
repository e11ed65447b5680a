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

mod external;
mod node;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spur_core::{RewardBase, RewardExpr};
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

/// One evaluation of a run, before its nodes are placed: the eval node's
/// parameters and their digest, its dataset (an index into the externals)
/// and the steps it runs at.
struct PlannedEval {
    params: Arc<Value>,
    digest: Hash,
    dataset: u32,
    steps: Vec<u32>,
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

impl Chain<'_> {
    fn push(
        &mut self,
        kind: StageKind,
        step: u32,
        params: &Arc<Value>,
        params_digest: Hash,
        inputs: Vec<Input>,
        externals: Vec<u32>,
    ) -> u32 {
        let version = (self.ctx.versions)(kind);
        let mut h = Sha256::new();
        h.update(b"spur-node\0");
        h.update(kind.name().as_bytes());
        h.update([0]);
        h.update(version.to_le_bytes());
        h.update(params_digest.0);
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
            params: Arc::clone(params),
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

    /// rollout → reward → update per step, evals at their steps.
    fn model_chain(&self, run: &Run, chain: &mut Chain) {
        let p = &run.params;
        let model_name = p.model.as_deref().unwrap_or_default();
        let model_def = &self.exp.models[model_name];
        let model_ext = self.ext(&format!("models.{model_name}"));
        // Rollouts, labels and updates always run on candle (GRPO needs natural-log
        // log-probs, per-sample seeds and the trainer's weights in memory); only
        // evaluations use the model's `engine`.
        let model_view = json!({
            "template": model_def.template,
            "template_text": model_def.template_text,
            "precision": p.precision,
        });
        let mut eval_model_view = model_view.clone();
        eval_model_view["engine"] = json!(model_def.engine);

        let mut evals: Vec<PlannedEval> = Vec::new();
        if self.exp.evaluates {
            for (name, e) in &p.evals {
                let ds = e.dataset.as_deref().unwrap_or_default();
                let mut view = spur_spec::to_json(e);
                view.as_object_mut().map(|m| m.remove("at"));
                let params = Arc::new(json!({
                    "name": name,
                    "eval": view,
                    "dataset": dataset_view(self.exp, ds),
                    "model": eval_model_view,
                }));
                evals.push(PlannedEval {
                    digest: digest(&params),
                    params,
                    dataset: self.ext(&format!("datasets.{ds}")),
                    steps: p.eval_steps(e.at),
                });
            }
        }
        let eval_at = |chain: &mut Chain, step: u32, policy: Option<u32>| {
            for e in &evals {
                if e.steps.binary_search(&step).is_ok() {
                    let (inputs, mut exts) = match policy {
                        Some(pol) => (
                            vec![Input {
                                role: Role::Policy,
                                node: pol,
                            }],
                            vec![],
                        ),
                        None => (vec![], vec![model_ext]),
                    };
                    exts.push(e.dataset);
                    chain.push(StageKind::Eval, step, &e.params, e.digest, inputs, exts);
                }
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
            .clone()
            .expect("a training run has a resolved reward");
        // Most rewards leave the training problems alone, so the rollout does
        // not read the reward and is shared by every arm. Two change them:
        // `incorrect` trains only on problems whose majority label is wrong,
        // `one_shot` on a single example.
        // The spec has refused kinds that do not parse.
        let expr = RewardExpr::parse(&reward.kind).ok();
        let uses = |base: RewardBase| expr.as_ref().is_some_and(|e| e.uses(base));
        let problems = if uses(RewardBase::Incorrect) {
            json!("incorrect_labels")
        } else if uses(RewardBase::OneShot) {
            json!({ "one_shot": reward.example })
        } else {
            json!("all")
        };
        let rollout_params = Arc::new(json!({
            "rollout": p.rollout,
            "seed": p.seed,
            "dataset": dataset_view(self.exp, train),
            "model": model_view,
            "problems": problems,
        }));
        let rollout_digest = digest(&rollout_params);
        let label = expr
            .as_ref()
            .is_some_and(RewardExpr::needs_labels)
            .then(|| {
                let label_model = reward.label_model.as_deref().unwrap_or(model_name);
                let params = Arc::new(json!({
                    "samples": reward.label_samples.unwrap_or(64),
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "max_tokens": p.rollout.max_response_tokens,
                    "dataset": dataset_view(self.exp, train),
                    "template": "raw",
                    "seed": 0,
                    "model": { "precision": p.precision },
                }));
                let d = digest(&params);
                let exts = vec![self.ext(&format!("models.{label_model}")), train_ext];
                chain.push(StageKind::Label, 0, &params, d, vec![], exts)
            });
        // A command reward's template stays as written; `vars` holds the values it reads,
        // which the reward stage hands to the shell as it does for command stages.
        let reward_vars: serde_json::Map<String, Value> = reward
            .command
            .iter()
            .flat_map(|c| spur_spec::references(c))
            .filter_map(|n| Some((n.clone(), run.lookup(&n)?)))
            .collect();
        let reward_params =
            Arc::new(json!({ "reward": reward, "vars": reward_vars, "seed": p.seed }));
        let reward_digest = digest(&reward_params);

        let mut update_view = spur_spec::to_json(&p.update);
        if p.update.lr_schedule != spur_spec::LrSchedule::Constant {
            update_view["total_steps"] = json!(p.steps);
        }
        // The trainer scores at the rollouts' temperature, and Dr. GRPO's constant defaults
        // to their response cap.
        let update_params = Arc::new(json!({
            "update": update_view,
            "rollout": {
                "temperature": p.rollout.temperature,
                "max_response_tokens": p.rollout.max_response_tokens,
            },
            "seed": p.seed,
            "model": model_view,
        }));
        let update_digest = digest(&update_params);

        // The probe's reference (prompts and the base model's greedy responses) is computed
        // once and shared by every run of the model that probes the same prompts alike.
        let probe = p.probe.dataset.as_deref().map(|ds| {
            let mut view = spur_spec::to_json(&p.probe);
            view.as_object_mut().map(|m| m.remove("dataset"));
            let params = Arc::new(json!({
                "probe": view,
                "rollout": {
                    "temperature": p.rollout.temperature,
                    "top_p": p.rollout.top_p,
                    "top_k": p.rollout.top_k,
                    "max_prompt_tokens": p.rollout.max_prompt_tokens,
                },
                "dataset": dataset_view(self.exp, ds),
                "model": model_view,
            }));
            let exts = vec![model_ext, self.ext(&format!("datasets.{ds}"))];
            chain.push(StageKind::Probe, 0, &params, digest(&params), vec![], exts)
        });

        let mut policy: Option<u32> = None;
        for step in 1..=p.steps {
            let (pol_inputs, pol_exts) = match policy {
                Some(pol) => (
                    vec![Input {
                        role: Role::Policy,
                        node: pol,
                    }],
                    vec![],
                ),
                None => (vec![], vec![model_ext]),
            };
            let mut rollout_exts = pol_exts.clone();
            rollout_exts.push(train_ext);
            let mut rollout_inputs = pol_inputs.clone();
            if let (Some(l), true) = (label, problems == "incorrect_labels") {
                rollout_inputs.push(Input {
                    role: Role::Labels,
                    node: l,
                });
            }
            let rollout = chain.push(
                StageKind::Rollout,
                step,
                &rollout_params,
                rollout_digest,
                rollout_inputs,
                rollout_exts,
            );

            let mut reward_inputs = vec![Input {
                role: Role::Rollout,
                node: rollout,
            }];
            if let Some(l) = label {
                reward_inputs.push(Input {
                    role: Role::Labels,
                    node: l,
                });
            }
            let scored = chain.push(
                StageKind::Reward,
                step,
                &reward_params,
                reward_digest,
                reward_inputs,
                vec![],
            );

            let mut update_inputs = pol_inputs;
            update_inputs.push(Input {
                role: Role::Rollout,
                node: rollout,
            });
            update_inputs.push(Input {
                role: Role::Reward,
                node: scored,
            });
            if let Some(probe) = probe {
                update_inputs.push(Input {
                    role: Role::Probe,
                    node: probe,
                });
            }
            // A KL penalty compares against the model's own weights at every step.
            let update_exts = if p.update.kl_coef > 0.0 {
                vec![model_ext]
            } else {
                pol_exts
            };
            let update = chain.push(
                StageKind::Update,
                step,
                &update_params,
                update_digest,
                update_inputs,
                update_exts,
            );
            policy = Some(update);
            eval_at(chain, step, policy);
        }
    }

    /// Command stages: each depends only on the variables it references.
    fn command_chain(&self, run: &Run, chain: &mut Chain) -> Result<(), PlanError> {
        // Command name → (first node, last node, per_step). A per-step
        // command's steps are consecutive nodes, so step s is first + s - 1.
        let mut placed: HashMap<&str, (u32, u32, bool)> = HashMap::new();
        let steps = run.params.steps;
        for (ci, name) in self.exp.command_order.iter().enumerate() {
            let def = &self.exp.commands[name];
            let mut runtime = vec!["out".to_string(), "step".into(), "prev".into()];
            runtime.extend(def.inputs.keys().map(|k| format!("inputs.{k}")));
            runtime.extend(def.needs.iter().cloned());
            // The template stays as written: the command stage substitutes
            // it once, quoting each value; `vars` holds the values it reads.
            let mut vars = serde_json::Map::new();
            for n in spur_spec::references(&def.run) {
                if runtime.contains(&n) || vars.contains_key(&n) {
                    continue;
                }
                let value = run.lookup(&n).ok_or_else(|| PlanError::UnknownReference {
                    command: name.clone(),
                    name: n.clone(),
                })?;
                vars.insert(n, value);
            }
            // Inputs enter the id by content (the externals), not by path;
            // `inputs` lists their names in the order of `Node::externals`.
            let mut input_names = Vec::with_capacity(def.inputs.len());
            let mut exts = Vec::with_capacity(def.inputs.len());
            for (k, raw) in &def.inputs {
                let path = spur_spec::substitute_str(raw, &mut |n| run.lookup(n))
                    .map(|v| spur_spec::scalar_text(&v))
                    .map_err(|n| PlanError::UnknownReference {
                        command: name.clone(),
                        name: n,
                    })?;
                exts.push(self.ext(&external::command_input_key(name, k, &path)));
                input_names.push(k.clone());
            }
            let params = Arc::new(json!({
                "command": name,
                "index": ci,
                "run": def.run,
                "vars": vars,
                "inputs": input_names,
                "outputs": def.outputs,
                "needs": def.needs,
                "per_step": def.per_step,
                "accelerator": def.accelerator,
                "version": def.version,
            }));
            let d = digest(&params);
            let need_inputs = |step: Option<u32>| -> Vec<Input> {
                def.needs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, need)| {
                        // Absent only for a per-step command in a 0-step run.
                        let (first, last, per_step) = *placed.get(need.as_str())?;
                        // A per-step command reading another per-step command
                        // takes the same step's node; otherwise the last one.
                        let node = match (step, per_step) {
                            (Some(s), true) => first + s - 1,
                            _ => last,
                        };
                        Some(Input {
                            role: Role::Need(i as u16),
                            node,
                        })
                    })
                    .collect()
            };
            if def.per_step {
                let mut prev: Option<u32> = None;
                let mut first = None;
                for step in 1..=steps {
                    let mut inputs = need_inputs(Some(step));
                    if let Some(p) = prev {
                        inputs.push(Input {
                            role: Role::Prev,
                            node: p,
                        });
                    }
                    let n = chain.push(StageKind::Command, step, &params, d, inputs, exts.clone());
                    first.get_or_insert(n);
                    prev = Some(n);
                }
                if let (Some(f), Some(l)) = (first, prev) {
                    placed.insert(name.as_str(), (f, l, true));
                }
            } else {
                let n = chain.push(StageKind::Command, 0, &params, d, need_inputs(None), exts);
                placed.insert(name.as_str(), (n, n, false));
            }
        }
        Ok(())
    }
}

/// What of a dataset definition affects results (not its name or sources).
fn dataset_view(exp: &Experiment, name: &str) -> Value {
    let d = &exp.datasets[name];
    json!({
        "problem_field": d.problem_field,
        "answer_field": d.answer_field,
        "offset": d.offset,
        "limit": d.limit,
    })
}

#[cfg(test)]
mod tests {
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
}
