//! Problems read from a dataset file (JSONL, or a JSON list of objects).

use std::path::Path;

use serde_json::Value;
use spur_core::node_params::DatasetView;

use crate::StageError;

#[derive(Debug, Clone)]
pub struct Problem {
    /// Row index in the file (before offset/limit), the problem's identity.
    pub index: usize,
    pub problem: String,
    pub answer: String,
    pub id: Option<String>,
    pub subject: Option<String>,
    pub level: Option<String>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Rows `[offset, offset + limit)` with the fields `view` names (the dataset part of a
/// node's params).
pub fn load(path: &Path, view: &DatasetView) -> Result<Vec<Problem>, StageError> {
    let bytes =
        std::fs::read(path).map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
    let rows: Vec<Value> = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(rows)) => rows,
        _ => {
            let mut rows = Vec::new();
            for (i, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                rows.push(serde_json::from_str(line).map_err(|e| {
                    StageError::Failed(format!(
                        "{}:{}: not a JSON object: {e}",
                        path.display(),
                        i + 1
                    ))
                })?);
            }
            rows
        }
    };
    let answer_field = view.answer_field.as_deref().unwrap_or("answer");
    let mut out = Vec::new();
    for (index, row) in rows
        .iter()
        .enumerate()
        .skip(view.offset)
        .take(view.limit.unwrap_or(usize::MAX))
    {
        let problem_field = view.problem_field.as_deref().unwrap_or_else(|| {
            if row.get("problem").is_some() {
                "problem"
            } else {
                "prompt"
            }
        });
        let get = |k: &str| row.get(k).and_then(text);
        let missing = |k: &str| {
            StageError::Failed(format!(
                "{}: row {} has no field `{k}` (set `problem_field`/`answer_field` in the dataset definition)",
                path.display(),
                index + 1
            ))
        };
        out.push(Problem {
            index,
            problem: get(problem_field).ok_or_else(|| missing(problem_field))?,
            answer: get(answer_field).ok_or_else(|| missing(answer_field))?,
            id: get("unique_id").or_else(|| get("id")),
            subject: get("subject"),
            level: get("level"),
        });
    }
    if out.is_empty() {
        return Err(StageError::Failed(format!(
            "{}: no rows selected",
            path.display()
        )));
    }
    Ok(out)
}
