use std::path::PathBuf;

use crate::JobId;

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("invalid Slurm setting `{key}`: {reason}")]
    InvalidSetting { key: String, reason: String },

    #[error("invalid job `{job}`: {reason}")]
    InvalidJob { job: String, reason: String },

    #[error("could not write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("could not run `{program}`: {source}; is Slurm's client (slurm-client) installed and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },

    #[error("Slurm rejected job `{job}` ({}): {message}", script.display())]
    Rejected {
        job: String,
        script: PathBuf,
        message: String,
    },

    #[error("`{command}` failed ({status}): {message}")]
    CommandFailed {
        command: String,
        status: String,
        message: String,
    },

    #[error("could not read the output of `{command}`: {detail}")]
    Parse { command: String, detail: String },

    /// A batch stopped at its first failure (usually a rejection); what it
    /// had submitted before was cancelled.
    #[error("batch job {index}: {source}; submitted nothing more{}", cancelled_note(.cancelled, .cancel_error))]
    BatchStopped {
        /// Position in the batch of the job that failed.
        index: usize,
        source: Box<SlurmError>,
        /// Jobs of this batch that were submitted before the rejection and then cancelled.
        cancelled: Vec<JobId>,
        /// Set when cancelling those jobs failed too: they may still be queued.
        cancel_error: Option<Box<SlurmError>>,
    },
}

fn cancelled_note(cancelled: &[JobId], cancel_error: &Option<Box<SlurmError>>) -> String {
    if cancelled.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = cancelled.iter().map(|id| id.to_string()).collect();
    match cancel_error {
        None => format!(
            " (cancelled the {} job(s) it had submitted: {})",
            ids.len(),
            ids.join(",")
        ),
        Some(e) => format!(
            " but could not cancel the job(s) it had submitted ({}): {e}; run `scancel {}`",
            ids.join(","),
            ids.join(" ")
        ),
    }
}
