//! The parameter tree of a cell as JSON: reading, writing and merging paths, typing fragments,
//! and finding where in the file a value or reference was written.

use indexmap::IndexMap;
use serde_json::Value;

use crate::{Ctx, RunParams, SpecError};

/// A YAML value as JSON; an error at `key` when it has no JSON form.
pub(super) fn yaml_to_json(
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

/// Writes `value` at the dotted `path`, making objects on the way.
pub(super) fn set_path(tree: &mut Value, path: &str, value: Value) {
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

pub(super) fn get_path<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |cur, part| cur.get(part))
}

/// `patch` written over `base`, objects merged key by key.
pub(super) fn merge(base: &mut Value, patch: &Value) {
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
pub(super) fn type_fragment(ctx: &Ctx, prefix: &str, tree: &Value) -> Result<RunParams, SpecError> {
    serde_path_to_error::deserialize(tree).map_err(|e| ctx.fragment_error(prefix, e))
}

/// Whether any string in `v` holds a `${…}` reference.
pub(super) fn contains_ref(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${"),
        Value::Array(a) => a.iter().any(contains_ref),
        Value::Object(m) => m.values().any(contains_ref),
        _ => false,
    }
}

/// Is `name` a path into the parameters (rather than a free variable)?
pub(super) fn is_param_path(name: &str) -> bool {
    let mut tree = Value::Object(Default::default());
    set_path(&mut tree, name, Value::Null);
    match serde_json::from_value::<RunParams>(tree) {
        Ok(_) => true,
        Err(e) => !e.to_string().starts_with("unknown field"),
    }
}

/// Calls `f` with the dotted path of every leaf of `v`.
pub(super) fn collect_leaves(v: &Value, prefix: &str, f: &mut dyn FnMut(&String)) {
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

/// Where the value at `path` was written when it came through `${axis}` (at `path` or an
/// enclosing string): the axis value's key, which is what to change, not the reference.
pub(super) fn value_source(
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

/// The path of the first string in `tree` that references `${name}`.
pub(super) fn find_reference(tree: &Value, name: &str) -> Option<String> {
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

/// `e`, moved to `key` (where the value it is about was written).
pub(super) fn relocate(ctx: &Ctx, mut e: SpecError, key: &str) -> SpecError {
    let fresh = ctx.err(key, false, "");
    e.key = key.to_string();
    e.line = fresh.line;
    e.column = fresh.column;
    e.snippet = fresh.snippet;
    e
}
