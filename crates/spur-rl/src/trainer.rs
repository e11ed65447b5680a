//! One GRPO step over a scored rollout: advantages per group, the rollout shuffled and split into
//! mini-batches (one optimizer update each) and micro-batches (gradient accumulation).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use spur_core::node_params::UpdateNodeParams;
use spur_core::params::{RolloutParams, UpdateParams, DEFAULT_SEED};

use crate::collective::{Collective, Solo};
use crate::objective::{
    group_advantages, micro_batch_objective, sample_std, MicroBatch, MiniBatchShape,
    ObjectiveConfig, TokenStats,
};
use crate::optim::{grad_norm, sq_sum, Adam, AdamConfig};
use crate::policy::{scoring_logprobs, training_logprobs, Entropy, Policy, Tempered};
use crate::rng::Rng;
use crate::{Error, Result};

/// Everything that decides what a step computes. Defaults are the paper's code's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: ObjectiveConfig,
    pub optimizer: AdamConfig,
    /// Rollouts per optimizer update (128 of 1024 → 8 updates per step). A value at least the
    /// rollout size gives one update per step, where ρ ≡ 1 (the paper's ablation ii).
    pub mini_batch: usize,
    /// Rollouts per forward/backward pass; gradients are accumulated over a mini-batch.
    pub micro_batch: usize,
    /// Shuffle the rollout before splitting it into mini-batches (as the paper's code does).
    pub shuffle: bool,
    /// Seed of the shuffling generator; its state is saved in checkpoints.
    pub seed: u64,
    /// Compute the policy's entropy for the metrics (costs a pass over the vocabulary).
    pub entropy_metric: bool,
    /// The temperature the rollouts were sampled at. π_θ, π_old and the reference are scored
    /// from logits / temperature, so that ρ and the objective refer to the distribution the
    /// tokens were drawn from (top-p and top-k truncation are not modelled, as in TRL and verl).
    pub temperature: f64,
}

impl Default for TrainConfig {
    /// The experiment file's defaults.
    fn default() -> Self {
        let update = UpdateParams::default();
        TrainConfig {
            objective: ObjectiveConfig::default(),
            optimizer: AdamConfig::default(),
            mini_batch: update.mini_batch as usize,
            micro_batch: update.micro_batch as usize,
            shuffle: true,
            seed: DEFAULT_SEED,
            entropy_metric: true,
            temperature: RolloutParams::default().temperature,
        }
    }
}

