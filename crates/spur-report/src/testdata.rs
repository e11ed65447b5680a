//! A synthetic experiment in the exact record format of `spur run`
//! (src/record.rs): models alpha and beta × rewards ground_truth and random
//! × seeds 1–3, 4 GRPO steps, MATH-500 evals at steps 0, 2, 4 and an AIME
//! eval at 0 and 4. alpha/random/3 stopped after step 2, beta/random/2
//! failed in step 3, beta/random/3 never started.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::{ExperimentInfo, RecordFile, ReportInput, RunInput, Sample};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const DIFF: &str = "d1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ffd1ff";
pub const MATH_HASH: &str = "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132";
pub const XSS: &str = "<script>alert(1)</script>";
pub const STEPS: u64 = 4;

/// MATH-500 accuracy of a run at a step: the model's baseline, a gain by
/// reward growing with the step, and a little per seed.
pub fn accuracy(model: &str, reward: &str, seed: u64, step: u64) -> f64 {
    let base = if model == "alpha" { 0.5 } else { 0.3 };
    let gain = if reward == "ground_truth" { 0.2 } else { 0.1 };
    if step == 0 {
        return base;
    }
    base + gain * step as f64 / STEPS as f64 + (seed as f64 - 2.0) * 0.02
}

fn eval_id(model: &str, reward: &str, seed: u64, eval: &str, step: u64) -> String {
    if step == 0 {
        format!("eval-{model}-{eval}-0")
    } else {
        format!("eval-{model}-{reward}-{seed}-{eval}-{step}")
    }
}

fn eval_metrics(model: &str, reward: &str, seed: u64, eval: &str, step: u64) -> Value {
    let mut acc = accuracy(model, reward, seed, step);
    if eval == "aime" {
        acc /= 4.0;
    }
    json!({
        "overall": {"n": 500, "correct": (acc * 500.0).round(), "accuracy": acc},
        "by_subject": {}, "by_level": {},
        "parsable": 0.9,
        "code_frequency": 0.3 + 0.05 * step as f64,
        "with_code": {"n": 0, "correct": 0, "accuracy": 0.0},
        "without_code": {"n": 0, "correct": 0, "accuracy": 0.0},
        "accuracy": acc,
        "boxed_rate": 0.8,
        "mean_length": 400.0 + step as f64,
        "grader": "paper",
        "graders": graders(acc, step),
    })
}

/// What the eval stage records of its graders: `strict` a point above
/// `paper` at every step, `math_verify` gaining a point more per step.
pub fn graders(paper: f64, step: u64) -> Value {
    let group =
        |acc: f64| json!({"n": 500, "correct": (acc * 500.0).round() as u64, "accuracy": acc});
    json!({
        "n": 500,
        "by_grader": {
            "math_verify": group(paper + 0.01 * step as f64),
            "paper": group(paper),
            "strict": group(paper + 0.01),
        },
        "pairs": [],
        "disagree": 5 + step,
        "disagree_lines": [],
    })
}

/// The policy probe after `step` updates (0: the base model): the mode gains probability and
/// entropy falls as steps go by, faster for higher seeds.
pub fn probe_metrics(seed: u64, step: u64) -> Value {
    let s = (seed * step) as f64;
    json!({
        "prompts": 8, "samples": 32, "entropy": 2.0 - 0.1 * s,
        "greedy_entropy": 1.5, "greedy_logprob": -1.0 + 0.05 * s,
        "greedy_sequence_logprob": -60.0, "opening_repeat": 0.1 + 0.01 * s,
        "greedy_repeat": 0.0, "response_length": 60.0 - s,
    })
}

fn update_metrics(seed: u64, step: u64) -> Value {
    json!({
        "probe": probe_metrics(seed, step),
        "step": step, "rollouts": 1024, "updates": 8, "tokens": 100000,
        "reward_mean": 0.5, "reward_std": 0.5, "zero_advantage_groups": 0.1,
        "loss": 0.01, "clip_fraction_low": 0.001 * step as f64,
        "clip_fraction_high": 0.002 * seed as f64, "approx_kl": 0.001,
        "ref_kl": null, "entropy": null, "grad_norm": 0.3, "grad_norm_max": 0.5,
        "lr": 5e-7, "response_length": 300.0, "code_reasoning": 0.2,
    })
}

