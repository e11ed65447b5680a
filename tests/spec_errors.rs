//! Bad experiment files: every problem names file, line, column and key, and
//! nothing runs.

mod common;

use common::Workspace;

const GOOD: &str = r#"models:
  smol: {sources: [{path: model.gguf}], sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
datasets:
  train: {sources: [{path: train.jsonl}], sha256: "2d6b971aee8c85272f9d085f4159a6da3985104ed9cdba82670ee53c94d03cd0"}
  math500: {sources: [{path: math500.jsonl}], sha256: "ca2cefae1c87c39e31880dc6469519a572faf72f06c63b144c21d8e98a2a5bf6"}
rewards:
  ground_truth: {kind: ground_truth}
  random: {kind: random, gamma: 0.5}
defaults:
  model: smol
  train_data: train
  steps: 2
  rollout:
    samples_per_prompt: 4
  update:
    lr: 5.0e-7
  evals:
    math500: {dataset: math500}
grid:
  reward: [ground_truth, random]
  seed: [1, 2]
"#;

/// Replace `from` by `to` in GOOD, run `spur plan`, and return stderr.
fn error_for(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "fixture lacks {from:?}");
    let ws = Workspace::new();
    ws.write("exp.yaml", &GOOD.replacen(from, to, 1));
    let err = ws.fails(&["plan", "exp.yaml"]);
    assert!(!ws
        .cache()
        .join("nodes")
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false));
    err
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected {p:?} in:\n{err}");
    }
}

#[test]
fn good_file_plans() {
    let ws = Workspace::new();
    ws.write("exp.yaml", GOOD);
    let plan = ws.plan_json("exp.yaml");
    assert_eq!(plan["runs"].as_array().unwrap().len(), 4);
}

/// A printing command whose reader stops early (`| head`) ends quietly, as `ls | head` does.
#[test]
fn a_closed_pipe_ends_a_printing_command_quietly() {
    let ws = Workspace::new();
    // Enough runs that the plan fills the pipe before `head` closes it.
    let seeds: Vec<String> = (1..=400).map(|s| s.to_string()).collect();
    ws.write(
        "exp.yaml",
        &GOOD.replace("seed: [1, 2]", &format!("seed: [{}]", seeds.join(", "))),
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' plan exp.yaml --json | head -c 1 >/dev/null",
            env!("CARGO_BIN_EXE_spur")
        ))
        .current_dir(ws.path("."))
        .env("SPUR_CACHE", ws.cache())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

#[test]
fn yaml_syntax_error() {
    let err = error_for("  steps: 2\n", "  steps: [2\n");
    assert_has(&err, &["exp.yaml:", "YAML syntax error"]);
}

#[test]
fn unknown_key_with_hint() {
    let err = error_for("    lr: 5.0e-7", "    lerning_rate: 5.0e-7");
    assert_has(
        &err,
        &[
            "unknown key `lerning_rate`",
            "exp.yaml:16:5",
            "defaults.update.lerning_rate",
            "did you mean `lr`?",
        ],
    );
    let err = error_for("datasets:", "datasetz:");
    assert_has(
        &err,
        &[
            "unknown key `datasetz`",
            "exp.yaml:3:1",
            "did you mean `datasets`?",
        ],
    );
}

#[test]
fn wrong_type() {
    let err = error_for("  steps: 2", "  steps: many");
    assert_has(&err, &["wrong type", "exp.yaml:12:10", "defaults.steps"]);
    let err = error_for("  seed: [1, 2]", "  seed: 7");
    assert_has(
        &err,
        &["axis `seed` must be a list", "exp.yaml:21:9", "grid.seed"],
    );
}

