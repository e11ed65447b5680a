//! What spur's commands do, as operations in cargo's manner: each takes what a command parsed
//! and returns what it should print, and the binary (`src/commands/`) does no more than parse
//! arguments and print.
//!
//! - [`workspace`]: load an experiment, plan it, open the cache; select runs.
//! - [`run`]: the run lifecycle. Records say `running`, the executor computes what is pending
//!   (here, or a Slurm job's units on its compute node), and each run's record ends with the
//!   status its nodes and the outcome decide ([`spur_store::RunStatus::after`]).
//! - [`record`]: writing and refreshing the typed run records ([`spur_store::RunRecord`]).
//! - [`provenance`]: where a result came from (git state, Cargo.lock, host, GPUs).
//! - [`bench`]: the planning benchmark (`spur bench plan`).
//! - [`memory`]: the peak-memory estimates `spur plan --json` prints and the check `spur run`
//!   makes before any work.
//!
//! Errors are `anyhow` with context, as cargo's ops are: they end at the command line.

pub mod bench;
pub mod memory;
pub mod provenance;
pub mod record;
pub mod run;
pub mod workspace;

pub use workspace::Loaded;
