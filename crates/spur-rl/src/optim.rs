//! Adam(W) as the paper's runs used it: β = (0.9, 0.95), ε = 1e-8, no weight decay, constant
//! learning rate 5e-7, gradient-norm clipping at 1.0 over all parameters together.
//!
//! Moments are f32 whatever the weights' dtype, or bf16 when asked (`moments: bf16`, a quarter
//! less static memory: a 7B model's moments take 30 GB instead of 60; the update itself is
//! computed in f32 either way). Weights that are not f32 get an f32 master copy that the update
//! is applied to, then cast back into the `Var`.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use spur_core::params::{LrSchedule as ScheduleKind, Precision, UpdateParams};

use crate::{Error, Result};

/// Adam's ε (the paper's; not an experiment setting).
const ADAM_EPS: f64 = 1e-8;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW) weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub schedule: LrSchedule,
    /// Storage dtype of the two moments.
    pub moments: Precision,
}

/// A precision setting as candle's dtype: what Adam stores its moments in, what a policy
/// computes in.
pub fn precision_dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// A policy's compute precision as spur-lm loads a model in.
pub fn load_precision(precision: Precision) -> spur_lm::Precision {
    match precision {
        Precision::F32 => spur_lm::Precision::F32,
        Precision::Bf16 => spur_lm::Precision::Bf16,
    }
}

impl Default for AdamConfig {
    /// The experiment file's defaults, at a constant learning rate.
    fn default() -> Self {
        AdamConfig::new(&UpdateParams::default(), None)
    }
}

impl AdamConfig {
    /// The optimizer a run's `update` parameters ask for. A cosine schedule spans
    /// `schedule_steps` GRPO steps (the run's step count); both counts are GRPO steps, as
    /// [`AdamConfig::lr_at`]'s are.
    pub fn new(update: &UpdateParams, schedule_steps: Option<u32>) -> Self {
        let schedule = match update.lr_schedule {
            ScheduleKind::Constant => LrSchedule::Constant,
            ScheduleKind::Cosine => LrSchedule::WarmupCosine {
                warmup_steps: u64::from(update.warmup_steps),
                // A plan always sets it for a cosine schedule; 0 fails validation.
                total_steps: u64::from(schedule_steps.unwrap_or(0)),
                min_lr_ratio: 0.0,
            },
        };
        AdamConfig {
            lr: update.lr,
            beta1: update.beta1,
            beta2: update.beta2,
            eps: ADAM_EPS,
            weight_decay: update.weight_decay,
            max_grad_norm: update.grad_clip,
            schedule,
            moments: update.moments,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = self.lr >= 0.0
            && self.lr.is_finite()
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.max_grad_norm >= 0.0;
        if !ok {
            return Err(Error::Config(format!(
                "optimizer: need lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0, \
                 max_grad_norm >= 0; got {self:?}"
            )));
        }
        if let LrSchedule::WarmupCosine {
            warmup_steps,
            total_steps,
            min_lr_ratio,
        } = self.schedule
        {
            if total_steps <= warmup_steps || !(0.0..=1.0).contains(&min_lr_ratio) {
                return Err(Error::Config(format!(
                    "optimizer.schedule: warmup_cosine needs total_steps > warmup_steps and \
                     min_lr_ratio in [0, 1]; got warmup_steps {warmup_steps}, \
                     total_steps {total_steps}, min_lr_ratio {min_lr_ratio}"
                )));
            }
        }
        Ok(())
    }

    /// The learning rate of every update of the GRPO step that follows `steps_done` completed
    /// steps. The schedule counts GRPO steps, not updates: all mini-batch updates of one step
    /// share its rate, whatever the number of updates per step.
    pub fn lr_at(&self, steps_done: u64) -> f64 {
        let lr = self.lr;
        match self.schedule {
            LrSchedule::Constant => lr,
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if steps_done < warmup_steps {
                    return lr * (steps_done + 1) as f64 / warmup_steps as f64;
                }
                let span = (total_steps - warmup_steps) as f64;
                let progress = ((steps_done - warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
            }
        }
    }
}

/// Learning rate as a function of the GRPO step (see [`AdamConfig::lr_at`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Linear warm-up from lr/warmup to lr over the first `warmup_steps` GRPO steps, then a
    /// half cosine that reaches `min_lr_ratio × lr` at step `total_steps` (and stays there),
    /// evaluated at the steps completed before each step (as Hugging Face's
    /// `get_cosine_schedule_with_warmup`, with GRPO steps for its scheduler steps).
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    },
}

