//! `spur run FILE`: execute what is not cached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use spur_exec::{Executor, Job, LocalExecutor, Options};

use crate::{record, workspace};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// Only these cells: `axis=value[|value],…`, e.g. `reward=random,seed=1`.
    #[arg(long)]
    pub only: Option<String>,
    /// Worker threads for CPU nodes (default: the number of cores).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Let other runs continue when one fails.
    #[arg(long)]
    pub keep_going: bool,
    /// Refuse to run if an external input no longer matches FILE.lock.
    #[arg(long)]
    pub locked: bool,
    /// Re-hash every cached artifact the selected runs use before starting.
    #[arg(long)]
    pub verify: bool,
    /// Accelerator devices, comma-separated (default: $CUDA_VISIBLE_DEVICES, else 0).
    #[arg(long)]
    pub devices: Option<String>,
}

pub fn run(args: RunArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    if args.locked {
        super::lock::check(&args.file, plan)?;
    }
    let runs = workspace::select_runs(exp, args.only.as_deref())?;
    let cached = workspace::cached(store)?;
    let selected = workspace::nodes_of(plan, &runs);
    let pending = selected
        .iter()
        .filter(|&&n| !cached.contains(&plan.nodes[n as usize].id))
        .count();
    if pending == 0 && !args.verify {
        // Runs finished elsewhere (another process, a cluster) get a record.
        let missing: Vec<usize> = runs
            .iter()
            .copied()
            .filter(|&r| !store.run_record_path(&plan.runs[r].id).exists())
            .collect();
        if !missing.is_empty() {
            let ctx = record::Context::new(exp, plan);
            for r in missing {
                record::write(store, exp, plan, r, &ctx, "finished", None)?;
            }
        }
        println!(
            "nothing to do: {} run{}, {} nodes, all cached",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" },
            selected.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let _shared = store.lock_shared()?;
    let ctx = record::Context::new(exp, plan);
    for &r in &runs {
        record::write(store, exp, plan, r, &ctx, "running", None)?;
    }
    let devices = args
        .devices
        .or_else(|| std::env::var("CUDA_VISIBLE_DEVICES").ok())
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "0".into())
        .split(',')
        .map(|d| d.trim().to_string())
        .collect();
    let options = Options {
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        keep_going: args.keep_going,
        verify: args.verify,
        devices,
        progress: true,
    };
    let job = Job {
        plan,
        experiment: exp,
        store,
        registry: &loaded.registry,
        runs: runs.clone(),
    };
    let outcome = LocalExecutor.execute(&job, &options)?;

    for &r in &runs {
        let failure = outcome.failures.iter().find(|f| f.run == r);
        let complete = plan.runs[r]
            .nodes
            .iter()
            .all(|&n| store.is_cached(&plan.nodes[n as usize].id));
        let status = match (failure, complete) {
            (Some(_), _) => "failed",
            (None, true) => "finished",
            (None, false) => "stopped",
        };
        record::write(
            store,
            exp,
            plan,
            r,
            &ctx,
            status,
            failure.map(|f| f.message.as_str()),
        )?;
    }
    for (id, why) in &outcome.corrupted {
        eprintln!(
            "warning: cache entry {} was corrupted and has been recomputed ({why})",
            &id.hex()[..12]
        );
    }
    println!(
        "computed {} node{}, {} finished by another process, {} skipped",
        outcome.computed.len(),
        if outcome.computed.len() == 1 { "" } else { "s" },
        outcome.reused,
        outcome.skipped
    );
    if outcome.failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{} run(s) failed:", outcome.failures.len());
    for f in &outcome.failures {
        eprintln!(
            "  run {} ({}): {}",
            plan.runs[f.run].id,
            exp.runs[f.run].label(),
            f.message
        );
    }
    if !args.keep_going {
        eprintln!("other runs were stopped; use --keep-going to let them continue");
    }
    Ok(ExitCode::FAILURE)
}
