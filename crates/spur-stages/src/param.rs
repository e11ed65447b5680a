//! Reading a node's parameters. The plan writes every parameter a stage reads, with the spec's
//! defaults already applied, so a missing one is an error naming it and the stage, never a
//! fallback to a default of the stage's own (which could differ from the spec's).

use serde_json::Value;
use spur_plan::StageKind;

use crate::StageError;

/// The parameters of one node, as its stage reads them.
#[derive(Clone, Copy)]
pub struct Params<'a> {
    stage: StageKind,
    root: &'a Value,
}

impl<'a> Params<'a> {
    pub fn new(stage: StageKind, root: &'a Value) -> Self {
        Self { stage, root }
    }

    fn error(&self, path: &str, why: String) -> StageError {
        StageError::Param {
            stage: self.stage,
            path: path.to_string(),
            why,
        }
    }

    /// The value at `path` (keys separated by dots), if present and not null.
    pub fn optional(&self, path: &str) -> Option<&'a Value> {
        path.split('.')
            .try_fold(self.root, |v, key| v.get(key))
            .filter(|v| !v.is_null())
    }

    /// The value at `path`; absent or null is an error.
    pub fn value(&self, path: &str) -> Result<&'a Value, StageError> {
        self.optional(path)
            .ok_or_else(|| self.error(path, "is missing".into()))
    }

    fn typed<T>(
        &self,
        path: &str,
        expected: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, StageError> {
        let v = self.value(path)?;
        read(v).ok_or_else(|| self.error(path, format!("is {v}, expected {expected}")))
    }

    pub fn u64(&self, path: &str) -> Result<u64, StageError> {
        self.typed(path, "a non-negative integer", Value::as_u64)
    }

    pub fn usize(&self, path: &str) -> Result<usize, StageError> {
        self.typed(path, "a non-negative integer", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    pub fn f64(&self, path: &str) -> Result<f64, StageError> {
        self.typed(path, "a number", Value::as_f64)
    }

    pub fn str(&self, path: &str) -> Result<&'a str, StageError> {
        self.typed(path, "a string", Value::as_str)
    }

    /// A value that must be one of `allowed`.
    pub fn one_of(&self, path: &str, allowed: &[&str]) -> Result<&'a str, StageError> {
        let s = self.str(path)?;
        if allowed.contains(&s) {
            Ok(s)
        } else {
            Err(self.error(path, format!("is \"{s}\", expected one of {allowed:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_missing_or_mistyped_parameter_names_itself_and_the_stage() {
        let root = json!({"rollout": {"top_k": 0, "top_p": null, "temperature": "hot"}});
        let p = Params::new(StageKind::Rollout, &root);
        assert_eq!(p.u64("rollout.top_k").unwrap(), 0);
        let missing = p.u64("rollout.prompts_per_step").unwrap_err().to_string();
        assert_eq!(
            missing,
            "the rollout node's parameter `rollout.prompts_per_step` is missing"
        );
        assert!(p
            .f64("rollout.top_p")
            .unwrap_err()
            .to_string()
            .contains("missing"));
        let mistyped = p.f64("rollout.temperature").unwrap_err().to_string();
        assert!(mistyped.contains("`rollout.temperature` is \"hot\", expected a number"));
        assert!(p.optional("rollout.top_p").is_none());
    }
}
