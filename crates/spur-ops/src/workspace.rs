//! Loading an experiment, its plan and the cache: the steps every command shares.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use spur_plan::{Hash, Plan};
use spur_spec::{did_you_mean, one_of, scalar_text, Experiment};
use spur_stages::Registry;
use spur_store::Store;

pub struct Loaded {
    pub experiment: Experiment,
    pub plan: Plan,
    pub store: Store,
    pub registry: Registry,
}

pub fn open_store(cache: &Path) -> Result<Store> {
    Store::open(cache).with_context(|| format!("cannot open the cache at {}", cache.display()))
}

/// The stages this build can run.
pub fn registry() -> Registry {
    Registry::with_builtin()
}

pub fn load(file: &Path, cache: &Path) -> Result<Loaded> {
    let experiment = spur_spec::load(file)?;
    let store = open_store(cache)?;
    let registry = registry();
    let plan = plan(&experiment, &store, &registry)?;
    Ok(Loaded {
        experiment,
        plan,
        store,
        registry,
    })
}

pub fn plan(experiment: &Experiment, store: &Store, registry: &Registry) -> Result<Plan> {
    let versions = |k| registry.version(k);
    let hasher = |p: &Path| store.content_hash(p);
    spur_plan::plan(experiment, &versions, &hasher)
        .with_context(|| format!("cannot plan {}", experiment.path.display()))
}

/// Indices of the runs matching `--only key=value[|value],…` (all without it).
pub fn select_runs(exp: &Experiment, only: Option<&str>) -> Result<Vec<usize>> {
    let Some(only) = only else {
        return Ok((0..exp.runs.len()).collect());
    };
    let axes: Vec<&str> = exp
        .runs
        .iter()
        .flat_map(|r| r.cell.keys().map(String::as_str))
        .collect::<indexmap::IndexSet<_>>()
        .into_iter()
        .collect();
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for part in only.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, values)) = part.split_once('=') else {
            bail!("--only: `{part}` is not `axis=value`; e.g. --only reward=random,seed=1");
        };
        if !axes.contains(&key) {
            let hint = did_you_mean(key, axes.iter().copied())
                .unwrap_or_else(|| one_of(axes.iter().copied()));
            bail!(
                "--only: `{key}` is not a grid axis of {} ({hint})",
                exp.path.display()
            );
        }
        let known: HashSet<String> = exp
            .runs
            .iter()
            .filter_map(|r| r.cell.get(key))
            .map(scalar_text)
            .collect();
        for v in values.split('|') {
            if !known.contains(v) {
                let mut k: Vec<&str> = known.iter().map(String::as_str).collect();
                k.sort();
                let hint =
                    did_you_mean(v, k.iter().copied()).unwrap_or_else(|| one_of(k.iter().copied()));
                bail!("--only: axis `{key}` has no value `{v}` ({hint})");
            }
        }
        filters.push((
            key.to_string(),
            values.split('|').map(str::to_string).collect(),
        ));
    }
    Ok(exp
        .runs
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            filters
                .iter()
                .all(|(k, vs)| r.cell.get(k).is_some_and(|v| vs.contains(&scalar_text(v))))
        })
        .map(|(i, _)| i)
        .collect())
}

/// Node indices used by the given runs, deduplicated, in plan order.
pub fn nodes_of(plan: &Plan, runs: &[usize]) -> Vec<u32> {
    let mut seen = vec![false; plan.nodes.len()];
    for &r in runs {
        for &n in &plan.runs[r].nodes {
            seen[n as usize] = true;
        }
    }
    (0..plan.nodes.len() as u32)
        .filter(|&n| seen[n as usize])
        .collect()
}

pub fn cached(store: &Store) -> Result<HashSet<Hash>> {
    store.cached_ids().context("cannot list the cache")
}
