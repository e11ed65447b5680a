//! Grid expansion, in phases:
//! - [`axes`]: the grid's axes (`zip` groups vary together), which of them are parameters,
//!   and the names the file references;
//! - [`cells`]: their product, minus `exclude`, plus `include`;
//! - [`resolve`]: each cell's parameters, defaults ← axis values ← `overrides`, `${…}`
//!   substituted, typed, range-checked, and its reward resolved.
//!
//! `defaults` and each override are typed on their own first, so an error points at the
//! fragment where it is written rather than at every cell that inherits it.

mod axes;
mod cells;
mod resolve;
mod tree;

use std::collections::BTreeSet;

use serde_json::Value;

use crate::schema::ExperimentFile;
use crate::validate::check_name;
use crate::{did_you_mean, Ctx, Run, SpecError};
use tree::{contains_ref, type_fragment, yaml_to_json};

/// Which named parameters the pipeline reads (command-only experiments may
/// use `model` or `reward` as plain axis values).
#[derive(Clone, Copy)]
struct Uses {
    trains: bool,
    evaluates: bool,
}

impl Uses {
    fn model(self, field: &str) -> bool {
        match field {
            "model" => self.trains || self.evaluates,
            _ => self.trains,
        }
    }
}

/// Check names (model, dataset, reward) written in a parameter fragment.
fn check_fragment_names(
    ctx: &Ctx,
    file: &ExperimentFile,
    uses: Uses,
    prefix: &str,
    tree: &Value,
    errors: &mut Vec<SpecError>,
) {
    let at = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    let named = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.contains("${"))
            .map(str::to_string)
    };
    if let Some(m) = named(tree.get("model")).filter(|_| uses.model("model")) {
        check_name(ctx, &at("model"), &m, "model", file.models.keys(), errors);
    }
    if let Some(d) = named(tree.get("train_data")).filter(|_| uses.model("train_data")) {
        check_name(
            ctx,
            &at("train_data"),
            &d,
            "dataset",
            file.datasets.keys(),
            errors,
        );
    }
    if let Some(r) = named(tree.get("reward")).filter(|_| uses.model("reward")) {
        check_name(
            ctx,
            &at("reward"),
            &r,
            "reward",
            file.rewards.keys(),
            errors,
        );
    }
    let probe_dataset = named(tree.get("probe").and_then(|p| p.get("dataset")));
    if let Some(d) = probe_dataset.filter(|_| uses.model("train_data")) {
        check_name(
            ctx,
            &at("probe.dataset"),
            &d,
            "dataset",
            file.datasets.keys(),
            errors,
        );
    }
    if let (Some(Value::Object(evals)), true) = (tree.get("evals"), uses.evaluates) {
        for (name, e) in evals {
            if let Some(d) = named(e.get("dataset")) {
                check_name(
                    ctx,
                    &at(&format!("evals.{name}.dataset")),
                    &d,
                    "dataset",
                    file.datasets.keys(),
                    errors,
                );
            }
        }
    }
}

/// What the phases share.
struct Scope<'a> {
    ctx: &'a Ctx<'a>,
    file: &'a ExperimentFile,
    uses: Uses,
    /// Every axis name, zip group members included.
    axis_names: Vec<&'a str>,
    /// Names the file references: `${name}` anywhere, and axes that rules match on.
    refs: BTreeSet<String>,
}

impl Scope<'_> {
    /// An error for `key`, naming a grid axis that `name` is not.
    fn not_an_axis(&self, key: &str, name: &str) -> SpecError {
        self.ctx
            .err(key, true, format!("`{name}` is not a grid axis"))
            .with_hint(
                did_you_mean(name, self.axis_names.iter().copied())
                    .or(Some(crate::one_of(self.axis_names.iter().copied()))),
            )
    }
}

pub(crate) fn expand(
    ctx: &Ctx,
    file: &ExperimentFile,
    trains: bool,
    evaluates: bool,
    errors: &mut Vec<SpecError>,
) -> Option<Vec<Run>> {
    if file.grid.is_empty() && ctx.loc.key("grid").is_some() {
        errors.push(ctx.err("grid", true, "the grid is empty").with_hint(Some(
            "add axes such as `reward: [ground_truth, random]`, or remove `grid:` for a single run".into(),
        )));
        return None;
    }
    let axes = axes::parse(ctx, file, errors);
    let scope = Scope {
        ctx,
        file,
        uses: Uses { trains, evaluates },
        axis_names: axes
            .iter()
            .flat_map(|a| a.names.iter().map(String::as_str))
            .collect(),
        refs: axes::referenced_names(file),
    };
    let mut param_axes = axes::check(&scope, &axes, errors);
    let defaults = typed_defaults(&scope, errors)?;
    let overrides = overrides(&scope, errors)?;
    let cells = cells::cells(&scope, &axes, &mut param_axes, errors)?;
    Some(resolve::runs(
        &scope,
        cells,
        &defaults,
        &overrides,
        &param_axes,
        errors,
    ))
}

/// `defaults` as JSON, typed here when free of references (else per cell).
fn typed_defaults(scope: &Scope, errors: &mut Vec<SpecError>) -> Option<Value> {
    let (ctx, file) = (scope.ctx, scope.file);
    let defaults = yaml_to_json(
        ctx,
        "defaults",
        &serde_yaml::Value::Mapping(file.defaults.clone()),
        errors,
    )?;
    if !contains_ref(&defaults) {
        if let Err(e) = type_fragment(ctx, "defaults", &defaults) {
            errors.push(e);
        }
    }
    check_fragment_names(ctx, file, scope.uses, "defaults", &defaults, errors);
    Some(defaults)
}

/// Each override's `match` and `set` as JSON, `set` typed where free of references.
fn overrides(scope: &Scope, errors: &mut Vec<SpecError>) -> Option<Vec<(Value, Value)>> {
    let (ctx, file) = (scope.ctx, scope.file);
    let mut overrides = Vec::new();
    for (j, o) in file.overrides.iter().enumerate() {
        let key = format!("overrides[{j}]");
        for k in o.matches.keys() {
            if !scope.axis_names.contains(&k.as_str()) {
                errors.push(scope.not_an_axis(&format!("{key}.match.{k}"), k));
            }
        }
        let matches = yaml_to_json(
            ctx,
            &format!("{key}.match"),
            &serde_yaml::Value::Mapping(
                o.matches
                    .iter()
                    .map(|(k, v)| (serde_yaml::Value::String(k.clone()), v.clone()))
                    .collect(),
            ),
            errors,
        )?;
        let set = yaml_to_json(
            ctx,
            &format!("{key}.set"),
            &serde_yaml::Value::Mapping(o.set.clone()),
            errors,
        )?;
        if !contains_ref(&set) {
            if let Err(e) = type_fragment(ctx, &format!("{key}.set"), &set) {
                errors.push(e);
            }
        }
        check_fragment_names(ctx, file, scope.uses, &format!("{key}.set"), &set, errors);
        overrides.push((matches, set));
    }
    Some(overrides)
}
