//! The planning benchmark behind `spur bench plan`: the paper's grid shape (8 models ×
//! 7 rewards × seeds, 300 steps, MATH-500 every 10 steps, AIME/AMC at the end) generated in
//! memory with pinned hashes, so no weights or data are needed, then parsed and planned, and
//! the fully cached "nothing to do" decision timed over a cache with every node in it.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use spur_stages::Registry;
use spur_store::Store;

use crate::workspace;

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

/// The shape of a plan and the best time to load and plan it.
pub struct PlanTiming {
    pub runs: usize,
    pub nodes: usize,
    pub shared: usize,
    /// Best of the repetitions: parse, validate, expand, plan.
    pub seconds: f64,
}

/// Loads and plans `file` `repeat` times (at least once).
pub fn time_plan(
    file: &Path,
    store: &Store,
    registry: &Registry,
    repeat: usize,
) -> Result<PlanTiming> {
    let mut timing = PlanTiming {
        runs: 0,
        nodes: 0,
        shared: 0,
        seconds: f64::INFINITY,
    };
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let exp = spur_spec::load(file)?;
        let plan = workspace::plan(&exp, store, registry)?;
        timing.seconds = timing.seconds.min(t.elapsed().as_secs_f64());
        (timing.runs, timing.nodes, timing.shared) =
            (plan.runs.len(), plan.nodes.len(), plan.shared_nodes());
    }
    Ok(timing)
}

/// Gives every node of `file`'s plan an (empty) cache entry; returns how many.
pub fn fill_cache(file: &Path, store: &Store, registry: &Registry) -> Result<usize> {
    let exp = spur_spec::load(file)?;
    let plan = workspace::plan(&exp, store, registry)?;
    for node in &plan.nodes {
        let dir = store.node_dir(&node.id);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("manifest.json"), b"{}")?;
    }
    Ok(plan.nodes.len())
}

/// Best time over `repeat` runs to load, plan, scan the cache and decide that nothing is
/// pending, as `spur run` does on a finished experiment.
pub fn time_cached_rerun(
    file: &Path,
    store: &Store,
    registry: &Registry,
    repeat: usize,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let exp = spur_spec::load(file)?;
        let plan = workspace::plan(&exp, store, registry)?;
        let cached = workspace::cached(store)?;
        let runs: Vec<usize> = (0..plan.runs.len()).collect();
        let pending = workspace::nodes_of(&plan, &runs)
            .into_iter()
            .filter(|&n| !cached.contains(&plan.nodes[n as usize].id))
            .count();
        best = best.min(t.elapsed().as_secs_f64());
        ensure!(pending == 0, "{pending} nodes were not cached");
    }
    Ok(best)
}
