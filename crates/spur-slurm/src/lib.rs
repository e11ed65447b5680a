//! Slurm building blocks for spur: settings, job scripts, submission with
//! `sbatch`, state queries and cancellation. It knows Slurm, not experiments:
//! callers decide what a job runs (a list of shell lines) and what depends on what.
//!
//! Jobs are written to script files (never `--wrap`), log to one file opened
//! in append mode, ask for `USR2` 120 s before their time limit, pass it on to
//! their payload so it can checkpoint, and requeue themselves.

mod client;
mod error;
mod script;
mod settings;
mod state;

use std::fmt;

pub use client::{Slurm, Submitted};
pub use error::SlurmError;
pub use script::{After, ArraySpec, JobFiles, JobSpec, ARRAY_ITEM_VAR, CHECKPOINT_SIGNAL_SECS};
pub use settings::{GpuOption, SlurmSettings};
pub use state::{ExitCode, JobInfo, JobState};

/// A job id as `sbatch --parsable` prints it (for an array, the array's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
