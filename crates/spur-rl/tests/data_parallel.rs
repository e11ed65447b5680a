//! Data-parallel updates: K workers, each with its own copy of the weights and a share of every
//! mini-batch, end where one worker does with the whole batch.

mod common;

use candle_core::DType;
use common::ToyLm;
use spur_rl::{
    AdamConfig, Error, ObjectiveConfig, Rng, Rollout, RolloutGroup, RolloutSample, StepMetrics,
    ThreadGroup, TrainConfig, Trainer,
};

fn rollout(step: u64) -> Rollout {
    let mut rng = Rng::new(1000 + step);
    let groups = (0..4)
        .map(|_| RolloutGroup {
            prompt: (0..1 + rng.below(3)).map(|_| rng.below(7) as u32).collect(),
            samples: (0..4)
                .map(|_| RolloutSample {
                    completion: (0..1 + rng.below(5)).map(|_| rng.below(7) as u32).collect(),
                    reward: rng.below(2) as f64,
                    old_logprobs: None,
                    text: None,
                })
                .collect(),
        })
        .collect();
    Rollout { groups }
}

/// 16 rollouts per step in mini-batches of 6 (three updates, the last one short) and micro-batches
/// of 2, so two workers split a mini-batch unevenly and three workers get one micro-batch each.
fn config(kl_coef: f64) -> TrainConfig {
    TrainConfig {
        mini_batch: 6,
        micro_batch: 2,
        objective: ObjectiveConfig {
            kl_coef,
            ..ObjectiveConfig::default()
        },
        optimizer: AdamConfig {
            lr: 0.02,
            ..AdamConfig::default()
        },
        ..TrainConfig::default()
    }
}

const STEPS: u64 = 3;

/// The weights after `STEPS` steps and each step's metrics, for every worker of a group of
/// `world` (one worker: no group at all).
fn train(world: usize, kl_coef: f64) -> Vec<(Vec<Vec<f32>>, Vec<StepMetrics>)> {
    let run = |collective: Option<ThreadGroup>| {
        let policy = ToyLm::new(7, 5, 3, DType::F32);
        let reference = ToyLm::new(7, 5, 3, DType::F32);
        let mut trainer = match collective {
            Some(c) => Trainer::data_parallel(config(kl_coef), &policy, Box::new(c)).unwrap(),
            None => Trainer::new(config(kl_coef), &policy).unwrap(),
        };
        let metrics = (0..STEPS)
            .map(|s| {
                trainer
                    .step(&policy, Some(&reference), &rollout(s))
                    .unwrap()
            })
            .collect();
        (policy.snapshot(), metrics)
    };
    if world == 1 {
        return vec![run(None)];
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|c| s.spawn(move || run(Some(c))))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    })
}

fn max_relative_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
        .fold(0.0, f32::max)
}

fn assert_same_update(world: usize, kl_coef: f64) {
    let (alone, alone_metrics) = train(1, kl_coef).remove(0);
    let start = ToyLm::new(7, 5, 3, DType::F32).snapshot();
    assert!(
        max_relative_gap(&alone, &start) > 1e-2,
        "the steps must move the weights"
    );
    let workers = train(world, kl_coef);
    for (rank, (weights, metrics)) in workers.iter().enumerate() {
        // Every worker holds the same weights, to the bit.
        assert_eq!(
            weights, &workers[0].0,
            "worker {rank} drifted from worker 0"
        );
        // ... the ones a single worker reaches (sums in another order: float rounding only).
        let gap = max_relative_gap(weights, &alone);
        assert!(
            gap < 1e-4,
            "{world} workers vs one: weights differ by {gap} (relative)"
        );
        for (m, a) in metrics.iter().zip(&alone_metrics) {
            assert_eq!(
                (m.tokens, m.updates, m.rollouts),
                (a.tokens, a.updates, a.rollouts)
            );
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * y.abs().max(1e-3);
            assert!(close(m.loss, a.loss), "loss {} vs {}", m.loss, a.loss);
            assert!(
                close(m.grad_norm, a.grad_norm),
                "grad norm {} vs {}",
                m.grad_norm,
                a.grad_norm
            );
            assert!(
                close(m.approx_kl, a.approx_kl),
                "approx kl {} vs {}",
                m.approx_kl,
                a.approx_kl
            );
            assert_eq!(m.clip_fraction_low, a.clip_fraction_low);
            assert_eq!(m.clip_fraction_high, a.clip_fraction_high);
            assert!(close(m.entropy.unwrap(), a.entropy.unwrap()));
            if kl_coef > 0.0 {
                assert!(close(m.ref_kl.unwrap(), a.ref_kl.unwrap()));
            }
        }
    }
}

#[test]
fn two_workers_update_like_one_worker_on_the_same_batch() {
    assert_same_update(2, 0.0);
}

#[test]
fn three_workers_with_a_reference_model_update_like_one() {
    assert_same_update(3, 0.05);
}

/// A NaN on one worker stops every worker before the update, instead of leaving the others
/// waiting for a sum that never comes or applying an update the group did not agree on.
#[test]
fn a_non_finite_loss_on_one_worker_stops_all_of_them() {
    let mut bad = rollout(0);
    bad.groups[0].samples[0].old_logprobs =
        Some(vec![f32::NAN; bad.groups[0].samples[0].completion.len()]);
    let cfg = TrainConfig {
        shuffle: false, // the poisoned sample is in micro-batch 0: worker 0's
        ..config(0.0)
    };
    let results: Vec<(Result<StepMetrics, Error>, bool)> = std::thread::scope(|s| {
        let workers: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let (cfg, bad) = (cfg.clone(), &bad);
                s.spawn(move || {
                    let policy = ToyLm::new(7, 5, 3, DType::F32);
                    let before = policy.snapshot();
                    let mut trainer = Trainer::data_parallel(cfg, &policy, Box::new(c)).unwrap();
                    let result = trainer.step(&policy, None, bad);
                    (result, policy.snapshot() == before)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let (own, untouched) = &results[0];
    assert!(
        matches!(own, Err(Error::NonFinite { micro_batch: 0, .. })),
        "{own:?}"
    );
    assert!(untouched);
    let (other, untouched) = &results[1];
    let message = other.as_ref().unwrap_err().to_string();
    assert!(message.contains("another worker"), "{message}");
    assert!(untouched);
}
