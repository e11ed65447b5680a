//! Grading throughput on a corpus of `{"gold", "response"}` JSONL rows
//! (the shared grader corpus), single-threaded.

use std::path::Path;
use std::time::Instant;

use crate::{ExtractStyle, Grader};

#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    pub rows: usize,
    pub seconds: f64,
    pub responses_per_sec: f64,
    /// Rows whose verdict equals the row's `paper_verdict` (when present).
    pub agree_with_paper: usize,
}

/// Loads `(gold, response, paper_verdict)` rows from JSONL files.
pub fn load_corpus(paths: &[&Path]) -> std::io::Result<Vec<(String, String, Option<bool>)>> {
    let mut rows = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)?;
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}:{}: {e}", path.display(), i + 1),
                )
            })?;
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            rows.push((
                s("gold"),
                s("response"),
                v.get("paper_verdict").and_then(|x| x.as_bool()),
            ));
        }
    }
    Ok(rows)
}

/// Extracts and grades every row `repeat` times on this thread.
pub fn grade_corpus(
    rows: &[(String, String, Option<bool>)],
    grader: Grader,
    repeat: usize,
) -> BenchResult {
    let start = Instant::now();
    let mut agree = 0;
    for _ in 0..repeat.max(1) {
        agree = 0;
        for (gold, response, paper) in rows {
            let v = grader.grade(response, gold, ExtractStyle::Default);
            agree += usize::from(Some(v.correct) == *paper);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let n = rows.len() * repeat.max(1);
    BenchResult {
        rows: n,
        seconds,
        responses_per_sec: n as f64 / seconds,
        agree_with_paper: agree,
    }
}
