//! `spur status FILE`: how far each run has got.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;

use crate::workspace;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// Only these cells: `axis=value[|value],…`.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: StatusArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let runs = workspace::select_runs(exp, args.only.as_deref())?;
    let cached = workspace::cached(store)?;
    println!(
        "{:<16}  {:>13}  {:>5}  {:<9}  cell",
        "run", "nodes", "step", "state"
    );
    for r in runs {
        let run = &plan.runs[r];
        let done = run
            .nodes
            .iter()
            .filter(|&&n| cached.contains(&plan.nodes[n as usize].id))
            .count();
        let step = run
            .nodes
            .iter()
            .filter(|&&n| cached.contains(&plan.nodes[n as usize].id))
            .map(|&n| plan.nodes[n as usize].step)
            .max()
            .unwrap_or(0);
        let record = store.read_run_record(&run.id)?;
        let recorded = record
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(|s| s.as_str())
            .unwrap_or("not started");
        // A record saying "running" from a process that died is stale.
        let state = if done == run.nodes.len() {
            "finished"
        } else if recorded == "finished" || recorded == "running" {
            "incomplete"
        } else {
            recorded
        };
        println!(
            "{:<16}  {:>6}/{:<6}  {:>5}  {:<9}  {}",
            run.id,
            done,
            run.nodes.len(),
            step,
            state,
            exp.runs[r].label()
        );
        if let Some(err) = record
            .as_ref()
            .and_then(|r| r.get("error"))
            .and_then(|e| e.as_str())
        {
            if state == "failed" {
                println!("{:18}error: {}", "", err.lines().next().unwrap_or(""));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
