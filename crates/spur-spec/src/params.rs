//! The parameters of one run (one grid cell), with the paper's defaults.
//!
//! `defaults`, grid axes and overrides all write into this one tree; a grid
//! axis is a dotted path into it (`update.lr`) or a free variable used via
//! `${name}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use spur_core::params::{
    EvalAt, EvalParams, Materialize, Precision, ProbeParams, RolloutParams, UpdateParams,
    DEFAULT_SEED,
};

/// Everything that varies between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunParams {
    /// Name from the `models` block.
    pub model: Option<String>,
    /// Name from the `datasets` block used for training rollouts.
    pub train_data: Option<String>,
    /// Name from the `rewards` block.
    pub reward: Option<String>,
    pub seed: u64,
    /// The dtype the run's policy computes in, for sampling, training and evaluation alike:
    /// `f32`, or `bf16` over f32 master weights (tensor cores on a GPU; emulated, slower, on
    /// the CPU).
    pub precision: Precision,
    /// GRPO steps (rollout → reward → update).
    pub steps: u32,
    /// Evaluate every this many steps (and at step 0 and at the end).
    pub eval_every: u32,
    pub rollout: RolloutParams,
    pub update: UpdateParams,
    /// Named evaluations, e.g. `math500`, `aime24`.
    pub evals: BTreeMap<String, EvalParams>,
    /// What every update measures of the policy on fixed prompts (off without a dataset).
    pub probe: ProbeParams,
    /// Which artifacts are kept.
    pub materialize: Materialize,
}

impl Default for RunParams {
    fn default() -> Self {
        RunParams {
            model: None,
            train_data: None,
            reward: None,
            seed: DEFAULT_SEED,
            precision: Precision::F32,
            steps: 300,
            eval_every: 10,
            rollout: RolloutParams::default(),
            update: UpdateParams::default(),
            evals: BTreeMap::new(),
            probe: ProbeParams::default(),
            materialize: Materialize::default(),
        }
    }
}

impl RunParams {
    /// Steps at which an evaluation with `at` runs, ascending, for this run.
    pub fn eval_steps(&self, at: EvalAt) -> Vec<u32> {
        let mut steps = match at {
            EvalAt::Every if self.eval_every > 0 => {
                (0..=self.steps).step_by(self.eval_every as usize).collect()
            }
            EvalAt::Every | EvalAt::StartEnd => vec![0],
            EvalAt::End => vec![],
        };
        if steps.last() != Some(&self.steps) {
            steps.push(self.steps);
        }
        steps
    }

    /// Range checks; each problem is (key path, message).
    pub fn check_ranges(&self) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, key: &str, msg: &str| {
            if !ok {
                bad.push((key.to_string(), msg.to_string()));
            }
        };
        let r = &self.rollout;
        check(
            r.prompts_per_step > 0,
            "rollout.prompts_per_step",
            "must be at least 1",
        );
        check(
            r.samples_per_prompt > 0,
            "rollout.samples_per_prompt",
            "must be at least 1 (zero samples per prompt gives nothing to train on)",
        );
        check(
            r.temperature >= 0.0 && r.temperature.is_finite(),
            "rollout.temperature",
            "must be a finite number >= 0",
        );
        check(
            r.top_p > 0.0 && r.top_p <= 1.0,
            "rollout.top_p",
            "must be in (0, 1]",
        );
        check(
            r.max_response_tokens > 0,
            "rollout.max_response_tokens",
            "must be at least 1",
        );
        check(
            r.max_prompt_tokens > 0,
            "rollout.max_prompt_tokens",
            "must be at least 1",
        );
        let u = &self.update;
        check(
            u.lr > 0.0 && u.lr.is_finite(),
            "update.lr",
            "the learning rate must be a positive finite number",
        );
        check(
            (0.0..1.0).contains(&u.beta1),
            "update.beta1",
            "must be in [0, 1)",
        );
        check(
            (0.0..1.0).contains(&u.beta2),
            "update.beta2",
            "must be in [0, 1)",
        );
        check(u.weight_decay >= 0.0, "update.weight_decay", "must be >= 0");
        check(u.grad_clip > 0.0, "update.grad_clip", "must be > 0");
        check(u.mini_batch > 0, "update.mini_batch", "must be at least 1");
        check(
            u.micro_batch > 0,
            "update.micro_batch",
            "must be at least 1",
        );
        check(
            u.micro_batch <= u.mini_batch,
            "update.micro_batch",
            "must not exceed update.mini_batch",
        );
        check(
            (0.0..=1.0).contains(&u.eps_low),
            "update.eps_low",
            "must be in [0, 1] (1 puts the lower bound at 0, which a ratio never reaches)",
        );
        check(
            u.eps_high >= 0.0 && u.eps_high.is_finite(),
            "update.eps_high",
            "must be a finite number >= 0 (a large one, such as 1.0e6, never binds)",
        );
        check(u.kl_coef >= 0.0, "update.kl_coef", "must be >= 0");
        check(
            u.norm_length != Some(0),
            "update.norm_length",
            "must be at least 1",
        );
        let rollouts = r.prompts_per_step as u64 * r.samples_per_prompt as u64;
        check(
            u.mini_batch as u64 <= rollouts.max(1) || rollouts == 0,
            "update.mini_batch",
            "must not exceed the rollouts per step (rollout.prompts_per_step × rollout.samples_per_prompt)",
        );
        let probe = &self.probe;
        if probe.dataset.is_some() {
            check(probe.prompts > 0, "probe.prompts", "must be at least 1");
            check(probe.samples > 0, "probe.samples", "must be at least 1");
            check(
                probe.max_tokens > 0,
                "probe.max_tokens",
                "must be at least 1",
            );
            check(
                probe.opening_tokens > 0,
                "probe.opening_tokens",
                "must be at least 1",
            );
        }
        for (name, e) in &self.evals {
            let key = format!("evals.{name}");
            check(
                e.samples > 0,
                &format!("{key}.samples"),
                "must be at least 1",
            );
            check(
                e.temperature >= 0.0,
                &format!("{key}.temperature"),
                "must be >= 0",
            );
            check(
                e.max_tokens > 0,
                &format!("{key}.max_tokens"),
                "must be at least 1",
            );
        }
        bad
    }
}

/// Every leaf path of the parameter tree (for axis-name hints).
pub fn param_paths() -> Vec<String> {
    let mut out = Vec::new();
    let value = serde_json::to_value(RunParams::default()).expect("params serialise");
    collect_paths(&value, "", &mut out);
    out.push("evals.<name>.dataset".into());
    out
}

fn collect_paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_paths(child, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}