#[test]
fn undefined_names() {
    let err = error_for(
        "  reward: [ground_truth, random]",
        "  reward: [ground_truth, rnadom]",
    );
    assert_has(
        &err,
        &[
            "undefined reward `rnadom`",
            "exp.yaml:20:26",
            "grid.reward[1]",
            "did you mean `random`?",
        ],
    );
    let err = error_for("  model: smol", "  model: smoll");
    assert_has(
        &err,
        &[
            "undefined model `smoll`",
            "exp.yaml:10:10",
            "defaults.model",
            "did you mean `smol`?",
        ],
    );
    let err = error_for("{dataset: math500}", "{dataset: math5000}");
    assert_has(
        &err,
        &[
            "undefined dataset `math5000`",
            "exp.yaml:18:",
            "defaults.evals.math500.dataset",
        ],
    );
}

#[test]
fn empty_grid() {
    let err = error_for("  seed: [1, 2]", "  seed: []");
    assert_has(&err, &["axis `seed` has no values", "exp.yaml:21:9"]);
    let err = error_for(
        "grid:\n  reward: [ground_truth, random]\n  seed: [1, 2]\n",
        "grid: {}\n",
    );
    assert_has(&err, &["the grid is empty", "exp.yaml:19:1"]);
    let err = error_for(
        "  seed: [1, 2]\n",
        "  seed: [1, 2]\nexclude:\n  - {seed: [1, 2]}\n",
    );
    assert_has(&err, &["every cell is excluded"]);
}

#[test]
fn duplicate_names() {
    let err = error_for(
        "  random: {kind: random, gamma: 0.5}",
        "  random: {kind: random, gamma: 0.5}\n  random: {kind: format}",
    );
    assert_has(
        &err,
        &["duplicate name `random`", "exp.yaml:9:3", "rewards.random"],
    );
}

#[test]
fn duplicate_key_points_at_the_duplicate() {
    // serde_yaml rejects these itself, placing them at the start of their mapping.
    let err = error_for("  steps: 2\n", "  steps: 2\n  steps: 3\n");
    assert_has(
        &err,
        &["duplicate name `steps`", "exp.yaml:13:3", "defaults.steps"],
    );
    let err = error_for("models:\n", "name: a\nname: b\nmodels:\n");
    assert_has(&err, &["duplicate name `name`", "exp.yaml:2:1"]);
    // Written three times: each duplicate at its own line.
    let err = error_for(
        "  random: {kind: random, gamma: 0.5}",
        "  random: {kind: random, gamma: 0.5}\n  random: {kind: format}\n  random: {kind: format}",
    );
    assert_has(&err, &["exp.yaml:9:3", "exp.yaml:10:3"]);
}

#[test]
fn out_of_range_values() {
    let err = error_for("    lr: 5.0e-7", "    lr: -5.0e-7");
    assert_has(
        &err,
        &[
            "`update.lr` the learning rate must be a positive",
            "exp.yaml:16:9",
            "defaults.update.lr",
        ],
    );
    let err = error_for("    samples_per_prompt: 4", "    samples_per_prompt: 0");
    assert_has(
        &err,
        &[
            "rollout.samples_per_prompt",
            "must be at least 1",
            "exp.yaml:14:25",
        ],
    );
    let err = error_for("gamma: 0.5", "gamma: 1.5");
    assert_has(
        &err,
        &[
            "gamma must be in [0, 1]",
            "exp.yaml:8:33",
            "rewards.random.gamma",
        ],
    );
}

#[test]
fn range_error_points_at_the_override_that_caused_it() {
    let err = error_for(
        "  seed: [1, 2]\n",
        "  seed: [1, 2]\noverrides:\n  - match: {reward: random}\n    set: {update: {lr: 0}}\n",
    );
    assert_has(
        &err,
        &["`update.lr`", "overrides[0].set.update.lr", "exp.yaml:24:"],
    );
}

#[test]
fn range_error_points_at_the_axis_value_not_its_reference() {
    let ws = Workspace::new();
    let text = GOOD
        .replace("    lr: 5.0e-7", "    lr: \"${lr}\"")
        .replace("  seed: [1, 2]\n", "  seed: [1, 2]\n  lr: [5.0e-7, -1.0]\n");
    ws.write("exp.yaml", &text);
    let err = ws.fails(&["plan", "exp.yaml"]);
    assert_has(
        &err,
        &[
            "`update.lr` the learning rate",
            "exp.yaml:22:16",
            "grid.lr[1]",
        ],
    );
}

