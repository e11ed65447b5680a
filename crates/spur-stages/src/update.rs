//! The `update` stage: one GRPO step on a scored rollout, then a checkpoint.

use serde_json::{json, Value};
use spur_plan::{Role, StageKind};
use spur_rl::{Rollout, RolloutGroup, RolloutSample, TrainConfig};

use crate::model::{self, failed, LoadedPolicy, WeightsAt, POLICY_DIR, TRAINER_DIR};
use crate::param::Params;
use crate::reward::{Rewards, REWARDS_FILE};
use crate::rollout::{RolloutArtifact, ROLLOUT_FILE};
use crate::{NodeContext, Stage, StageError};

pub struct UpdateStage;

/// The trainer's configuration from the node's params: `update` (the run's update params),
/// `rollout` (the temperature and response cap of the rollouts it trains on) and `seed`.
pub fn train_config(params: &Value) -> Result<TrainConfig, StageError> {
    let p = Params::new(StageKind::Update, params);
    let aggregation = match p.one_of(
        "update.aggregation",
        &["token_mean", "seq_mean", "seq_sum_const"],
    )? {
        "seq_sum_const" => "token_sum_const",
        other => other,
    };
    let schedule = match p.one_of("update.lr_schedule", &["constant", "cosine"])? {
        // Both counts are GRPO steps, as the trainer's schedule is.
        "cosine" => json!({
            "kind": "warmup_cosine",
            "warmup_steps": p.u64("update.warmup_steps")?,
            "total_steps": p.u64("update.total_steps")?,
            "min_lr_ratio": 0.0,
        }),
        _ => json!({"kind": "constant"}),
    };
    // Dr. GRPO's constant is the run's response cap unless set.
    let norm_length = match p.optional("update.norm_length") {
        Some(_) => p.u64("update.norm_length")?,
        None => p.u64("rollout.max_response_tokens")?,
    };
    // Greedy rollouts (T = 0) carry the plain log-softmax as their log-probs (the engine's
    // convention): score them at T = 1.
    let sampled_at = p.f64("rollout.temperature")?;
    let temperature = if sampled_at == 0.0 { 1.0 } else { sampled_at };
    let cfg = json!({
        "objective": {
            "eps_low": p.f64("update.eps_low")?,
            "eps_high": p.f64("update.eps_high")?,
            "clip": p.value("update.clip")?,
            "advantage": p.str("update.advantage")?,
            "aggregation": aggregation,
            "norm_length": norm_length,
            "kl_coef": p.f64("update.kl_coef")?,
            "kl_estimator": p.str("update.kl_estimator")?,
            "entropy_coef": p.f64("update.entropy_coef")?,
        },
        "optimizer": {
            "lr": p.f64("update.lr")?,
            "beta1": p.f64("update.beta1")?,
            "beta2": p.f64("update.beta2")?,
            "weight_decay": p.f64("update.weight_decay")?,
            "max_grad_norm": p.f64("update.grad_clip")?,
            "schedule": schedule,
            "moments": p.str("update.moments")?,
        },
        "mini_batch": p.u64("update.mini_batch")?,
        "micro_batch": p.u64("update.micro_batch")?,
        "seed": p.u64("seed")?,
        "temperature": temperature,
    });
    let cfg: TrainConfig =
        serde_json::from_value(cfg).map_err(|e| failed(format!("update parameters: {e}")))?;
    cfg.validate()
        .map_err(|e| failed(format!("update parameters: {e}")))?;
    Ok(cfg)
}

impl Stage for UpdateStage {
    fn kind(&self) -> StageKind {
        StageKind::Update
    }

    fn version(&self) -> u32 {
        // 2: π_old of the first mini-batch from its own forward pass; x·Wᵀ matmuls.
        // 3: sampled-token log-probs from one fused op (rounding differs from log_softmax).
        // 4: lr schedule in GRPO steps; Dr. GRPO's norm_length from the response cap;
        //    scoring at the rollouts' temperature.
        // Scores through spur-lm's forward pass: numerics changes are spur_lm::NUMERICS_VERSION.
        crate::numerics_stage_version(4, spur_lm::NUMERICS_VERSION)
    }

    fn resource(&self, _node: &spur_plan::Node) -> crate::Resource {
        crate::Resource::Accelerator
    }