/// Global L2 norm of all gradients together (computed in f64).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads {
        sum += sq_sum(g)?;
    }
    Ok(sum.sqrt())
}

pub(crate) fn sq_sum(t: &Tensor) -> Result<f64> {
    let t = t.to_dtype(DType::F32)?;
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

pub struct Adam {
    pub(crate) cfg: AdamConfig,
    /// Updates applied so far.
    pub(crate) t: u64,
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    /// f32 copies of weights whose `Var` is not f32.
    pub(crate) master: Vec<Option<Tensor>>,
}

impl Adam {
    pub fn new(cfg: AdamConfig, vars: &[Var]) -> Result<Self> {
        cfg.validate()?;
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        let mut master = Vec::with_capacity(vars.len());
        let moments = precision_dtype(cfg.moments);
        for var in vars {
            m.push(Tensor::zeros(var.shape(), moments, var.device())?);
            v.push(Tensor::zeros(var.shape(), moments, var.device())?);
            master.push(match var.dtype() {
                DType::F32 => None,
                _ => Some(var.as_tensor().to_dtype(DType::F32)?),
            });
        }
        Ok(Self {
            cfg,
            t: 0,
            m,
            v,
            master,
        })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// Number of updates applied.
    pub fn updates(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr` (the step's, [`AdamConfig::lr_at`]) and `grads` (one
    /// per var, any dtype) whose global norm is `norm` (from [`grad_norm`]; the caller checks
    /// it is finite).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], norm: f64, lr: f64) -> Result<()> {
        if vars.len() != self.m.len() || grads.len() != vars.len() {
            return Err(Error::Config(format!(
                "optimizer built for {} parameters, stepped with {} vars and {} gradients",
                self.m.len(),
                vars.len(),
                grads.len()
            )));
        }
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        // torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6)).
        let max = self.cfg.max_grad_norm;
        let clip = if max > 0.0 {
            (max / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let bias1 = 1.0 - b1.powi(self.t as i32);
        let bias2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
        let step_size = lr / bias1;
        for (i, var) in vars.iter().enumerate() {
            let mut g = grads[i].to_dtype(DType::F32)?;
            if clip < 1.0 {
                g = (g * clip)?;
            }
            let m = ((self.m[i].to_dtype(DType::F32)? * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((self.v[i].to_dtype(DType::F32)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + self.cfg.eps)?;
            let weight = match &self.master[i] {
                Some(w) => w.clone(),
                None => var.as_tensor().detach(),
            };
            let wd = self.cfg.weight_decay;
            let decayed = if wd > 0.0 {
                (weight * (1.0 - lr * wd))?
            } else {
                weight
            };
            let next = (decayed - (m.div(&denom)? * step_size)?)?;
            match &mut self.master[i] {
                Some(w) => {
                    var.set(&next.to_dtype(var.dtype())?)?;
                    *w = next;
                }
                None => var.set(&next)?,
            }
            let moments = precision_dtype(self.cfg.moments);
            self.m[i] = m.to_dtype(moments)?;
            self.v[i] = v.to_dtype(moments)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(warmup_steps: u64, total_steps: u64) -> AdamConfig {
        AdamConfig {
            lr: 1.0,
            schedule: LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio: 0.0,
            },
            ..AdamConfig::default()
        }
    }

    #[test]
    fn warmup_cosine_counts_grpo_steps() {
        let cfg = cosine(0, 10);
        assert_eq!(cfg.lr_at(0), 1.0);
        assert!(
            (cfg.lr_at(5) - 0.5).abs() < 1e-12,
            "midpoint {}",
            cfg.lr_at(5)
        );
        assert!(cfg.lr_at(9) > 0.0);
        assert_eq!(cfg.lr_at(10), 0.0);
        assert_eq!(cfg.lr_at(50), 0.0);
        let warm = cosine(4, 10);
        let rates: Vec<f64> = (0..5).map(|s| warm.lr_at(s)).collect();
        assert_eq!(rates, [0.25, 0.5, 0.75, 1.0, 1.0]);
        assert!((warm.lr_at(7) - 0.5).abs() < 1e-12);
    }
}
