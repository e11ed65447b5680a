//! The trainer on a tiny model: gradients against finite differences, zero advantages, a toy
//! task that must improve, NaN handling and bit-identical resume.

mod common;

use candle_core::{DType, Tensor};
use common::ToyLm;
use spur_rl::objective::Aggregation;
use spur_rl::policy::Entropy;
use spur_rl::{
    micro_batch_objective, sequence_logprobs, Error, KlEstimator, MicroBatch, MiniBatchShape,
    ObjectiveConfig, Policy, Rng, Rollout, RolloutGroup, RolloutSample, TrainConfig, Trainer,
};

fn sample(completion: &[u32], reward: f64) -> RolloutSample {
    RolloutSample {
        completion: completion.to_vec(),
        reward,
        old_logprobs: None,
        text: None,
    }
}

const MICRO: usize = 2;

/// π_old per micro-batch of `MICRO`: the policy's current log-probs shifted per sequence, so
/// that ratios differ from 1 and some tokens fall outside the clip range on either side.
fn old_logprobs(policy: &ToyLm, seqs: &[(&[u32], &[u32])], shift: &[f64]) -> Vec<Tensor> {
    seqs.chunks(MICRO)
        .zip(shift.chunks(MICRO))
        .map(|(chunk, shift)| {
            let cur = sequence_logprobs(policy, chunk, Entropy::Skip).unwrap();
            let (b, t) = cur.logprobs.dims2().unwrap();
            let shift = Tensor::from_vec(shift.to_vec(), (b, 1), &candle_core::Device::Cpu)
                .unwrap()
                .broadcast_as((b, t))
                .unwrap();
            (cur.logprobs.detach() + shift).unwrap()
        })
        .collect()
}

