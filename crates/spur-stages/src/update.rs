//! The `update` stage: one GRPO step on a scored rollout, then a checkpoint.

use serde_json::{json, Value};
use spur_plan::{Role, StageKind};
use spur_rl::{Rollout, RolloutGroup, RolloutSample, TrainConfig};

use crate::model::{self, failed, LoadedPolicy, WeightsAt, POLICY_DIR, TRAINER_DIR};
use crate::reward::{Rewards, REWARDS_FILE};
use crate::rollout::{RolloutArtifact, ROLLOUT_FILE};
use crate::{NodeContext, Stage, StageError};

pub struct UpdateStage;

/// The trainer's configuration from the node's `update` params.
pub fn train_config(params: &Value) -> Result<TrainConfig, StageError> {
    let u = &params["update"];
    let aggregation = match u["aggregation"].as_str() {
        Some("seq_sum_const") => "token_sum_const",
        Some(other) => other,
        None => "token_mean",
    };
    let schedule = if u["lr_schedule"] == "cosine" {
        json!({
            "kind": "warmup_cosine",
            "warmup_updates": u["warmup_steps"],
            "total_updates": u["total_steps"],
            "min_lr_ratio": 0.0,
        })
    } else {
        json!({"kind": "constant"})
    };
    let cfg = json!({
        "objective": {
            "eps_low": u["eps_low"],
            "eps_high": u["eps_high"],
            "clip": u["clip"],
            "advantage": u["advantage"],
            "aggregation": aggregation,
            "kl_coef": u["kl_coef"],
            "kl_estimator": u["kl_estimator"],
            "entropy_coef": u["entropy_coef"],
        },
        "optimizer": {
            "lr": u["lr"],
            "beta1": u["beta1"],
            "beta2": u["beta2"],
            "weight_decay": u["weight_decay"],
            "max_grad_norm": u["grad_clip"],
            "schedule": schedule,
        },
        "mini_batch": u["mini_batch"],
        "micro_batch": u["micro_batch"],
        "seed": params["seed"],
    });
    let cfg: TrainConfig =
        serde_json::from_value(cfg).map_err(|e| failed(format!("update parameters: {e}")))?;
    Ok(cfg)
}

impl Stage for UpdateStage {
    fn kind(&self) -> StageKind {
        StageKind::Update
    }

    fn version(&self) -> u32 {
        // 2: π_old of the first mini-batch from its own forward pass; x·Wᵀ matmuls.
        // 3: sampled-token log-probs from one fused op (rounding differs from log_softmax).
        3
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
        let out = ctx.out.to_path_buf();
        let node = ctx.node.id;
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
        serde_json::to_value(metrics).map_err(failed)
    }
}
