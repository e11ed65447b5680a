//! Grid expansion: axes multiply, `zip` groups vary together, `exclude`
//! removes cells, `include` adds them, `overrides` patch matching cells.
//! Each cell is then resolved: defaults ← axis values ← overrides, `${…}`
//! substituted, typed, and range-checked.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use serde_json::Value;

use spur_core::node_params::RewardSpec;

use crate::schema::{ExperimentFile, RewardDef};
use crate::subst::substitute_tree;
use crate::{check_name, did_you_mean, param_paths, yaml_refs, Ctx, Run, RunParams, SpecError};

/// One axis: a single name, or a zip group of names whose values go together.
struct Axis {
    names: Vec<String>,
    /// values[i][j]: the i-th setting of names[j].
    values: Vec<Vec<Value>>,
    /// Key path in the file of values[i][j], for messages.
    keys: Vec<Vec<String>>,
}

/// A cell before resolution: axis values and where each was written.
struct Cell {
    values: IndexMap<String, Value>,
    keys: IndexMap<String, String>,
}

fn yaml_to_json(
    ctx: &Ctx,
    key: &str,
    v: &serde_yaml::Value,
    errors: &mut Vec<SpecError>,
) -> Option<Value> {
    match serde_json::to_value(v) {
        Ok(j) => Some(j),
        Err(e) => {
            errors.push(ctx.err(key, false, format!("cannot use this value: {e}")));
            None
        }
    }
}

fn set_path(tree: &mut Value, path: &str, value: Value) {
    let mut cur = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        let map = cur.as_object_mut().expect("made an object above");
        if i == parts.len() - 1 {
            map.insert(part.to_string(), value);
            return;
        }
        cur = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

fn get_path<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |cur, part| cur.get(part))
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Type a parameter fragment written at `prefix`; errors point into it.
fn type_fragment(ctx: &Ctx, prefix: &str, tree: &Value) -> Result<RunParams, SpecError> {
    serde_path_to_error::deserialize(tree).map_err(|e| ctx.fragment_error(prefix, e))
}

fn contains_ref(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${"),
        Value::Array(a) => a.iter().any(contains_ref),
        Value::Object(m) => m.values().any(contains_ref),
        _ => false,
    }
}

/// Is `name` a path into the parameters (rather than a free variable)?
fn is_param_path(name: &str) -> bool {
    let mut tree = Value::Object(Default::default());
    set_path(&mut tree, name, Value::Null);
    match serde_json::from_value::<RunParams>(tree) {
        Ok(_) => true,
        Err(e) => !e.to_string().starts_with("unknown field"),
    }
}

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

