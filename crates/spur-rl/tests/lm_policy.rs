//! GRPO on spur-lm's transformer: every weight of every architecture gets a gradient through
//! the objective, autograd agrees with finite differences, and a step trains the shared vars.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use spur_core::params::Precision;
use spur_lm::model::parameter_shapes;
use spur_lm::{Architecture, ModelConfig, Transformer};
use spur_rl::policy::Entropy;
use spur_rl::{
    micro_batch_objective, sequence_logprobs, training_logprobs, Backprop, MicroBatch,
    MiniBatchShape, ObjectiveConfig, Policy, Rng, Rollout, RolloutGroup, RolloutSample,
    SeqLogprobs, TrainConfig, Trainer,
};

fn tiny(architecture: Architecture, tie: bool, seed: u64) -> Transformer {
    let config = ModelConfig {
        architecture,
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 64,
        tie_word_embeddings: tie,
        bos_token_id: None,
        eos_token_ids: vec![1],
    };
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in parameter_shapes(&config) {
        let n: usize = shape.iter().product();
        // Norm weights near 1, the rest small, as in a trained model.
        let (center, scale) = if name.contains("norm") {
            (1.0, 0.1)
        } else {
            (0.0, 0.3)
        };
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (center + (2.0 * u - 1.0) * scale) as f32
            })
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    }
    Transformer::from_tensors(config, tensors, Path::new("tiny"), &Device::Cpu).unwrap()
}

const SEQS: [(&[u32], &[u32]); 3] = [
    (&[2, 5, 7], &[9, 11, 3, 1]),
    (&[4], &[30, 8]),
    (&[6, 6], &[12, 13, 14]),
];

/// The GRPO loss of `SEQS` as one micro-batch, with π_old shifted so both clip sides occur.
fn loss(policy: &Transformer, old: &Tensor) -> Tensor {
    objective(
        &sequence_logprobs(policy, &SEQS, Entropy::Trainable).unwrap(),
        old,
    )
}

fn objective(scored: &SeqLogprobs, old: &Tensor) -> Tensor {
    objective_with(scored, old, 0.01)
}

fn objective_with(scored: &SeqLogprobs, old: &Tensor, entropy_coef: f64) -> Tensor {
    let adv = Tensor::new(&[1.0f32, -0.5, 0.8], &Device::Cpu).unwrap();
    let cfg = ObjectiveConfig {
        entropy_coef,
        ..ObjectiveConfig::default()
    };
    let mb = MicroBatch {
        logprobs: &scored.logprobs,
        old_logprobs: old,
        ref_logprobs: None,
        entropy: scored.entropy.as_ref(),
        mask: &scored.mask,
        advantages: &adv,
    };
    let shape = MiniBatchShape {
        micro_batches: 1,
        sequences: SEQS.len(),
    };
    micro_batch_objective(&cfg, &mb, shape).unwrap().loss
}

fn old_logprobs(policy: &Transformer) -> Tensor {
    let cur = sequence_logprobs(policy, &SEQS, Entropy::Skip).unwrap();
    let shift = Tensor::new(
        &[
            [0.1f32, -0.3, 0.3, 0.0],
            [0.3, 0.0, 0.0, 0.0],
            [-0.1, 0.05, 0.3, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    (cur.logprobs.detach() + shift).unwrap()
}

#[test]
fn every_weight_of_every_architecture_gets_a_gradient() {
    for (arch, tie) in [
        (Architecture::Llama, true),
        (Architecture::Llama, false),
        (Architecture::Qwen2, false),
        (Architecture::Olmo2, false),
    ] {
        let model = tiny(arch, tie, 11);
        let old = old_logprobs(&model);
        let grads = loss(&model, &old).backward().unwrap();
        let vars = Policy::named_vars(&model);
        assert!(!vars.is_empty());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?} (tied {tie}): {name} got no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0,
                "{arch:?} (tied {tie}): {name} has a zero gradient"
            );
        }
    }
}

