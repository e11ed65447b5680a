use std::path::PathBuf;

/// What can go wrong while loading a model into mistral.rs. Each variant names the file
/// involved and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: mistral.rs cannot load this model: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: the mistral.rs engine does not support {arch} models (it supports llama and qwen2); use `engine: candle`")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("cannot start the async runtime that talks to mistral.rs: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("max_num_seqs must be at least 1")]
    NoSequences,
    #[error(transparent)]
    Lm(#[from] spur_lm::Error),
}
