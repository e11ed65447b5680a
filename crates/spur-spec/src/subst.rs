//! `${name}` references in strings.

use std::collections::BTreeSet;

use serde_json::Value;

/// The names referenced by `${…}` in `s`, in order (duplicates kept).
pub fn references(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push(after[..end].trim().to_string());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// Replace every `${name}` in `s` using `lookup`. A string that is exactly one
/// reference keeps the referenced value's type (`"${lr}"` → `5e-7`, a number).
/// Returns the first name `lookup` does not know as the error.
pub fn substitute_str(
    s: &str,
    lookup: &mut dyn FnMut(&str) -> Option<Value>,
) -> Result<Value, String> {
    let refs = references(s);
    if refs.is_empty() {
        return Ok(Value::String(s.to_string()));
    }
    let trimmed = s.trim();
    if refs.len() == 1 && trimmed.starts_with("${") && trimmed.ends_with('}') {
        return lookup(&refs[0]).ok_or_else(|| refs[0].clone());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = after[..end].trim();
        let value = lookup(name).ok_or_else(|| name.to_string())?;
        out.push_str(&crate::scalar_text(&value));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Substitute inside every string of a JSON tree.
pub(crate) fn substitute_tree(
    v: &mut Value,
    lookup: &mut dyn FnMut(&str) -> Option<Value>,
) -> Result<(), String> {
    match v {
        Value::String(s) => {
            *v = substitute_str(s, lookup)?;
        }
        Value::Array(items) => {
            for item in items {
                substitute_tree(item, lookup)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                substitute_tree(item, lookup)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_reference_keeps_type() {
        let mut lookup = |n: &str| (n == "lr").then(|| json!(5e-7));
        assert_eq!(substitute_str("${lr}", &mut lookup), Ok(json!(5e-7)));
        assert_eq!(
            substitute_str("lr=${lr}!", &mut lookup),
            Ok(json!("lr=5e-7!"))
        );
        assert_eq!(
            substitute_str("${nope}", &mut lookup),
            Err("nope".to_string())
        );
    }
}

/// All `${name}` references in any string of a YAML value.
pub(crate) fn yaml_refs(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::String(s) => out.extend(references(s)),
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| yaml_refs(i, out)),
        serde_yaml::Value::Mapping(m) => m.values().for_each(|i| yaml_refs(i, out)),
        serde_yaml::Value::Tagged(t) => yaml_refs(&t.value, out),
        _ => {}
    }
}
