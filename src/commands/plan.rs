//! `spur plan FILE`: the DAG without running it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use serde_json::{json, Value};

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// One JSON document on stdout: `{"runs": […], "nodes": […]}`.
    #[arg(long)]
    pub json: bool,
    /// Only these cells: `axis=value[|value],…`.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: PlanArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan) = (&loaded.experiment, &loaded.plan);
    let runs = workspace::select_runs(exp, args.only.as_deref())?;
    let cached = workspace::cached(&loaded.store)?;
    let nodes = workspace::nodes_of(plan, &runs);

    if args.json {
        let runs_json: Vec<Value> = runs
            .iter()
            .map(|&r| json!({"id": plan.runs[r].id, "cell": exp.runs[r].cell}))
            .collect();
        let mut estimator =
            spur_ops::memory::Estimator::new(plan, spur_ops::memory::run_device(&[]), false);
        let nodes_json: Vec<Value> = nodes
            .iter()
            .map(|&n| {
                let node = &plan.nodes[n as usize];
                let mut entry = json!({
                    "id": node.id.hex(),
                    "kind": node.kind.name(),
                    "step": node.step,
                    "deps": node.inputs.iter().map(|i| plan.nodes[i.node as usize].id.hex()).collect::<Vec<_>>(),
                    "runs": node.runs.iter().filter(|&&r| runs.contains(&(r as usize))).map(|&r| &plan.runs[r as usize].id).collect::<Vec<_>>(),
                    "status": if cached.contains(&node.id) { "cached" } else { "pending" },
                });
                // Every model node carries its estimated peak; null when the model's shapes
                // are not on this machine yet (a hub model not downloaded).
                if node.kind.loads_model() {
                    entry["memory_bytes"] = json!(estimator.node(n).map(|(m, _)| m.estimate.total));
                }
                entry
            })
            .collect();
        let doc = json!({"runs": runs_json, "nodes": nodes_json});
        println!("{}", serde_json::to_string(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }

    let shared = nodes
        .iter()
        .filter(|&&n| plan.nodes[n as usize].runs.len() > 1)
        .count();
    let n_cached = nodes
        .iter()
        .filter(|&&n| cached.contains(&plan.nodes[n as usize].id))
        .count();
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for &n in &nodes {
        let node = &plan.nodes[n as usize];
        let e = by_kind.entry(node.kind.name()).or_default();
        e.0 += 1;
        if node.runs.len() > 1 {
            e.1 += 1;
        }
    }
    println!("experiment {} ({})", exp.name, exp.path.display());
    println!("  runs:   {}", runs.len());
    println!(
        "  nodes:  {} ({} shared by several runs)",
        nodes.len(),
        shared
    );
    for (kind, (count, shared)) in &by_kind {
        println!("    {kind:<8} {count:>7}  ({shared} shared)");
    }
    println!("  cached: {n_cached}");
    println!("  to run: {}", nodes.len() - n_cached);
    Ok(ExitCode::SUCCESS)
}
