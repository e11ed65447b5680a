//! Each cell resolved to a [`Run`]: defaults ← axis values ← matching overrides, `${…}`
//! substituted, typed as [`RunParams`], range-checked, its names checked, its reward resolved.
//! Every error points where the offending value was written (the last writer of its path).

use std::collections::BTreeSet;

use indexmap::IndexMap;
use serde_json::Value;
use spur_core::node_params::RewardSpec;

use super::cells::{self, Cell};
use super::tree::{
    collect_leaves, contains_ref, find_reference, get_path, merge, relocate, set_path, value_source,
};
use super::{Scope, Uses};
use crate::schema::RewardDef;
use crate::subst::substitute_tree;
use crate::validate::check_name;
use crate::{did_you_mean, Ctx, Run, RunParams, SpecError};

/// Errors of the cells, each reported once however many cells share it.
struct Reporter<'e> {
    seen: BTreeSet<(String, String)>,
    errors: &'e mut Vec<SpecError>,
}

impl Reporter<'_> {
    fn report(&mut self, e: SpecError) {
        if self.seen.insert((e.key.clone(), e.message.clone())) {
            self.errors.push(e);
        }
    }

    /// Reports `e` unless an earlier phase said the same (a fragment typed on its own, a
    /// name checked where it is written).
    fn report_new(&mut self, e: SpecError) {
        if !self.errors.iter().any(|old| old.message == e.message) {
            self.report(e);
        }
    }
}

/// The runs of `cells`; a duplicate cell or one that does not resolve is reported and left out.
pub(super) fn runs(
    scope: &Scope,
    cells: Vec<Cell>,
    defaults: &Value,
    overrides: &[(Value, Value)],
    param_axes: &BTreeSet<String>,
    errors: &mut Vec<SpecError>,
) -> Vec<Run> {
    let mut r = Reporter {
        seen: BTreeSet::new(),
        errors,
    };
    let mut seen_cells = BTreeSet::new();
    let mut runs = Vec::with_capacity(cells.len());
    for cell in cells {
        let canonical = serde_json::to_string(&cell.values).unwrap_or_default();
        if !seen_cells.insert(canonical) {
            let key = cell
                .keys
                .values()
                .last()
                .cloned()
                .unwrap_or_else(|| "include".into());
            r.report(
                scope
                    .ctx
                    .err(
                        &key,
                        false,
                        "duplicate cell: this combination of axis values already exists",
                    )
                    .with_hint(Some("remove the repeated value or `include` entry".into())),
            );
            continue;
        }
        runs.extend(resolve(
            scope, cell, defaults, overrides, param_axes, &mut r,
        ));
    }
    runs
}

fn resolve(
    scope: &Scope,
    cell: Cell,
    defaults: &Value,
    overrides: &[(Value, Value)],
    param_axes: &BTreeSet<String>,
    r: &mut Reporter,
) -> Option<Run> {
    let (ctx, file) = (scope.ctx, scope.file);
    // Provenance of each parameter path, for messages: the last writer wins.
    let mut written: Vec<(String, String)> = Vec::new(); // (param prefix, file key)
    let mut tree = defaults.clone();
    for (name, v) in &cell.values {
        if param_axes.contains(name) {
            set_path(&mut tree, name, v.clone());
            written.push((name.clone(), cell.keys[name].clone()));
        }
    }
    for (j, (matches, set)) in overrides.iter().enumerate() {
        if cells::matches(&cell.values, matches) {
            merge(&mut tree, set);
            collect_leaves(set, "", &mut |p| {
                written.push((p.clone(), format!("overrides[{j}].set.{p}")))
            });
        }
    }
    let where_is = |path: &str| -> String {
        written
            .iter()
            .rev()
            .find(|(p, _)| path == p || path.starts_with(&format!("{p}.")))
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| format!("defaults.{path}"))
    };
    let unresolved = tree.clone();
    let mut lookup = |name: &str| -> Option<Value> {
        cell.values.get(name).cloned().or_else(|| {
            get_path(&unresolved, name)
                .filter(|v| !contains_ref(v))
                .cloned()
        })
    };
    if let Err(name) = substitute_tree(&mut tree, &mut lookup) {
        let key = find_reference(&unresolved, &name)
            .map(|p| where_is(&p))
            .unwrap_or_else(|| "defaults".into());
        r.report(
            ctx.err(
                &key,
                false,
                format!("`${{{name}}}` names no grid axis or parameter"),
            )
            .with_hint(
                did_you_mean(&name, scope.axis_names.iter().copied()).or(Some(format!(
                    "axes: {}",
                    crate::one_of(scope.axis_names.iter().copied())
                ))),
            ),
        );
        return None;
    }
    let params: RunParams = match serde_path_to_error::deserialize(&tree) {
        Ok(p) => p,
        Err(e) => {
            let path = e.path().to_string();
            let mut err = ctx.fragment_error("", e);
            err = relocate(ctx, err, &where_is(&path));
            // Fragments were typed on their own first; don't repeat those.
            r.report_new(err);
            return None;
        }
    };
    for (path, msg) in params.check_ranges() {
        let key = value_source(&unresolved, &path, &cell.keys).unwrap_or_else(|| where_is(&path));
        r.report(ctx.err(&key, false, format!("`{path}` {msg}")));
    }
    check_required(scope, &params, &cell, &where_is, r);
    // Names that came through ${...} are checked now that they are known.
    for (field, what, defined) in [
        ("model", "model", file.models.keys().collect::<Vec<_>>()),
        ("reward", "reward", file.rewards.keys().collect()),
        ("train_data", "dataset", file.datasets.keys().collect()),
    ] {
        if let (Some(Value::String(s)), true) = (tree.get(field), scope.uses.model(field)) {
            if !defined.contains(&s) {
                let mut errs = Vec::new();
                check_name(
                    ctx,
                    &where_is(field),
                    s,
                    what,
                    defined.into_iter(),
                    &mut errs,
                );
                // Literal names were reported where they are written.
                errs.into_iter().for_each(|e| r.report_new(e));
            }
        }
    }
    if let (Some(d), true) = (&params.probe.dataset, scope.uses.trains) {
        if !file.datasets.contains_key(d) {
            let mut errs = Vec::new();
            check_name(
                ctx,
                &where_is("probe.dataset"),
                d,
                "dataset",
                file.datasets.keys(),
                &mut errs,
            );
            errs.into_iter().for_each(|e| r.report_new(e));
        }
    }
    let reward_name = params.reward.clone().filter(|_| scope.uses.trains);
    let mut run = Run {
        cell: cell.values,
        params,
        tree,
        reward: None,
    };
    if let Some(def) = reward_name.as_ref().and_then(|n| file.rewards.get(n)) {
        let name = reward_name.as_deref().unwrap_or_default();
        run.reward = resolve_reward(ctx, name, def, &run)
            .map_err(|e| r.report(e))
            .ok();
    }
    Some(run)
}