    fn prunable(&self) -> &'static [&'static str] {
        model::CHECKPOINT_FILES
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![
            format!("{POLICY_DIR}/model.safetensors"),
            format!("{TRAINER_DIR}/state.json"),
        ]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params = ctx.node.params.clone();
        let cfg = train_config(&params)?;
        let read = |role: Role, file: &str| -> Result<std::path::PathBuf, StageError> {
            Ok(ctx
                .input(role)
                .ok_or_else(|| failed(format!("an update reads a {role:?} input")))?
                .out
                .join(file))
        };
        let rollout: RolloutArtifact = model::read_json(&read(Role::Rollout, ROLLOUT_FILE)?)?;
        let rewards: Rewards = model::read_json(&read(Role::Reward, REWARDS_FILE)?)?;
        let batch = Rollout {
            groups: rollout
                .groups
                .into_iter()
                .zip(rewards.rewards)
                .map(|(g, r)| RolloutGroup {
                    prompt: g.prompt_ids,
                    samples: g
                        .samples
                        .into_iter()
                        .zip(r)
                        .map(|(s, reward)| RolloutSample {
                            completion: s.token_ids,
                            reward,
                            // Recomputed by the policy before the first update,
                            // as the paper's code does.
                            old_logprobs: None,
                            text: Some(s.text),
                        })
                        .collect(),
                })
                .collect(),
        };
        let probe = crate::probe::read_reference(ctx)?;
        let out = ctx.out.to_path_buf();
        let node = ctx.node.id;
        let step = u64::from(ctx.node.step);
        let reference = if cfg.objective.kl_coef > 0.0 {
            Some(model::ensure_reference(ctx)?)
        } else {
            None
        };
        let policy = model::ensure_policy(ctx, Some(&cfg))?;
        let trainer = policy
            .trainer
            .as_mut()
            .expect("ensure_policy made a trainer");
        let reference = reference.as_deref().map(|r| r as &dyn spur_rl::Policy);
        let result = trainer.step(policy.model.as_ref(), reference, &batch);
        let metrics = match result {
            Ok(m) => m,
            Err(e) => {
                // The weights in memory may be half-updated: never reuse them.
                ctx.session.remove::<LoadedPolicy>();
                return Err(failed(format!(
                    "step {}: {e}; the last good checkpoint is kept",
                    ctx.node.step
                )));
            }
        };
        spur_lm::save_checkpoint(&policy.model, &policy.tokenizer, &out.join(POLICY_DIR))
            .map_err(failed)?;
        // The trainer's weights are the policy file's tensors by the same
        // names: one copy on disk, written once.
        trainer
            .save_checkpoint_sharing(
                &out.join(TRAINER_DIR),
                &out.join(POLICY_DIR).join("model.safetensors"),
            )
            .map_err(failed)?;
        policy.at = WeightsAt::Update(node);
        let mut metrics = serde_json::to_value(metrics).map_err(failed)?;
        if let Some(reference) = probe {
            let probed = crate::probe::measure(&policy.model, &policy.tokenizer, &reference, step)?;
            metrics["probe"] = serde_json::to_value(probed).map_err(failed)?;
        }
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use spur_plan::Hash;
    use spur_rl::{Aggregation, LrSchedule};

    use super::*;

    /// The params of the first update node the plan makes for an experiment whose `defaults`
    /// block is `defaults` (YAML lines, indented by two spaces).
    fn update_params(defaults: &str) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, name).unwrap();
            path.display().to_string()
        };
        let text = format!(
            "models:\n  m: {{sources: [{{path: {}}}]}}\n\
             datasets:\n  train: {{sources: [{{path: {}}}]}}\n  test: {{sources: [{{path: {}}}]}}\n\
             rewards:\n  gt: {{kind: ground_truth}}\n\
             defaults:\n  model: m\n  train_data: train\n  reward: gt\n  steps: 10\n\
             \x20 evals:\n    math500: {{dataset: test}}\n{defaults}",
            file("m.gguf"),
            file("train.jsonl"),
            file("test.jsonl"),
        );
        let exp = spur_spec::parse(&text, &dir.path().join("exp.yaml")).unwrap();
        let plan = spur_plan::plan(&exp, &|_| 1, &|_: &std::path::Path| Ok(Hash([0; 32]))).unwrap();
        let node = plan
            .nodes
            .iter()
            .find(|n| n.kind == StageKind::Update)
            .unwrap();
        node.params.as_ref().clone()
    }

    #[test]
    fn dr_grpo_norm_length_follows_the_response_cap_unless_set() {
        let cfg = train_config(&update_params(
            "  rollout: {max_response_tokens: 512}\n  update: {aggregation: seq_sum_const}\n",
        ))
        .unwrap();
        assert_eq!(cfg.objective.aggregation, Aggregation::TokenSumConst);
        assert_eq!(cfg.objective.norm_length, 512);
        let cfg = train_config(&update_params(
            "  rollout: {max_response_tokens: 512}\n  update: {aggregation: seq_sum_const, norm_length: 1000}\n",
        ))
        .unwrap();
        assert_eq!(cfg.objective.norm_length, 1000);
    }

    #[test]
    fn the_trainer_gets_the_rollouts_temperature() {
        let cfg = train_config(&update_params("  rollout: {temperature: 0.6}\n")).unwrap();
        assert_eq!(cfg.temperature, 0.6);
        // Greedy rollouts carry plain log-softmax log-probs: scored at T = 1.
        let cfg = train_config(&update_params("  rollout: {temperature: 0}\n")).unwrap();
        assert_eq!(cfg.temperature, 1.0);
        let defaults = train_config(&update_params("")).unwrap();
        assert_eq!(defaults.temperature, 1.0);
        assert_eq!(defaults.objective.norm_length, 3072);
    }

    #[test]
    fn the_cosine_schedule_counts_grpo_steps() {
        let cfg = train_config(&update_params(
            "  update: {lr_schedule: cosine, warmup_steps: 2}\n",
        ))
        .unwrap();
        let want = LrSchedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 10,
            min_lr_ratio: 0.0,
        };
        assert_eq!(cfg.optimizer.schedule, want);
    }

    #[test]
    fn a_missing_update_parameter_is_an_error() {
        let params = update_params("  update: {lr_schedule: cosine}\n");
        for (path, key) in [
            ("update", "lr"),
            ("update", "total_steps"),
            ("update", "moments"),
            ("rollout", "temperature"),
            ("rollout", "max_response_tokens"),
        ] {
            let mut missing = params.clone();
            missing[path].as_object_mut().unwrap().remove(key);
            let err = train_config(&missing).expect_err("missing parameter");
            assert_eq!(
                err.to_string(),
                format!("the update node's parameter `{path}.{key}` is missing")
            );
        }
    }
}