#[test]
fn transformer_gradients_match_finite_differences() {
    // f32 model: central differences with a step large enough for f32 rounding, checked on
    // the entries with the largest gradient of a few weights.
    let model = tiny(Architecture::Qwen2, false, 12);
    let old = old_logprobs(&model);
    let grads = loss(&model, &old).backward().unwrap();
    let value = |m: &Transformer| loss(m, &old).to_scalar::<f32>().unwrap() as f64;
    let checked = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "lm_head.weight",
    ];
    let vars: HashMap<String, _> = Policy::named_vars(&model).into_iter().collect();
    for name in checked {
        let var = &vars[name];
        let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let grad = grad.to_vec1::<f32>().unwrap();
        let i = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let flat = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut w = flat.clone();
            w[i] += delta;
            var.set(&Tensor::from_vec(w, original.shape(), &Device::Cpu).unwrap())
                .unwrap();
            value(&model)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        var.set(&original).unwrap();
        let analytic = grad[i] as f64;
        assert!(
            (analytic - numeric).abs() < 2e-2 * analytic.abs() + 1e-4,
            "{name}[{i}]: autograd {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn a_step_updates_the_shared_weights() {
    let model = tiny(Architecture::Llama, true, 13);
    let before = model
        .forward(&Tensor::new(&[[2u32, 5, 7]], &Device::Cpu).unwrap())
        .unwrap();
    let sample = |c: &[u32], reward: f64| RolloutSample {
        completion: c.to_vec(),
        reward,
        old_logprobs: None,
        text: Some(
            if reward > 0.0 {
                "```python"
            } else {
                "so x = 2"
            }
            .into(),
        ),
    };
    let rollout = Rollout {
        groups: vec![RolloutGroup {
            prompt: vec![2, 5, 7],
            samples: vec![sample(&[9, 1], 1.0), sample(&[3, 4, 1], 0.0)],
        }],
    };
    let cfg = TrainConfig {
        optimizer: spur_rl::AdamConfig {
            lr: 1e-3,
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &model).unwrap();
    let m = trainer.step(&model, None, &rollout).unwrap();
    assert_eq!(m.code_reasoning, Some(0.5));
    assert!(m.entropy.unwrap() > 0.0);
    let after = model
        .forward(&Tensor::new(&[[2u32, 5, 7]], &Device::Cpu).unwrap())
        .unwrap();
    let diff = (after - before).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
}

/// The loss of [`loss`], through the training pass the trainer uses, with its gradients.
fn training_gradients(policy: &Transformer, old: &Tensor) -> candle_core::backprop::GradStore {
    let (scored, backprop) = training_logprobs(policy, &SEQS, Entropy::Trainable).unwrap();
    let loss = objective(&scored, old);
    assert_eq!(
        matches!(backprop, Backprop::Staged(_)),
        policy.activation_checkpointing(),
        "a checkpointing policy takes its own backward pass"
    );
    backprop.backward(&loss).unwrap()
}

/// Largest |a - b| over the largest |a|.
fn relative_gap(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let gap = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = a.abs().unwrap().max_all().unwrap();
    gap.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

#[test]
fn checkpointed_layers_give_the_whole_graphs_gradients() {
    for (arch, tie) in [
        (Architecture::Llama, true),
        (Architecture::Qwen2, false),
        (Architecture::Olmo2, false),
    ] {
        let mut model = tiny(arch, tie, 21);
        let old = old_logprobs(&model);
        let whole = training_gradients(&model, &old);
        model.set_activation_checkpointing(true);
        let staged = training_gradients(&model, &old);
        for (name, var) in Policy::named_vars(&model) {
            let (a, b) = (whole.get(var.as_tensor()), staged.get(var.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("{arch:?}: {name}: a gradient is missing with or without checkpointing");
            };
            let gap = relative_gap(a, b);
            assert!(
                gap < 1e-5,
                "{arch:?} (tied {tie}): {name}: relative gap {gap}"
            );
        }
    }
}

/// A training pass takes the log-probs chunk by chunk from the last hidden states
/// (`spur_lm::head_logprobs`): the same log-probs, entropies and gradients as whole logits
/// through candle's ops, with the entropy as a metric or trained by a bonus, with and without
/// checkpointing, tied head or not, at the rollouts' temperature; and the same log-probs, to
/// the bit, as the scoring pass.
#[test]
fn chunked_head_log_probs_train_like_whole_logits() {
    let cases = [
        (Architecture::Llama, true, Entropy::Metric, 0.0),
        (Architecture::Qwen2, false, Entropy::Metric, 0.0),
        (Architecture::Qwen2, false, Entropy::Trainable, 0.05),
    ];
    for (arch, tie, entropy, coef) in cases {
        for checkpoint in [false, true] {
            let mut model = tiny(arch, tie, 31);
            model.set_activation_checkpointing(checkpoint);
            let policy = spur_rl::Tempered::new(&model, 0.7);
            let old = old_logprobs(&model);
            let what = format!("{arch:?} tied {tie} {entropy:?} checkpointing {checkpoint}");

            // Whole logits: `sequence_logprobs` takes `forward_logits`.
            let whole = sequence_logprobs(&policy, &SEQS, entropy).unwrap();
            let whole_grads = objective_with(&whole, &old, coef).backward().unwrap();

            let (chunked, backprop) = training_logprobs(&policy, &SEQS, entropy).unwrap();
            let scoring = spur_rl::scoring_logprobs(&policy, &SEQS).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let rows = t.to_vec2::<f32>().unwrap();
                rows.into_iter().flatten().map(f32::to_bits).collect()
            };
            assert_eq!(bits(&chunked.logprobs), bits(&scoring), "{what}");
            assert!(
                relative_gap(&chunked.logprobs, &whole.logprobs) < 1e-5,
                "{what}"
            );
            let h = chunked.entropy.as_ref().expect("entropies");
            assert_eq!(h.track_op(), entropy == Entropy::Trainable, "{what}");
            assert!(
                relative_gap(h, whole.entropy.as_ref().unwrap()) < 1e-5,
                "{what}"
            );

            let grads = backprop
                .backward(&objective_with(&chunked, &old, coef))
                .unwrap();
            for (name, var) in Policy::named_vars(&model) {
                let a = whole_grads
                    .get(var.as_tensor())
                    .expect("a whole-graph gradient");
                let b = grads.get(var.as_tensor());
                let b = b.unwrap_or_else(|| panic!("{what}: {name} has no gradient"));
                let gap = relative_gap(a, b);
                assert!(gap < 1e-5, "{what}: {name}: relative gap {gap}");
            }
        }
    }
}

#[test]
fn bf16_compute_follows_f32_and_trains_the_f32_weights() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Olmo2,
    ] {
        let mut model = tiny(arch, false, 22);
        let old = old_logprobs(&model);
        let ids = Tensor::new(&[[2u32, 5, 7, 9, 11]], &Device::Cpu).unwrap();
        let f32_logits = model.forward(&ids).unwrap();
        let f32_grads = training_gradients(&model, &old);
        model.set_compute_dtype(candle_core::DType::BF16).unwrap();
        let bf16_logits = model.forward(&ids).unwrap();
        assert_eq!(bf16_logits.dtype(), candle_core::DType::F32);
        let gap = relative_gap(&f32_logits, &bf16_logits);
        assert!(
            gap > 0.0 && gap < 3e-2,
            "{arch:?}: bf16 logits' relative gap {gap}"
        );
        // Checkpointing composes with bf16.
        model.set_activation_checkpointing(true);
        let bf16_grads = training_gradients(&model, &old);
        for (name, var) in Policy::named_vars(&model) {
            let g = bf16_grads.get(var.as_tensor()).unwrap();
            assert_eq!(
                g.dtype(),
                candle_core::DType::F32,
                "{name}: master gradient dtype"
            );
            let gap = relative_gap(f32_grads.get(var.as_tensor()).unwrap(), g);
            assert!(
                gap < 0.1,
                "{arch:?}: {name}: bf16 gradient's relative gap {gap}"
            );
        }
    }
}

#[test]
fn bf16_moments_step_like_f32_moments() {
    let rollout = Rollout {
        groups: vec![RolloutGroup {
            prompt: vec![2, 5, 7],
            samples: vec![
                RolloutSample {
                    completion: vec![9, 1],
                    reward: 1.0,
                    old_logprobs: None,
                    text: None,
                },
                RolloutSample {
                    completion: vec![3, 4, 1],
                    reward: 0.0,
                    old_logprobs: None,
                    text: None,
                },
            ],
        }],
    };
    let stepped = |moments| {
        let model = tiny(Architecture::Qwen2, false, 23);
        let cfg = TrainConfig {
            optimizer: spur_rl::AdamConfig {
                lr: 1e-3,
                moments,
                ..Default::default()
            },
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(cfg, &model).unwrap();
        trainer.step(&model, None, &rollout).unwrap();
        trainer.step(&model, None, &rollout).unwrap();
        Policy::named_vars(&model)
    };
    let (f32s, bf16s) = (stepped(Precision::F32), stepped(Precision::Bf16));
    let start = Policy::named_vars(&tiny(Architecture::Qwen2, false, 23));
    for (((name, a), (_, b)), (_, w0)) in f32s.iter().zip(&bf16s).zip(&start) {
        // The updates (not the weights) agree to bf16's precision.
        let da = (a.as_tensor() - w0.as_tensor()).unwrap();
        let db = (b.as_tensor() - w0.as_tensor()).unwrap();
        let gap = relative_gap(&da, &db);
        assert!(gap < 0.05, "{name}: update's relative gap {gap}");
    }
}

/// Completions drawn at `temperature` by the engines' token rule (`spur_lm::choose_token`,
/// from the model's logits), with the sampler's log-probs.
fn sampled(
    model: &Transformer,
    prompt: &[u32],
    n: usize,
    temperature: f64,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let params = spur_lm::SamplingParams {
        temperature,
        ..Default::default()
    };
    let mut rng = Rng::new(31);
    (0..n)
        .map(|_| {
            let mut seq = prompt.to_vec();
            let mut logprobs = Vec::new();
            for _ in 0..4 {
                let ids = Tensor::new(&seq[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let logits = model.forward(&ids).unwrap().squeeze(0).unwrap();
                let row = logits.get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap();
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                let (token, logprob) = spur_lm::choose_token(&row, &params, || u);
                seq.push(token);
                logprobs.push(logprob);
            }
            (seq[prompt.len()..].to_vec(), logprobs)
        })
        .collect()
}

/// Rollouts at T = 0.6 are scored at T = 0.6: the trainer's log-probs are the sampler's, so with
/// the sampler's log-probs as π_old the first mini-batch has ρ = 1.
#[test]
fn the_trainer_scores_at_the_rollouts_temperature() {
    let model = tiny(Architecture::Qwen2, false, 24);
    let prompt = [2u32, 5, 7];
    let samples = sampled(&model, &prompt, 4, 0.6);
    let seqs: Vec<(&[u32], &[u32])> = samples.iter().map(|(c, _)| (&prompt[..], &c[..])).collect();
    let gap = |temperature: f64| {
        let tempered = spur_rl::Tempered::new(&model, temperature);
        let scored = spur_rl::scoring_logprobs(&tempered, &seqs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut gap = 0.0f32;
        for (row, (_, sampler)) in scored.iter().zip(&samples) {
            for (a, b) in row.iter().zip(sampler) {
                gap = gap.max((a - b).abs());
            }
        }
        gap
    };
    assert!(
        gap(0.6) < 1e-5,
        "gap to the sampler at T = 0.6: {}",
        gap(0.6)
    );
    assert!(gap(1.0) > 1e-2, "T = 1 should not match a T = 0.6 sampler");

    let rollout = Rollout {
        groups: vec![RolloutGroup {
            prompt: prompt.to_vec(),
            samples: samples
                .iter()
                .zip([1.0, 0.0, 1.0, 0.0])
                .map(|((c, lp), reward)| RolloutSample {
                    completion: c.clone(),
                    reward,
                    old_logprobs: Some(lp.clone()),
                    text: None,
                })
                .collect(),
        }],
    };
    let step = |temperature: f64| {
        let model = tiny(Architecture::Qwen2, false, 24);
        let cfg = TrainConfig {
            temperature,
            mini_batch: 4,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(cfg, &model).unwrap();
        trainer.step(&model, None, &rollout).unwrap()
    };
    let m = step(0.6);
    assert_eq!(m.updates, 1);
    assert!(m.approx_kl.abs() < 1e-9, "approx_kl {}", m.approx_kl);
    assert_eq!(m.clip_fraction_low + m.clip_fraction_high, 0.0);
    // Scored at T = 1, the same rollout's ratios are not 1.
    assert!(step(1.0).approx_kl > 1e-4);
}

/// The completions' log-probs of `SEQS` from one right-padded batch through
/// [`Transformer::forward`] (logits at every position), `[3, width]` with zeros past each
/// completion: the padded reference for packed passes. Differentiable.
fn padded_logprobs(model: &Transformer) -> Tensor {
    let len = SEQS.iter().map(|(p, c)| p.len() + c.len()).max().unwrap();
    let width = SEQS.iter().map(|(_, c)| c.len()).max().unwrap();
    let (mut ids, mut rows, mut targets, mut mask) = (vec![], vec![], vec![], vec![]);
    for (i, (prompt, completion)) in SEQS.iter().enumerate() {
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(completion);
        ids.resize((i + 1) * len, 0);
        for k in 0..width {
            let inside = k < completion.len();
            rows.push(if inside {
                (i * len + prompt.len() - 1 + k) as u32
            } else {
                0
            });
            targets.push(if inside { completion[k] } else { 0 });
            mask.push(inside as u8 as f32);
        }
    }
    let device = &Device::Cpu;
    let logits = model
        .forward(&Tensor::from_vec(ids, (SEQS.len(), len), device).unwrap())
        .unwrap();
    let vocab = logits.dim(2).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    let picked = logp
        .reshape((SEQS.len() * len, vocab))
        .unwrap()
        .index_select(&Tensor::new(rows, device).unwrap(), 0)
        .unwrap()
        .gather(
            &Tensor::new(targets, device).unwrap().unsqueeze(1).unwrap(),
            1,
        )
        .unwrap()
        .reshape((SEQS.len(), width))
        .unwrap();
    (picked * Tensor::from_vec(mask, (SEQS.len(), width), device).unwrap()).unwrap()
}

fn max_abs_gap(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn packed_sequences_score_and_train_like_padded_ones() {
    // Fixed weights per completion token, so that every token's gradient counts differently.
    let weights = Tensor::new(
        &[
            [0.3f32, -1.0, 0.5, 0.8],
            [1.2, -0.4, 0.0, 0.0],
            [-0.7, 0.2, 0.9, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    for (arch, tie) in [
        (Architecture::Llama, true),
        (Architecture::Qwen2, false),
        (Architecture::Olmo2, false),
    ] {
        let mut model = tiny(arch, tie, 31);
        let padded = padded_logprobs(&model);
        let padded_grads = (&padded * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for checkpointing in [false, true] {
            model.set_activation_checkpointing(checkpointing);
            let case = format!("{arch:?}, checkpointing {checkpointing}");
            let scoring = spur_rl::scoring_logprobs(&model, &SEQS).unwrap();
            let gap = max_abs_gap(&scoring, &padded);
            assert!(gap <= 1e-5, "{case}: scoring log-probs differ by {gap}");
            let (scored, backprop) = training_logprobs(&model, &SEQS, Entropy::Skip).unwrap();
            let gap = max_abs_gap(&scored.logprobs, &padded);
            assert!(gap <= 1e-5, "{case}: training log-probs differ by {gap}");
            let loss = (&scored.logprobs * &weights).unwrap().sum_all().unwrap();
            let grads = backprop.backward(&loss).unwrap();
            for (name, var) in Policy::named_vars(&model) {
                let expected = padded_grads.get(var.as_tensor()).unwrap();
                let got = grads.get(var.as_tensor()).unwrap();
                let gap = relative_gap(expected, got);
                assert!(
                    gap <= 1e-5,
                    "{case}: {name}: gradients differ by {gap} (relative)"
                );
            }
        }
        // The comparison can fail: the second completion after the first sequence in one
        // sequence (no boundary between them) has other log-probs than after its own prompt.
        let joined = [SEQS[0].0, SEQS[0].1, SEQS[1].0].concat();
        let unbounded = sequence_logprobs(&model, &[(&joined, SEQS[1].1)], Entropy::Skip).unwrap();
        let own = padded
            .get(1)
            .unwrap()
            .narrow(0, 0, SEQS[1].1.len())
            .unwrap();
        let gap = max_abs_gap(&unbounded.logprobs.get(0).unwrap(), &own);
        assert!(
            gap > 1e-3,
            "{arch:?}: the context does not change log-probs ({gap})"
        );
    }
}
