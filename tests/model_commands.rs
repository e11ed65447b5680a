//! `spur sample`, `spur bench generate`, `spur bench update` and `spur bench train-ops`, on the
//! embedded default model (SmolLM2-135M-Instruct, fetched into the model cache on first use)
//! where they load one: their JSON shapes, determinism and input errors.

mod common;

use std::collections::BTreeSet;

use common::Workspace;
use serde_json::Value;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn sample_prints_one_json_object_per_sample_and_repeats_itself() {
    let ws = Workspace::new();
    let args = [
        "sample",
        "--prompt",
        "What is 2+2?",
        "--n",
        "3",
        "--temperature",
        "1",
        "--seed",
        "3",
        "--max-tokens",
        "6",
        "--json",
    ];
    let out = ws.ok(&args);
    let samples = json_lines(&out);
    assert_eq!(samples.len(), 3);
    let keys: BTreeSet<&str> = [
        "prompt_index",
        "sample_index",
        "text",
        "token_ids",
        "logprobs",
        "finish_reason",
    ]
    .into();
    for (i, s) in samples.iter().enumerate() {
        let obj = s.as_object().unwrap();
        assert_eq!(
            obj.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            keys
        );
        assert_eq!(s["prompt_index"], 0);
        assert_eq!(s["sample_index"], i);
        let ids = s["token_ids"].as_array().unwrap();
        let logprobs = s["logprobs"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 6, "{s}");
        assert_eq!(ids.len(), logprobs.len());
        assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
        let reason = s["finish_reason"].as_str().unwrap();
        assert!(["length", "eos", "stop"].contains(&reason), "{reason}");
        if reason == "length" {
            assert_eq!(ids.len(), 6);
        }
    }
    // Distinct samples per index; the same seed gives the same samples.
    assert_ne!(samples[0]["token_ids"], samples[1]["token_ids"]);
    assert_eq!(ws.ok(&args), out);
}

