use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::script::JobFiles;
use crate::state::{parse_sacct, parse_scontrol, SACCT_FORMAT};
use crate::{After, JobId, JobInfo, JobSpec, SlurmError};

/// A submitted job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub id: JobId,
    pub files: JobFiles,
}

/// Runs Slurm's client commands (`sbatch`, `scontrol`, `sacct`, `scancel`).
#[derive(Debug, Default)]
pub struct Slurm {
    conf: Option<PathBuf>,
    accounting: OnceLock<bool>,
}

impl Slurm {
    /// Uses the cluster the environment points at (`SLURM_CONF` or Slurm's default).
    pub fn from_env() -> Slurm {
        Slurm::default()
    }

    /// Uses the cluster configured by this `slurm.conf` (sets `SLURM_CONF` for
    /// every command, and so for the jobs they submit).
    pub fn with_conf(conf: impl Into<PathBuf>) -> Slurm {
        Slurm {
            conf: Some(conf.into()),
            accounting: OnceLock::new(),
        }
    }

    fn output(&self, program: &str, args: &[String]) -> Result<Output, SlurmError> {
        let mut command = Command::new(program);
        command.args(args);
        if let Some(conf) = &self.conf {
            command.env("SLURM_CONF", conf);
        }
        command.output().map_err(|source| SlurmError::Spawn {
            program: program.to_string(),
            source,
        })
    }