/// The trainer of an `update` node: its run's update parameters, the rollouts' temperature and
/// response cap, the run's seed and step count.
impl From<&UpdateNodeParams> for TrainConfig {
    fn from(p: &UpdateNodeParams) -> Self {
        TrainConfig {
            objective: ObjectiveConfig::new(&p.update, p.rollout.max_response_tokens),
            optimizer: AdamConfig::new(&p.update, p.schedule_steps),
            mini_batch: p.update.mini_batch as usize,
            micro_batch: p.update.micro_batch as usize,
            shuffle: true,
            seed: p.seed,
            entropy_metric: true,
            // Greedy rollouts (T = 0) carry the plain log-softmax as their log-probs (the
            // engine's convention): score them at T = 1.
            temperature: if p.rollout.temperature == 0.0 {
                1.0
            } else {
                p.rollout.temperature
            },
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.objective.validate()?;
        self.optimizer.validate()?;
        if self.mini_batch == 0 || self.micro_batch == 0 {
            return Err(Error::Config(format!(
                "mini_batch and micro_batch must be at least 1, got {} and {}",
                self.mini_batch, self.micro_batch
            )));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::Config(format!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// A scored rollout: for each prompt, its samples with their rewards.
#[derive(Clone, Debug, Default)]
pub struct Rollout {
    pub groups: Vec<RolloutGroup>,
}

#[derive(Clone, Debug)]
pub struct RolloutGroup {
    /// Prompt token ids (chat template applied).
    pub prompt: Vec<u32>,
    pub samples: Vec<RolloutSample>,
}

#[derive(Clone, Debug)]
pub struct RolloutSample {
    /// Completion token ids, stop token included when the sampler emitted one.
    pub completion: Vec<u32>,
    pub reward: f64,
    /// log π_old per completion token. When absent the trainer computes them with the policy
    /// before the first update, as the paper's code does (sampler log-probs differ slightly).
    pub old_logprobs: Option<Vec<f32>>,
    /// Decoded completion, for the code-reasoning metric.
    pub text: Option<String>,
}

/// What one step did, with the quantities the paper plots. Token-level figures are means over
/// all response tokens of the step; `loss` and `grad_norm` are means over its updates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Steps completed, this one included (the first step is 1).
    pub step: u64,
    pub rollouts: usize,
    pub updates: usize,
    pub tokens: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Share of groups whose rewards are all equal (zero advantage, no signal).
    pub zero_advantage_groups: f64,
    pub loss: f64,
    pub clip_fraction_low: f64,
    pub clip_fraction_high: f64,
    /// Mean k3 estimate of KL(π_old‖π) while updating.
    pub approx_kl: f64,
    /// Mean KL estimate to the reference model, when one is used.
    pub ref_kl: Option<f64>,
    pub entropy: Option<f64>,
    /// Global gradient norm before clipping: mean and max over the updates.
    pub grad_norm: f64,
    pub grad_norm_max: f64,
    /// Learning rate of the step's updates (one rate per GRPO step).
    pub lr: f64,
    /// Mean completion length in tokens.
    pub response_length: f64,
    /// Share of completions whose text contains "python" (case-insensitive), the paper's
    /// code-reasoning frequency; `None` unless every sample has a text.
    pub code_reasoning: Option<f64>,
}

/// Where a step's time went, when asked for ([`Trainer::set_timing`]): each phase ends with a
/// device synchronisation, so that GPU work is charged to the phase that launched it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepTimings {
    /// π_old and reference log-probs (no gradient).
    pub scoring_s: f64,
    /// Training forward passes and the objective.
    pub forward_s: f64,
    /// Backward passes and gradient accumulation.
    pub backward_s: f64,
    /// Gradient norms and Adam.
    pub optimizer_s: f64,
}

/// Runs GRPO steps on a policy and owns the optimizer and shuffling state.
pub struct Trainer {
    pub(crate) cfg: TrainConfig,
    pub(crate) names: Vec<String>,
    pub(crate) vars: Vec<Var>,
    pub(crate) optimizer: Adam,
    pub(crate) rng: Rng,
    pub(crate) step: u64,
    timings: Option<StepTimings>,
    /// The data-parallel group this trainer is one worker of ([`Solo`] when alone).
    collective: Box<dyn Collective>,
}

/// Adds the time since the last mark to a phase, synchronising the device first.
struct PhaseClock {
    device: Option<Device>,
    last: std::time::Instant,
}

impl PhaseClock {
    fn new(device: Option<Device>) -> Result<Self> {
        if let Some(d) = &device {
            d.synchronize()?;
        }
        Ok(Self {
            device,
            last: std::time::Instant::now(),
        })
    }

    fn charge(&mut self, phase: &mut f64) -> Result<()> {
        if let Some(d) = &self.device {
            d.synchronize()?;
            let now = std::time::Instant::now();
            *phase += (now - self.last).as_secs_f64();
            self.last = now;
        }
        Ok(())
    }
}

/// One sample, flattened out of its group.
struct Item<'a> {
    prompt: &'a [u32],
    completion: &'a [u32],
    advantage: f32,
    old: Option<&'a [f32]>,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, policy: &dyn Policy) -> Result<Self> {
        Self::data_parallel(cfg, policy, Box::new(Solo))
    }

    /// One worker of a data-parallel update: each of the group's workers holds the same
    /// weights, trains on its share of every mini-batch's micro-batches (micro-batch j goes to
    /// worker j mod world size), and the group sums the gradients before every update, so each
    /// worker applies the update one worker would on the whole batch. Every worker must be built
    /// with the same configuration and weights, and be given the same rollouts.
    pub fn data_parallel(
        cfg: TrainConfig,
        policy: &dyn Policy,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (names, vars): (Vec<String>, Vec<Var>) = policy.named_vars().into_iter().unzip();
        if vars.is_empty() {
            return Err(Error::Config(
                "the policy has no trainable weights (a quantised model cannot be trained; \
                 load it dequantised)"
                    .into(),
            ));
        }
        let optimizer = Adam::new(cfg.optimizer.clone(), &vars)?;
        let rng = Rng::new(cfg.seed);
        Ok(Self {
            cfg,
            names,
            vars,
            optimizer,
            rng,
            step: 0,
            timings: None,
            collective,
        })
    }

    /// Times each step's phases (at the cost of a device synchronisation between them).
    pub fn set_timing(&mut self, on: bool) {
        self.timings = on.then(StepTimings::default);
    }

    /// The phases of the last step, when timing is on.
    pub fn last_timings(&self) -> Option<&StepTimings> {
        self.timings.as_ref()
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Optimizer updates applied.
    pub fn updates_done(&self) -> u64 {
        self.optimizer.updates()
    }

    /// One GRPO step. `reference` is needed when `kl_coef > 0`.
    ///
    /// On a NaN/Inf loss or gradient the step stops with [`Error::NonFinite`] before the
    /// update that would have used it; updates of earlier mini-batches of the same step stay
    /// applied, so recover by resuming from the last checkpoint.
    pub fn step(
        &mut self,
        policy: &dyn Policy,
        reference: Option<&dyn Policy>,
        rollout: &Rollout,
    ) -> Result<StepMetrics> {
        let temperature = self.cfg.temperature;
        let policy = Tempered::new(policy, temperature);
        let reference = reference.map(|r| Tempered::new(r, temperature));
        let reference = reference.as_ref().map(|r| r as &dyn Policy);
        if self.collective.world_size() > 1 {
            // A data-parallel worker blocks inside its step until the others reach the same
            // sum; on a pool thread it would hold that thread from the others' kernels (and
            // more workers than pool threads would never meet), so it stays on its own thread.
            return self.step_on_this_thread(&policy, reference, rollout);
        }
        // Forward, backward and the optimizer are thousands of small parallel ops.
        spur_lm::on_compute_pool(|| self.step_on_this_thread(&policy, reference, rollout))
    }

    fn step_on_this_thread(
        &mut self,
        policy: &dyn Policy,
        reference: Option<&dyn Policy>,
        rollout: &Rollout,
    ) -> Result<StepMetrics> {
        let step = self.step + 1;
        self.check_policy(policy)?;
        let objective = &self.cfg.objective;
        let need_ref = objective.kl_coef > 0.0;
        if need_ref && reference.is_none() {
            return Err(Error::Config(
                "objective.kl_coef > 0 needs a reference model".into(),
            ));
        }
        let (items, group_stats) = flatten(rollout, objective)?;
        let n = items.len();
        let micro = self.cfg.micro_batch;
        let mut timings = StepTimings::default();
        let mut clock = PhaseClock::new(self.timings.is_some().then(|| policy.device().clone()))?;

        // Every worker shuffles alike, so all agree on the mini- and micro-batches; micro-batch
        // j of each mini-batch is trained by worker j mod world_size.
        let mut order: Vec<usize> = (0..n).collect();
        if self.cfg.shuffle {
            self.rng.shuffle(&mut order);
        }
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let mini_batch = self.cfg.mini_batch;
        let mine = |position: usize| (position % mini_batch) / micro % world == rank;

        // π_old: the sampler's log-probs when given, else this policy's before any update. The
        // first mini-batch trains on weights that are still π_old, so its own forward pass gives
        // them (detached; ρ ≡ 1 exactly); only later mini-batches need a scoring pass first.
        let mut old: Vec<Option<Vec<f32>>> =
            items.iter().map(|i| i.old.map(<[f32]>::to_vec)).collect();
        let first_mini = order.len().min(mini_batch);
        let missing: Vec<usize> = (first_mini..n)
            .filter(|&p| mine(p) && old[order[p]].is_none())
            .map(|p| order[p])
            .collect();
        for (i, lp) in missing.iter().zip(score(policy, &items, &missing, micro)?) {
            old[*i] = Some(lp);
        }
        let mut reference_logprobs: Vec<Option<Vec<f32>>> = vec![None; n];
        if let Some(r) = reference.filter(|_| need_ref) {
            let own: Vec<usize> = (0..n).filter(|&p| mine(p)).map(|p| order[p]).collect();
            for (i, lp) in own.iter().zip(score(r, &items, &own, micro)?) {
                reference_logprobs[*i] = Some(lp);
            }
        }
        clock.charge(&mut timings.scoring_s)?;
        let entropy = match (objective.entropy_coef > 0.0, self.cfg.entropy_metric) {
            (true, _) => Entropy::Trainable,
            (false, true) => Entropy::Metric,
            (false, false) => Entropy::Skip,
        };
        let batch = StepBatch {
            policy,
            items: &items,
            old: &old,
            reference: need_ref.then_some(&reference_logprobs[..]),
            entropy,
        };

        let mut stats = TokenStats::default();
        let mut losses = Vec::new();
        let mut norms = Vec::new();
        let lr = self.cfg.optimizer.lr_at(self.step);
        for (mini_index, mini) in order.chunks(mini_batch).enumerate() {
            let shape = MiniBatchShape {
                micro_batches: mini.len().div_ceil(micro),
                sequences: mini.len(),
            };
            let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
            let mut mini_stats = TokenStats::default();
            let mut mini_loss = 0.0;
            let mut failure = None;
            for (micro_index, chunk) in mini.chunks(micro).enumerate() {
                if micro_index % world != rank {
                    continue;
                }
                let place = (step, mini_index, micro_index);
                match self.micro_batch(
                    &batch,
                    chunk,
                    shape,
                    place,
                    &mut grads,
                    &mut clock,
                    &mut timings,
                ) {
                    Ok((loss, out)) => {
                        mini_loss += loss;
                        mini_stats.add(&out);
                    }
                    Err(e @ Error::NonFinite { .. }) => {
                        failure = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            // The workers sum their losses, statistics and failures before their gradients,
            // so that all of them stop together when one of them saw a non-finite value.
            let mut sums = sums_of(mini_loss, &mini_stats, failure.is_some());
            self.collective.all_reduce_sum_f64(&mut sums)?;
            if let Some(failure) = failure {
                return Err(failure);
            }
            let (mini_loss, mini_stats, failed) = unsums(&sums);
            if failed {
                return Err(Error::Collective(format!(
                    "step {step}, mini-batch {mini_index}: another worker's loss or gradient is \
                     not finite; that update was not applied"
                )));
            }
            let mut grads = grads
                .into_iter()
                .zip(&self.vars)
                .map(|(g, var)| match g {
                    Some(g) => Ok(g),
                    None => Ok(var.zeros_like()?),
                })
                .collect::<Result<Vec<_>>>()?;
            self.collective.all_reduce_sum(&mut grads)?;
            let norm = grad_norm(&grads)?;
            if !norm.is_finite() {
                let last = mini.len().div_ceil(micro) - 1;
                return Err(Error::NonFinite {
                    step,
                    mini_batch: mini_index,
                    micro_batch: last,
                    what: "accumulated gradient",
                    value: norm,
                });
            }
            self.optimizer.step(&self.vars, &grads, norm, lr)?;
            stats.add(&mini_stats);
            losses.push(mini_loss);
            norms.push(norm);
            clock.charge(&mut timings.optimizer_s)?;
        }
        self.step = step;
        if self.timings.is_some() {
            self.timings = Some(timings);
        }

        let tokens = stats.tokens.max(1.0);
        let texts: Option<Vec<&str>> = rollout
            .groups
            .iter()
            .flat_map(|g| &g.samples)
            .map(|s| s.text.as_deref())
            .collect();
        Ok(StepMetrics {
            step,
            rollouts: n,
            updates: losses.len(),
            tokens: stats.tokens as usize,
            reward_mean: group_stats.reward_mean,
            reward_std: group_stats.reward_std,
            zero_advantage_groups: group_stats.zero_advantage_groups,
            loss: mean(&losses),
            clip_fraction_low: stats.clipped_low / tokens,
            clip_fraction_high: stats.clipped_high / tokens,
            approx_kl: stats.approx_kl / tokens,
            ref_kl: need_ref.then(|| stats.ref_kl / tokens),
            entropy: (entropy != Entropy::Skip).then(|| stats.entropy / tokens),
            grad_norm: mean(&norms),
            grad_norm_max: norms.iter().cloned().fold(0.0, f64::max),
            lr,
            response_length: items.iter().map(|i| i.completion.len()).sum::<usize>() as f64
                / n as f64,
            code_reasoning: texts.map(|t| {
                let hits = t
                    .iter()
                    .filter(|s| s.to_lowercase().contains("python"))
                    .count();
                hits as f64 / t.len() as f64
            }),
        })
    }

    /// Forward and backward of one micro-batch (`chunk`, item indices); adds its gradients to
    /// `grads` and returns its loss share and token statistics.
    #[allow(clippy::too_many_arguments)]
    fn micro_batch(
        &self,
        batch: &StepBatch,
        chunk: &[usize],
        shape: MiniBatchShape,
        (step, mini_batch, micro_batch): (u64, usize, usize),
        grads: &mut [Option<Tensor>],
        clock: &mut PhaseClock,
        timings: &mut StepTimings,
    ) -> Result<(f64, TokenStats)> {
        let non_finite = |what, value| Error::NonFinite {
            step,
            mini_batch,
            micro_batch,
            what,
            value,
        };
        let device = &batch.policy.device();
        let items = batch.items;
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|&i| (items[i].prompt, items[i].completion))
            .collect();
        let (scored, backprop) = training_logprobs(batch.policy, &seqs, batch.entropy)?;
        let width = scored.logprobs.dim(1)?;
        let old_t = old_logprobs(chunk, batch.old, &scored.logprobs, device)?;
        let ref_t = match batch.reference {
            Some(r) => {
                let rows = chunk.iter().map(|&i| r[i].as_deref().unwrap_or_default());
                Some(padded(rows, width, device)?)
            }
            None => None,
        };
        let adv: Vec<f32> = chunk.iter().map(|&i| items[i].advantage).collect();
        let adv = Tensor::from_vec(adv, chunk.len(), device)?;
        let out = micro_batch_objective(
            &self.cfg.objective,
            &MicroBatch {
                logprobs: &scored.logprobs,
                old_logprobs: &old_t,
                ref_logprobs: ref_t.as_ref(),
                entropy: scored.entropy.as_ref(),
                mask: &scored.mask,
                advantages: &adv,
            },
            shape,
        )?;
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            return Err(non_finite("loss", loss));
        }
        clock.charge(&mut timings.forward_s)?;
        let mut store = backprop.backward(&out.loss)?;
        let mut sq = 0.0;
        for (acc, var) in grads.iter_mut().zip(&self.vars) {
            // Detached: a gradient computed from tracked tensors would keep this micro-batch's
            // whole graph alive in the accumulator (and in Adam's moments) otherwise.
            if let Some(g) = store.remove(var.as_tensor()).map(|g| g.detach()) {
                sq += sq_sum(&g)?;
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        if !sq.is_finite() {
            return Err(non_finite("gradient", sq.sqrt()));
        }
        clock.charge(&mut timings.backward_s)?;
        Ok((loss, out.stats))
    }

    pub(crate) fn check_policy(&self, policy: &dyn Policy) -> Result<()> {
        let vars = policy.named_vars();
        let same = vars.len() == self.vars.len()
            && vars
                .iter()
                .zip(self.names.iter().zip(&self.vars))
                .all(|((name, var), (n, v))| name == n && var.as_tensor().id() == v.id());
        if !same {
            return Err(Error::Config(
                "the policy's weights are not the ones this trainer was built for".into(),
            ));
        }
        Ok(())
    }
}

/// What every micro-batch of a step reads.
struct StepBatch<'a> {
    policy: &'a dyn Policy,
    items: &'a [Item<'a>],
    old: &'a [Option<Vec<f32>>],
    /// Reference log-probs, for the items this worker trains on, when the objective has a KL term.
    reference: Option<&'a [Option<Vec<f32>>]>,
    entropy: Entropy,
}

/// A mini-batch's loss, token statistics and failure flag as one buffer to sum over workers.
fn sums_of(loss: f64, stats: &TokenStats, failed: bool) -> [f64; 8] {
    [
        loss,
        stats.tokens,
        stats.clipped_low,
        stats.clipped_high,
        stats.approx_kl,
        stats.ref_kl,
        stats.entropy,
        f64::from(u8::from(failed)),
    ]
}

fn unsums(s: &[f64; 8]) -> (f64, TokenStats, bool) {
    let stats = TokenStats {
        tokens: s[1],
        clipped_low: s[2],
        clipped_high: s[3],
        approx_kl: s[4],
        ref_kl: s[5],
        entropy: s[6],
    };
    (s[0], stats, s[7] > 0.0)
}

struct GroupStats {
    reward_mean: f64,
    reward_std: f64,
    zero_advantage_groups: f64,
}

fn flatten<'a>(
    rollout: &'a Rollout,
    objective: &ObjectiveConfig,
) -> Result<(Vec<Item<'a>>, GroupStats)> {
    if rollout.groups.is_empty() {
        return Err(Error::Rollout("the rollout has no groups".into()));
    }
    let mut items = Vec::new();
    let mut rewards_all = Vec::new();
    let mut zero_groups = 0;
    for (g, group) in rollout.groups.iter().enumerate() {
        if group.prompt.is_empty() || group.samples.is_empty() {
            return Err(Error::Rollout(format!(
                "group {g} has an empty prompt or no samples"
            )));
        }
        let rewards: Vec<f64> = group.samples.iter().map(|s| s.reward).collect();
        for (s, sample) in group.samples.iter().enumerate() {
            if !sample.reward.is_finite() {
                return Err(Error::Rollout(format!(
                    "group {g} sample {s}: reward {} is not finite",
                    sample.reward
                )));
            }
            if sample.completion.is_empty() {
                return Err(Error::Rollout(format!(
                    "group {g} sample {s}: empty completion"
                )));
            }
            if let Some(old) = &sample.old_logprobs {
                if old.len() != sample.completion.len() {
                    return Err(Error::Rollout(format!(
                        "group {g} sample {s}: {} old log-probs for {} completion tokens",
                        old.len(),
                        sample.completion.len()
                    )));
                }
            }
        }
        let advantages = group_advantages(&rewards, objective.advantage);
        if advantages.iter().all(|&a| a == 0.0) {
            zero_groups += 1;
        }
        for (sample, adv) in group.samples.iter().zip(advantages) {
            items.push(Item {
                prompt: &group.prompt,
                completion: &sample.completion,
                advantage: adv as f32,
                old: sample.old_logprobs.as_deref(),
            });
        }
        rewards_all.extend(rewards);
    }
    let stats = GroupStats {
        reward_mean: mean(&rewards_all),
        reward_std: sample_std(&rewards_all),
        zero_advantage_groups: zero_groups as f64 / rollout.groups.len() as f64,
    };
    Ok((items, stats))
}

/// Log-probs of the completions of `items[which]` under `policy`, without keeping a graph.
fn score(
    policy: &dyn Policy,
    items: &[Item],
    which: &[usize],
    micro: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(which.len());
    for chunk in which.chunks(micro) {
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|&i| (items[i].prompt, items[i].completion))
            .collect();
        let rows = scoring_logprobs(policy, &seqs)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (&i, row) in chunk.iter().zip(rows) {
            out.push(row[..items[i].completion.len()].to_vec());
        }
    }
    Ok(out)
}

/// π_old for the rows of `chunk`, `[rows, width]` like `current`: the given or scored
/// log-probs, and for a row without them (first mini-batch, weights not yet updated) the
/// current log-probs, detached.
fn old_logprobs(
    chunk: &[usize],
    old: &[Option<Vec<f32>>],
    current: &Tensor,
    device: &Device,
) -> Result<Tensor> {
    let width = current.dim(1)?;
    if chunk.iter().all(|&i| old[i].is_some()) {
        let rows = chunk.iter().map(|&i| old[i].as_deref().unwrap_or_default());
        return padded(rows, width, device);
    }
    let current = current.detach();
    let rows = chunk
        .iter()
        .enumerate()
        .map(|(row, &i)| match &old[i] {
            Some(o) => Ok(padded(std::iter::once(&o[..]), width, device)?
                .squeeze(0)?
                .to_dtype(current.dtype())?),
            None => Ok(current.get(row)?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Rows right-padded with zeros to `width`, as an f32 `[rows, width]` tensor.
fn padded<'a>(
    rows: impl ExactSizeIterator<Item = &'a [f32]>,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let n = rows.len();
    let mut data = Vec::with_capacity(n * width);
    for row in rows {
        data.extend_from_slice(row);
        data.resize(data.len() + width - row.len(), 0.0);
    }
    Ok(Tensor::from_vec(data, (n, width), device)?)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}