#[test]
fn sample_reads_prompts_from_jsonl_in_every_accepted_form() {
    let ws = Workspace::new();
    let file = ws.write(
        "prompts.jsonl",
        "\"What is 1+1?\"\n\n{\"prompt\": \"What is 2+2?\"}\n{\"problem\": \"What is 3+3?\", \"answer\": \"6\"}\n",
    );
    let out = ws.ok(&[
        "sample",
        "--prompts",
        file.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let indices: Vec<u64> = json_lines(&out)
        .iter()
        .map(|s| s["prompt_index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[test]
fn sample_names_the_file_and_line_of_a_bad_prompt() {
    let ws = Workspace::new();
    let sample_from = |name: &str, text: &str| {
        let file = ws.write(name, text);
        ws.fails(&[
            "sample",
            "--prompts",
            file.to_str().unwrap(),
            "--max-tokens",
            "2",
        ])
    };
    let err = sample_from("prompts.jsonl", "\"fine\"\n{\"prompt\": \n");
    assert!(
        err.contains("prompts.jsonl:2") && err.contains("not JSON"),
        "{err}"
    );
    let err = sample_from("keys.jsonl", "{\"question\": \"x\"}\n");
    assert!(
        err.contains("keys.jsonl:1") && err.contains("\"prompt\" or \"problem\""),
        "{err}"
    );

    let err = ws.fails(&["sample", "--prompt", "x", "--n", "0"]);
    assert!(err.contains("--n must be at least 1"), "{err}");
    let err = ws.fails(&["sample", "--prompt", "x", "--engine", "vllm"]);
    assert!(err.contains("engine \"vllm\" is not available"), "{err}");
    let err = ws.fails(&["sample", "--prompt", "x", "--device", "tpu"]);
    assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{err}");
}

#[test]
fn bench_generate_reports_each_batch() {
    let ws = Workspace::new();
    let out = ws.ok(&[
        "bench",
        "generate",
        "--device",
        "cpu",
        "--batches",
        "1,3",
        "--max-tokens",
        "3",
        "--prompt",
        "What is 2+2?",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["engine"], "candle");
    assert!(report["prompt_tokens"].as_u64().unwrap() > 0);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["batch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    for run in runs {
        let batch = run["batch"].as_u64().unwrap();
        let tokens = run["tokens"].as_u64().unwrap();
        assert!(tokens >= batch && tokens <= 3 * batch, "{run}");
        assert!(run["tok_s"].as_f64().unwrap() > 0.0);
    }
    // Greedy: the first sequence is the same whatever the batch.
    assert_eq!(runs[0]["first_token_ids"], runs[1]["first_token_ids"]);
    assert!(runs[0]["static_tok_s"].is_null(), "not asked for");

    // Sampled, through the engine's rows and as static batches of 2.
    let out = ws.ok(&[
        "bench",
        "generate",
        "--device",
        "cpu",
        "--batches",
        "5",
        "--max-tokens",
        "6",
        "--max-sequences",
        "2",
        "--temperature",
        "1",
        "--seed",
        "3",
        "--compare-static",
        "--prompt",
        "What is 2+2?",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["temperature"], 1.0);
    let run = &report["runs"][0];
    assert!(run["static_tok_s"].as_f64().unwrap() > 0.0, "{run}");

    let err = ws.fails(&["bench", "generate", "--prompt", "x", "--batches", "0"]);
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn bench_update_reports_throughput_mfu_and_a_gradient() {
    let ws = Workspace::new();
    let args = [
        "bench",
        "update",
        "--device",
        "cpu",
        "--rollouts",
        "4",
        "--prompt-tokens",
        "5",
        "--completion-tokens",
        "3",
        "--micro-batch",
        "2",
        "--json",
    ];
    let report: Value = serde_json::from_str(&ws.ok(&args)).unwrap();
    assert_eq!(report["tokens"], 4 * (5 + 3));
    assert_eq!(report["parameters"], 134_515_008);
    let grad_norm = report["grad_norm"].as_f64().unwrap();
    assert!(grad_norm.is_finite() && grad_norm > 0.0, "{report}");
    let mfu = report["mfu_f32"].as_f64().unwrap();
    assert!(mfu > 0.0 && mfu < 1.0, "{report}");
    assert!(report["mfu_bf16"].is_null(), "no bf16 peak on the CPU");
    // The tokens are a fixed function of their position: the gradient repeats exactly.
    let again: Value = serde_json::from_str(&ws.ok(&args)).unwrap();
    assert_eq!(again["grad_norm"], report["grad_norm"]);

    let err = ws.fails(&["bench", "update", "--rollouts", "0"]);
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn checkpointing_keeps_the_gradient_and_lowers_peak_memory_as_estimated() {
    let ws = Workspace::new();
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "bench",
            "update",
            "--device",
            "cpu",
            "--rollouts",
            "4",
            "--completion-tokens",
            "192",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ws.ok(&args)).unwrap()
    };
    let whole = run(&[]);
    let staged = run(&["--checkpoint-activations"]);
    assert_eq!(staged["checkpoint_activations"], true);
    let norm = |r: &Value| r["grad_norm"].as_f64().unwrap();
    let gap = (norm(&whole) - norm(&staged)).abs() / norm(&whole);
    assert!(
        gap <= 1e-5,
        "grad norms {} and {}",
        norm(&whole),
        norm(&staged)
    );
    let peak = |r: &Value| r["peak_memory_bytes"].as_u64().expect("a measured peak") as f64;
    assert!(
        peak(&staged) <= 0.75 * peak(&whole),
        "checkpointing's peak {} vs {}",
        peak(&staged),
        peak(&whole)
    );
    // The memory model's estimate is within 15% of the measured resident peak.
    for r in [&whole, &staged] {
        let estimate = r["estimated_memory_bytes"].as_u64().unwrap() as f64;
        let ratio = estimate / peak(r);
        assert!((0.85..=1.15).contains(&ratio), "estimate/peak {ratio}: {r}");
        for phase in ["forward_s", "backward_s", "optimizer_s"] {
            assert!(r["phases"][phase].as_f64().unwrap() > 0.0, "{r}");
        }
    }
}

#[test]
fn bf16_compute_trains_close_to_f32_and_says_so() {
    let ws = Workspace::new();
    let args = |precision: &'static str| {
        [
            "bench",
            "update",
            "--device",
            "cpu",
            "--rollouts",
            "4",
            "--prompt-tokens",
            "7",
            "--completion-tokens",
            "5",
            "--precision",
            precision,
            "--moments",
            "bf16",
            "--json",
        ]
    };
    let f32_run: Value = serde_json::from_str(&ws.ok(&args("f32"))).unwrap();
    let bf16_run: Value = serde_json::from_str(&ws.ok(&args("bf16"))).unwrap();
    assert_eq!(bf16_run["precision"], "bf16");
    assert_eq!(bf16_run["moments"], "bf16");
    let (a, b) = (
        f32_run["grad_norm"].as_f64().unwrap(),
        bf16_run["grad_norm"].as_f64().unwrap(),
    );
    assert!(a != b && (a - b).abs() / a < 0.05, "f32 {a} vs bf16 {b}");

    let err = ws.fails(&["bench", "update", "--precision", "f16"]);
    assert!(err.contains("f16") && err.contains("bf16"), "{err}");
}

#[test]
fn bench_train_ops_checks_each_op_in_both_dtypes() {
    let ws = Workspace::new();
    let args = [
        "bench",
        "train-ops",
        "--device",
        "cpu",
        "--tokens",
        "3",
        "--adam-elements",
        "1000",
        "--json",
    ];
    let report: Value = serde_json::from_str(&ws.ok(&args)).unwrap();
    assert_eq!(report["all_agree"], true, "{report}");
    let checks = report["checks"].as_array().unwrap();
    let seen: BTreeSet<(String, String)> = checks
        .iter()
        .map(|c| {
            assert!(c["fused_ms"].as_f64().unwrap() > 0.0, "{c}");
            assert!(c["composite_ms"].as_f64().unwrap() > 0.0, "{c}");
            (
                c["op"].as_str().unwrap().into(),
                c["dtype"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 12, "{seen:?}");
    assert!(seen.contains(&("attention".into(), "f32".into())));
    assert!(seen.contains(&("rope_interleaved".into(), "bf16".into())));
    assert!(seen.contains(&("adam".into(), "bf16".into())));
    // The norm's rows, at Qwen2.5-Math-1.5B's width.
    assert_eq!(checks[0]["shape"], serde_json::json!([3, 1536]));

    let err = ws.fails(&["bench", "train-ops", "--tokens", "0"]);
    assert!(err.contains("at least 1"), "{err}");
}
