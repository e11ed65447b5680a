use std::fmt;
use std::path::PathBuf;

use crate::JobId;

/// A job's state as Slurm names it (base state, without flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Configuring,
    Running,
    Suspended,
    Completing,
    Completed,
    Cancelled,
    Failed,
    Timeout,
    NodeFail,
    Preempted,
    BootFail,
    Deadline,
    OutOfMemory,
    Requeued,
    /// Any other state, as Slurm wrote it.
    Other(String),
}

impl JobState {
    /// Parses a long state name as `scontrol` or `sacct` (`CANCELLED by 0`) write it.
    pub fn parse(text: &str) -> JobState {
        let word = text.split_whitespace().next().unwrap_or("");
        match word {
            "PENDING" => JobState::Pending,
            "CONFIGURING" => JobState::Configuring,
            "RUNNING" => JobState::Running,
            "SUSPENDED" => JobState::Suspended,
            "COMPLETING" => JobState::Completing,
            "COMPLETED" => JobState::Completed,
            "CANCELLED" => JobState::Cancelled,
            "FAILED" => JobState::Failed,
            "TIMEOUT" => JobState::Timeout,
            "NODE_FAIL" => JobState::NodeFail,
            "PREEMPTED" => JobState::Preempted,
            "BOOT_FAIL" => JobState::BootFail,
            "DEADLINE" => JobState::Deadline,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            "REQUEUED" => JobState::Requeued,
            _ => JobState::Other(word.to_string()),
        }
    }

    /// True once the job will not run again by itself.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Completed
                | JobState::Cancelled
                | JobState::Failed
                | JobState::Timeout
                | JobState::NodeFail
                | JobState::Preempted
                | JobState::BootFail
                | JobState::Deadline
                | JobState::OutOfMemory
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            JobState::Pending => "PENDING",
            JobState::Configuring => "CONFIGURING",
            JobState::Running => "RUNNING",
            JobState::Suspended => "SUSPENDED",
            JobState::Completing => "COMPLETING",
            JobState::Completed => "COMPLETED",
            JobState::Cancelled => "CANCELLED",
            JobState::Failed => "FAILED",
            JobState::Timeout => "TIMEOUT",
            JobState::NodeFail => "NODE_FAIL",
            JobState::Preempted => "PREEMPTED",
            JobState::BootFail => "BOOT_FAIL",
            JobState::Deadline => "DEADLINE",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::Requeued => "REQUEUED",
            JobState::Other(s) => s,
        };
        f.write_str(name)
    }
}

/// Slurm's `code:signal` exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCode {
    pub code: i32,
    pub signal: i32,
}

impl ExitCode {
    fn parse(text: &str) -> Option<ExitCode> {
        let (code, signal) = text.split_once(':')?;
        Some(ExitCode {
            code: code.parse().ok()?,
            signal: signal.parse().ok()?,
        })
    }
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.code, self.signal)
    }
}

/// What Slurm says about one job, or one task of an array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// The id that sbatch returned: for an array task, the array's id.
    pub job: JobId,
    /// For array records: the task index (`3`), or for tasks not yet started,
    /// the pending range as Slurm writes it (`4-9%2`).
    pub array_task: Option<String>,
    pub state: JobState,
    /// Why the job is pending or ended as it did (`Dependency`,
    /// `DependencyNeverSatisfied`, `NonZeroExitCode`...); `None` when Slurm says `None`.
    pub reason: Option<String>,
    pub exit_code: Option<ExitCode>,
    /// Times the job was requeued.
    pub restarts: Option<u32>,
    /// Only known without accounting (from `scontrol`).
    pub stdout: Option<PathBuf>,
    /// e.g. `afterok:12(unfulfilled),afterok:13(failed)`; only from `scontrol`.
    pub dependency: Option<String>,
}

fn none_if_null(value: &str) -> Option<String> {
    match value {
        "" | "None" | "(null)" | "N/A" => None,
        v => Some(v.to_string()),
    }
}

/// Splits one line of `scontrol show job -o` into key/value pairs. Values may
/// contain spaces (paths, job names): a word without `Key=` continues the
/// previous value.
fn scontrol_fields(line: &str) -> Vec<(&str, String)> {
    let mut fields: Vec<(&str, String)> = Vec::new();
    for word in line.split(' ') {
        let key = word.split_once('=').map(|(k, _)| k).filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '_'))
        });
        match (key, fields.last_mut()) {
            (Some(key), _) => fields.push((key, word[key.len() + 1..].to_string())),
            (None, Some((_, value))) => {
                value.push(' ');
                value.push_str(word);
            }
            (None, None) => {}
        }
    }
    for (_, value) in &mut fields {
        let trimmed = value.trim_end().len();
        value.truncate(trimmed);
    }
    fields
}

