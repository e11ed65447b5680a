//! `spur cancel FILE`: cancel the experiment's queued and running Slurm jobs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use spur_exec::slurm::{cancel, slurm_dir, JobBook, JobRecord};
use spur_exec::spur_slurm::Slurm;

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// Only the jobs of these cells: `axis=value[|value],…`. A shared node's
    /// job is cancelled only when every run that needs it is selected.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: CancelArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let book = JobBook::load(&slurm_dir(store.root(), &plan.experiment))?;
    if book.jobs.is_empty() {
        println!(
            "no Slurm jobs were submitted for {} (with this cache)",
            args.file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let selected: Vec<&JobRecord> = match args.only.as_deref() {
        None => book.jobs.iter().collect(),
        Some(only) => {
            let runs: HashSet<usize> = workspace::select_runs(exp, Some(only))?
                .into_iter()
                .collect();
            book.jobs
                .iter()
                .filter(|j| {
                    let of = j.work.runs(plan);
                    !of.is_empty() && of.iter().all(|r| runs.contains(r))
                })
                .collect()
        }
    };
    let cancelled = cancel(&Slurm::from_env(), &selected)
        .with_context(|| format!("cannot cancel the jobs of {}", args.file.display()))?;
    if cancelled.is_empty() {
        println!("no queued or running jobs to cancel");
    } else {
        let ids: Vec<String> = cancelled.iter().map(|id| id.to_string()).collect();
        println!(
            "cancelled {} job{}: {}",
            ids.len(),
            if ids.len() == 1 { "" } else { "s" },
            ids.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
