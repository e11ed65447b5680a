//! Tiny random-weight checkpoints of each architecture, written here: loading, shapes,
//! gradients, KV-cache consistency and seeded sampling.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use spur_lm::engine::{
    CandleEngine, Completion, Engine, FinishReason, GenerationRequest, SamplingParams,
};
use spur_lm::{load_model, Architecture, KvCache, LoadOptions, LoadedModel, PromptTemplate};

const ARCHS: [Architecture; 3] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Olmo2,
];

fn checkpoint(arch: Architecture, dtype: DType) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    common::write_checkpoint(dir.path(), &common::tiny_config(arch), 7, dtype);
    let loaded = load_model(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    (dir, loaded)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tokens(rows: &[&[u32]]) -> Tensor {
    Tensor::new(
        rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn loads_each_architecture_with_expected_shapes() {
    for arch in ARCHS {
        let (_dir, loaded) = checkpoint(arch, DType::F32);
        let c = loaded.model.config().clone();
        assert_eq!(c.architecture, arch);
        let logits = loaded
            .model
            .forward(&tokens(&[&[1, 2, 3, 4, 5], &[6, 7, 8, 9, 10]]))
            .unwrap();
        assert_eq!(logits.dims(), &[2, 5, c.vocab_size]);
        let lp = loaded
            .model
            .sequence_logprobs(&tokens(&[&[1, 2, 3, 4, 5]]))
            .unwrap();
        assert_eq!(lp.dims(), &[1, 4]);
        let values = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite() && *v < 0.0));
        // Tied models have no separate head var.
        let names: Vec<String> = loaded
            .model
            .named_vars()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names.contains(&"lm_head.weight".to_string()),
            !c.tie_word_embeddings
        );
        // Deterministic: the same input gives the same logits.
        let again = loaded
            .model
            .forward(&tokens(&[&[1, 2, 3, 4, 5], &[6, 7, 8, 9, 10]]))
            .unwrap();
        assert_eq!(max_diff(&logits, &again), 0.0);
    }
}

#[test]
fn bf16_checkpoint_loads_as_f32_vars() {
    let (_dir, loaded) = checkpoint(Architecture::Qwen2, DType::BF16);
    for (name, var) in loaded.model.named_vars() {
        assert_eq!(var.dtype(), DType::F32, "{name}");
    }
}

/// Every parameter must receive a non-zero gradient: candle's fused ops (softmax_last_dim,
/// rms_norm, rope) would silently cut it.
#[test]
fn every_parameter_gets_a_gradient() {
    for arch in ARCHS {
        let (_dir, loaded) = checkpoint(arch, DType::F32);
        let model = &loaded.model;
        let lp = model
            .sequence_logprobs(&tokens(&[
                &[1, 20, 3, 40, 5, 60, 7],
                &[8, 90, 10, 110, 12, 130, 14],
            ]))
            .unwrap();
        let loss = lp.sum_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.named_vars();
        assert!(!vars.is_empty());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{arch:?}: gradient of {name} is {norm}"
            );
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for arch in ARCHS {
        let (_dir, loaded) = checkpoint(arch, DType::F32);
        let model = &loaded.model;
        let seq: Vec<u32> = vec![5, 17, 200, 3, 99, 42, 7, 1, 150, 33];
        let full = model.forward(&tokens(&[&seq])).unwrap().squeeze(0).unwrap();
        let mut cache = model.new_cache(1, 4).unwrap();
        let first = model
            .forward_cached(&tokens(&[&seq[..4]]), &mut cache)
            .unwrap();
        assert!(max_diff(&first.squeeze(0).unwrap(), &full.get(3).unwrap()) < 1e-4);
        for (j, &t) in seq.iter().enumerate().skip(4) {
            let step = model.forward_cached(&tokens(&[&[t]]), &mut cache).unwrap();
            let d = max_diff(&step.squeeze(0).unwrap(), &full.get(j).unwrap());
            assert!(d < 1e-4, "{arch:?}: position {j} differs by {d}");
        }
    }
}