/// Parses `scontrol show job -o` output (one job or array task per line).
pub(crate) fn parse_scontrol(output: &str) -> Result<Vec<JobInfo>, String> {
    let mut jobs = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let fields = scontrol_fields(line);
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        };
        let id_text = get("ArrayJobId")
            .or(get("JobId"))
            .ok_or_else(|| format!("no JobId in line {line:?}"))?;
        let job = id_text
            .parse()
            .map(JobId)
            .map_err(|_| format!("job id {id_text:?} is not a number"))?;
        let state = get("JobState").ok_or_else(|| format!("no JobState in line {line:?}"))?;
        jobs.push(JobInfo {
            job,
            array_task: get("ArrayTaskId").map(str::to_string),
            state: JobState::parse(state),
            reason: get("Reason").and_then(none_if_null),
            exit_code: get("ExitCode").and_then(ExitCode::parse),
            restarts: get("Restarts").and_then(|r| r.parse().ok()),
            stdout: get("StdOut").and_then(none_if_null).map(PathBuf::from),
            dependency: get("Dependency").and_then(none_if_null),
        });
    }
    Ok(jobs)
}

/// The fields asked of `sacct`, in order, with `--parsable2` (`|`-separated).
pub(crate) const SACCT_FORMAT: &str = "JobID,State,ExitCode,Reason";

/// Parses `sacct -X --noheader --parsable2 --format=JobID,State,ExitCode,Reason`.
pub(crate) fn parse_sacct(output: &str) -> Result<Vec<JobInfo>, String> {
    let mut jobs = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('|').collect();
        let [id, state, exit_code, reason] = cols[..] else {
            return Err(format!("expected 4 `|`-separated columns in {line:?}"));
        };
        // Array tasks are `12_3`, pending ones `12_[4-9%2]`.
        let (job, task) = match id.split_once('_') {
            Some((job, task)) => (job, Some(task.trim_matches(['[', ']']).to_string())),
            None => (id, None),
        };
        jobs.push(JobInfo {
            job: JobId(
                job.parse()
                    .map_err(|_| format!("job id {id:?} is not a number"))?,
            ),
            array_task: task,
            state: JobState::parse(state),
            reason: none_if_null(reason),
            exit_code: ExitCode::parse(exit_code),
            restarts: None,
            stdout: None,
            dependency: None,
        });
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Slurm 22.05's `scontrol show job -o` writes them (shortened).
    const SCONTROL: &str = "\
JobId=5 JobName=train a UserId=root(0) JobState=CANCELLED Reason=DependencyNeverSatisfied Dependency=afterok:4(failed) Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 Command=/tmp/sl/s.sh WorkDir=/tmp/sl StdErr=/tmp/a b/5.log StdIn=/dev/null StdOut=/tmp/a b/5.log Power= KillOInInvalidDependent=Yes 
JobId=10 ArrayJobId=7 ArrayTaskId=1 ArrayTaskThrottle=2 JobName=s.sh JobState=COMPLETED Reason=None Dependency=(null) Restarts=1 ExitCode=0:0 StdOut=/tmp/sl/arr-7_1.log Power= 
JobId=7 ArrayJobId=7 ArrayTaskId=4-9%2 ArrayTaskThrottle=2 JobName=s.sh JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) ExitCode=0:0 StdOut=/tmp/sl/arr-7_4294967294.log Power= 
JobId=4 JobName=f.sh JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=3:0 StdOut=/tmp/sl/f.log
";

    #[test]
    fn parses_scontrol_lines() {
        let jobs = parse_scontrol(SCONTROL).unwrap();
        assert_eq!(jobs.len(), 4);
        assert_eq!(jobs[0].job, JobId(5));
        assert_eq!(jobs[0].state, JobState::Cancelled);
        assert_eq!(jobs[0].reason.as_deref(), Some("DependencyNeverSatisfied"));
        assert_eq!(jobs[0].dependency.as_deref(), Some("afterok:4(failed)"));
        assert_eq!(jobs[0].stdout, Some(PathBuf::from("/tmp/a b/5.log")));
        assert_eq!(jobs[1].job, JobId(7));
        assert_eq!(jobs[1].array_task.as_deref(), Some("1"));
        assert_eq!(jobs[1].restarts, Some(1));
        assert_eq!(jobs[1].reason, None);
        assert_eq!(jobs[2].array_task.as_deref(), Some("4-9%2"));
        assert_eq!(jobs[2].state, JobState::Pending);
        assert_eq!(jobs[3].exit_code, Some(ExitCode { code: 3, signal: 0 }));
        assert!(jobs[3].state.is_finished());
    }

    #[test]
    fn parses_sacct_lines() {
        let out = "12|COMPLETED|0:0|None\n13|CANCELLED by 0|0:0|DependencyNeverSatisfied\n\
                   14_2|FAILED|1:0|NonZeroExitCode\n14_[3-9%2]|PENDING|0:0|JobArrayTaskLimit\n";
        let jobs = parse_sacct(out).unwrap();
        assert_eq!(jobs.len(), 4);
        assert_eq!(jobs[1].state, JobState::Cancelled);
        assert_eq!(jobs[2].job, JobId(14));
        assert_eq!(jobs[2].array_task.as_deref(), Some("2"));
        assert_eq!(jobs[2].exit_code, Some(ExitCode { code: 1, signal: 0 }));
        assert_eq!(jobs[3].array_task.as_deref(), Some("3-9%2"));
        assert!(parse_sacct("12|COMPLETED\n").is_err());
    }

    #[test]
    fn unknown_states_are_kept() {
        assert_eq!(
            JobState::parse("REQUEUE_HOLD"),
            JobState::Other("REQUEUE_HOLD".into())
        );
        assert_eq!(JobState::parse("REQUEUE_HOLD").to_string(), "REQUEUE_HOLD");
        assert!(!JobState::Pending.is_finished());
    }
}
