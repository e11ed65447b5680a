//! `spur bench …`: each benchmark measures in the crate whose code it times (planning in
//! `spur_ops::bench`, models and generation in `spur_lm::bench`, the update step in
//! `spur_rl::bench`); these files parse arguments and print.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use spur_store::Store;

use spur_ops::{bench, workspace};

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Time parsing + planning, and the fully cached "nothing to do" decision.
    Plan(PlanBench),
    /// Prefill and decode tokens/s of a model (f32 and quantised weights).
    Models(super::bench_models::ModelsBench),
    /// End-to-end greedy generation tokens/s of an engine (prefill included).
    Generate(super::bench_generate::GenerateBench),
    /// Tokens/s and model FLOPs utilisation of one GRPO update step.
    Update(super::bench_update::UpdateBench),
    /// The fused training ops on a device against their CPU kernels, and their speed against
    /// candle's composite ops.
    TrainOps(super::bench_train_ops::TrainOpsBench),
}

#[derive(clap::Args, Debug)]
pub struct PlanBench {
    /// Multiply the number of seeds (1 → ~156,000 nodes).
    #[arg(long, default_value_t = 1)]
    pub scale: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Also fill a temporary cache with every node and time the cached rerun decision.
    #[arg(long)]
    pub cached: bool,
    /// Write the generated experiment here instead of a temporary file.
    #[arg(long)]
    pub write: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand, _cache: &Path) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Plan(args) => plan(args),
        BenchCommand::Models(args) => super::bench_models::run(args),
        BenchCommand::Generate(args) => super::bench_generate::run(args),
        BenchCommand::Update(args) => super::bench_update::run(args),
        BenchCommand::TrainOps(args) => super::bench_train_ops::run(args),
    }
}

fn plan(args: PlanBench) -> Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let file = args
        .write
        .clone()
        .unwrap_or_else(|| dir.path().join("paper.yaml"));
    std::fs::write(&file, bench::paper_grid(3 * args.scale))?;
    let store = Store::open(dir.path().join("cache"))?;
    let registry = workspace::registry();
    let t = bench::time_plan(&file, &store, &registry, args.repeat)?;
    println!(
        "plan: {} runs, {} nodes ({} shared): parse + plan {:.3} s (best of {})",
        t.runs, t.nodes, t.shared, t.seconds, args.repeat
    );
    if args.cached {
        let started = Instant::now();
        let nodes = bench::fill_cache(&file, &store, &registry)?;
        println!(
            "filled a cache with {nodes} nodes in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let best = bench::time_cached_rerun(&file, &store, &registry, args.repeat)?;
        println!("cached rerun: load + plan + cache scan decides \"nothing to do\" in {best:.3} s (best of {})", args.repeat);
    }
    Ok(ExitCode::SUCCESS)
}