/// Rows continuing prompts of different lengths, two of them the same prompt, decode as they
/// would alone: on the CPU's decode kernel (f32) and through candle's composite attention
/// (bf16).
#[test]
fn rows_continuing_shared_prompts_decode_like_single_rows() {
    for arch in ARCHS {
        // bf16 logits of about 3 are 0.016 apart: plain bf16 decoding is 0.05 from the full pass.
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 8e-2)] {
            let (_dir, mut loaded) = checkpoint(arch, DType::F32);
            loaded.model.set_compute_dtype(dtype).unwrap();
            let model = &loaded.model;
            let prompts: [&[u32]; 3] = [&[5, 6, 7], &[9, 10, 11, 12, 13, 14], &[100]];
            let mut singles = Vec::new();
            for p in prompts {
                let mut c = model.new_cache(1, p.len()).unwrap();
                model.forward_cached(&tokens(&[p]), &mut c).unwrap();
                singles.push(c);
            }
            // Rows 0 and 3 continue prompt 0, held once.
            let of_row = [0, 1, 2, 0];
            let rows: Vec<(usize, &KvCache)> = of_row.iter().map(|&p| (p, &singles[p])).collect();
            let mut batch = KvCache::continuing(&rows, 4).unwrap();
            assert_eq!(batch.prompt_count(), 3);
            let next = [[21u32], [22], [23], [24]];
            let batched = model
                .forward_cached(&Tensor::new(&next, &Device::Cpu).unwrap(), &mut batch)
                .unwrap();
            for (i, &p) in of_row.iter().enumerate() {
                let seq = [prompts[p], &next[i]].concat();
                let full = model.forward(&tokens(&[&seq])).unwrap().squeeze(0).unwrap();
                let want = full.get(seq.len() - 1).unwrap();
                let d = max_diff(&batched.get(i).unwrap(), &want);
                assert!(d < tolerance, "{arch:?} {dtype:?}: row {i} differs by {d}");
            }
            // Dropping rows keeps the others intact, and the prompts they continue.
            batch.retain_rows(&[2, 0]).unwrap();
            assert_eq!(batch.batch_size(), 2);
            assert_eq!((batch.row_len(0), batch.row_len(1)), (2, 4));
            assert_eq!(batch.prompt_count(), 2);
        }
    }
}

/// The CPU decode kernel reads a shared prompt's columns in the order a row holding its own
/// copy would: rows sharing one prompt give the same logits, to the bit, as rows with a copy
/// each.
#[test]
fn shared_prompts_change_no_bit_of_the_logits() {
    let (_dir, loaded) = checkpoint(Architecture::Qwen2, DType::F32);
    let model = &loaded.model;
    let mut prompt = model.new_cache(1, 5).unwrap();
    model
        .forward_cached(&tokens(&[&[3, 1, 4, 1, 5]]), &mut prompt)
        .unwrap();
    let decode = |keys: [usize; 3]| {
        let rows: Vec<(usize, &KvCache)> = keys.iter().map(|&k| (k, &prompt)).collect();
        let mut batch = KvCache::continuing(&rows, 2).unwrap();
        let mut out = Vec::new();
        for step in [[[9u32], [2], [6]], [[5], [3], [5]]] {
            let logits = model
                .forward_cached(&Tensor::new(&step, &Device::Cpu).unwrap(), &mut batch)
                .unwrap();
            out.push(logits.to_vec2::<f32>().unwrap());
        }
        (batch.prompt_count(), out)
    };
    let (shared, shared_logits) = decode([7, 7, 7]);
    let (copies, copied_logits) = decode([0, 1, 2]);
    assert_eq!((shared, copies), (1, 3));
    assert_eq!(shared_logits, copied_logits);
}

