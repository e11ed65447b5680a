//! `spur`: declarative RL-for-LLM experiments.
//!
//! Commands live in `commands/`, one file each; they parse arguments, call
//! into the library crates and print. See ARCHITECTURE.md for the map.

mod commands;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc's malloc fragments badly under candle's many mid-sized tensors
// freed across threads (RSS several times the live memory in rollouts).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v2's `mi_option_purge_delay` (libmimalloc-sys has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory in the process. By default mimalloc returns it to the
/// OS after 10 ms, and a training step frees and reallocates its activations
/// continuously: the kernel then zeroes every page again (a third of an
/// update's time went to `clear_page` before this). The working set is reused
/// step after step, so holding it costs no extra peak memory.
fn keep_freed_memory() {
    // SAFETY: sets an allocator option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser, Debug)]
#[command(
    name = "spur",
    version,
    about = "Declarative RL-for-LLM experiments: one YAML grid → a cached stage DAG"
)]
struct Cli {
    /// Cache root (default: ./cache).
    #[arg(long, global = true, env = "SPUR_CACHE", value_name = "DIR")]
    cache: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Execute the pending nodes of an experiment.
    Run(commands::run::RunArgs),
    /// Show the stage DAG of an experiment: runs, nodes, sharing, cache state.
    Plan(commands::plan::PlanArgs),
    /// Per-run progress of an experiment, from the cache and run records.
    Status(commands::status::StatusArgs),
    /// Print a run record or a node manifest by id (a prefix is enough).
    Show(commands::show::ShowArgs),
    /// Table, plots and a self-contained index.html from an experiment's run records.
    Report(commands::report::ReportArgs),
    /// Pin every external input's hash in FILE.lock.
    Lock(commands::lock::LockArgs),
    /// Remove cache entries no given experiment references.
    Gc(commands::gc::GcArgs),
    /// Grade responses against reference answers (the paper's grader).
    Grade(commands::grade::GradeArgs),
    /// Sample from a model: `default`, a local path or a hub id.
    Sample(commands::sample::SampleArgs),
    /// GRPO objective and gradient for given log-probs (docs/grpo.md).
    Loss(commands::loss::LossArgs),
    /// Cancel the experiment's queued and running Slurm jobs.
    Cancel(commands::cancel::CancelArgs),
    /// Compute units of work into the cache (what a Slurm job runs).
    #[command(hide = true)]
    ExecNode(commands::exec_node::ExecNodeArgs),
    /// Benchmarks: planning, model speed, generation, update step.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPUR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: piped into a file or a Slurm log they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Run(_) | Command::ExecNode(_) | Command::Gc(_)
    ) {
        die_quietly_on_a_closed_pipe();
    }
    let cache = cli.cache.unwrap_or_else(|| PathBuf::from("cache"));
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a, &cache),
        Command::Plan(a) => commands::plan::run(a, &cache),
        Command::Status(a) => commands::status::run(a, &cache),
        Command::Show(a) => commands::show::run(a, &cache),
        Command::Report(a) => commands::report::run(a, &cache),
        Command::Lock(a) => commands::lock::run(a, &cache),
        Command::Gc(a) => commands::gc::run(a, &cache),
        Command::Grade(a) => commands::grade::run(a),
        Command::Loss(a) => commands::loss::run(a),
        Command::Sample(a) => commands::sample::run(a),
        Command::Bench(c) => commands::bench::run(c, &cache),
        Command::Cancel(a) => commands::cancel::run(a, &cache),
        Command::ExecNode(a) => commands::exec_node::run(a, &cache),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// `spur status | head` ends as `ls | head` does: a write to a closed pipe ends the process
/// (SIGPIPE's default action), instead of Rust's ignored signal and a panic on the failed
/// write. Not for the commands that change the cache or run children (`run`, `exec-node`,
/// `gc`): they finish what they started and report through their exit status.
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: restores a signal's default disposition before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Errors for people: spec problems print as-is, others with their causes.
fn render_error(e: &anyhow::Error) -> String {
    if let Some(spec) = e.downcast_ref::<spur_spec::SpecErrors>() {
        return spec.to_string();
    }
    let mut s = format!("error: {e}");
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    s
}
