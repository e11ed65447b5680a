//! `spur loss`: the objective for log-probs given as JSON, so a researcher can check spur against
//! another implementation. The log-probs become a candle `Var` and go through
//! [`micro_batch_objective`], the trainer's own code; the gradient comes from autograd.

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::objective::{
    group_advantages, micro_batch_objective, Advantage, Aggregation, KlEstimator, MicroBatch,
    MiniBatchShape, ObjectiveConfig, TokenStats,
};
use crate::{Error, Result};

/// The `config` object of the input. Every key is optional; defaults are the paper's.
/// The whole input is one mini-batch, split into micro-batches of `micro_batch` consecutive
/// samples (across group boundaries).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct InputConfig {
    eps_low: f64,
    eps_high: f64,
    clip: bool,
    advantage: Advantage,
    aggregation: Aggregation,
    norm_length: usize,
    micro_batch: usize,
    kl_coef: f64,
    kl_estimator: KlEstimator,
}

impl Default for InputConfig {
    fn default() -> Self {
        let o = ObjectiveConfig::default();
        Self {
            eps_low: o.eps_low,
            eps_high: o.eps_high,
            clip: o.clip,
            advantage: o.advantage,
            aggregation: o.aggregation,
            norm_length: o.norm_length,
            micro_batch: spur_core::params::UpdateParams::default().micro_batch as usize,
            kl_coef: o.kl_coef,
            kl_estimator: o.kl_estimator,
        }
    }
}

/// What `spur loss` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LossOutput {
    /// The mini-batch loss (sum of the micro-batch shares).
    pub loss: f64,
    /// Per group, per sample.
    pub advantages: Vec<Vec<f64>>,
    /// Share of response tokens whose gradient clipping removed (low + high).
    pub clip_fraction: f64,
    pub clip_fraction_low: f64,
    pub clip_fraction_high: f64,
    /// Token mean of the k3 estimate of KL(π_old‖π).
    pub approx_kl: f64,
    /// Per sample in input order (groups flattened), per token: ∂loss/∂logprob.
    pub grad_logprobs: Vec<Vec<f64>>,
}

struct Sample {
    logprobs: Vec<f32>,
    old_logprobs: Vec<f32>,
    ref_logprobs: Option<Vec<f32>>,
}

/// Computes the objective and its gradient for the input described in `docs/grpo.md`.
/// Errors name the JSON path of the offending value.
pub fn loss_from_json(input: &Value) -> Result<LossOutput> {
    let top = object(input, "$")?;
    reject_unknown(top, "$", &["config", "groups"])?;
    let config: InputConfig = match top.get("config") {
        None => InputConfig::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad("config", e.to_string()))?,
    };
    if config.micro_batch == 0 {
        return Err(bad("config.micro_batch", "must be at least 1".into()));
    }
    let objective = ObjectiveConfig {
        eps_low: config.eps_low,
        eps_high: config.eps_high,
        clip: config.clip,
        advantage: config.advantage,
        aggregation: config.aggregation,
        norm_length: config.norm_length,
        kl_coef: config.kl_coef,
        kl_estimator: config.kl_estimator,
        entropy_coef: 0.0,
    };
    objective
        .validate()
        .map_err(|e| bad("config", e.to_string()))?;

    let groups = top.get("groups").ok_or_else(|| {
        bad(
            "groups",
            "missing: give a list of {rewards, samples}".into(),
        )
    })?;
    let groups = array(groups, "groups")?;
    if groups.is_empty() {
        return Err(bad("groups", "is empty".into()));
    }
    let mut advantages = Vec::with_capacity(groups.len());
    let mut samples = Vec::new();
    let mut flat_advantages = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let path = format!("groups[{g}]");
        let obj = object(group, &path)?;
        reject_unknown(obj, &path, &["rewards", "samples"])?;
        let rewards = numbers(field(obj, &path, "rewards")?, &format!("{path}.rewards"))?;
        let spath = format!("{path}.samples");
        let group_samples = array(field(obj, &path, "samples")?, &spath)?;
        if group_samples.len() != rewards.len() {
            return Err(bad(
                &spath,
                format!(
                    "has {} samples but rewards has {} values; give one reward per sample",
                    group_samples.len(),
                    rewards.len()
                ),
            ));
        }
        for (s, sample) in group_samples.iter().enumerate() {
            samples.push(parse_sample(
                sample,
                &format!("{spath}[{s}]"),
                objective.kl_coef > 0.0,
            )?);
        }
        let adv = group_advantages(&rewards, objective.advantage);
        flat_advantages.extend_from_slice(&adv);
        advantages.push(adv);
    }

    let device = Device::Cpu;
    let shape = MiniBatchShape {
        micro_batches: samples.len().div_ceil(config.micro_batch),
        sequences: samples.len(),
    };
    let mut loss = 0.0;
    let mut stats = TokenStats::default();
    let mut grad_logprobs = Vec::with_capacity(samples.len());
    for (chunk, adv) in samples
        .chunks(config.micro_batch)
        .zip(flat_advantages.chunks(config.micro_batch))
    {
        let width = chunk
            .iter()
            .map(|s| s.logprobs.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let logprobs = Var::from_tensor(&padded(chunk, width, |s| &s.logprobs, &device)?)?;
        let old = padded(chunk, width, |s| &s.old_logprobs, &device)?;
        let reference = if objective.kl_coef > 0.0 {
            Some(padded(chunk, width, ref_row, &device)?)
        } else {
            None
        };
        let mask: Vec<f32> = chunk
            .iter()
            .flat_map(|s| (0..width).map(move |i| (i < s.logprobs.len()) as u8 as f32))
            .collect();
        let mask = Tensor::from_vec(mask, (chunk.len(), width), &device)?;
        let adv: Vec<f32> = adv.iter().map(|&a| a as f32).collect();
        let adv = Tensor::from_vec(adv, chunk.len(), &device)?;
        let out = micro_batch_objective(
            &objective,
            &MicroBatch {
                logprobs: logprobs.as_tensor(),
                old_logprobs: &old,
                ref_logprobs: reference.as_ref(),
                entropy: None,
                mask: &mask,
                advantages: &adv,
            },
            shape,
        )?;
        let grads = out.loss.backward()?;
        let grad = match grads.get(logprobs.as_tensor()) {
            Some(g) => g.to_vec2::<f32>()?,
            // No path from the log-probs to the loss (e.g. all advantages zero): gradient zero.
            None => vec![vec![0.0; width]; chunk.len()],
        };
        for (s, row) in chunk.iter().zip(grad) {
            let n = s.logprobs.len();
            grad_logprobs.push(row[..n].iter().map(|&g| g as f64).collect());
        }
        loss += out.loss.to_scalar::<f32>()? as f64;
        stats.add(&out.stats);
    }

    let tokens = stats.tokens.max(1.0);
    Ok(LossOutput {
        loss,
        advantages,
        clip_fraction: (stats.clipped_low + stats.clipped_high) / tokens,
        clip_fraction_low: stats.clipped_low / tokens,
        clip_fraction_high: stats.clipped_high / tokens,
        approx_kl: stats.approx_kl / tokens,
        grad_logprobs,
    })
}

