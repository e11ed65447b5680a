use std::path::PathBuf;

/// Errors of the GRPO objective, optimiser, trainer and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Loading or running a model (`spur bench update`).
    #[error(transparent)]
    Model(#[from] spur_lm::Error),

    /// The policy's forward pass failed.
    #[error("policy forward pass: {0}")]
    Policy(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// Bad `spur loss` input; `path` is a JSON path such as `groups[1].samples[0].logprobs`.
    #[error("invalid loss input at `{path}`: {msg}")]
    Input { path: String, msg: String },

    #[error("invalid GRPO configuration: {0}")]
    Config(String),

    /// A rollout that cannot be trained on, e.g. a sample with no completion tokens.
    #[error("invalid rollout: {0}")]
    Rollout(String),

    /// A NaN or infinite loss or gradient. The update that would have used it was not applied.
    #[error(
        "step {step}, mini-batch {mini_batch}, micro-batch {micro_batch}: the {what} is not finite \
         ({value}); that update was not applied, so the weights are those after the last good \
         update; resume from the last checkpoint after fixing the cause (learning rate, \
         old log-probs, rewards)"
    )]
    NonFinite {
        step: u64,
        mini_batch: usize,
        micro_batch: usize,
        what: &'static str,
        value: f64,
    },

    /// A data-parallel sum failed, or a worker of the group failed or left.
    #[error("data-parallel workers: {0}")]
    Collective(String),

    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
