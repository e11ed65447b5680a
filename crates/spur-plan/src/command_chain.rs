//! A run's command nodes: each shell rule once, or once per step, reading the variables it
//! references and the outputs of the commands it needs.

use std::collections::HashMap;

use spur_core::node_params::CommandNodeParams;
use spur_spec::Run;

use crate::{external, Chain, Input, NodeParams, PlanError, Role, RunCtx, StageKind};

impl RunCtx<'_> {
    /// Command stages: each depends only on the variables it references.
    pub(crate) fn command_chain(&self, run: &Run, chain: &mut Chain) -> Result<(), PlanError> {
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
            let params = NodeParams::new(&CommandNodeParams {
                command: name.clone(),
                index: ci,
                run: def.run.clone(),
                vars,
                inputs: input_names,
                outputs: def.outputs.clone(),
                needs: def.needs.clone(),
                per_step: def.per_step,
                accelerator: def.accelerator,
                version: def.version.clone(),
            });
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
                    let n = chain.push(StageKind::Command, step, &params, inputs, exts.clone());
                    first.get_or_insert(n);
                    prev = Some(n);
                }
                if let (Some(f), Some(l)) = (first, prev) {
                    placed.insert(name.as_str(), (f, l, true));
                }
            } else {
                let n = chain.push(StageKind::Command, 0, &params, need_inputs(None), exts);
                placed.insert(name.as_str(), (n, n, false));
            }
        }
        Ok(())
    }
}
