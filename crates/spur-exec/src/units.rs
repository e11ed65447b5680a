//! Cutting the pending part of a plan into work units.

use std::collections::{HashMap, HashSet};

use spur_plan::{Hash, Plan};

/// Nodes one worker runs in order, after the units in `after`.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Node indices, in execution order.
    pub nodes: Vec<u32>,
    /// Units (indices) that must finish first.
    pub after: Vec<usize>,
    /// The run whose fused chain this is, or `None` for a shared node.
    pub run: Option<usize>,
}

/// Units for the pending nodes of `runs` (a node is pending when its id is not
/// in `cached`). Units may appear before the units they wait for.
pub fn units(plan: &Plan, runs: &[usize], cached: &HashSet<Hash>) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::new();
    let mut unit_of: HashMap<u32, usize> = HashMap::new();
    for &r in runs {
        let mut chain: Option<usize> = None;
        for &n in &plan.runs[r].nodes {
            let node = &plan.nodes[n as usize];
            if cached.contains(&node.id) || unit_of.contains_key(&n) {
                continue;
            }
            let u = if node.runs.len() > 1 {
                units.push(Unit {
                    nodes: Vec::new(),
                    after: Vec::new(),
                    run: None,
                });
                units.len() - 1
            } else {
                *chain.get_or_insert_with(|| {
                    units.push(Unit {
                        nodes: Vec::new(),
                        after: Vec::new(),
                        run: Some(r),
                    });
                    units.len() - 1
                })
            };
            units[u].nodes.push(n);
            unit_of.insert(n, u);
        }
    }
    // Dependencies between units, from node inputs.
    for (u, unit) in units.iter_mut().enumerate() {
        let mut after: Vec<usize> = unit
            .nodes
            .iter()
            .flat_map(|&n| plan.nodes[n as usize].inputs.iter())
            .filter_map(|i| unit_of.get(&i.node).copied())
            .filter(|&d| d != u)
            .collect();
        after.sort_unstable();
        after.dedup();
        unit.after = after;
    }
    units
}
