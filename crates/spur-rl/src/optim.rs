//! Adam(W) as the paper's runs used it: β = (0.9, 0.95), ε = 1e-8, no weight decay, constant
//! learning rate 5e-7, gradient-norm clipping at 1.0 over all parameters together.
//!
//! Moments are f32 whatever the weights' dtype, or bf16 when asked (`moments: bf16`, a quarter
//! less static memory: a 7B model's moments take 30 GB instead of 60; the update itself is
//! computed in f32 either way). Weights that are not f32 get an f32 master copy that the update
//! is applied to, then cast back into the `Var`.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use spur_core::params::{LrSchedule as ScheduleKind, Precision, UpdateParams};
use spur_lm::bench::TrainOpCheck;

use crate::adam_in_place::{self, AdamStep};
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
        let step = self.step_constants(norm, lr);
        for (i, var) in vars.iter().enumerate() {
            let (weight, grad) = (var.as_tensor(), &grads[i]);
            // f32 weights, the only ones the passes take, have no master copy.
            if adam_in_place::applies(weight, grad, &self.m[i], &self.v[i]) {
                adam_in_place::step(weight, grad, &self.m[i], &self.v[i], &step)?;
            } else {
                self.composite_update(i, var, grad, &step)?;
            }
        }
        Ok(())
    }

    /// The constants of update `self.t` at learning rate `lr`, for gradients of global norm
    /// `norm`.
    fn step_constants(&self, norm: f64, lr: f64) -> AdamStep {
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        // torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6)).
        let max = self.cfg.max_grad_norm;
        let clip = if max > 0.0 {
            (max / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let bias1 = 1.0 - b1.powi(self.t as i32);
        let wd = self.cfg.weight_decay;
        AdamStep {
            clip: (clip < 1.0).then_some(clip),
            beta1: b1,
            beta2: b2,
            decay: (wd > 0.0).then_some(1.0 - lr * wd),
            bias2_sqrt: (1.0 - b2.powi(self.t as i32)).sqrt(),
            eps: self.cfg.eps,
            step_size: lr / bias1,
        }
    }

    /// Var `i`'s update through candle's ops (devices and dtypes without the in-place passes).
    fn composite_update(&mut self, i: usize, var: &Var, grad: &Tensor, s: &AdamStep) -> Result<()> {
        let (b1, b2) = (s.beta1, s.beta2);
        let mut g = grad.to_dtype(DType::F32)?;
        if let Some(clip) = s.clip {
            g = (g * clip)?;
        }
        let m = ((self.m[i].to_dtype(DType::F32)? * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((self.v[i].to_dtype(DType::F32)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let denom = ((v.sqrt()? / s.bias2_sqrt)? + s.eps)?;
        let weight = match &self.master[i] {
            Some(w) => w.clone(),
            None => var.as_tensor().detach(),
        };
        let decayed = match s.decay {
            Some(d) => (weight * d)?,
            None => weight,
        };
        let next = (decayed - (m.div(&denom)? * s.step_size)?)?;
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
        Ok(())
    }
}

/// Adam's in-place passes on `device` against the CPU's: the second update of one var of
/// `elements` f32 weights, from random moments and a clipped random gradient, with f32 and with
/// bf16 moments. `forward_error` is the largest relative error of the weight's change and the
/// two moments (Adam has no backward pass: `gradient_error` is 0); the times compare the
/// in-place passes with candle's composite update on `device`.
pub fn check_adam(device: &Device, elements: usize) -> Result<Vec<TrainOpCheck>> {
    let cpu = Device::Cpu;
    let random =
        |scale: f64| -> Result<Tensor> { Ok((Tensor::randn(0f32, 1.0, elements, &cpu)? * scale)?) };
    let (weight, grad, m, v) = (random(0.02)?, random(1e-3)?, random(1e-4)?, random(1e-3)?);
    let v = v.abs()?;
    let mut checks = Vec::new();
    for moments in [Precision::F32, Precision::Bf16] {
        let dtype = precision_dtype(moments);
        let cfg = AdamConfig {
            lr: 5e-7,
            weight_decay: 0.1,
            max_grad_norm: 1.0,
            moments,
            ..AdamConfig::default()
        };
        // One update from the moments above, after a first one; returns the weight's change
        // and the moments, on the CPU in f32, and the update's time in ms.
        type Updated = ((Tensor, Tensor, Tensor), f64);
        let update = |on: &Device, in_place: bool| -> Result<Updated> {
            // Copies: the passes write in place, and a cast or move to where a tensor already
            // is would share its storage.
            let var = Var::from_tensor(&weight.to_device(on)?.copy()?)?;
            let mut adam = Adam::new(cfg.clone(), std::slice::from_ref(&var))?;
            adam.m[0] = m.to_dtype(dtype)?.to_device(on)?.copy()?;
            adam.v[0] = v.to_dtype(dtype)?.to_device(on)?.copy()?;
            adam.t = 2;
            let g = grad.to_device(on)?;
            // A norm above the clip, so that the gradient is scaled.
            let s = adam.step_constants(3.0 * grad_norm(std::slice::from_ref(&g))?, cfg.lr);
            on.synchronize()?;
            let start = std::time::Instant::now();
            if in_place {
                adam_in_place::step(var.as_tensor(), &g, &adam.m[0], &adam.v[0], &s)?;
            } else {
                adam.composite_update(0, &var, &g, &s)?;
            }
            on.synchronize()?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let f32_cpu = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            let change = (f32_cpu(var.as_tensor())? - &weight)?;
            Ok(((change, f32_cpu(&adam.m[0])?, f32_cpu(&adam.v[0])?), ms))
        };
        let (want, _) = update(&cpu, true)?;
        let (got, _) = update(device, true)?;
        let mut error = 0f64;
        for (g, w) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
            error = error.max(spur_lm::bench::relative_error(g, w)?);
        }
        let time = |in_place: bool| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                best = best.min(update(device, in_place)?.1);
            }
            Ok(best)
        };
        let tolerance = spur_lm::bench::tolerance(dtype);
        checks.push(TrainOpCheck {
            op: "adam",
            dtype: format!("{dtype:?}").to_lowercase(),
            shape: vec![elements],
            forward_error: error,
            gradient_error: 0.0,
            agrees: error <= tolerance,
            tolerance,
            fused_ms: time(true)?,
            composite_ms: time(false)?,
        });
    }
    Ok(checks)
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

    /// Three steps of one var through the in-place passes and through candle's ops.
    fn three_steps(moments: Precision, in_place: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let init: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let var = Var::from_vec(init, (10, 100), &candle_core::Device::Cpu).unwrap();
        let cfg = AdamConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            max_grad_norm: 1.0,
            moments,
            ..AdamConfig::default()
        };
        let mut adam = Adam::new(cfg, std::slice::from_ref(&var)).unwrap();
        for step in 0..3u32 {
            let g: Vec<f32> = (0..1000)
                .map(|i| ((i * 13 + step as usize * 7) % 29) as f32 / 29.0 - 0.45)
                .collect();
            let g = Tensor::from_vec(g, (10, 100), &candle_core::Device::Cpu).unwrap();
            // A norm above the clip, so that the gradient is scaled.
            let norm = grad_norm(std::slice::from_ref(&g)).unwrap() * 3.0;
            if in_place {
                adam.step(std::slice::from_ref(&var), &[g], norm, 1e-2)
                    .unwrap();
            } else {
                adam.t += 1;
                let (t, cfg) = (adam.t as i32, &adam.cfg);
                let step = AdamStep {
                    clip: Some(1.0 / (norm + 1e-6)),
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    decay: Some(1.0 - 1e-2 * 0.1),
                    bias2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt(),
                    eps: cfg.eps,
                    step_size: 1e-2 / (1.0 - cfg.beta1.powi(t)),
                };
                adam.composite_update(0, &var, &g, &step).unwrap();
            }
        }
        let flat = |t: &Tensor| {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        (flat(var.as_tensor()), flat(&adam.m[0]), flat(&adam.v[0]))
    }

    #[test]
    fn in_place_updates_equal_candles_ops() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (
            three_steps(Precision::F32, true),
            three_steps(Precision::F32, false),
        );
        assert_eq!(bits(&a.0), bits(&b.0), "weights");
        assert_eq!(bits(&a.1), bits(&b.1), "first moments");
        assert_eq!(bits(&a.2), bits(&b.2), "second moments");
        // bf16 moments: the weight's pass reads them rounded.
        let (a, b) = (
            three_steps(Precision::Bf16, true),
            three_steps(Precision::Bf16, false),
        );
        let gap =
            a.0.iter()
                .zip(&b.0)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
        assert!(gap < 1e-4, "bf16 moments: weights differ by {gap}");
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
