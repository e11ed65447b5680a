//! Peak memory of model nodes before they run: `spur plan --json` prints each estimate, and
//! `spur run` refuses, before any work, a node that would not fit the device it would get.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use anyhow::{bail, Result};
use spur_lm::{Device, ModelConfig, Tokenizer};
use spur_plan::Plan;
use spur_spec::Experiment;
use spur_stages::memory::{self, NodeMemory, PromptSet};

/// The estimates of one plan's model nodes, reading each model's configuration once.
pub struct Estimator<'p> {
    plan: &'p Plan,
    device: Device,
    /// Fetch what a model's shapes need (the default model, a hub model's config.json) rather
    /// than report no estimate: `spur run` fetches them anyway, `spur plan` never does.
    fetch: bool,
    configs: HashMap<String, Option<ModelConfig>>,
    tokenizers: HashMap<String, Option<Tokenizer>>,
    /// Longest prompt by (model, prompt set) key.
    prompts: HashMap<(String, String), Option<usize>>,
}

impl<'p> Estimator<'p> {
    pub fn new(plan: &'p Plan, device: Device, fetch: bool) -> Self {
        Estimator {
            plan,
            device,
            fetch,
            configs: HashMap::new(),
            tokenizers: HashMap::new(),
            prompts: HashMap::new(),
        }
    }

    /// The model's configuration; `None` (with a warning for unreadable ones) when it cannot
    /// be known.
    fn config(&mut self, node: u32) -> Option<ModelConfig> {
        let ext = memory::model_external(self.plan, node)?;
        let fetch = self.fetch;
        self.configs
            .entry(ext.key.clone())
            .or_insert_with(|| {
                let spec = memory::model_spec(ext)?;
                spur_lm::source::model_config_of(&spec, &spur_lm::default_cache_dir(), fetch)
                    .inspect_err(|e| {
                        tracing::warn!("{}: no memory estimate: {e}", ext.key);
                    })
                    .ok()
                    .flatten()
            })
            .clone()
    }

    /// The longest prompt `node` feeds its model, in its model's tokens; `None` when its
    /// dataset or tokenizer is not on this machine (the estimate then counts the budget).
    fn longest_prompt(&mut self, node: u32) -> Option<usize> {
        let ext = memory::model_external(self.plan, node)?;
        let set = PromptSet::of(self.plan, node)?;
        let key = (ext.key.clone(), set.key());
        if let Some(&known) = self.prompts.get(&key) {
            return known;
        }
        let tokenizer = self
            .tokenizers
            .entry(ext.key.clone())
            .or_insert_with(|| {
                let spec = memory::model_spec(ext)?;
                spur_lm::source::tokenizer_of(&spec, &spur_lm::default_cache_dir())
                    .inspect_err(|e| {
                        tracing::warn!("{}: prompts counted at their budget: {e}", ext.key)
                    })
                    .ok()
                    .flatten()
            })
            .as_ref();
        let longest = tokenizer.and_then(|t| set.longest(t));
        self.prompts.insert(key, longest);
        longest
    }

    /// The estimate of `node`; `None` for nodes without a model or whose model's shapes are
    /// not on this machine yet.
    pub fn node(&mut self, node: u32) -> Option<(NodeMemory, ModelConfig)> {
        let config = self.config(node)?;
        let prompt_tokens = self.longest_prompt(node);
        let m = memory::estimate(self.plan, node, &config, &self.device, prompt_tokens)?;
        Some((m, config))
    }
}

/// The device a local run's model nodes get: the first accelerator in a CUDA build that can
/// open one, else the CPU.
pub fn run_device(devices: &[String]) -> Device {
    if cfg!(feature = "cuda") {
        let ordinal = devices.first().and_then(|d| d.parse::<usize>().ok());
        if let Ok(device) = spur_lm::device(&format!("cuda:{}", ordinal.unwrap_or(0))) {
            return device;
        }
    }
    Device::Cpu
}

