//! Executors: who runs the pending nodes of a plan, where and in what order.
//!
//! The plan is cut into work units: each run's nodes that no other run
//! shares form one fused chain (one worker, so a model stays loaded between
//! steps), and every shared node (a model's step-0 eval, a (model, seed)'s
//! first rollout) is a unit of its own that the chains wait for. The local
//! executor runs units on a thread pool; a cluster executor submits each unit
//! as a job with the same dependencies.

mod local;
pub mod slurm;
mod units;

use spur_plan::{Hash, Plan};
use spur_stages::Registry;
use spur_store::Store;

pub use local::{LocalExecutor, Progress};
/// Slurm's building blocks, for callers of [`slurm`].
pub use spur_slurm;
pub use units::{units, Unit};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Store(#[from] spur_store::StoreError),
    #[error(transparent)]
    Slurm(#[from] slurm::SlurmExecError),
    #[error("{0}")]
    Other(String),
}

/// What to execute: the selected runs of a plan.
pub struct Job<'a> {
    pub plan: &'a Plan,
    pub store: &'a Store,
    pub registry: &'a Registry,
    /// Indices of the selected runs.
    pub runs: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads for CPU units.
    pub jobs: usize,
    /// Keep running other runs after one fails.
    pub keep_going: bool,
    /// Re-hash every cached artifact of the selected runs before starting.
    pub verify: bool,
    /// Accelerator devices; accelerator units take one each, one at a time.
    pub devices: Vec<String>,
    /// Show the progress display (only when stdout is a terminal).
    pub progress: bool,
}

impl Default for Options {
    /// One worker, no accelerator, stop at the first failure, no progress display.
    fn default() -> Self {
        Options {
            jobs: 1,
            keep_going: false,
            verify: false,
            devices: Vec::new(),
            progress: false,
        }
    }
}

/// A run that did not finish, and why.
#[derive(Debug, Clone)]
pub struct RunFailure {
    pub run: usize,
    pub node: Option<Hash>,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Nodes computed by this process.
    pub computed: Vec<Hash>,
    /// Pending nodes another process finished while we waited for them.
    pub reused: usize,
    /// Cached entries found corrupted and moved aside, to be recomputed.
    pub corrupted: Vec<(Hash, String)>,
    pub failures: Vec<RunFailure>,
    /// Nodes not attempted because an input failed or the run stopped.
    pub skipped: usize,
}

impl Outcome {
    /// One line on what this process did.
    pub fn summary(&self) -> String {
        format!(
            "computed {} node{}, {} finished by another process, {} skipped",
            self.computed.len(),
            if self.computed.len() == 1 { "" } else { "s" },
            self.reused,
            self.skipped
        )
    }

    /// Print a warning for each corrupted cache entry, saying whether this
    /// process recomputed it.
    pub fn warn_corrupted(&self) {
        for (id, why) in &self.corrupted {
            let fate = if self.computed.contains(id) {
                "has been recomputed"
            } else {
                "has not been recomputed"
            };
            eprintln!(
                "warning: cache entry {} was corrupted and {fate} ({why})",
                &id.hex()[..12]
            );
        }
    }
}

/// Who runs a job's pending nodes: [`LocalExecutor`] computes them in this process and reports
/// what it did ([`Outcome`]); [`slurm::SlurmExecutor`] queues them as batch jobs and reports
/// what it submitted ([`slurm::Submission`]). Both cut the plan into the same units.
pub trait Executor {
    /// What executing a job gives back.
    type Report;

    fn execute(&self, job: &Job, options: &Options) -> Result<Self::Report, ExecError>;
}