/// Logs written to a pipe carry no terminal colour codes.
#[test]
fn no_colour_when_stderr_is_not_a_terminal() {
    let ws = Workspace::new();
    ws.write("exp.yaml", common::GRID);
    let log = ws.path("executions.log");
    ws.spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    // A corrupted artifact makes `--verify` log a warning.
    let nodes = ws.cache().join("nodes");
    let data = std::fs::read_dir(&nodes)
        .unwrap()
        .filter_map(|d| std::fs::read_dir(d.unwrap().path()).ok())
        .flatten()
        .map(|n| n.unwrap().path().join("out/data.txt"))
        .find(|p| p.exists())
        .expect("a prepare node's output");
    std::fs::write(&data, "corrupt").unwrap();
    let out = ws
        .spur()
        .args(["run", "exp.yaml", "--verify"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

#[test]
fn cycles_among_commands() {
    let ws = Workspace::new();
    ws.write("exp.yaml", "commands:\n  a:\n    run: echo a\n    needs: [c]\n  b:\n    run: echo b\n    needs: [a]\n  c:\n    run: echo c\n    needs: [b]\n");
    let err = ws.fails(&["run", "exp.yaml"]);
    assert_has(
        &err,
        &[
            "cycle among command stages: a → b → c → a",
            "exp.yaml:4:5",
            "commands.a.needs",
        ],
    );
    assert!(
        !ws.cache().join("nodes").exists()
            || ws
                .cache()
                .join("nodes")
                .read_dir()
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn unknown_reference_and_unknown_stage() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        "commands:\n  a:\n    run: echo ${sed}\npipeline: [a, rollot]\ngrid:\n  seed: [1]\n",
    );
    let err = ws.fails(&["plan", "exp.yaml"]);
    assert_has(
        &err,
        &[
            "unknown stage `rollot`",
            "exp.yaml:4:15",
            "did you mean `rollout`?",
        ],
    );
}

#[test]
fn commands_beside_models_need_a_pipeline() {
    let err = error_for(
        "grid:\n",
        "commands:\n  note:\n    run: echo ${seed}\ngrid:\n",
    );
    assert_has(
        &err,
        &[
            "these commands are in no pipeline",
            "exp.yaml:19:1",
            "pipeline: [rollout, reward, update, eval, note]",
        ],
    );
}

#[test]
fn several_problems_are_reported_together() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        &GOOD
            .replace("  model: smol", "  model: smoll")
            .replace("[ground_truth, random]", "[ground_truth, rnadom]"),
    );
    let err = ws.fails(&["plan", "exp.yaml"]);
    assert_has(
        &err,
        &[
            "undefined model `smoll`",
            "undefined reward `rnadom`",
            "2 problems",
        ],
    );
}

/// `engine: mistralrs` in a build without mistral.rs is refused at plan time, at its key.
#[cfg(not(feature = "mistralrs"))]
#[test]
fn mistralrs_engine_needs_a_build_with_it() {
    let err = error_for(
        "smol: {sources: [{path: model.gguf}],",
        "smol: {engine: mistralrs, sources: [{path: model.gguf}],",
    );
    assert_has(
        &err,
        &[
            "exp.yaml:2:18",
            "key: models.smol.engine",
            "engine `mistralrs` is not available in this build",
            "--features mistralrs",
        ],
    );
}

#[test]
fn graders_are_checked_where_they_are_named() {
    let err = error_for(
        "{dataset: math500}",
        "{dataset: math500, grader: math-verify}",
    );
    assert_has(
        &err,
        &[
            "unknown value `math-verify`",
            "exp.yaml:18:41",
            "defaults.evals.math500.grader",
            "did you mean `math_verify`?",
        ],
    );
    let err = error_for(
        "ground_truth: {kind: ground_truth}",
        "ground_truth: {kind: ground_truth, grader: mathverify}",
    );
    assert_has(
        &err,
        &[
            "unknown grader `mathverify`",
            "exp.yaml:7:",
            "rewards.ground_truth.grader",
            "did you mean `math_verify`?",
        ],
    );
    // Named right, both plan.
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        &GOOD
            .replacen(
                "{dataset: math500}",
                "{dataset: math500, grader: math_verify}",
                1,
            )
            .replacen(
                "ground_truth: {kind: ground_truth}",
                "ground_truth: {kind: ground_truth, grader: math_verify}",
                1,
            ),
    );
    let plan = ws.plan_json("exp.yaml");
    assert_eq!(plan["runs"].as_array().unwrap().len(), 4);
}