/// Rows that take finished rows' places in a running batch (continuous batching), continuing
/// shorter or longer prompts than the batch's, or one it already holds, decode as they would
/// alone; prompts no row continues are dropped.
#[test]
fn rows_joining_a_running_batch_decode_like_single_rows() {
    for arch in ARCHS {
        let (_dir, loaded) = checkpoint(arch, DType::F32);
        let model = &loaded.model;
        let prefilled = |p: &[u32]| {
            let mut c = model.new_cache(1, p.len()).unwrap();
            model.forward_cached(&tokens(&[p]), &mut c).unwrap();
            c
        };
        let last_logits = |seq: &[u32]| {
            let full = model.forward(&tokens(&[seq])).unwrap().squeeze(0).unwrap();
            full.get(seq.len() - 1).unwrap()
        };
        let check = |out: &Tensor, rows: &[Vec<u32>]| {
            for (i, seq) in rows.iter().enumerate() {
                let d = max_diff(&out.get(i).unwrap(), &last_logits(seq));
                assert!(d < 1e-4, "{arch:?}: row {i} differs by {d}");
            }
        };
        let (a, b, e): (&[u32], &[u32], &[u32]) = (&[5, 6, 7, 8], &[9, 10, 11], &[12, 13]);
        let rows = [(0, &prefilled(a)), (1, &prefilled(b)), (2, &prefilled(e))];
        let mut batch = KvCache::continuing(&rows, 2).unwrap();
        let step = Tensor::new(&[[21u32], [22], [23]], &Device::Cpu).unwrap();
        model.forward_cached(&step, &mut batch).unwrap();
        // Rows 0 and 2 finish: a shorter prompt and a longer one than the batch's take them.
        let (c, d): (&[u32], &[u32]) = (&[100], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        batch.restart_row(0, 3, &prefilled(c)).unwrap();
        batch.restart_row(2, 4, &prefilled(d)).unwrap();
        assert_eq!(
            (batch.row_len(0), batch.row_len(1), batch.row_len(2)),
            (1, 4, 9)
        );
        // Prompts a and e are dropped with their last rows.
        assert_eq!(batch.prompt_count(), 3);
        let next = Tensor::new(&[[31u32], [32], [33]], &Device::Cpu).unwrap();
        let out = model.forward_cached(&next, &mut batch).unwrap();
        let mut rows = vec![
            [c, &[31]].concat(),
            [b, &[22, 32]].concat(),
            [d, &[33]].concat(),
        ];
        check(&out, &rows);
        // Row 2 finishes and another sample of prompt c takes it: nothing new is held.
        batch.restart_row(2, 3, &prefilled(c)).unwrap();
        assert_eq!(batch.prompt_count(), 2);
        rows[2] = c.to_vec();
        let next = Tensor::new(&[[41u32], [42], [43]], &Device::Cpu).unwrap();
        let out = model.forward_cached(&next, &mut batch).unwrap();
        for (row, token) in rows.iter_mut().zip([41, 42, 43]) {
            row.push(token);
        }
        check(&out, &rows);
        // Row 1 leaves, and with it prompt b; the columns only it read are trimmed away.
        batch.retain_rows(&[0, 2]).unwrap();
        rows.remove(1);
        assert_eq!(batch.prompt_count(), 1);
        batch.trim_left().unwrap();
        assert_eq!(batch.len(), 2);
        let next = Tensor::new(&[[51u32], [52]], &Device::Cpu).unwrap();
        let out = model.forward_cached(&next, &mut batch).unwrap();
        rows[0].push(51);
        rows[1].push(52);
        check(&out, &rows);
    }
}

fn engine(loaded: LoadedModel, max_batch: usize) -> CandleEngine {
    CandleEngine::new(Arc::new(loaded.model), Arc::new(loaded.tokenizer)).with_max_batch(max_batch)
}

fn request(prompt: &[u32], n: usize, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: prompt.to_vec(),
        n,
        params: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            max_new_tokens: 12,
            stop_strings: Vec::new(),
            seed,
        },
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_batch_composition() {
    for arch in ARCHS {
        let (_dir, loaded) = checkpoint(arch, DType::F32);
        let engine = engine(loaded, 8);
        let a = request(&[1, 2, 3, 4], 3, 11);
        let b = request(&[50, 60, 70, 80, 90, 100, 110], 4, 99);
        let alone = engine.generate(std::slice::from_ref(&a)).unwrap();
        let again = engine.generate(std::slice::from_ref(&a)).unwrap();
        assert_eq!(alone, again, "{arch:?}: same seed, different output");
        let mixed = engine.generate(&[b.clone(), a.clone()]).unwrap();
        let a_in_mixed: Vec<_> = mixed
            .iter()
            .filter(|c| c.prompt_index == 1)
            .cloned()
            .collect();
        assert_same_samples(&alone, &a_in_mixed);
        // Samples of one request differ from each other (distinct per-sample RNG streams).
        assert!(alone.windows(2).any(|w| w[0].token_ids != w[1].token_ids));
        // A small max_batch (chunks split requests) gives the same result.
        let (_dir2, loaded2) = checkpoint(arch, DType::F32);
        let small = self::engine(loaded2, 2).generate(&[b, a]).unwrap();
        assert_same_samples(&small, &mixed);
    }
}

/// Same tokens and text; log-probs equal up to float rounding (batch shapes change the
/// order of floating-point sums, not the sampled tokens).
fn assert_same_samples(a: &[Completion], b: &[Completion]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.sample_index, y.sample_index);
        assert_eq!(x.token_ids, y.token_ids, "batch composition changed tokens");
        assert_eq!(x.text, y.text);
        assert_eq!(x.finish_reason, y.finish_reason);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-4, "log-probs {p} vs {q}");
        }
    }
}

