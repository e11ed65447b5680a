//! mistral.rs against spur's candle engine on tiny random-weight checkpoints written by the
//! tests (the same checkpoints spur-lm's tests use).

#[path = "../../spur-lm/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use spur_lm::{
    load_model, Architecture, CandleEngine, Completion, Engine, FinishReason, GenerationRequest,
    LoadOptions, SamplingParams,
};
use spur_mistralrs::{Error, MistralRsEngine, MistralRsOptions};

/// A tiny checkpoint whose config.json names its MLP activation, as real ones do.
fn checkpoint(arch: Architecture) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::write_checkpoint(dir.path(), &common::tiny_config(arch), 7, DType::F32);
    set_hidden_act(dir.path(), Some("silu"));
    dir
}

fn set_hidden_act(dir: &Path, act: Option<&str>) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    match act {
        Some(act) => config["hidden_act"] = act.into(),
        None => {
            config.as_object_mut().unwrap().remove("hidden_act");
        }
    }
    std::fs::write(&path, config.to_string()).unwrap();
}

/// The mistral.rs engine over the checkpoint in `dir` (spur loads it first, as the stages do).
fn load_mistral(dir: &Path) -> Result<MistralRsEngine, Error> {
    let loaded = load_model(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    MistralRsEngine::load(
        &loaded.files,
        Arc::new(loaded.tokenizer),
        &MistralRsOptions::default(),
    )
}

fn engines(dir: &Path) -> (CandleEngine, MistralRsEngine) {
    let loaded = load_model(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tokenizer = Arc::new(loaded.tokenizer);
    let mistral = MistralRsEngine::load(
        &loaded.files,
        tokenizer.clone(),
        &MistralRsOptions::default(),
    )
    .unwrap();
    (
        CandleEngine::new(Arc::new(loaded.model), tokenizer),
        mistral,
    )
}

fn greedy(prompt: Vec<u32>, max_new_tokens: usize, stop: &[String]) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: prompt,
        n: 1,
        params: SamplingParams {
            temperature: 0.0,
            max_new_tokens,
            stop_strings: stop.to_vec(),
            ..SamplingParams::default()
        },
    }
}

fn assert_same(a: &[Completion], b: &[Completion]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (x.prompt_index, x.sample_index),
            (y.prompt_index, y.sample_index)
        );
        assert_eq!(x.token_ids, y.token_ids, "prompt {}", x.prompt_index);
        assert_eq!(x.text, y.text);
        assert_eq!(x.finish_reason, y.finish_reason);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-4, "log-probs {p} vs {q}");
        }
    }
}

#[test]
fn greedy_continuations_equal_the_candle_engine() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let dir = checkpoint(arch);
        let (candle, mistral) = engines(dir.path());
        assert_eq!(mistral.name(), "mistralrs");
        let tok = candle.tokenizer();
        let texts = [
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "a",
            "The quick brown fox jumps over the lazy dog, twice.",
            "0 1 2 3",
        ];
        let requests: Vec<_> = texts
            .iter()
            .map(|t| greedy(tok.encode(t).unwrap(), 20, &[]))
            .collect();
        let expected = candle.generate(&requests).unwrap();
        assert_same(&mistral.generate(&requests).unwrap(), &expected);

        // A stop string taken from the middle of a continuation ends both engines at the same
        // token, with that token kept.
        let text = &expected[2].text;
        let stop: String = text.chars().skip(6).take(2).collect();
        assert_eq!(stop.chars().count(), 2, "continuation too short: {text:?}");
        let stopped = [greedy(
            requests[2].prompt_ids.clone(),
            20,
            std::slice::from_ref(&stop),
        )];
        let expected = candle.generate(&stopped).unwrap();
        assert_eq!(expected[0].finish_reason, FinishReason::Stop);
        assert!(expected[0].text.contains(&stop));
        assert_same(&mistral.generate(&stopped).unwrap(), &expected);
    }
}

/// A request's samples depend on its seed alone, not on the requests before or after it in
/// the call. With the default options one sequence is in flight at a time (mistral.rs's
/// batched CPU decoding was measured wrong, see `MistralRsOptions::max_num_seqs`), so this
/// does not exercise batched decoding.
#[test]
fn seeded_samples_do_not_depend_on_the_other_requests() {
    let dir = checkpoint(Architecture::Llama);
    let (candle, mistral) = engines(dir.path());
    assert!(mistral.capabilities().per_request_seed);
    let tok = candle.tokenizer();
    let sampled = |text: &str, n: usize, seed: u64| GenerationRequest {
        prompt_ids: tok.encode(text).unwrap(),
        n,
        params: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            max_new_tokens: 12,
            stop_strings: Vec::new(),
            seed,
        },
    };
    let alone = mistral.generate(&[sampled("hello", 3, 11)]).unwrap();
    let batch = [
        sampled("other prompt", 2, 5),
        sampled("hello", 3, 11),
        greedy(tok.encode("xyz").unwrap(), 7, &[]),
    ];
    let together = mistral.generate(&batch).unwrap();
    assert_eq!(together.len(), 6);
    let mut from_batch: Vec<Completion> = together
        .into_iter()
        .filter(|c| c.prompt_index == 1)
        .collect();
    from_batch.iter_mut().for_each(|c| c.prompt_index = 0);
    assert_same(&alone, &from_batch);

    // Samples of one request differ from each other and from another seed's.
    assert!(alone[0].token_ids != alone[1].token_ids || alone[1].token_ids != alone[2].token_ids);
    let reseeded = mistral.generate(&[sampled("hello", 3, 12)]).unwrap();
    assert!(alone
        .iter()
        .zip(&reseeded)
        .any(|(a, b)| a.token_ids != b.token_ids));
    for c in &alone {
        assert_eq!(c.token_ids.len(), c.logprobs.len());
        assert!(c.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

#[test]
fn olmo2_is_refused_naming_the_config() {
    let dir = checkpoint(Architecture::Olmo2);
    let err = load_mistral(dir.path())
        .err()
        .expect("OLMo2 must be refused");
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("olmo2"),
        "{message}"
    );
}

#[test]
fn an_incomplete_config_is_named_in_the_error() {
    let dir = checkpoint(Architecture::Llama);
    set_hidden_act(dir.path(), None);
    let err = load_mistral(dir.path())
        .err()
        .expect("a config without hidden_act must be refused");
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("hidden_act"),
        "{message}"
    );
}
