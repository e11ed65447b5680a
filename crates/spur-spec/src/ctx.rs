//! Where an experiment's problems are: the file, its text and the index of every key's
//! position, and the wording of serde's errors turned into spur's.

use std::path::Path;

use crate::error::{did_you_mean, one_of, SpecError};
use crate::locate::{Locations, Pos};

pub(crate) struct Ctx<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub loc: Locations,
}

impl Ctx<'_> {
    /// An error at a key path, located at its value (or key, if `at_key`).
    pub fn err(&self, key: &str, at_key: bool, message: impl Into<String>) -> SpecError {
        let pos = if at_key {
            self.loc.key(key).or_else(|| self.loc.value(key))
        } else {
            self.loc.value(key)
        };
        self.err_at(key, pos, message)
    }

    /// An error at a key path, located at `pos`.
    fn err_at(&self, key: &str, pos: Option<Pos>, message: impl Into<String>) -> SpecError {
        let mut e = SpecError::new(self.path, key, message);
        if let Some(pos) = pos {
            e.line = pos.line;
            e.column = pos.column;
            e.snippet = self.text.lines().nth(pos.line - 1).map(str::to_string);
        }
        e
    }

    pub(crate) fn serde_error(
        &self,
        e: serde_path_to_error::Error<serde_yaml::Error>,
    ) -> SpecError {
        let key = clean_path(&e.path().to_string());
        let inner = e.into_inner();
        let raw = inner.to_string();
        let message = strip_location(&raw);
        let (message, hint) = describe_serde_message(message);
        let at_key = message.starts_with("unknown key");
        let mut err = self.err(&key, at_key, message);
        if let Some(loc) = inner.location() {
            err.line = loc.line();
            err.column = loc.column();
            err.snippet = self.text.lines().nth(loc.line() - 1).map(str::to_string);
        }
        if [
            "while parsing",
            "while scanning",
            "did not find expected",
            "cannot start any token",
        ]
        .iter()
        .any(|m| raw.contains(m))
        {
            err.message = format!("YAML syntax error: {}", err.message);
            if err.snippet.as_deref().is_some_and(|l| l.contains("${")) {
                err.hint =
                    Some("quote values that contain `${…}`, e.g. `gamma: \"${gamma}\"`".into());
            }
            return err;
        }
        err.with_hint(hint)
    }

    /// An error from typing a fragment (`prefix` is where it sits in the file).
    pub fn fragment_error(
        &self,
        prefix: &str,
        e: serde_path_to_error::Error<serde_json::Error>,
    ) -> SpecError {
        let inner_path = clean_path(&e.path().to_string());
        let key = join_key(prefix, &inner_path);
        let raw = e.into_inner().to_string();
        let (message, hint) = describe_serde_message(strip_location(&raw));
        let at_key = message.starts_with("unknown key");
        self.err(&key, at_key, message).with_hint(hint)
    }

    pub(crate) fn duplicate_keys(&self) -> Vec<SpecError> {
        self.loc
            .duplicates
            .iter()
            .map(|(key, pos)| {
                let name = key.rsplit('.').next().unwrap_or(key);
                // At this duplicate: a key written three times has two, at different lines.
                self.err_at(key, Some(*pos), format!("duplicate name `{name}`"))
                    .with_hint(Some(
                        "each name may be defined once in a block; rename or remove one".into(),
                    ))
            })
            .collect()
    }
}

fn join_key(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (_, true) => prefix.to_string(),
        _ if inner.starts_with('[') => format!("{prefix}{inner}"),
        _ => format!("{prefix}.{inner}"),
    }
}

/// serde_path_to_error writes `.` for the root and `?` for unknown parts.
fn clean_path(p: &str) -> String {
    let p = p.trim_end_matches(".?").trim_end_matches('?');
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

fn strip_location(msg: &str) -> &str {
    match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

/// Turn serde's wording into ours, with a did-you-mean for unknown keys and
/// unknown variants.
fn describe_serde_message(msg: &str) -> (String, Option<String>) {
    for (what, label) in [
        ("unknown field", "unknown key"),
        ("unknown variant", "unknown value"),
    ] {
        if let Some(rest) = msg.strip_prefix(what) {
            let given = rest.split('`').nth(1).unwrap_or("").to_string();
            let expected: Vec<&str> = rest
                .split_once("expected")
                .map(|(_, tail)| tail.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            let hint = did_you_mean(&given, expected.iter().copied())
                .or_else(|| (!expected.is_empty()).then(|| one_of(expected.iter().copied())));
            return (format!("{label} `{given}`"), hint);
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return (format!("wrong type: found {rest}"), None);
    }
    (msg.to_string(), None)
}