/// The names a run must have (`model`, `train_data`, `reward`) and its evaluations' datasets.
fn check_required(
    scope: &Scope,
    params: &RunParams,
    cell: &Cell,
    where_is: &dyn Fn(&str) -> String,
    r: &mut Reporter,
) {
    let ctx = scope.ctx;
    let need = |ok: bool, what: &str, r: &mut Reporter| {
        if !ok {
            r.report(
                ctx.err(
                    "defaults",
                    true,
                    format!("no `{what}` is set for run {}", label(&cell.values)),
                )
                .with_hint(Some(format!(
                    "set `defaults.{what}` or add a `{what}` grid axis"
                ))),
            );
        }
    };
    let Uses { trains, evaluates } = scope.uses;
    if trains || evaluates {
        need(params.model.is_some(), "model", r);
    }
    if trains {
        need(params.train_data.is_some(), "train_data", r);
        need(params.reward.is_some(), "reward", r);
    }
    if evaluates {
        if params.evals.is_empty() {
            r.report(
                ctx.err(
                    "defaults",
                    true,
                    "the pipeline has `eval` but no evaluation is defined",
                )
                .with_hint(Some(
                    "add `defaults.evals.math500: {dataset: math500}`".into(),
                )),
            );
        }
        for (name, e) in &params.evals {
            if e.dataset.is_none() {
                r.report(ctx.err(
                    &where_is(&format!("evals.{name}")),
                    true,
                    format!("evaluation `{name}` has no `dataset`"),
                ));
            }
        }
    }
}

/// `axis=value,…` of a cell, for messages.
fn label(cell: &IndexMap<String, Value>) -> String {
    if cell.is_empty() {
        return "(defaults)".into();
    }
    cell.iter()
        .map(|(k, v)| format!("{k}={}", crate::scalar_text(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The run's reward, typed: `${…}` in `gamma` resolved to a number in [0, 1], those in
/// `command` checked (the command itself stays as written).
fn resolve_reward(
    ctx: &Ctx,
    name: &str,
    def: &RewardDef,
    run: &Run,
) -> Result<RewardSpec, SpecError> {
    let key = format!("rewards.{name}");
    let mut lookup = |n: &str| run.lookup(n);
    let gamma = match &def.gamma {
        None => None,
        Some(written) => {
            let value = match written {
                serde_yaml::Value::String(s) => {
                    crate::substitute_str(s, &mut lookup).map_err(|n| {
                        ctx.err(
                            &format!("{key}.gamma"),
                            false,
                            format!("`${{{n}}}` names no grid axis or parameter"),
                        )
                    })?
                }
                other => crate::to_json(other),
            };
            let g = match &value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) if written.is_string() => s.parse().ok(),
                _ => None,
            };
            // A written number out of range is the file's own error, reported where it is
            // checked with the other reward keys.
            match g {
                Some(g) if (0.0..=1.0).contains(&g) || !written.is_string() => Some(g),
                _ => {
                    return Err(ctx.err(
                        &format!("{key}.gamma"),
                        false,
                        format!("gamma must be a number in [0, 1], got {value}"),
                    ))
                }
            }
        }
    };
    if let Some(c) = &def.command {
        // The command stays as written: the reward stage passes each value to the shell
        // through the environment, never as script text (see the plan's reward `vars`).
        if let Some(n) = crate::references(c)
            .into_iter()
            .find(|n| lookup(n).is_none())
        {
            return Err(ctx.err(
                &format!("{key}.command"),
                false,
                format!("`${{{n}}}` names no grid axis or parameter"),
            ));
        }
    }
    Ok(RewardSpec {
        kind: def.kind.clone(),
        gamma,
        command: def.command.clone(),
        style: def.style.clone(),
        grader: def.grader.clone(),
        label_model: def.label_model.clone(),
        label_samples: def.label_samples,
        example: def.example.clone(),
    })
}
