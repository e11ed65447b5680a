//! `spur bench plan`: planning speed on the paper's grid shape (`spur bench models`,
//! `generate` and `update`: see `bench_models.rs`, `bench_generate.rs`, `bench_update.rs`).
//!
//! The grid is generated in memory (8 models × 7 rewards × 3·scale seeds,
//! 300 steps, MATH-500 every 10 steps, AIME/AMC at the end) with pinned
//! hashes, so no weights or data are needed.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use spur_store::Store;

use spur_ops::workspace;

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

/// The paper's grid as an experiment file.
pub fn paper_grid(seeds: usize) -> String {
    let pin = |i: usize| format!("{:064x}", i + 1);
    let models = [
        "qwen2.5-math-7b",
        "qwen2.5-math-1.5b",
        "qwen2.5-7b",
        "qwen2.5-1.5b",
        "olmo2-7b",
        "olmo2-7b-sft",
        "llama3.1-8b-instruct",
        "llama3.2-3b-instruct",
    ];
    let mut s = String::from("name: bench-paper-grid\nmodels:\n");
    for (i, m) in models.iter().enumerate() {
        s.push_str(&format!(
            "  {m}: {{sources: [{{hub: org/{m}}}], sha256: \"{}\"}}\n",
            pin(i)
        ));
    }
    s.push_str("datasets:\n");
    for (i, d) in ["deepscaler", "math500", "aime24", "aime25", "amc"]
        .iter()
        .enumerate()
    {
        s.push_str(&format!(
            "  {d}: {{sources: [{{path: {d}.jsonl}}], sha256: \"{}\"}}\n",
            pin(100 + i)
        ));
    }
    s.push_str(
        "rewards:\n  ground_truth: {kind: ground_truth}\n  majority_vote: {kind: majority_vote}\n  incorrect: {kind: incorrect}\n  format: {kind: format}\n  random: {kind: random, gamma: 0.5}\n  python: {kind: python}\n  one_shot: {kind: one_shot, example: {problem: \"1+1\", answer: \"2\"}}\n",
    );
    s.push_str("defaults:\n  train_data: deepscaler\n  steps: 300\n  eval_every: 10\n  evals:\n    math500: {dataset: math500}\n    aime24: {dataset: aime24, temperature: 0.6, samples: 8, at: end}\n    aime25: {dataset: aime25, temperature: 0.6, samples: 8, at: end}\n    amc: {dataset: amc, temperature: 0.6, samples: 8, at: end}\ngrid:\n");
    s.push_str(&format!("  model: [{}]\n", models.join(", ")));
    s.push_str(
        "  reward: [ground_truth, majority_vote, incorrect, format, random, python, one_shot]\n",
    );
    let seeds: Vec<String> = (1..=seeds).map(|i| i.to_string()).collect();
    s.push_str(&format!("  seed: [{}]\n", seeds.join(", ")));
    s
}

pub fn run(cmd: BenchCommand, _cache: &Path) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Plan(args) => plan(args),
        BenchCommand::Models(args) => super::bench_models::run(args),
        BenchCommand::Generate(args) => super::bench_generate::run(args),
        BenchCommand::Update(args) => super::bench_update::run(args),
    }
}

fn plan(args: PlanBench) -> Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let file = args
        .write
        .clone()
        .unwrap_or_else(|| dir.path().join("paper.yaml"));
    std::fs::write(&file, paper_grid(3 * args.scale))?;
    let cache = dir.path().join("cache");
    let store = Store::open(&cache)?;
    let registry = workspace::registry();

    let mut best = f64::INFINITY;
    let mut shape = (0, 0, 0);
    for _ in 0..args.repeat.max(1) {
        let t = Instant::now();
        let exp = spur_spec::load(&file)?;
        let plan = workspace::plan(&exp, &store, &registry)?;
        best = best.min(t.elapsed().as_secs_f64());
        shape = (plan.runs.len(), plan.nodes.len(), plan.shared_nodes());
    }
    println!(
        "plan: {} runs, {} nodes ({} shared): parse + plan {:.3} s (best of {})",
        shape.0, shape.1, shape.2, best, args.repeat
    );
    if args.cached {
        let exp = spur_spec::load(&file)?;
        let plan = workspace::plan(&exp, &store, &registry)?;
        let t = Instant::now();
        for node in &plan.nodes {
            let dir = store.node_dir(&node.id);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("manifest.json"), b"{}")?;
        }
        println!(
            "filled a cache with {} nodes in {:.1} s",
            plan.nodes.len(),
            t.elapsed().as_secs_f64()
        );
        let mut best = f64::INFINITY;
        for _ in 0..args.repeat.max(1) {
            let t = Instant::now();
            let exp = spur_spec::load(&file)?;
            let plan = workspace::plan(&exp, &store, &registry)?;
            let cached = workspace::cached(&store)?;
            let runs: Vec<usize> = (0..plan.runs.len()).collect();
            let pending = workspace::nodes_of(&plan, &runs)
                .into_iter()
                .filter(|&n| !cached.contains(&plan.nodes[n as usize].id))
                .count();
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(pending, 0, "every node was cached");
        }
        println!("cached rerun: load + plan + cache scan decides \"nothing to do\" in {best:.3} s (best of {})", args.repeat);
    }
    Ok(ExitCode::SUCCESS)
}
