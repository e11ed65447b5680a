//! Grid expansion and validation, on experiment text.

use std::path::Path;

fn parse(text: &str) -> Result<spur_spec::Experiment, spur_spec::SpecErrors> {
    spur_spec::parse(text, Path::new("exp.yaml"))
}

const HEAD: &str = r#"
models:
  m1: {sources: [{path: m1.gguf}]}
  m2: {sources: [{path: m2.gguf}]}
datasets:
  train: {sources: [{path: train.jsonl}]}
  test: {sources: [{path: test.jsonl}]}
rewards:
  gt: {kind: ground_truth}
  fmt: {kind: format}
  rnd: {kind: random, gamma: 0.5}
"#;

fn with(body: &str) -> String {
    format!("{HEAD}{body}")
}

const DEFAULTS: &str = r#"
defaults:
  model: m1
  train_data: train
  reward: gt
  evals:
    math500: {dataset: test}
"#;

#[test]
fn product_of_axes() {
    let exp = parse(&with(&format!(
        "{DEFAULTS}grid:\n  model: [m1, m2]\n  reward: [gt, fmt, rnd]\n  seed: [1, 2, 3]\n"
    )))
    .unwrap();
    assert_eq!(exp.runs.len(), 18);
    assert_eq!(exp.runs[0].label(), "model=m1,reward=gt,seed=1");
    assert_eq!(exp.runs[17].params.model.as_deref(), Some("m2"));
    assert_eq!(exp.runs[17].params.seed, 3);
}

#[test]
fn zip_exclude_include_overrides() {
    let text = with(&format!(
        "{DEFAULTS}grid:\n  reward: [gt, rnd]\n  zip:\n    - {{update.lr: [1.0e-6, 2.0e-6], update.clip: [true, false]}}\n  seed: [1, 2]\n\
exclude:\n  - {{reward: rnd, seed: 2}}\ninclude:\n  - {{reward: fmt, seed: 7}}\n\
overrides:\n  - match: {{reward: rnd}}\n    set: {{update: {{eps_high: 0.28}}}}\n"
    ));
    let exp = parse(&text).unwrap();
    // 2 rewards × 2 zipped × 2 seeds = 8, minus 2 excluded, plus 1 included.
    assert_eq!(exp.runs.len(), 7);
    for run in &exp.runs {
        let rnd = run.params.reward.as_deref() == Some("rnd");
        assert_eq!(run.params.update.eps_high, if rnd { 0.28 } else { 0.2 });
        assert!(!(rnd && run.params.seed == 2));
    }
    let zipped: Vec<(f64, bool)> = exp
        .runs
        .iter()
        .take(4)
        .map(|r| (r.params.update.lr, r.params.update.clip))
        .collect();
    assert_eq!(
        zipped,
        [(1e-6, true), (1e-6, true), (2e-6, false), (2e-6, false)]
    );
    assert_eq!(exp.runs[6].params.reward.as_deref(), Some("fmt"));
    assert_eq!(exp.runs[6].params.seed, 7);
}

#[test]
fn free_axis_through_reference() {
    let text = format!(
        "{}{DEFAULTS}grid:\n  gamma: [0.0, 0.3]\n",
        HEAD.replace("gamma: 0.5", "gamma: \"${gamma}\"")
            .replace("reward: gt", "reward: rnd")
    )
    .replace("  reward: gt\n", "  reward: rnd\n");
    let exp = parse(&text).unwrap();
    assert_eq!(exp.runs.len(), 2);
    let g: Vec<f64> = exp
        .runs
        .iter()
        .map(|r| r.reward.as_ref().unwrap().gamma.unwrap())
        .collect();
    assert_eq!(g, [0.0, 0.3]);
}

/// `${path}` reads a parameter as written, or at its default when the file leaves it out: a
/// command may name `rollout.temperature` without the file restating the paper's 1.0.
#[test]
fn references_read_parameters_written_or_at_their_defaults() {
    let text = with(&format!(
        "{DEFAULTS}  update: {{lr: 2}}\n\
         commands:\n  note:\n    run: echo ${{rollout.temperature}} ${{update.lr}}\n\
         pipeline: [rollout, reward, update, eval, note]\n"
    ))
    .replace(
        "rnd: {kind: random, gamma: 0.5}",
        "rnd: {kind: command, command: 'score --t ${rollout.temperature}'}",
    )
    .replace("  reward: gt\n", "  reward: rnd\n");
    let exp = parse(&text).unwrap();
    let run = &exp.runs[0];
    assert_eq!(
        run.lookup("rollout.temperature"),
        Some(serde_json::json!(1.0))
    );
    // Written as the integer 2: kept so, as a command sees it.
    assert_eq!(run.lookup("update.lr"), Some(serde_json::json!(2)));
    assert_eq!(run.lookup("update.no_such_key"), None);
}