    /// Runs a command that must succeed and returns its stdout.
    fn run(&self, program: &str, args: &[String]) -> Result<String, SlurmError> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            return Err(SlurmError::CommandFailed {
                command: format!("{program} {}", args.join(" ")),
                status: out.status.to_string(),
                message: slurm_message(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes the job's script (and manifest) and submits it. `after_ok` may
    /// only name jobs already in Slurm here; see [`Slurm::submit_batch`].
    pub fn submit(&self, spec: &JobSpec) -> Result<Submitted, SlurmError> {
        let after = spec
            .after_ok
            .iter()
            .map(|a| match a {
                After::Job(id) => Ok(*id),
                After::InBatch(i) => Err(SlurmError::InvalidJob {
                    job: spec.name.clone(),
                    reason: format!(
                        "depends on batch entry {i}, but it is not submitted in a batch"
                    ),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.submit_resolved(spec, &after)
    }

    fn submit_resolved(&self, spec: &JobSpec, after: &[JobId]) -> Result<Submitted, SlurmError> {
        let files = spec.write(after)?;
        let out = self.output(
            "sbatch",
            &["--parsable".to_string(), path_arg(&files.script)],
        )?;
        if !out.status.success() {
            return Err(SlurmError::Rejected {
                job: spec.name.clone(),
                script: files.script,
                message: slurm_message(&out.stderr),
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        // `--parsable` prints `id` or `id;cluster`.
        let text = stdout.trim();
        let id_text = text.split(';').next().unwrap_or("");
        let id = id_text.parse().map(JobId).map_err(|_| SlurmError::Parse {
            command: format!("sbatch --parsable {}", files.script.display()),
            detail: format!("expected a job id, got {text:?}"),
        })?;
        Ok(Submitted { id, files })
    }

    /// Submits jobs in order; `After::InBatch(i)` names the job at position
    /// `i < this one`. Everything is checked before the first submission. At
    /// the first failure (e.g. Slurm rejects a job) it stops and cancels the
    /// jobs this batch already submitted, so a batch goes in whole or not at all.
    pub fn submit_batch(&self, specs: &[JobSpec]) -> Result<Vec<Submitted>, SlurmError> {
        for (i, spec) in specs.iter().enumerate() {
            if let Some(After::InBatch(j)) = spec
                .after_ok
                .iter()
                .find(|a| matches!(a, After::InBatch(j) if *j >= i))
            {
                return Err(SlurmError::InvalidJob {
                    job: spec.name.clone(),
                    reason: format!(
                        "at batch position {i} it depends on position {j}, which is not submitted before it"
                    ),
                });
            }
            spec.validate()?;
        }
        let mut submitted: Vec<Submitted> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let after: Vec<JobId> = spec
                .after_ok
                .iter()
                .map(|a| match a {
                    After::Job(id) => *id,
                    After::InBatch(j) => submitted[*j].id,
                })
                .collect();
            match self.submit_resolved(spec, &after) {
                Ok(s) => submitted.push(s),
                Err(source) => {
                    let cancelled: Vec<JobId> = submitted.iter().map(|s| s.id).collect();
                    let cancel_error = self.cancel(&cancelled).err().map(Box::new);
                    return Err(SlurmError::BatchStopped {
                        index,
                        source: Box::new(source),
                        cancelled,
                        cancel_error,
                    });
                }
            }
        }
        Ok(submitted)
    }

    /// Cancels jobs (whole arrays for array ids). Jobs that already ended are
    /// left as they are.
    pub fn cancel(&self, ids: &[JobId]) -> Result<(), SlurmError> {
        if ids.is_empty() {
            return Ok(());
        }
        let args: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        self.run("scancel", &args)?;
        Ok(())
    }

    /// Whether the cluster keeps accounting (then `sacct` knows every job).
    pub fn accounting_enabled(&self) -> Result<bool, SlurmError> {
        if let Some(known) = self.accounting.get() {
            return Ok(*known);
        }
        let args = ["show".to_string(), "config".to_string()];
        let config = self.run("scontrol", &args)?;
        let storage = config
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once('=')?;
                (key.trim() == "AccountingStorageType").then(|| value.trim().to_string())
            })
            .ok_or_else(|| SlurmError::Parse {
                command: "scontrol show config".to_string(),
                detail: "no AccountingStorageType line".to_string(),
            })?;
        let enabled = storage != "accounting_storage/none";
        Ok(*self.accounting.get_or_init(|| enabled))
    }

    /// The state of these jobs (for arrays, one record per task, and one for
    /// tasks not started yet). Uses `sacct` when the cluster keeps accounting,
    /// else `scontrol show job`, which knows jobs until `MinJobAge` after they
    /// end. Jobs Slurm no longer knows are missing from the result.
    pub fn query(&self, ids: &[JobId]) -> Result<Vec<JobInfo>, SlurmError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.accounting_enabled()? {
            let list: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
            let args = vec![
                "--allocations".to_string(),
                "--noheader".to_string(),
                "--parsable2".to_string(),
                format!("--format={SACCT_FORMAT}"),
                format!("--jobs={}", list.join(",")),
            ];
            let out = self.run("sacct", &args)?;
            return parse_sacct(&out).map_err(|detail| SlurmError::Parse {
                command: format!("sacct {}", args.join(" ")),
                detail,
            });
        }
        let args = vec![
            "show".to_string(),
            "job".to_string(),
            "--oneliner".to_string(),
        ];
        let mut jobs = self.scontrol_jobs(&args)?;
        jobs.retain(|j| ids.contains(&j.job));
        Ok(jobs)
    }

    /// `scontrol show job ID`: the controller's view of one job (all tasks of
    /// an array), with dependencies and log path. Fails once Slurm has
    /// forgotten the job.
    pub fn show_job(&self, id: JobId) -> Result<Vec<JobInfo>, SlurmError> {
        let args = vec![
            "show".to_string(),
            "job".to_string(),
            "--oneliner".to_string(),
            id.to_string(),
        ];
        self.scontrol_jobs(&args)
    }

    fn scontrol_jobs(&self, args: &[String]) -> Result<Vec<JobInfo>, SlurmError> {
        let out = self.run("scontrol", args)?;
        // An empty queue prints "No jobs in the system".
        let lines: String = out
            .lines()
            .filter(|l| l.starts_with("JobId="))
            .map(|l| format!("{l}\n"))
            .collect();
        parse_scontrol(&lines).map_err(|detail| SlurmError::Parse {
            command: format!("scontrol {}", args.join(" ")),
            detail,
        })
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Slurm's error lines without the `sbatch: error: ` prefixes, on one line.
fn slurm_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| {
            let l = l.trim();
            match l.split_once(": error: ") {
                Some((_, msg)) => msg,
                None => l,
            }
        })
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(no message on stderr)".to_string()
    } else {
        lines.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_messages_lose_their_prefix() {
        let stderr = b"sbatch: error: invalid partition specified: nope\n\
                       sbatch: error: Batch job submission failed: Invalid partition name specified\n";
        assert_eq!(
            slurm_message(stderr),
            "invalid partition specified: nope; Batch job submission failed: Invalid partition name specified"
        );
        assert_eq!(slurm_message(b""), "(no message on stderr)");
    }
}
