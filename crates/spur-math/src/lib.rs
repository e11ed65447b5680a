//! spur-math: reading the final answer out of a model response and deciding
//! whether it equals the reference, as the paper "Spurious Rewards" did
//! (Qwen2.5-Math extraction + OpenAI PRM800K grader), in pure Rust; the
//! paper's rewards; and the eval metrics of its Table 1.

mod compare;
mod expr;
mod extract;
mod grade;
mod hendrycks;
mod jsonl;
mod latex2text;
pub mod math_verify;
mod metrics;
mod prm;
mod pyfloat;
mod reward;
mod words;

pub mod bench;

pub use compare::{GraderComparison, PairCounts, DISAGREE_LINES_KEPT};
pub use extract::{extract_answer, extract_answer_strict, last_box, strip_string, ExtractStyle};
pub use grade::{Grader, Verdict};
pub use jsonl::{grade_jsonl, GradeSummary, LineError};
pub use metrics::{
    eval_metrics, multi_sample_metrics, EvalMetrics, EvalRecord, Group, MultiSampleMetrics,
};
pub use reward::{majority_label, no_repetition, sample_seed, Reward, RewardOptions, RewardSpec};

/// `grade_answer(given, gold)` of PRM800K exactly as the paper ran it.
pub fn paper_grade_answer(given: &str, gold: &str) -> bool {
    prm::grade_answer(given, gold)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown {what} '{name}' (expected one of: {expected})")]
    UnknownName {
        what: &'static str,
        name: String,
        expected: &'static str,
    },
    #[error("reward '{name}': {message}")]
    BadReward { name: String, message: String },
    #[error("reading input: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing output: {0}")]
    Write(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
