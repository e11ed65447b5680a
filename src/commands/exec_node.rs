//! `spur exec-node FILE WORK…`: what a Slurm job runs on its compute node.
//!
//! Computes a run's chain (`run:<run id>`) or a shared node (`node:<node id>`)
//! into the cache with the local executor's locks and atomic publish. On USR2
//! (the time limit is near) it stops after the node it is computing and exits
//! with status 75, so the job script requeues the job, which then resumes from
//! what is cached. SIGINT/SIGTERM (scancel) stop it as they stop `spur run`:
//! exit 128 + the signal, after stopping the running command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use spur_exec::slurm::{stop_on_usr2, Work};
use spur_ops::run::{NodeWork, WorkOutcome};
use spur_ops::workspace;

/// Exit status after stopping on USR2 (EX_TEMPFAIL): the work is unfinished
/// but nothing failed.
const STOPPED: u8 = 75;

#[derive(clap::Args, Debug)]
pub struct ExecNodeArgs {
    /// Experiment file (as submitted).
    pub file: PathBuf,
    /// Units of work: `run:<run id>` (the nodes only that run uses) or
    /// `node:<node id>` (one node), computed in this order.
    #[arg(required = true)]
    pub work: Vec<String>,
}

pub fn run(args: ExecNodeArgs, cache: &Path) -> Result<ExitCode> {
    let stop = stop_on_usr2().context("cannot install the USR2 handler")?;
    // scancel and the time limit's end send SIGTERM: stop as `spur run` does.
    // USR2 reaches the command too, in its own process group, as the batch
    // script's signal to the payload's group did before.
    super::run::stop_on_signals(&[signal_hook::consts::SIGUSR2])?;
    let works: Vec<Work> = args
        .work
        .iter()
        .map(|w| w.parse())
        .collect::<Result<_, _>>()?;
    let loaded = workspace::load(&args.file, cache)?;
    // The job's allocation is one device group: an accelerator unit gets all of its GPUs, as
    // Slurm set them in CUDA_VISIBLE_DEVICES.
    let devices: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .into_iter()
        .collect();
    let work = NodeWork::new(&loaded, &args.file, &works, devices)?;
    let pending = work.pending();
    eprintln!(
        "spur exec-node: {} node{} to compute for {}",
        pending,
        if pending == 1 { "" } else { "s" },
        args.work.join(" ")
    );
    let WorkOutcome { outcome, stopped } = work.execute(stop)?;
    let signal = spur_stages::interrupt::requested();
    outcome.warn_corrupted();
    eprintln!("spur exec-node: {}", outcome.summary());
    if let Some(signal) = signal {
        eprintln!(
            "spur exec-node: stopped by {}; what finished is cached",
            super::run::signal_name(signal)
        );
        return Ok(super::run::signal_exit(signal));
    }
    let unfinished = !outcome.failures.is_empty() || outcome.skipped > 0;
    if stopped && unfinished {
        eprintln!(
            "spur exec-node: stopped on USR2 (time limit near); what finished is cached, \
             and the requeued job resumes from there"
        );
        return Ok(ExitCode::from(STOPPED));
    }
    if let Some(f) = outcome.failures.first() {
        eprintln!("spur exec-node: failed: {}", f.message);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