/// The mini-batch loss of `seqs` through the trainer's own pieces (log-probs from the policy,
/// then the objective per micro-batch), as a differentiable scalar.
fn mini_batch_loss(
    cfg: &ObjectiveConfig,
    policy: &ToyLm,
    reference: &ToyLm,
    seqs: &[(&[u32], &[u32])],
    advantages: &[f64],
    old: &[Tensor],
) -> Tensor {
    let micro = MICRO;
    let shape = MiniBatchShape {
        micro_batches: seqs.len().div_ceil(micro),
        sequences: seqs.len(),
    };
    let mut total: Option<Tensor> = None;
    for (start, chunk) in (0..seqs.len()).step_by(micro).zip(seqs.chunks(micro)) {
        let cur = sequence_logprobs(policy, chunk, Entropy::Trainable).unwrap();
        let refr = sequence_logprobs(reference, chunk, Entropy::Skip).unwrap();
        let adv = Tensor::new(
            &advantages[start..start + chunk.len()],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let out = micro_batch_objective(
            cfg,
            &MicroBatch {
                logprobs: &cur.logprobs,
                old_logprobs: &old[start / micro],
                ref_logprobs: Some(&refr.logprobs.detach()),
                entropy: cur.entropy.as_ref(),
                mask: &cur.mask,
                advantages: &adv,
            },
            shape,
        )
        .unwrap();
        total = Some(match total {
            Some(t) => (t + out.loss).unwrap(),
            None => out.loss,
        });
    }
    total.unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let policy = ToyLm::new(7, 5, 1, DType::F64);
    let reference = ToyLm::new(7, 5, 2, DType::F64);
    let seqs: Vec<(&[u32], &[u32])> = vec![
        (&[1, 2], &[3, 4, 5]),
        (&[1, 2], &[6]),
        (&[3], &[0, 1, 2, 3]),
        (&[3], &[4, 4]),
        (&[5, 6, 0], &[2, 1]),
    ];
    let advantages = [1.1, -0.7, 0.4, -1.3, 0.9];
    // log π_old − log π per sequence: 0.3 and −0.3 put tokens beyond both clip bounds.
    let old = old_logprobs(&policy, &seqs, &[0.3, 0.3, -0.3, -0.3, 0.05]);
    for aggregation in [
        Aggregation::TokenMean,
        Aggregation::SeqMean,
        Aggregation::SeqSumConst,
    ] {
        let cfg = ObjectiveConfig {
            aggregation,
            norm_length: 6,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.01,
            ..ObjectiveConfig::default()
        };
        let loss = |p: &ToyLm| {
            mini_batch_loss(&cfg, p, &reference, &seqs, &advantages, &old)
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = mini_batch_loss(&cfg, &policy, &reference, &seqs, &advantages, &old)
            .backward()
            .unwrap();
        for (name, var) in policy.named_vars() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let original = var.as_tensor().copy().unwrap();
            let flat = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for &i in &[0, flat.len() / 2, flat.len() - 1] {
                let h = 1e-6;
                let at = |delta: f64| {
                    let mut w = flat.clone();
                    w[i] += delta;
                    var.set(&Tensor::from_vec(w, original.shape(), original.device()).unwrap())
                        .unwrap();
                    loss(&policy)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                var.set(&original).unwrap();
                let tol = 1e-6 * (1.0 + numeric.abs());
                assert!(
                    (grad[i] - numeric).abs() < tol,
                    "{aggregation:?} {name}[{i}]: autograd {} vs finite difference {numeric}",
                    grad[i]
                );
            }
            assert!(
                grad.iter().any(|&g| g != 0.0),
                "{aggregation:?}: every gradient of {name} is zero"
            );
        }
    }
}

#[test]
fn zero_advantages_without_kl_leave_weights_unchanged() {
    let policy = ToyLm::new(6, 4, 3, DType::F32);
    let before = policy.snapshot();
    let rollout = Rollout {
        groups: vec![
            RolloutGroup {
                prompt: vec![1, 2],
                samples: vec![sample(&[3, 4], 1.0), sample(&[5], 1.0)],
            },
            RolloutGroup {
                prompt: vec![0],
                samples: vec![
                    sample(&[1, 1, 1], 0.0),
                    sample(&[2], 0.0),
                    sample(&[4], 0.0),
                ],
            },
        ],
    };
    let cfg = TrainConfig {
        mini_batch: 2,
        micro_batch: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &policy).unwrap();
    let m = trainer.step(&policy, None, &rollout).unwrap();
    assert_eq!(policy.snapshot(), before);
    assert_eq!(m.zero_advantage_groups, 1.0);
    assert_eq!(m.grad_norm, 0.0);
    assert_eq!(m.updates, 3);
    assert_eq!(m.loss, 0.0);
}

/// One update per step (mini-batch = rollout) with π_old computed by the trainer: ρ ≡ 1, so
/// nothing is clipped and the KL to π_old is zero (the paper's ablation ii).
#[test]
fn one_update_per_step_has_unit_ratio() {
    let policy = ToyLm::new(6, 4, 4, DType::F32);
    let rollout = Rollout {
        groups: vec![RolloutGroup {
            prompt: vec![1],
            samples: vec![
                sample(&[2, 3, 4], 1.0),
                sample(&[5, 5], 0.0),
                sample(&[0, 1], 0.0),
            ],
        }],
    };
    let cfg = TrainConfig {
        mini_batch: 1024,
        micro_batch: 2,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &policy).unwrap();
    let m = trainer.step(&policy, None, &rollout).unwrap();
    assert_eq!(m.updates, 1);
    assert_eq!(m.clip_fraction_low + m.clip_fraction_high, 0.0);
    assert!(m.approx_kl.abs() < 1e-10, "approx_kl {}", m.approx_kl);
    assert!(m.grad_norm > 0.0);
    assert_eq!(m.tokens, 7);
    assert!((m.response_length - 7.0 / 3.0).abs() < 1e-12);
}

/// Probability that a completion of `len` tokens after `prompt` contains `token`, exactly.
fn p_contains(model: &ToyLm, prompt: &[u32], len: usize, token: u32) -> f64 {
    fn walk(model: &ToyLm, seq: &mut Vec<u32>, left: usize, token: u32) -> f64 {
        if left == 0 {
            return 0.0;
        }
        let probs = model.next_probs(seq);
        let mut p = probs[token as usize];
        for (t, &q) in probs.iter().enumerate() {
            if t as u32 != token {
                seq.push(t as u32);
                p += q * walk(model, seq, left - 1, token);
                seq.pop();
            }
        }
        p
    }
    walk(model, &mut prompt.to_vec(), len, token)
}

#[test]
fn reward_for_a_token_raises_its_frequency() {
    let (prompt, len, x) = (vec![0u32], 3, 4u32);
    let policy = ToyLm::new(6, 8, 5, DType::F32);
    let before = p_contains(&policy, &prompt, len, x);
    let cfg = TrainConfig {
        mini_batch: 32,
        micro_batch: 4,
        optimizer: spur_rl::AdamConfig {
            lr: 0.03,
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &policy).unwrap();
    let mut sampler = Rng::new(7);
    let mut rewards = Vec::new();
    for _ in 0..4 {
        let groups = (0..8)
            .map(|_| RolloutGroup {
                prompt: prompt.clone(),
                samples: (0..8)
                    .map(|_| {
                        let c = policy.sample(&prompt, len, &mut sampler);
                        let r = c.contains(&x) as u8 as f64;
                        sample(&c, r)
                    })
                    .collect(),
            })
            .collect();
        let m = trainer.step(&policy, None, &Rollout { groups }).unwrap();
        assert_eq!(m.updates, 2);
        rewards.push(m.reward_mean);
    }
    let after = p_contains(&policy, &prompt, len, x);
    assert!(
        after > before + 0.15,
        "P(contains {x}) went from {before:.3} to {after:.3}; rewards per step {rewards:?}"
    );
}

#[test]
fn non_finite_loss_stops_with_step_and_micro_batch_and_keeps_weights() {
    let policy = ToyLm::new(6, 4, 6, DType::F32);
    let before = policy.snapshot();
    let with_old = |c: &[u32], r: f64, old: f32| RolloutSample {
        old_logprobs: Some(vec![old; c.len()]),
        ..sample(c, r)
    };
    let rollout = Rollout {
        groups: vec![RolloutGroup {
            prompt: vec![1],
            samples: vec![
                with_old(&[2, 3], 1.0, -1.5),
                with_old(&[4], 0.0, -1.5),
                with_old(&[5, 1], 0.0, f32::NAN),
                with_old(&[0], 1.0, -1.5),
            ],
        }],
    };
    let cfg = TrainConfig {
        micro_batch: 2,
        shuffle: false,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, &policy).unwrap();
    let err = trainer.step(&policy, None, &rollout).unwrap_err();
    match &err {
        Error::NonFinite {
            step,
            mini_batch,
            micro_batch,
            ..
        } => assert_eq!((*step, *mini_batch, *micro_batch), (1, 0, 1), "{err}"),
        other => panic!("expected a non-finite error, got {other}"),
    }
    assert!(err
        .to_string()
        .contains("step 1, mini-batch 0, micro-batch 1"));
    assert_eq!(policy.snapshot(), before);
    assert_eq!(trainer.steps_done(), 0);
    assert_eq!(trainer.updates_done(), 0);
}

/// A deterministic rollout for `step` (random tokens and rewards, not sampled from the model).
fn scripted_rollout(step: u64) -> Rollout {
    let mut rng = Rng::new(1000 + step);
    let groups = (0..3)
        .map(|_| RolloutGroup {
            prompt: (0..1 + rng.below(3)).map(|_| rng.below(6) as u32).collect(),
            samples: (0..4)
                .map(|_| {
                    let c: Vec<u32> = (0..1 + rng.below(4)).map(|_| rng.below(6) as u32).collect();
                    sample(&c, rng.below(2) as f64)
                })
                .collect(),
        })
        .collect();
    Rollout { groups }
}

#[test]
fn resumed_run_is_bit_identical() {
    let cfg = TrainConfig {
        mini_batch: 5,
        micro_batch: 2,
        optimizer: spur_rl::AdamConfig {
            lr: 0.01,
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    // Uninterrupted: 4 steps.
    let straight = ToyLm::new(6, 4, 8, DType::F32);
    let mut trainer = Trainer::new(cfg.clone(), &straight).unwrap();
    let mut metrics = Vec::new();
    for step in 0..4 {
        metrics.push(
            trainer
                .step(&straight, None, &scripted_rollout(step))
                .unwrap(),
        );
    }

    // Interrupted after 2 steps, resumed into a model with other weights.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    {
        let first = ToyLm::new(6, 4, 8, DType::F32);
        let mut trainer = Trainer::new(cfg.clone(), &first).unwrap();
        for step in 0..2 {
            trainer.step(&first, None, &scripted_rollout(step)).unwrap();
        }
        trainer.save_checkpoint(&ckpt).unwrap();
        // A second save replaces the first in place.
        trainer.save_checkpoint(&ckpt).unwrap();
    }
    let resumed = ToyLm::new(6, 4, 99, DType::F32);
    let mut trainer = Trainer::resume(cfg.clone(), &resumed, &ckpt).unwrap();
    assert_eq!(trainer.steps_done(), 2);
    assert_eq!(spur_rl::checkpoint::saved_config(&ckpt).unwrap(), cfg);
    for step in 2..4 {
        let m = trainer
            .step(&resumed, None, &scripted_rollout(step))
            .unwrap();
        assert_eq!(m, metrics[step as usize]);
    }
    assert_eq!(resumed.snapshot(), straight.snapshot());
    assert_ne!(
        ToyLm::new(6, 4, 8, DType::F32).snapshot(),
        straight.snapshot()
    );
}

#[test]
fn checkpoint_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = ToyLm::new(6, 4, 1, DType::F32);
    let trainer = Trainer::new(TrainConfig::default(), &small).unwrap();
    trainer.save_checkpoint(dir.path()).unwrap();
    let wider = ToyLm::new(6, 5, 1, DType::F32);
    let err = Trainer::resume(TrainConfig::default(), &wider, dir.path())
        .err()
        .expect("a checkpoint of another shape must be refused");
    assert!(err.to_string().contains("shape"), "{err}");
}

/// The warm-up/cosine schedule counts GRPO steps: with 8 updates per step and 10 steps, the step
/// after 5 completed ones runs at the cosine midpoint (not at the floor, where counting updates
/// would put it after 10/8 steps), and every update of a step uses that step's rate.
#[test]
fn lr_schedule_follows_grpo_steps_not_updates() {
    let policy = ToyLm::new(6, 4, 9, DType::F32);
    let rollout = Rollout {
        groups: (0..2)
            .map(|g| RolloutGroup {
                prompt: vec![g + 1],
                samples: vec![
                    sample(&[2, 3], 1.0),
                    sample(&[4], 0.0),
                    sample(&[5, 1], 0.0),
                    sample(&[0], 1.0),
                ],
            })
            .collect(),
    };
    let cfg = TrainConfig {
        optimizer: spur_rl::AdamConfig {
            lr: 1e-3,
            schedule: spur_rl::LrSchedule::WarmupCosine {
                warmup_steps: 0,
                total_steps: 10,
                min_lr_ratio: 0.0,
            },
            ..Default::default()
        },
        mini_batch: 1,
        micro_batch: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg.clone(), &policy).unwrap();
    let mut rates = Vec::new();
    for _ in 0..6 {
        let m = trainer.step(&policy, None, &rollout).unwrap();
        assert_eq!(m.updates, 8);
        rates.push(m.lr);
    }
    assert_eq!(trainer.updates_done(), 48);
    assert_eq!(rates[0], 1e-3);
    assert!(
        (rates[5] - 0.5e-3).abs() < 1e-15,
        "step 6 runs at {}",
        rates[5]
    );
    for (s, lr) in rates.iter().enumerate() {
        assert_eq!(*lr, cfg.optimizer.lr_at(s as u64));
    }
}
