//! `spur run FILE`: execute what is not cached, here or on Slurm.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use spur_exec::slurm::{self, SlurmExecutor};
use spur_exec::spur_slurm::Slurm;
use spur_exec::{Executor, Job, Options};
use spur_ops::{memory, run, workspace};
use spur_stages::interrupt;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Threads of this process.
    Local,
    /// Jobs submitted to Slurm (settings from the file's `executor: {slurm: …}`);
    /// returns once they are queued.
    Slurm,
}

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
    /// Where the pending nodes run.
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    /// Run model nodes even when their estimated peak memory exceeds their device's.
    #[arg(long)]
    pub no_memory_check: bool,
}

pub fn run(args: RunArgs, cache: &Path) -> Result<ExitCode> {
    let started = Instant::now();
    if args.executor == ExecutorKind::Slurm && args.verify {
        bail!("--verify checks the cache in this process; run `spur run FILE --verify` without --executor slurm first");
    }
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    if args.locked {
        super::lock::check(&args.file, plan)?;
    }
    let runs = workspace::select_runs(exp, args.only.as_deref())?;
    let cached = workspace::cached(store)?;
    let selected = workspace::nodes_of(plan, &runs);
    let pending: Vec<u32> = selected
        .iter()
        .copied()
        .filter(|&n| !cached.contains(&plan.nodes[n as usize].id))
        .collect();
    if pending.is_empty() && !args.verify {
        run::record_finished_elsewhere(&loaded, &runs)?;
        println!(
            "nothing to do: {} run{}, {} nodes, all cached",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" },
            selected.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.executor == ExecutorKind::Slurm {
        return submit_to_slurm(&loaded, runs, started);
    }
    let devices: Vec<String> = args
        .devices
        .or_else(|| std::env::var("CUDA_VISIBLE_DEVICES").ok())
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "0".into())
        .split(',')
        .map(|d| d.trim().to_string())
        .collect();
    if !args.no_memory_check {
        memory::check_fits(exp, plan, &pending, memory::run_device(&devices))?;
    }
    stop_on_signals(&[])?;
    let options = Options {
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        keep_going: args.keep_going,
        verify: args.verify,
        devices,
        progress: true,
    };
    let outcome = run::execute_local(&loaded, &runs, &options)?;
    let signal = interrupt::requested();
    outcome.warn_corrupted();
    println!("{}", outcome.summary());
    if let Some(signal) = signal {
        eprintln!(
            "stopped by {}: finished nodes are cached; run again to continue",
            signal_name(signal)
        );
        return Ok(signal_exit(signal));
    }
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

/// The first SIGINT or SIGTERM stops the command children (their whole
/// process groups) and the executor, which starts nothing new; interrupted
/// nodes' staging directories are removed and published nodes stay. A second
/// one kills the children and exits at once, leaving staging directories to
/// `spur gc`. Signals in `forward` are passed on to the command children.
pub(crate) fn stop_on_signals(forward: &'static [i32]) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM].iter().chain(forward))
        .context("cannot handle SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("spur-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if forward.contains(&signal) {
                    interrupt::forward(signal);
                } else if interrupt::requested().is_none() {
                    eprintln!(
                        "spur: {}: stopping the running commands (again to exit at once)",
                        signal_name(signal)
                    );
                    interrupt::request(signal);
                } else {
                    interrupt::kill_all();
                    std::process::exit(128 + signal);
                }
            }
        })
        .context("cannot start the signal-handling thread")?;
    Ok(())
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    signal_hook::low_level::signal_name(signal).unwrap_or("a signal")
}

/// The shell's convention for a process stopped by `signal`: 128 + its number.
pub(crate) fn signal_exit(signal: i32) -> ExitCode {
    ExitCode::from(u8::try_from(128 + signal).unwrap_or(u8::MAX))
}

/// Queues the pending units of `runs` on Slurm and returns.
fn submit_to_slurm(
    loaded: &workspace::Loaded,
    runs: Vec<usize>,
    started: Instant,
) -> Result<ExitCode> {
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let executor = SlurmExecutor {
        slurm: Slurm::from_env(),
        settings: slurm::settings(&plan.experiment)?,
        spur: std::env::current_exe().context("cannot find the spur binary for the jobs to run")?,
    };
    let job = Job {
        plan,
        store,
        registry: &loaded.registry,
        runs,
    };
    let submission = executor
        .execute(&job, &Options::default())
        .with_context(|| format!("cannot submit {} to Slurm", exp.path.display()))?;
    // Run records are written by the jobs (`spur exec-node`); the submission
    // is recorded in jobs.json beside the scripts.
    let elapsed = started.elapsed();

    if let Some(dir) = &submission.dir {
        println!(
            "submitted {} job{} to Slurm (scripts and logs in {}):",
            submission.submitted.len(),
            if submission.submitted.len() == 1 {
                ""
            } else {
                "s"
            },
            dir.display()
        );
    }
    for j in &submission.submitted {
        let after: Vec<String> = j.after.iter().map(u64::to_string).collect();
        if after.is_empty() {
            println!("  {}  {}", j.id, j.name);
        } else {
            println!("  {}  {}  (after {})", j.id, j.name, after.join(","));
        }
    }
    if !submission.queued.is_empty() {
        let ids: Vec<String> = submission.queued.iter().map(|j| j.id.to_string()).collect();
        println!(
            "{} unit{} already queued or running, not submitted again: job{} {}",
            ids.len(),
            if ids.len() == 1 { " is" } else { "s are" },
            if ids.len() == 1 { "" } else { "s" },
            ids.join(" ")
        );
    }
    if !submission.submitted.is_empty() {
        println!(
            "took {:.2} s: {:.2} s writing scripts and in sbatch, {:.2} s planning and deciding; `spur status {}` follows them",
            elapsed.as_secs_f64(),
            submission.sbatch.as_secs_f64(),
            elapsed.saturating_sub(submission.sbatch).as_secs_f64(),
            exp.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
