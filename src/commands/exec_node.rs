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

use anyhow::{bail, Context, Result};
use spur_exec::slurm::{stop_on_usr2, Work};
use spur_exec::{Job, LocalExecutor, Options, Unit};

use crate::{record, workspace};

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
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let cached = workspace::cached(store)?;
    let mut units: Vec<Unit> = Vec::with_capacity(works.len());
    for work in &works {
        let Some(mut unit) = work.unit(plan, &cached) else {
            bail!(spur_exec::slurm::SlurmExecError::NotInPlan {
                work: work.clone(),
                file: args.file.clone(),
            });
        };
        // One after the other, in the order given.
        if !units.is_empty() {
            unit.after = vec![units.len() - 1];
        }
        units.push(unit);
    }
    let chains: Vec<usize> = units.iter().filter_map(|u| u.run).collect();
    let runs: Vec<usize> = {
        let mut runs: Vec<usize> = works.iter().flat_map(|w| w.runs(plan)).collect();
        runs.sort_unstable();
        runs.dedup();
        runs
    };
    let pending: usize = units.iter().map(|u| u.nodes.len()).sum();
    eprintln!(
        "spur exec-node: {} node{} to compute for {}",
        pending,
        if pending == 1 { "" } else { "s" },
        args.work.join(" ")
    );

    // The job's allocation is one device group: an accelerator unit gets all
    // of its GPUs, as Slurm set them in CUDA_VISIBLE_DEVICES.
    let devices: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .into_iter()
        .collect();
    if devices.is_empty() {
        for unit in &units {
            for &n in &unit.nodes {
                let node = &plan.nodes[n as usize];
                let accelerated = loaded
                    .registry
                    .get(node.kind)
                    .is_some_and(|s| s.resource(node) == spur_stages::Resource::Accelerator);
                if accelerated {
                    bail!(
                        "node {} ({} step {}) needs an accelerator, but this job has none \
                         (CUDA_VISIBLE_DEVICES is unset); set `gpus` under executor.slurm in {}",
                        &node.id.hex()[..12],
                        node.kind,
                        node.step,
                        args.file.display()
                    );
                }
            }
        }
    }

    let _shared = store.lock_shared()?;
    let ctx = record::Context::new(exp, plan);
    for &r in &chains {
        record::write(store, exp, plan, r, &ctx, "running", None)?;
    }
    let options = Options {
        jobs: 1,
        // A failure stops the units that wait for it anyway; with keep_going
        // the executor leaves `stop` to the USR2 handler.
        keep_going: true,
        verify: false,
        devices,
        progress: false,
    };
    let job = Job {
        plan,
        store,
        registry: &loaded.registry,
        runs,
    };
    let outcome = LocalExecutor.execute_units(&job, units, &options, stop)?;
    let signal = spur_stages::interrupt::requested();
    let stopped = stop.load(std::sync::atomic::Ordering::SeqCst) || signal.is_some();

    for &r in &chains {
        let failure = outcome.failures.iter().find(|f| f.run == r);
        let complete = plan.runs[r]
            .nodes
            .iter()
            .all(|&n| store.is_cached(&plan.nodes[n as usize].id));
        let status = match (complete, stopped, failure) {
            (true, _, _) => "finished",
            (false, true, _) => "stopped",
            (false, false, Some(_)) => "failed",
            (false, false, None) => "stopped",
        };
        let error = failure.filter(|_| !stopped).map(|f| f.message.as_str());
        record::write(store, exp, plan, r, &ctx, status, error)?;
    }
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