#[test]
fn sampling_logprobs_follow_the_sampling_distribution() {
    let (_dir, loaded) = checkpoint(Architecture::Llama, DType::F32);
    let model = Arc::new(loaded.model);
    let engine = CandleEngine::new(model.clone(), Arc::new(loaded.tokenizer));
    let prompt = [1u32, 2, 3];
    let mut greedy = request(&prompt, 1, 0);
    greedy.params.temperature = 0.0;
    greedy.params.top_p = 1.0;
    greedy.params.top_k = 0;
    let out = &engine.generate(&[greedy]).unwrap()[0];
    // Greedy: each token is the argmax and its log-prob is the model's log-softmax.
    let mut seq = prompt.to_vec();
    seq.extend(&out.token_ids);
    let logits = model.forward(&tokens(&[&seq])).unwrap().squeeze(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    for (j, (&t, &lp)) in out.token_ids.iter().zip(&out.logprobs).enumerate() {
        let row = logits.get(prompt.len() - 1 + j).unwrap();
        assert_eq!(row.argmax(0).unwrap().to_scalar::<u32>().unwrap(), t);
        let want = logp
            .get(prompt.len() - 1 + j)
            .unwrap()
            .get(t as usize)
            .unwrap();
        assert!((want.to_scalar::<f32>().unwrap() - lp).abs() < 1e-4);
    }
    // Pure sampling at temperature 2: the log-prob is that of softmax(logits / 2).
    let mut hot = request(&prompt, 1, 3);
    hot.params.temperature = 2.0;
    hot.params.top_p = 1.0;
    hot.params.top_k = 0;
    let out = &engine.generate(&[hot]).unwrap()[0];
    let mut seq = prompt.to_vec();
    seq.extend(&out.token_ids);
    let logits = model.forward(&tokens(&[&seq])).unwrap().squeeze(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&(logits / 2.0).unwrap(), D::Minus1).unwrap();
    for (j, (&t, &lp)) in out.token_ids.iter().zip(&out.logprobs).enumerate() {
        let want = logp
            .get(prompt.len() - 1 + j)
            .unwrap()
            .get(t as usize)
            .unwrap();
        assert!((want.to_scalar::<f32>().unwrap() - lp).abs() < 1e-4);
    }
    // top_k = 1 is greedy with log-prob 0 (a point mass).
    let mut k1 = request(&prompt, 1, 5);
    k1.params.top_k = 1;
    let out = &engine.generate(&[k1]).unwrap()[0];
    assert!(out.logprobs.iter().all(|&l| l == 0.0));
}

#[test]
fn stops_at_eos_stop_string_and_length() {
    let (_dir, loaded) = checkpoint(Architecture::Qwen2, DType::F32);
    let tokenizer = Arc::new(loaded.tokenizer);
    let engine = CandleEngine::new(Arc::new(loaded.model), tokenizer.clone());
    let mut req = request(&[1, 2, 3], 16, 1);
    req.params.max_new_tokens = 40;
    let outs = engine.generate(&[req.clone()]).unwrap();
    for c in &outs {
        assert_eq!(c.token_ids.len(), c.logprobs.len());
        match c.finish_reason {
            FinishReason::Length => assert_eq!(c.token_ids.len(), 40),
            FinishReason::Eos => assert_eq!(*c.token_ids.last().unwrap(), 257),
            FinishReason::Stop => unreachable!("no stop strings were given"),
        }
    }
    // Use a character the first completion produced as a stop string.
    let first = &outs[0];
    let stop: String = first
        .text
        .chars()
        .nth(first.text.chars().count() / 2)
        .unwrap()
        .to_string();
    req.params.stop_strings = vec![stop.clone()];
    let stopped = engine.generate(&[req]).unwrap();
    let c = &stopped[0];
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(c.text.contains(&stop));
    assert_eq!(c.text, tokenizer.decode(&c.token_ids).unwrap());
    // Stopped exactly at the token that completed the stop string.
    let before = tokenizer
        .decode(&c.token_ids[..c.token_ids.len() - 1])
        .unwrap();
    assert!(!before.contains(&stop));
    assert!(first.token_ids.starts_with(&c.token_ids));
}

#[test]
fn templates_render() {
    let (_dir, loaded) = checkpoint(Architecture::Llama, DType::F32);
    let tok = &loaded.tokenizer;
    let chat = PromptTemplate::Chat { system: None }
        .render(tok, "1+1?")
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    );
    let math = PromptTemplate::parse("qwen-math")
        .render(tok, "1+1?")
        .unwrap();
    assert_eq!(
        math,
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    );
    let r1 = PromptTemplate::parse("r1");
    let text = r1.render(tok, "1+1?").unwrap();
    assert!(text.starts_with("A conversation between User and Assistant."));
    assert!(text.ends_with("\n\n<|user|>\n1+1?\n<|assistant|>\n<think>"));
    assert_eq!(r1.stop_strings(), ["</answer>"]);
    let custom = PromptTemplate::parse("Q: {{ problem }}\nA:")
        .render(tok, "1+1?")
        .unwrap();
    assert_eq!(custom, "Q: 1+1?\nA:");
    let err = PromptTemplate::parse("{{ raise_exception('no') }}").render(tok, "x");
    assert!(err.is_err());
}

