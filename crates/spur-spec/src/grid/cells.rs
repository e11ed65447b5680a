//! The grid's cells: the product of its axes (first axis outermost), minus the cells an
//! `exclude` rule matches, plus each `include` entry.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use serde_json::Value;

use super::axes::Axis;
use super::tree::{is_param_path, yaml_to_json};
use super::Scope;
use crate::validate::check_name;
use crate::{did_you_mean, SpecError};

/// A cell before resolution: axis values and where each was written.
pub(super) struct Cell {
    pub values: IndexMap<String, Value>,
    pub keys: IndexMap<String, String>,
}

/// Whether a cell has the values a rule (`exclude`, an override's `match`) asks for; a list in
/// the rule matches any of its values.
pub(super) fn matches(cell: &IndexMap<String, Value>, rule: &Value) -> bool {
    rule.as_object().is_some_and(|m| {
        m.iter().all(|(k, want)| match (cell.get(k), want) {
            (Some(have), Value::Array(any)) => any.contains(have),
            (Some(have), want) => have == want,
            (None, _) => false,
        })
    })
}

/// The cells to run. An `include` entry may set parameters no axis has: they join
/// `param_axes`. `None` when there is nothing to run (reported).
pub(super) fn cells(
    scope: &Scope,
    axes: &[Axis],
    param_axes: &mut BTreeSet<String>,
    errors: &mut Vec<SpecError>,
) -> Option<Vec<Cell>> {
    let (ctx, file, uses) = (scope.ctx, scope.file, scope.uses);
    let (axis_names, refs) = (&scope.axis_names, &scope.refs);
    let mut cells = vec![Cell {
        values: IndexMap::new(),
        keys: IndexMap::new(),
    }];
    for axis in axes {
        let mut next = Vec::with_capacity(cells.len() * axis.values.len());
        for cell in &cells {
            for (i, vals) in axis.values.iter().enumerate() {
                let mut values = cell.values.clone();
                let mut keys = cell.keys.clone();
                for (j, name) in axis.names.iter().enumerate() {
                    values.insert(name.clone(), vals[j].clone());
                    keys.insert(name.clone(), axis.keys[i][j].clone());
                }
                next.push(Cell { values, keys });
            }
        }
        cells = next;
    }
    if axes.is_empty() && !file.grid.is_empty() {
        return None; // every axis was malformed; already reported
    }

    for (j, ex) in file.exclude.iter().enumerate() {
        let key = format!("exclude[{j}]");
        for k in ex.keys() {
            if !axis_names.contains(&k.as_str()) {
                errors.push(scope.not_an_axis(&format!("{key}.{k}"), k));
            }
        }
        let rule = yaml_to_json(
            ctx,
            &key,
            &serde_yaml::to_value(ex).unwrap_or_default(),
            errors,
        )?;
        cells.retain(|c| !matches(&c.values, &rule));
    }
    for (j, inc) in file.include.iter().enumerate() {
        let key = format!("include[{j}]");
        let mut values = IndexMap::new();
        let mut keys = IndexMap::new();
        for (k, v) in inc {
            let vkey = format!("{key}.{k}");
            if !axis_names.contains(&k.as_str()) && !is_param_path(k) && !refs.contains(k) {
                errors.push(
                    ctx.err(
                        &vkey,
                        true,
                        format!("`{k}` is not a grid axis or a parameter"),
                    )
                    .with_hint(did_you_mean(k, axis_names.iter().copied())),
                );
                continue;
            }
            if let Some(j) = yaml_to_json(ctx, &vkey, v, errors) {
                if uses.model(k) && (k == "model" || k == "reward" || k == "train_data") {
                    if let Some(s) = j.as_str() {
                        let (what, defined): (&str, Vec<&String>) = match k.as_str() {
                            "model" => ("model", file.models.keys().collect()),
                            "reward" => ("reward", file.rewards.keys().collect()),
                            _ => ("dataset", file.datasets.keys().collect()),
                        };
                        check_name(ctx, &vkey, s, what, defined.into_iter(), errors);
                    }
                }
                if is_param_path(k) {
                    param_axes.insert(k.clone());
                }
                values.insert(k.clone(), j);
                keys.insert(k.clone(), vkey);
            }
        }
        cells.push(Cell { values, keys });
    }
    if cells.is_empty() {
        errors.push(
            ctx.err(
                if file.exclude.is_empty() {
                    "grid"
                } else {
                    "exclude"
                },
                true,
                "the grid is empty: every cell is excluded",
            )
            .with_hint(Some("loosen the `exclude` rules".into())),
        );
        return None;
    }

    Some(cells)
}
