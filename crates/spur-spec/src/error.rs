//! Errors that point at the experiment file: file, line, column, key, and a hint.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in an experiment file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based line; 0 when the problem has no single place (e.g. an empty grid).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, e.g. `grid.reward[1]`.
    pub key: String,
    pub message: String,
    pub hint: Option<String>,
    /// The offending source line, for display.
    pub snippet: Option<String>,
}

impl SpecError {
    pub fn new(file: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            key: key.into(),
            message: message.into(),
            hint: None,
            snippet: None,
        }
    }

    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if self.line > 0 {
            writeln!(
                f,
                "  --> {}:{}:{}",
                self.file.display(),
                self.line,
                self.column
            )?;
        } else {
            writeln!(f, "  --> {}", self.file.display())?;
        }
        if !self.key.is_empty() {
            writeln!(f, "   = key: {}", self.key)?;
        }
        if let Some(snippet) = &self.snippet {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            writeln!(f, "{pad} |")?;
            writeln!(f, "{num} | {snippet}")?;
            let caret_at = self.column.saturating_sub(1).min(snippet.len());
            writeln!(f, "{pad} | {}^", " ".repeat(caret_at))?;
        }
        if let Some(hint) = &self.hint {
            writeln!(f, "   = help: {hint}")?;
        }
        Ok(())
    }
}

/// All problems found in one experiment file; nothing runs while any exist.
#[derive(Debug, Clone)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the experiment file; nothing was run",
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for SpecErrors {}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
}

/// Names people bring from other RL frameworks, and spur's name for them.
const ALIASES: [(&str, &str); 12] = [
    ("learning_rate", "lr"),
    ("lr_scheduler", "lr_schedule"),
    ("num_steps", "steps"),
    ("total_steps", "steps"),
    ("n_samples", "samples_per_prompt"),
    ("group_size", "samples_per_prompt"),
    ("num_generations", "samples_per_prompt"),
    ("rollout_batch_size", "prompts_per_step"),
    ("clip_range", "eps_low"),
    ("epsilon", "eps_low"),
    ("max_grad_norm", "grad_clip"),
    ("init_kl_coef", "kl_coef"),
];

/// "did you mean `x`?" for the closest candidate, if any is close enough
/// (by spelling, or as a known synonym such as `learning_rate` for `lr`).
pub fn did_you_mean<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    let mut best: Option<(f64, &str)> = None;
    for &cand in &candidates {
        let score = strsim::jaro_winkler(given, cand);
        if score > 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, cand));
        }
    }
    if best.is_none() {
        for (alias, target) in ALIASES {
            let score = strsim::jaro_winkler(given, alias);
            if score > 0.85 && candidates.contains(&target) && best.is_none_or(|(s, _)| score > s) {
                best = Some((score, target));
            }
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Names listed for a hint when nothing is close: "expected one of `a`, `b`".
pub fn one_of<'a>(candidates: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = candidates.into_iter().map(|c| format!("`{c}`")).collect();
    if names.is_empty() {
        "none are defined".to_string()
    } else {
        format!("expected one of {}", names.join(", "))
    }
}
