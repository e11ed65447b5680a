//! GRPO on spur-lm's transformer: every weight of every architecture gets a gradient through
//! the objective, autograd agrees with finite differences, and a step trains the shared vars.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use spur_lm::model::parameter_shapes;
use spur_lm::{Architecture, ModelConfig, Transformer};
use spur_rl::policy::Entropy;
use spur_rl::{
    micro_batch_objective, sequence_logprobs, MicroBatch, MiniBatchShape, ObjectiveConfig, Policy,
    Rng, Rollout, RolloutGroup, RolloutSample, TrainConfig, Trainer,
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
    let scored = sequence_logprobs(policy, &SEQS, Entropy::Trainable).unwrap();
    let adv = Tensor::new(&[1.0f32, -0.5, 0.8], &Device::Cpu).unwrap();
    let cfg = ObjectiveConfig {
        entropy_coef: 0.01,
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
