//! The run lifecycle, the same for `spur run` and for a Slurm job's `spur exec-node`: each
//! run's record says `running`, the local executor computes what is pending, and each record
//! ends with the status that its nodes and the outcome decide.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use spur_exec::slurm::{SlurmExecError, Work};
use spur_exec::{Executor, Job, LocalExecutor, Options, Outcome, Unit};
use spur_stages::{interrupt, Resource};
use spur_store::RunStatus;

use crate::record::{self, RecordContext};
use crate::workspace::{self, Loaded};

/// Runs with no pending node that have no record get one saying `finished`: they were
/// computed elsewhere (another process, a cluster).
pub fn record_finished_elsewhere(loaded: &Loaded, runs: &[usize]) -> Result<()> {
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let missing: Vec<usize> = runs
        .iter()
        .copied()
        .filter(|&r| !store.run_record_path(&plan.runs[r].id).exists())
        .collect();
    if !missing.is_empty() {
        let ctx = RecordContext::new(exp, plan);
        for r in missing {
            record::write(store, exp, plan, r, &ctx, RunStatus::Finished, None)?;
        }
    }
    Ok(())
}

/// `spur run` on this machine: computes the pending nodes of `runs`, with their records.
/// A stop (SIGINT/SIGTERM, see [`interrupt`]) ends the runs it interrupted as `stopped`.
pub fn execute_local(loaded: &Loaded, runs: &[usize], options: &Options) -> Result<Outcome> {
    let store = &loaded.store;
    let _shared = store.lock_shared()?;
    let ctx = RecordContext::new(&loaded.experiment, &loaded.plan);
    open_records(loaded, &ctx, runs)?;
    let outcome = LocalExecutor.execute(&job(loaded, runs.to_vec()), options)?;
    let stopped = interrupt::requested().is_some();
    close_records(loaded, &ctx, runs, &outcome, stopped)?;
    Ok(outcome)
}

/// A Slurm job's units of work (`run:<id>` chains, `node:<id>` shared nodes) on its compute
/// node, computed one after the other in the order given (`spur exec-node`).
pub struct NodeWork<'a> {
    loaded: &'a Loaded,
    units: Vec<Unit>,
    /// The runs whose chains the units are: their records are written as `spur run` writes
    /// them.
    chains: Vec<usize>,
    /// Every run a unit serves.
    runs: Vec<usize>,
    devices: Vec<String>,
}

/// What a compute node's work came to.
pub struct WorkOutcome {
    pub outcome: Outcome,
    /// Stopped by USR2 (the time limit is near) or a signal before the end.
    pub stopped: bool,
}

impl<'a> NodeWork<'a> {
    /// The units of `works` in `file`'s plan, to run on `devices` (the job's GPUs). A job
    /// without GPUs cannot run model nodes.
    pub fn new(
        loaded: &'a Loaded,
        file: &Path,
        works: &[Work],
        devices: Vec<String>,
    ) -> Result<NodeWork<'a>> {
        let plan = &loaded.plan;
        let cached = workspace::cached(&loaded.store)?;
        let mut units: Vec<Unit> = Vec::with_capacity(works.len());
        for work in works {
            let Some(mut unit) = work.unit(plan, &cached) else {
                bail!(SlurmExecError::NotInPlan {
                    work: work.clone(),
                    file: file.to_path_buf(),
                });
            };
            if !units.is_empty() {
                unit.after = vec![units.len() - 1];
            }
            units.push(unit);
        }
        if devices.is_empty() {
            refuse_accelerator_nodes(loaded, &units, file)?;
        }
        let chains = units.iter().filter_map(|u| u.run).collect();
        let mut runs: Vec<usize> = works.iter().flat_map(|w| w.runs(plan)).collect();
        runs.sort_unstable();
        runs.dedup();
        Ok(NodeWork {
            loaded,
            units,
            chains,
            runs,
            devices,
        })
    }

    /// Nodes still to compute.
    pub fn pending(&self) -> usize {
        self.units.iter().map(|u| u.nodes.len()).sum()
    }

    /// Computes the units; `stop` (set on USR2) stops it after the node it is computing.
    pub fn execute(self, stop: &AtomicBool) -> Result<WorkOutcome> {
        let loaded = self.loaded;
        let _shared = loaded.store.lock_shared()?;
        let ctx = RecordContext::new(&loaded.experiment, &loaded.plan);
        open_records(loaded, &ctx, &self.chains)?;
        let options = Options {
            jobs: 1,
            // A failure stops the units that wait for it anyway; with keep_going the
            // executor leaves stopping to `stop`.
            keep_going: true,
            verify: false,
            devices: self.devices,
            progress: false,
        };
        let job = job(loaded, self.runs);
        let outcome = LocalExecutor.execute_units(&job, self.units, &options, stop)?;
        let stopped = stop.load(Ordering::SeqCst) || interrupt::requested().is_some();
        close_records(loaded, &ctx, &self.chains, &outcome, stopped)?;
        Ok(WorkOutcome { outcome, stopped })
    }
}

/// A job without GPUs (CUDA_VISIBLE_DEVICES unset) cannot run a model node.
fn refuse_accelerator_nodes(loaded: &Loaded, units: &[Unit], file: &Path) -> Result<()> {
    let plan = &loaded.plan;
    for &n in units.iter().flat_map(|u| &u.nodes) {
        let node = &plan.nodes[n as usize];
        let accelerated = loaded
            .registry
            .get(node.kind)
            .is_some_and(|s| s.resource(node) == Resource::Accelerator);
        if accelerated {
            bail!(
                "node {} ({} step {}) needs an accelerator, but this job has none \
                 (CUDA_VISIBLE_DEVICES is unset); set `gpus` under executor.slurm in {}",
                &node.id.hex()[..12],
                node.kind,
                node.step,
                file.display()
            );
        }
    }
    Ok(())
}

fn job(loaded: &Loaded, runs: Vec<usize>) -> Job<'_> {
    Job {
        plan: &loaded.plan,
        store: &loaded.store,
        registry: &loaded.registry,
        runs,
    }
}

fn open_records(loaded: &Loaded, ctx: &RecordContext, runs: &[usize]) -> Result<()> {
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    for &r in runs {
        record::write(store, exp, plan, r, ctx, RunStatus::Running, None)?;
    }
    Ok(())
}

/// Each run's record with its final status; a stopped run records no error.
fn close_records(
    loaded: &Loaded,
    ctx: &RecordContext,
    runs: &[usize],
    outcome: &Outcome,
    stopped: bool,
) -> Result<()> {
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    for &r in runs {
        let failure = outcome.failures.iter().find(|f| f.run == r);
        let complete = plan.runs[r]
            .nodes
            .iter()
            .all(|&n| store.is_cached(&plan.nodes[n as usize].id));
        let status = RunStatus::after(complete, failure.is_some(), stopped);
        let error = failure
            .filter(|_| status == RunStatus::Failed)
            .map(|f| f.message.as_str());
        record::write(store, exp, plan, r, ctx, status, error)?;
    }
    Ok(())
}
