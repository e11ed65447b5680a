//! The grid's axes: a name with a list of values, or a `zip` group of names whose lists pair
//! up by position. An axis is a parameter path (`update.lr`, `seed`) or a free variable the file
//! references as `${name}` or matches on in a rule.

use std::collections::BTreeSet;

use serde_json::Value;

use super::tree::{contains_ref, is_param_path, set_path, type_fragment, yaml_to_json};
use super::Scope;
use crate::schema::ExperimentFile;
use crate::subst::yaml_refs;
use crate::validate::check_name;
use crate::{did_you_mean, param_paths, Ctx, SpecError};

/// One axis: a single name, or a zip group of names whose values go together.
pub(super) struct Axis {
    pub names: Vec<String>,
    /// values[i][j]: the i-th setting of names[j].
    pub values: Vec<Vec<Value>>,
    /// Key path in the file of values[i][j], for messages.
    pub keys: Vec<Vec<String>>,
}

/// The axes of `grid:`, in the order written.
pub(super) fn parse(ctx: &Ctx, file: &ExperimentFile, errors: &mut Vec<SpecError>) -> Vec<Axis> {
    let mut axes = Vec::new();
    let push_axis = |name: &str,
                     key: &str,
                     v: &serde_yaml::Value,
                     errors: &mut Vec<SpecError>|
     -> Option<(Vec<Value>, Vec<String>)> {
        let serde_yaml::Value::Sequence(items) = v else {
            errors.push(
                ctx.err(
                    key,
                    false,
                    format!("axis `{name}` must be a list of values"),
                )
                .with_hint(Some(format!("write `{name}: [a, b]`"))),
            );
            return None;
        };
        if items.is_empty() {
            errors.push(ctx.err(
                key,
                false,
                format!("axis `{name}` has no values: the grid would be empty"),
            ));
            return None;
        }
        let mut values = Vec::new();
        let mut keys = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let k = format!("{key}[{i}]");
            values.push(yaml_to_json(ctx, &k, item, errors)?);
            keys.push(k);
        }
        Some((values, keys))
    };
    for (name, v) in &file.grid {
        if name == "zip" {
            let serde_yaml::Value::Sequence(groups) = v else {
                errors.push(ctx.err(
                    "grid.zip",
                    false,
                    "`zip` must be a list of groups, e.g. `- {a: [1, 2], b: [3, 4]}`",
                ));
                continue;
            };
            for (g, group) in groups.iter().enumerate() {
                let gkey = format!("grid.zip[{g}]");
                let serde_yaml::Value::Mapping(m) = group else {
                    errors.push(ctx.err(
                        &gkey,
                        false,
                        "a zip group maps axis names to lists of equal length",
                    ));
                    continue;
                };
                let mut names = Vec::new();
                let mut cols = Vec::new();
                for (k, list) in m {
                    let Some(k) = k.as_str() else { continue };
                    if let Some(col) = push_axis(k, &format!("{gkey}.{k}"), list, errors) {
                        names.push(k.to_string());
                        cols.push(col);
                    }
                }
                if cols.is_empty() {
                    continue;
                }
                let n = cols[0].0.len();
                if let Some((bad, col)) = names.iter().zip(&cols).find(|(_, c)| c.0.len() != n) {
                    errors.push(ctx.err(&format!("{gkey}.{bad}"), true, format!(
                        "zip group lists differ in length: `{}` has {n} values, `{bad}` has {}",
                        names[0], col.0.len()
                    )).with_hint(Some("values in a zip group pair up by position, so every list needs the same length".into())));
                    continue;
                }
                axes.push(Axis {
                    values: (0..n)
                        .map(|i| cols.iter().map(|c| c.0[i].clone()).collect())
                        .collect(),
                    keys: (0..n)
                        .map(|i| cols.iter().map(|c| c.1[i].clone()).collect())
                        .collect(),
                    names,
                });
            }
        } else if let Some((values, keys)) = push_axis(name, &format!("grid.{name}"), v, errors) {
            axes.push(Axis {
                names: vec![name.clone()],
                values: values.into_iter().map(|v| vec![v]).collect(),
                keys: keys.into_iter().map(|k| vec![k]).collect(),
            });
        }
    }
    axes
}