fn parse_sample(value: &Value, path: &str, need_ref: bool) -> Result<Sample> {
    let obj = object(value, path)?;
    reject_unknown(obj, path, &["logprobs", "old_logprobs", "ref_logprobs"])?;
    let floats = |key: &str| -> Result<Vec<f32>> {
        let p = format!("{path}.{key}");
        Ok(numbers(field(obj, path, key)?, &p)?
            .into_iter()
            .map(|x| x as f32)
            .collect())
    };
    let logprobs = floats("logprobs")?;
    let old_logprobs = floats("old_logprobs")?;
    if old_logprobs.len() != logprobs.len() {
        return Err(bad(
            &format!("{path}.old_logprobs"),
            format!(
                "has {} values but logprobs has {}; give one per response token",
                old_logprobs.len(),
                logprobs.len()
            ),
        ));
    }
    let ref_logprobs = match (obj.contains_key("ref_logprobs"), need_ref) {
        (true, _) => {
            let r = floats("ref_logprobs")?;
            if r.len() != logprobs.len() {
                return Err(bad(
                    &format!("{path}.ref_logprobs"),
                    format!(
                        "has {} values but logprobs has {}; give one per response token",
                        r.len(),
                        logprobs.len()
                    ),
                ));
            }
            Some(r)
        }
        (false, true) => {
            return Err(bad(
                &format!("{path}.ref_logprobs"),
                "missing: config.kl_coef > 0 needs reference log-probs".into(),
            ))
        }
        (false, false) => None,
    };
    Ok(Sample {
        logprobs,
        old_logprobs,
        ref_logprobs,
    })
}

fn ref_row(s: &Sample) -> &[f32] {
    s.ref_logprobs.as_deref().unwrap_or(&[])
}

/// Rows of `get(sample)` right-padded with zeros to `width`, as a `[rows, width]` f32 tensor.
fn padded(
    samples: &[Sample],
    width: usize,
    get: impl Fn(&Sample) -> &[f32],
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(samples.len() * width);
    for s in samples {
        let row = get(s);
        data.extend_from_slice(row);
        data.resize(data.len() + width - row.len(), 0.0);
    }
    Ok(Tensor::from_vec(data, (samples.len(), width), device)?)
}

fn bad(path: &str, msg: String) -> Error {
    Error::Input {
        path: path.to_string(),
        msg,
    }
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| bad(path, format!("expected an object, found {}", kind(v))))
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| bad(path, format!("expected a list, found {}", kind(v))))
}

fn field<'a>(obj: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| bad(&format!("{path}.{key}"), "missing".into()))
}

fn numbers(v: &Value, path: &str) -> Result<Vec<f64>> {
    array(v, path)?
        .iter()
        .enumerate()
        .map(|(i, x)| match x.as_f64() {
            Some(f) if f.is_finite() => Ok(f),
            _ => Err(bad(
                &format!("{path}[{i}]"),
                format!("expected a finite number, found {}", kind(x)),
            )),
        })
        .collect()
}

fn reject_unknown(obj: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(
            &format!("{path}.{k}"),
            format!("unknown key; allowed here: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}