/// A record as `record::write` makes it; nodes after `done_through` (a
/// step) are pending.
fn record(
    model: &str,
    reward: &str,
    seed: u64,
    status: &str,
    done_through: u64,
    error: Option<&str>,
    eval_names: &mut BTreeMap<String, String>,
) -> Value {
    let mut nodes = Vec::new();
    let mut node = |id: String, kind: &str, step: u64, shared: bool, metrics: Value| {
        let done = step <= done_through;
        nodes.push(json!({
            "id": id,
            "kind": kind,
            "step": step,
            "shared": shared,
            "status": if done { "cached" } else { "pending" },
            "seconds": if done { json!(1.5) } else { Value::Null },
            "finished_at": if done { json!("2025-01-01T00:00:00Z") } else { Value::Null },
            "metrics": if done { metrics } else { Value::Null },
        }));
    };
    let mut eval = |node: &mut dyn FnMut(String, &str, u64, bool, Value), name: &str, step| {
        let id = eval_id(model, reward, seed, name, step);
        eval_names.insert(id.clone(), name.to_string());
        node(
            id,
            "eval",
            step,
            step == 0,
            eval_metrics(model, reward, seed, name, step),
        );
    };
    eval(&mut node, "math500", 0);
    eval(&mut node, "aime", 0);
    node(
        format!("probe-{model}"),
        "probe",
        0,
        true,
        probe_metrics(seed, 0),
    );
    for step in 1..=STEPS {
        let tag = format!("{model}-{reward}-{seed}-{step}");
        node(
            format!("rollout-{tag}"),
            "rollout",
            step,
            step == 1,
            json!({}),
        );
        node(format!("reward-{tag}"), "reward", step, false, json!({}));
        node(
            format!("update-{tag}"),
            "update",
            step,
            false,
            update_metrics(seed, step),
        );
        if step % 2 == 0 {
            eval(&mut node, "math500", step);
        }
        if step == STEPS {
            eval(&mut node, "aime", step);
        }
    }
    let done = nodes.iter().filter(|n| n["status"] == "cached").count();
    json!({
        "run_id": format!("run-{model}-{reward}-{seed}"),
        "status": status,
        "error": error,
        "experiment": {"path": "/x/demo.yaml", "name": "demo", "sha256": "ab"},
        "cell": {"model": model, "reward": reward, "seed": seed},
        "params": {"model": model, "reward": reward, "seed": seed, "steps": STEPS},
        "reward": {"kind": reward},
        "first_started_at": "2025-01-01T00:00:00Z",
        "started_at": "2025-01-01T00:00:00Z",
        "finished_at": if status == "running" { Value::Null } else { json!("2025-01-01T01:00:00Z") },
        "nodes_done": done,
        "nodes_total": nodes.len(),
        "provenance": {
            "spur_version": "0.1.0",
            "cargo_lock_sha256": "c0ffee",
            "host": {"name": "box", "cpu": "Zen 4", "cores": 2, "os": "linux", "arch": "x86_64"},
            "accelerators": [],
            "git": {"commit": COMMIT, "branch": "main", "dirty": true, "diff_sha256": DIFF, "workdir": "/x"},
            "inputs": {"datasets.math500": MATH_HASH, "models.alpha": "aa", "models.beta": "bb"},
        },
        "nodes": nodes,
    })
}

pub fn input() -> ReportInput {
    let mut runs = Vec::new();
    for model in ["alpha", "beta"] {
        for reward in ["ground_truth", "random"] {
            for seed in 1..=3u64 {
                let label = format!("model={model},reward={reward},seed={seed}");
                let mut eval_names = BTreeMap::new();
                let (status, through, error) = match (model, reward, seed) {
                    ("alpha", "random", 3) => ("stopped", 2, None),
                    ("beta", "random", 2) => ("failed", 2, Some("step 3: out of memory\nmore")),
                    _ => ("finished", STEPS, None),
                };
                let never = (model, reward, seed) == ("beta", "random", 3);
                let record = (!never).then(|| RecordFile {
                    path: PathBuf::from(format!("cache/runs/run-{model}-{reward}-{seed}.json")),
                    record: serde_json::from_value(record(
                        model,
                        reward,
                        seed,
                        status,
                        through,
                        error,
                        &mut eval_names,
                    ))
                    .expect("test records read as spur-store's RunRecord"),
                });
                let samples = if never {
                    Vec::new()
                } else {
                    vec![Sample {
                        eval: "math500".into(),
                        step: through - through % 2,
                        problem: "test/algebra/1.json".into(),
                        gold: "4".into(),
                        extracted: "4".into(),
                        correct: true,
                        response: format!("2+2 is \\boxed{{4}} {XSS} & more"),
                    }]
                };
                runs.push(RunInput {
                    id: format!("run-{model}-{reward}-{seed}"),
                    label,
                    model: model.into(),
                    reward: reward.into(),
                    seed: seed.to_string(),
                    variant: String::new(),
                    record,
                    eval_names,
                    samples,
                });
            }
        }
    }
    ReportInput {
        experiment: ExperimentInfo {
            name: format!("demo {XSS}"),
            path: "/x/demo.yaml".into(),
            sha256: "ab".repeat(32),
            description: Some(format!("a grid {XSS}")),
        },
        runs,
    }
}

/// The parsed view of every run of [`input`].
pub fn views(input: &ReportInput) -> Vec<crate::runs::RunView> {
    input
        .runs
        .iter()
        .map(|r| crate::runs::RunView::parse(r).unwrap())
        .collect()
}
