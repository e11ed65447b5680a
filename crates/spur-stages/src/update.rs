//! The `update` stage: one GRPO step on a scored rollout, then a checkpoint.

use serde_json::Value;
use spur_core::node_params::UpdateNodeParams;
use spur_plan::{Role, StageKind};
use spur_rl::{Rollout, RolloutGroup, RolloutSample, TrainConfig};

use crate::model::{self, failed, LoadedPolicy, Training, WeightsAt, POLICY_DIR, TRAINER_DIR};
use crate::reward::{Rewards, REWARDS_FILE};
use crate::rollout::{RolloutArtifact, ROLLOUT_FILE};
use crate::{NodeContext, Stage, StageError};

pub struct UpdateStage;

/// The trainer of an update node, validated.
pub fn train_config(params: &UpdateNodeParams) -> Result<TrainConfig, StageError> {
    let cfg = TrainConfig::from(params);
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
        // 5: Adam in place on the CPU (with bf16 moments the weights read them rounded).
        // Scores through spur-lm's forward pass: numerics changes are spur_lm::NUMERICS_VERSION.
        crate::numerics_stage_version(5, spur_lm::NUMERICS_VERSION)
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
        let params: UpdateNodeParams = ctx.params()?;
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
            Some(model::ensure_reference(ctx, params.model.precision)?)
        } else {
            None
        };
        let training = Training {
            config: &cfg,
            checkpoint_activations: params.update.checkpoint_activations,
        };
        let policy = model::ensure_policy(ctx, params.model.precision, Some(training))?;
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
    fn update_params(defaults: &str) -> UpdateNodeParams {
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
        spur_core::node_params::from_value(StageKind::Update, &node.params).unwrap()
    }

    #[test]
    fn dr_grpo_norm_length_follows_the_response_cap_unless_set() {
        let cfg = train_config(&update_params(
            "  rollout: {max_response_tokens: 512}\n  update: {aggregation: seq_sum_const}\n",
        ))
        .unwrap();
        assert_eq!(cfg.objective.aggregation, Aggregation::SeqSumConst);
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
    fn update_parameters_of_another_shape_are_refused() {
        let params = spur_core::node_params::to_value(&update_params(""));
        let mut misspelt = params.clone();
        misspelt["update"]["learning_rate"] = serde_json::json!(1e-6);
        let err =
            spur_core::node_params::from_value::<UpdateNodeParams>(StageKind::Update, &misspelt)
                .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `learning_rate`"),
            "{err}"
        );
        let mut missing = params;
        missing["rollout"]
            .as_object_mut()
            .unwrap()
            .remove("temperature");
        let err =
            spur_core::node_params::from_value::<UpdateNodeParams>(StageKind::Update, &missing)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the update node's parameters: missing field `temperature`"
        );
    }
}