/// A base model's config names only its `<|endoftext|>`-like EOS; generation_config.json
/// names more ids, and the ChatML turn ends at `<|im_end|>`: generation stops at all of them,
/// and a saved checkpoint stops at the same ones.
#[test]
fn stop_ids_include_generation_config_and_end_of_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::tiny_config(Architecture::Qwen2);
    config.eos_token_ids = vec![0];
    common::write_checkpoint(dir.path(), &config, 7, DType::F32);
    // No eos_token in tokenizer_config.json either, so nothing there names `<|im_end|>`.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, 5, 6]}"#,
    )
    .unwrap();
    let loaded = load_model(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let im_end = loaded.tokenizer.inner().token_to_id("<|im_end|>").unwrap();
    let stops = loaded.tokenizer.eos_token_ids();
    for id in [0, 5, 6, im_end] {
        assert!(stops.contains(&id), "{id} missing from {stops:?}");
    }

    // A single id is a plain integer.
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 9}"#,
    )
    .unwrap();
    let loaded = load_model(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.tokenizer.eos_token_ids(), [0, 9, im_end]);

    let out = tempfile::tempdir().unwrap();
    spur_lm::save_checkpoint(&loaded.model, &loaded.tokenizer, out.path()).unwrap();
    let reloaded = load_model(out.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(reloaded.tokenizer.eos_token_ids(), [0, 9, im_end]);
}

/// The engine shares the trainer's weights: setting a var in place changes what it samples,
/// and a saved checkpoint loads back to the same logits.
#[test]
fn var_updates_are_seen_and_checkpoints_round_trip() {
    let (_dir, loaded) = checkpoint(Architecture::Olmo2, DType::F32);
    let model = Arc::new(loaded.model);
    let tokenizer = Arc::new(loaded.tokenizer);
    let input = tokens(&[&[3, 1, 4, 1, 5, 9, 2, 6]]);
    let before = model.forward(&input).unwrap();

    let out = tempfile::tempdir().unwrap();
    spur_lm::save_checkpoint(&model, &tokenizer, out.path()).unwrap();
    let reloaded = load_model(out.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(
        max_diff(&before, &reloaded.model.forward(&input).unwrap()),
        0.0
    );
    assert_eq!(
        reloaded.tokenizer.eos_token_ids(),
        tokenizer.eos_token_ids()
    );
    assert_eq!(
        reloaded.tokenizer.chat_template(),
        tokenizer.chat_template()
    );

    let engine = CandleEngine::new(model.clone(), tokenizer);
    let vars = model.named_vars();
    let (_, head) = vars.iter().find(|(n, _)| n == "lm_head.weight").unwrap();
    head.set(&head.zeros_like().unwrap()).unwrap();
    let mut greedy = request(&[1, 2], 1, 0);
    greedy.params.temperature = 0.0;
    let c = &engine.generate(&[greedy]).unwrap()[0];
    // All logits are zero now: uniform distribution, argmax is token 0.
    let uniform = -(model.config().vocab_size as f32).ln();
    assert!(c.token_ids.iter().all(|&t| t == 0));
    assert!(c.logprobs.iter().all(|&l| (l - uniform).abs() < 1e-5));
}
