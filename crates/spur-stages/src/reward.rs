//! The `reward` stage: scores a rollout with the run's reward.

use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spur_core::node_params::RewardNodeParams;
use spur_core::{RewardBase, RewardExpr};
use spur_math::{RewardOptions, RewardSpec};
use spur_plan::{Role, StageKind};

use crate::interrupt;
use crate::label::{Label, LABELS_FILE};
use crate::model::{self, failed};
use crate::rollout::{RolloutArtifact, ROLLOUT_FILE};
use crate::shell::{self, ScriptError};
use crate::{NodeContext, Stage, StageError};

pub const REWARDS_FILE: &str = "rewards.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rewards {
    /// rewards[group][sample], in the rollout's order.
    pub rewards: Vec<Vec<f64>>,
    /// The label each group was graded against.
    pub labels: Vec<String>,
}

pub struct RewardStage;

/// A user's reward command: JSONL in (`response`, `label`, `problem`), one
/// number per line out. `${name}` in `template` reads `vars[name]`, passed
/// through the environment as one word (see [`crate::shell`]).
fn command_rewards(
    template: &str,
    vars: &serde_json::Map<String, Value>,
    rollout: &RolloutArtifact,
    labels: &[String],
) -> Result<Vec<Vec<f64>>, StageError> {
    let mut input = Vec::new();
    for (g, group) in rollout.groups.iter().enumerate() {
        for s in &group.samples {
            serde_json::to_writer(
                &mut input,
                &json!({"response": s.text, "label": labels[g], "problem": group.problem}),
            )
            .map_err(failed)?;
            input.push(b'\n');
        }
    }
    let script = shell::render(template, &mut |name| {
        vars.get(name).map(|v| spur_core::scalar_text(v).into())
    })
    .map_err(|e| match e {
        ScriptError::Unknown(name) => failed(format!(
            "reward command: `${{{name}}}` has no value for this node"
        )),
        ScriptError::Unusable { name, why } => failed(format!(
            "reward command: `${{{name}}}` cannot be passed to the command: {why}"
        )),
    })?;
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(&script.text).envs(script.env);
    let output = interrupt::output(&mut cmd, input)?;
    let command = template;
    if !output.status.success() {
        return Err(failed(format!(
            "reward command `{command}` exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let values: Vec<f64> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            l.trim().parse().map_err(|_| {
                failed(format!(
                    "reward command output line {}: `{l}` is not a number",
                    i + 1
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let expected: usize = rollout.groups.iter().map(|g| g.samples.len()).sum();
    if values.len() != expected {
        return Err(failed(format!(
            "reward command printed {} rewards for {expected} responses",
            values.len()
        )));
    }
    let mut it = values.into_iter();
    Ok(rollout
        .groups
        .iter()
        .map(|g| it.by_ref().take(g.samples.len()).collect())
        .collect())
}

impl Stage for RewardStage {
    fn kind(&self) -> StageKind {
        StageKind::Reward
    }

    fn version(&self) -> u32 {
        // 2: `reward_std` is the sample std (n − 1), as the trainer's and the advantages'.
        // 3: a command reward's `${…}` values reach the shell through the environment.
        3
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![REWARDS_FILE.into()]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params: RewardNodeParams = ctx.params()?;
        let def = &params.reward;
        let expr = RewardExpr::parse(&def.kind).map_err(|e| failed(format!("reward.kind: {e}")))?;
        let seed = params.seed;
        let step = ctx.node.step as u64;
        let rollout_dir = ctx
            .input(Role::Rollout)
            .ok_or_else(|| failed("a reward node reads a rollout"))?;
        let rollout: RolloutArtifact = model::read_json(&rollout_dir.out.join(ROLLOUT_FILE))?;

        // Labels: the reference answer, or the majority vote for
        // `majority_vote` (an `incorrect` rollout already carries its label).
        let mut labels: Vec<String> = rollout.groups.iter().map(|g| g.answer.clone()).collect();
        if expr.uses(RewardBase::MajorityVote) {
            let dir = ctx
                .input(Role::Labels)
                .ok_or_else(|| failed("a majority-vote reward reads the label node"))?;
            let votes: Vec<Label> = model::read_json(&dir.out.join(LABELS_FILE))?;
            for (g, group) in rollout.groups.iter().enumerate() {
                labels[g] = votes
                    .iter()
                    .find(|l| l.index == group.index)
                    .map(|l| l.label.clone())
                    .unwrap_or_default();
            }
        }

        let rewards = if expr.is_command() {
            let template = def
                .command
                .as_deref()
                .ok_or_else(|| failed("a `command` reward needs its `command`"))?;
            command_rewards(template, &params.vars, &rollout, &labels)?
        } else {
            let options = RewardOptions {
                gamma: def.gamma,
                grader: def
                    .grader
                    .as_deref()
                    .unwrap_or("paper")
                    .parse()
                    .map_err(failed)?,
                style: def
                    .style
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(failed)?,
            };
            let spec = RewardSpec::new(&def.kind, &options).map_err(failed)?;
            rollout
                .groups
                .iter()
                .enumerate()
                .map(|(g, group)| {
                    group
                        .samples
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            f64::from(spec.evaluate(
                                &s.text,
                                &labels[g],
                                spur_math::sample_seed(seed, &[step, g as u64, i as u64]),
                            ))
                        })
                        .collect()
                })
                .collect()
        };
        let flat: Vec<f64> = rewards.iter().flatten().copied().collect();
        let mean = flat.iter().sum::<f64>() / flat.len().max(1) as f64;
        // The trainer's definition, so the two reports of one step agree.
        let std = spur_rl::sample_std(&flat);
        let zero_adv = rewards
            .iter()
            .filter(|g| g.windows(2).all(|w| w[0] == w[1]))
            .count();
        let metrics = json!({
            "reward_mean": mean,
            "reward_std": std,
            "zero_advantage_groups": zero_adv as f64 / rewards.len().max(1) as f64,
        });
        model::write_json(&ctx.out.join(REWARDS_FILE), &Rewards { rewards, labels })?;
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use spur_lm::FinishReason;
    use spur_plan::{Hash, Node, Role, StageKind};

    use super::*;
    use crate::rollout::{Group, Sample};
    use crate::{InputDir, Session};

    /// Runs a reward node over one group of `texts`.
    fn run(reward: Value, texts: &[&str]) -> Result<Value, StageError> {
        run_with(json!({"reward": reward, "vars": {}, "seed": 42}), texts)
    }

    fn run_with(params: Value, texts: &[&str]) -> Result<Value, StageError> {
        let dir = tempfile::tempdir().unwrap();
        let rollout = RolloutArtifact {
            step: 1,
            groups: vec![Group {
                index: 0,
                problem: "1 + 1".into(),
                answer: "2".into(),
                prompt_sha256: String::new(),
                prompt_ids: vec![1],
                samples: texts
                    .iter()
                    .map(|t| Sample {
                        token_ids: vec![2],
                        logprobs: vec![-1.0],
                        text: t.to_string(),
                        finish_reason: FinishReason::Eos,
                    })
                    .collect(),
            }],
        };
        model::write_json(&dir.path().join(ROLLOUT_FILE), &rollout).unwrap();
        let node = Node {
            id: Hash([0; 32]),
            kind: StageKind::Reward,
            version: RewardStage.version(),
            step: 1,
            params: Arc::new(params),
            inputs: vec![],
            externals: vec![],
            runs: vec![0],
        };
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut session = Session::default();
        let mut ctx = NodeContext {
            node: &node,
            inputs: vec![InputDir {
                role: Role::Rollout,
                node: Hash([1; 32]),
                out: dir.path().to_path_buf(),
            }],
            externals: vec![],
            out: &out,
            log: &dir.path().join("log"),
            devices: &[],
            session: &mut session,
        };
        RewardStage.run(&mut ctx)
    }

    #[test]
    fn reward_std_is_the_trainers_sample_std() {
        let texts = ["\\boxed{2}", "no box", "no box", "no box"];
        let metrics = run(json!({"kind": "format"}), &texts).unwrap();
        // Rewards [1, 0, 0, 0]: sample std 0.5 (the population std is 0.433).
        assert_eq!(metrics["reward_mean"], 0.25);
        assert_eq!(metrics["reward_std"], 0.5);
        assert_eq!(
            metrics["reward_std"],
            spur_rl::sample_std(&[1.0, 0.0, 0.0, 0.0])
        );
    }

    #[test]
    fn parameters_that_do_not_read_as_the_stages_struct_are_an_error() {
        let err = run(json!({}), &["x"]).unwrap_err().to_string();
        assert_eq!(err, "the reward node's parameters: missing field `kind`");
        let err = run(json!({"kind": "format", "gama": 0.5}), &["x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `gama`"), "{err}");
        let err = run(json!({"kind": "command"}), &["x"])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "a `command` reward needs its `command`");
    }

    #[test]
    fn a_command_rewards_values_reach_the_shell_as_one_word() {
        // Quoted, the value compares equal and each response scores 1; spliced into the
        // script, it would run `echo 0` and print more lines than responses.
        let command = "while read -r line; do [ ${v} = 'a; echo 0' ] && echo 1 || echo 0; done";
        let params = json!({
            "reward": {"kind": "command", "command": command},
            "vars": {"v": "a; echo 0"},
            "seed": 42,
        });
        let metrics = run_with(params, &["x", "y"]).unwrap();
        assert_eq!(metrics["reward_mean"], 1.0);

        let params = json!({
            "reward": {"kind": "command", "command": "echo ${missing}"},
            "vars": {},
            "seed": 42,
        });
        let err = run_with(params, &["x"]).unwrap_err().to_string();
        assert!(err.contains("`${missing}` has no value"), "{err}");
    }
}