fn parse_axes(ctx: &Ctx, file: &ExperimentFile, errors: &mut Vec<SpecError>) -> Vec<Axis> {
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
    let axes = parse_axes(ctx, file, errors);
    let uses = Uses { trains, evaluates };

    // Which axis names are parameters; free ones must be used via ${name}.
    let mut refs = BTreeSet::new();
    for v in file.defaults.values() {
        yaml_refs(v, &mut refs);
    }
    for o in &file.overrides {
        file_refs_mapping(&o.set, &mut refs);
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
    let axis_names: Vec<&str> = axes
        .iter()
        .flat_map(|a| a.names.iter().map(String::as_str))
        .collect();
    let mut param_axes = BTreeSet::new();
    for axis in &axes {
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

    // Defaults: typed once here when free of references, else per cell.
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
    check_fragment_names(ctx, file, uses, "defaults", &defaults, errors);

    let mut overrides = Vec::new();
    for (j, o) in file.overrides.iter().enumerate() {
        let key = format!("overrides[{j}]");
        for (k, _) in &o.matches {
            if !axis_names.contains(&k.as_str()) {
                errors.push(
                    ctx.err(
                        &format!("{key}.match.{k}"),
                        true,
                        format!("`{k}` is not a grid axis"),
                    )
                    .with_hint(
                        did_you_mean(k, axis_names.iter().copied())
                            .or(Some(crate::one_of(axis_names.iter().copied()))),
                    ),
                );
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
        check_fragment_names(ctx, file, uses, &format!("{key}.set"), &set, errors);
        overrides.push((matches, set));
    }

    // The product of all axes, first axis outermost.
    let mut cells = vec![Cell {
        values: IndexMap::new(),
        keys: IndexMap::new(),
    }];
    for axis in &axes {
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

    let cell_matches = |cell: &IndexMap<String, Value>, rule: &Value| -> bool {
        rule.as_object().is_some_and(|m| {
            m.iter().all(|(k, want)| match (cell.get(k), want) {
                (Some(have), Value::Array(any)) => any.contains(have),
                (Some(have), want) => have == want,
                (None, _) => false,
            })
        })
    };
    for (j, ex) in file.exclude.iter().enumerate() {
        let key = format!("exclude[{j}]");
        for k in ex.keys() {
            if !axis_names.contains(&k.as_str()) {
                errors.push(
                    ctx.err(
                        &format!("{key}.{k}"),
                        true,
                        format!("`{k}` is not a grid axis"),
                    )
                    .with_hint(
                        did_you_mean(k, axis_names.iter().copied())
                            .or(Some(crate::one_of(axis_names.iter().copied()))),
                    ),
                );
            }
        }
        let rule = yaml_to_json(
            ctx,
            &key,
            &serde_yaml::to_value(ex).unwrap_or_default(),
            errors,
        )?;
        cells.retain(|c| !cell_matches(&c.values, &rule));
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

    let mut runs = Vec::with_capacity(cells.len());
    let mut reported = BTreeSet::new();
    let mut seen_cells = BTreeSet::new();
    for cell in cells {
        let mut report = |e: SpecError, errors: &mut Vec<SpecError>| {
            if reported.insert((e.key.clone(), e.message.clone())) {
                errors.push(e);
            }
        };
        let canonical = serde_json::to_string(&cell.values).unwrap_or_default();
        if !seen_cells.insert(canonical) {
            let key = cell
                .keys
                .values()
                .last()
                .cloned()
                .unwrap_or_else(|| "include".into());
            report(
                ctx.err(
                    &key,
                    false,
                    "duplicate cell: this combination of axis values already exists",
                )
                .with_hint(Some("remove the repeated value or `include` entry".into())),
                errors,
            );
            continue;
        }
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
            if cell_matches(&cell.values, matches) {
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
        let mut missing = None;
        let mut lookup = |name: &str| -> Option<Value> {
            let found = cell.values.get(name).cloned().or_else(|| {
                get_path(&unresolved, name)
                    .filter(|v| !contains_ref(v))
                    .cloned()
            });
            if found.is_none() {
                missing.get_or_insert(name.to_string());
            }
            found
        };
        if let Err(name) = substitute_tree(&mut tree, &mut lookup) {
            let key = find_reference(&unresolved, &name)
                .map(|p| where_is(&p))
                .unwrap_or_else(|| "defaults".into());
            report(
                ctx.err(
                    &key,
                    false,
                    format!("`${{{name}}}` names no grid axis or parameter"),
                )
                .with_hint(
                    did_you_mean(&name, axis_names.iter().copied())
                        .or(Some(format!(
                            "axes: {}",
                            crate::one_of(axis_names.iter().copied())
                        )))
                        .filter(|_| true),
                ),
                errors,
            );
            continue;
        }
        let params: RunParams = match serde_path_to_error::deserialize(&tree) {
            Ok(p) => p,
            Err(e) => {
                let path = e.path().to_string();
                let mut err = ctx.fragment_error("", e);
                err = relocate(ctx, err, &where_is(&path));
                // Fragments were typed on their own first; don't repeat those.
                if !errors.iter().any(|old| old.message == err.message) {
                    report(err, errors);
                }
                continue;
            }
        };
        for (path, msg) in params.check_ranges() {
            let key =
                value_source(&unresolved, &path, &cell.keys).unwrap_or_else(|| where_is(&path));
            report(ctx.err(&key, false, format!("`{path}` {msg}")), errors);
        }
        let need = |ok: bool,
                    what: &str,
                    errors: &mut Vec<SpecError>,
                    report: &mut dyn FnMut(SpecError, &mut Vec<SpecError>)| {
            if !ok {
                report(
                    ctx.err(
                        "defaults",
                        true,
                        format!("no `{what}` is set for run {}", label(&cell.values)),
                    )
                    .with_hint(Some(format!(
                        "set `defaults.{what}` or add a `{what}` grid axis"
                    ))),
                    errors,
                );
            }
        };
        if trains || evaluates {
            need(params.model.is_some(), "model", errors, &mut report);
        }
        if trains {
            need(
                params.train_data.is_some(),
                "train_data",
                errors,
                &mut report,
            );
            need(params.reward.is_some(), "reward", errors, &mut report);
        }
        if evaluates {
            if params.evals.is_empty() {
                report(
                    ctx.err(
                        "defaults",
                        true,
                        "the pipeline has `eval` but no evaluation is defined",
                    )
                    .with_hint(Some(
                        "add `defaults.evals.math500: {dataset: math500}`".into(),
                    )),
                    errors,
                );
            }
            for (name, e) in &params.evals {
                if e.dataset.is_none() {
                    report(
                        ctx.err(
                            &where_is(&format!("evals.{name}")),
                            true,
                            format!("evaluation `{name}` has no `dataset`"),
                        ),
                        errors,
                    );
                }
            }
        }
        // Names that came through ${...} are checked now that they are known.
        for (field, what, defined) in [
            ("model", "model", file.models.keys().collect::<Vec<_>>()),
            ("reward", "reward", file.rewards.keys().collect()),
            ("train_data", "dataset", file.datasets.keys().collect()),
        ] {
            if let (Some(Value::String(s)), true) = (tree.get(field), uses.model(field)) {
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
                    for e in errs {
                        if !errors.iter().any(|old| old.message == e.message) {
                            report(e, errors);
                        }
                    }
                }
            }
        }
        if let (Some(d), true) = (&params.probe.dataset, trains) {
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
                for e in errs {
                    if !errors.iter().any(|old| old.message == e.message) {
                        report(e, errors);
                    }
                }
            }
        }
        let reward = match (trains, &params.reward) {
            (true, Some(name)) => file.rewards.get(name).and_then(|def| {
                resolve_reward(ctx, name, def, &cell.values, &tree)
                    .map_err(|e| report(e, errors))
                    .ok()
            }),
            _ => None,
        };
        runs.push(Run {
            cell: cell.values,
            params,
            tree,
            reward,
        });
    }
    Some(runs)
}

fn file_refs_mapping(m: &serde_yaml::Mapping, out: &mut BTreeSet<String>) {
    for v in m.values() {
        yaml_refs(v, out);
    }
}

fn collect_leaves(v: &Value, prefix: &str, f: &mut dyn FnMut(&String)) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_leaves(child, &p, f);
            }
        }
        _ => f(&prefix.to_string()),
    }
}

/// The path of the first string in `tree` that references `${name}`.
/// Where the value at `path` was written when it came through `${axis}` (at `path` or an
/// enclosing string): the axis value's key, which is what to change, not the reference.
fn value_source(
    unresolved: &Value,
    path: &str,
    axis_keys: &IndexMap<String, String>,
) -> Option<String> {
    let mut p = path;
    loop {
        if let Some(Value::String(s)) = get_path(unresolved, p) {
            return crate::references(s)
                .iter()
                .find_map(|name| axis_keys.get(name).cloned());
        }
        p = &p[..p.rfind('.')?];
    }
}

fn find_reference(tree: &Value, name: &str) -> Option<String> {
    let mut found = None;
    collect_leaves(tree, "", &mut |p| {
        if found.is_none() {
            if let Some(Value::String(s)) = get_path(tree, p) {
                if crate::references(s).iter().any(|r| r == name) {
                    found = Some(p.clone());
                }
            }
        }
    });
    found
}

fn relocate(ctx: &Ctx, mut e: SpecError, key: &str) -> SpecError {
    let fresh = ctx.err(key, false, "");
    e.key = key.to_string();
    e.line = fresh.line;
    e.column = fresh.column;
    e.snippet = fresh.snippet;
    e
}

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
    cell: &IndexMap<String, Value>,
    tree: &Value,
) -> Result<RewardSpec, SpecError> {
    let key = format!("rewards.{name}");
    let mut lookup = |n: &str| cell.get(n).cloned().or_else(|| get_path(tree, n).cloned());
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