/// What a node may use of `device`: `$SPUR_DEVICE_MEMORY` bytes when set (a device shared
/// with other work, or a smaller target than this machine), else all of it.
fn device_memory(device: &Device) -> Result<Option<u64>> {
    match std::env::var("SPUR_DEVICE_MEMORY") {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(bytes) => Ok(Some(bytes)),
            Err(_) => bail!("SPUR_DEVICE_MEMORY is `{text}`; it takes a number of bytes, e.g. 85899345920 for 80 GiB"),
        },
        Err(_) => Ok(spur_lm::memory::capacity(device)),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Fails, naming each node and the settings that would make it fit, when a node of `nodes`
/// needs more than `device` holds. Nodes of one kind and run with one estimate are reported
/// together.
pub fn check_fits(exp: &Experiment, plan: &Plan, nodes: &[u32], device: Device) -> Result<()> {
    let Some(capacity) = device_memory(&device)? else {
        tracing::warn!("cannot read the memory of {device:?}; nodes are not checked against it");
        return Ok(());
    };
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" };
    let mut estimator = Estimator::new(plan, device.clone(), true);
    // Nodes of one kind with one estimate (the steps of a chain, the arms of a grid) are
    // reported together: (kind, estimate) → (runs, steps, text).
    type Group = (BTreeSet<u32>, BTreeSet<u32>, String);
    let mut too_big: Vec<((&str, u64), Group)> = Vec::new();
    let mut refused = 0;
    for &n in nodes {
        let Some((m, config)) = estimator.node(n) else {
            continue;
        };
        if m.estimate.total <= capacity {
            continue;
        }
        refused += 1;
        let node = &plan.nodes[n as usize];
        let key = (node.kind.name(), m.estimate.total);
        if let Some((_, (runs, steps, _))) = too_big.iter_mut().find(|(k, _)| *k == key) {
            runs.extend(node.runs.iter().copied());
            steps.insert(node.step);
            continue;
        }
        let e = &m.estimate;
        let mut text = format!(
            "needs ~{} at its peak (weights {}, gradients {}, optimizer {}, activations {}, KV cache {}, runtime {})",
            gib(e.total),
            gib(e.weights),
            gib(e.gradients),
            gib(e.optimizer),
            gib(e.activations),
            gib(e.kv_cache),
            gib(e.runtime),
        );
        match memory::fitting_settings(&m, &config, &device, capacity) {
            Some((settings, total)) => {
                let _ = write!(
                    text,
                    "\n      it fits with {} (~{})",
                    memory::describe_change(&m.settings, &settings).join(", "),
                    gib(total)
                );
            }
            None => {
                let _ = write!(
                    text,
                    "\n      no setting makes it fit (micro-batch 1, checkpointing, bf16 compute and bf16 moments included): it needs a device with more memory"
                );
            }
        }
        too_big.push((
            key,
            (
                node.runs.iter().copied().collect(),
                BTreeSet::from([node.step]),
                text,
            ),
        ));
    }
    if too_big.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "{refused} model node{} would not fit in the memory of the device {} run on ({device_name}, {}); nothing was run:",
        if refused == 1 { "" } else { "s" },
        if refused == 1 { "it would" } else { "they would" },
        gib(capacity)
    );
    for ((kind, _), (runs, steps, text)) in &too_big {
        let cells: Vec<String> = runs
            .iter()
            .take(3)
            .map(|&r| {
                let cell = &exp.runs[r as usize].cell;
                let vars: Vec<String> = cell
                    .iter()
                    .map(|(k, v)| format!("{k}={}", spur_spec::scalar_text(v)))
                    .collect();
                format!("run {} ({})", plan.runs[r as usize].id, vars.join(", "))
            })
            .collect();
        let more = runs.len().saturating_sub(3);
        let steps = match (steps.first(), steps.last()) {
            (Some(a), Some(b)) if a != b => format!("steps {a}–{b}"),
            (Some(a), _) => format!("step {a}"),
            _ => String::new(),
        };
        let _ = write!(
            message,
            "\n  {kind} ({steps}) of {}{}: {text}",
            cells.join(", "),
            if more > 0 {
                format!(" and {more} more runs")
            } else {
                String::new()
            }
        );
    }
    let _ = write!(
        message,
        "\n  = help: set those keys in {} (under `defaults:`, or per cell as a grid axis or override); or pass --no-memory-check if the estimate is wrong for this device",
        exp.path.display()
    );
    bail!(message)
}