#[test]
fn probe_settings_are_checked_where_they_are_written() {
    let err = error_for(
        "  evals:\n",
        "  probe: {dataset: math50, samples: 4}\n  evals:\n",
    );
    assert_has(
        &err,
        &[
            "undefined dataset `math50`",
            "exp.yaml:17:",
            "defaults.probe.dataset",
            "did you mean `math500`?",
        ],
    );
    let err = error_for(
        "  evals:\n",
        "  probe: {dataset: math500, samples: 0}\n  evals:\n",
    );
    assert_has(
        &err,
        &["`probe.samples`", "must be at least 1", "exp.yaml:17:"],
    );
    let err = error_for("    lr: 5.0e-7", "    lr: 5.0e-7\n    eps_low: 1.5");
    assert_has(&err, &["`update.eps_low`", "must be in [0, 1]"]);
}

/// One probe node per model, shared by every arm and seed; every update reads it.
#[test]
fn the_probe_is_planned_once_and_read_by_every_update() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        &GOOD.replace("  evals:\n", "  probe: {dataset: math500}\n  evals:\n"),
    );
    let plan = ws.plan_json("exp.yaml");
    let nodes = plan["nodes"].as_array().unwrap();
    let kind = |k: &'static str| nodes.iter().filter(move |n| n["kind"] == k);
    let probes: Vec<_> = kind("probe").collect();
    assert_eq!(probes.len(), 1, "{probes:#?}");
    assert_eq!(probes[0]["step"], 0);
    let probe_id = probes[0]["id"].clone();
    let updates: Vec<_> = kind("update").collect();
    assert_eq!(updates.len(), 4 * 2);
    for u in updates {
        let reads_probe = u["deps"].as_array().unwrap().contains(&probe_id);
        assert!(reads_probe, "{u:#}");
    }
    assert_eq!(probes[0]["runs"].as_array().unwrap().len(), 4);
    // A model node: it carries a memory estimate (null while the weights are not local).
    assert!(probes[0].get("memory_bytes").is_some(), "{:#}", probes[0]);
    // Without a probe, no probe node and no probe input.
    let ws = Workspace::new();
    ws.write("exp.yaml", GOOD);
    let plan = ws.plan_json("exp.yaml");
    assert!(!plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["kind"] == "probe"));
}

/// One reward grammar for the spec, the planner and the reward stage: what the
/// spec accepts the stages can run, and the rest is refused where it is written.
#[test]
fn reward_kinds_follow_the_one_grammar() {
    let err = error_for("kind: random, gamma: 0.5", "kind: randon, gamma: 0.5");
    assert_has(
        &err,
        &[
            "unknown reward kind `randon`",
            "exp.yaml:8:",
            "rewards.random.kind",
            "did you mean `random`?",
        ],
    );
    // A command scores alone: combined, the stages could not run it.
    let err = error_for(
        "kind: ground_truth}",
        "kind: format_AND_command, command: cat}",
    );
    assert_has(
        &err,
        &[
            "a `command` reward stands alone",
            "exp.yaml:7:",
            "rewards.ground_truth.kind",
        ],
    );
    // The R1 suffix, aliases and an inline γ plan, as the reward stage reads them.
    for kind in [
        "ground_truth_r1_style",
        "math_AND_inverse_python",
        "random0.3",
    ] {
        let ws = Workspace::new();
        ws.write(
            "exp.yaml",
            &GOOD.replacen("kind: ground_truth}", &format!("kind: {kind}}}"), 1),
        );
        ws.plan_json("exp.yaml");
    }
}