/// Every name the file references: `${name}` in defaults, overrides, rewards and commands,
/// and the axes that `overrides`, `exclude` and `include` match on (an `ablation` axis whose
/// values select overrides is used, though no parameter reads it).
pub(super) fn referenced_names(file: &ExperimentFile) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for v in file.defaults.values() {
        yaml_refs(v, &mut refs);
    }
    for o in &file.overrides {
        for v in o.set.values() {
            yaml_refs(v, &mut refs);
        }
    }
    // Matching on an axis in a rule uses it too (e.g. an `ablation` axis
    // whose values select overrides).
    for o in &file.overrides {
        refs.extend(o.matches.keys().cloned());
    }
    for rule in file.exclude.iter().chain(&file.include) {
        refs.extend(rule.keys().cloned());
    }
    for r in file.rewards.values() {
        if let Some(g) = &r.gamma {
            yaml_refs(g, &mut refs);
        }
        if let Some(c) = &r.command {
            refs.extend(crate::references(c));
        }
    }
    for c in file.commands.values() {
        refs.extend(crate::references(&c.run));
        for v in c.inputs.values() {
            refs.extend(crate::references(v));
        }
    }
    refs
}

/// Types each value of a parameter axis and checks the names it gives (`model`, `reward`,
/// `train_data`); a free axis must be referenced. Returns the names of the parameter axes.
pub(super) fn check(scope: &Scope, axes: &[Axis], errors: &mut Vec<SpecError>) -> BTreeSet<String> {
    let (ctx, file, uses, refs) = (scope.ctx, scope.file, scope.uses, &scope.refs);
    let mut param_axes = BTreeSet::new();
    for axis in axes {
        for (j, name) in axis.names.iter().enumerate() {
            if is_param_path(name) {
                param_axes.insert(name.clone());
                for (i, v) in axis.values.iter().enumerate() {
                    let mut tree = Value::Object(Default::default());
                    set_path(&mut tree, name, v[j].clone());
                    if !contains_ref(&v[j]) {
                        if let Err(mut e) = type_fragment(ctx, "", &tree) {
                            e.key = axis.keys[i][j].clone();
                            let pos = ctx.loc.value(&e.key);
                            if let Some(pos) = pos {
                                e.line = pos.line;
                                e.column = pos.column;
                                e.snippet = ctx.text.lines().nth(pos.line - 1).map(str::to_string);
                            }
                            e.message = format!("axis `{name}`: {}", e.message);
                            errors.push(e);
                        }
                    }
                    let key = axis.keys[i][j].clone();
                    let defined: Option<(&str, Vec<&String>)> = match name.as_str() {
                        "model" => Some(("model", file.models.keys().collect())),
                        "reward" => Some(("reward", file.rewards.keys().collect())),
                        "train_data" => Some(("dataset", file.datasets.keys().collect())),
                        _ => None,
                    };
                    if let (Some((what, defined)), Some(s), true) =
                        (defined, v[j].as_str(), uses.model(name))
                    {
                        if !s.contains("${") {
                            check_name(ctx, &key, s, what, defined.into_iter(), errors);
                        }
                    }
                }
            } else if !refs.contains(name) {
                let key = if axis.names.len() > 1 {
                    axis.keys[0][j]
                        .rsplit_once('[')
                        .map(|x| x.0.to_string())
                        .unwrap_or_default()
                } else {
                    format!("grid.{name}")
                };
                let paths = param_paths();
                errors.push(
                    ctx.err(&key, true, format!("axis `{name}` is neither a parameter nor used anywhere (as `${{{name}}}` or in a rule)"))
                        .with_hint(did_you_mean(name, paths.iter().map(String::as_str)).or(Some(
                            "grid axes are parameter paths (e.g. `update.lr`, `seed`, `reward`) or variables referenced as `${name}`".into(),
                        ))),
                );
            }
        }
    }
    param_axes
}
