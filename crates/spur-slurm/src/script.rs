use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{JobId, SlurmError, SlurmSettings};

/// Seconds before the time limit at which Slurm sends USR2 to the batch
/// shell, which forwards it to the payload and requeues the job.
pub const CHECKPOINT_SIGNAL_SECS: u32 = 120;

/// Environment variable that holds an array task's item from the manifest.
pub const ARRAY_ITEM_VAR: &str = "SPUR_ARRAY_ITEM";

/// A job that `afterok` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// A job already in Slurm.
    Job(JobId),
    /// An earlier job of the same [`crate::Slurm::submit_batch`] call, by position.
    InBatch(usize),
}

/// A job array: task `i` runs with `$SPUR_ARRAY_ITEM` set to `items[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArraySpec {
    /// One line of text per task (e.g. a grid cell's node id); no tabs or newlines.
    pub items: Vec<String>,
    /// At most this many tasks run at once (`%P`).
    pub max_parallel: Option<u32>,
}

/// Everything needed to write one job script and submit it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Slurm's job name; also names nothing on disk.
    pub name: String,
    /// Where the script is written; an array's manifest goes beside it
    /// (`<script>.manifest.tsv`). Keep it on a filesystem the nodes can read.
    pub script: PathBuf,
    /// stdout and stderr, appended across requeues. Slurm expands `%j`, `%A`
    /// and `%a`; an array's log must contain `%a` so that tasks do not share one.
    pub log: PathBuf,
    /// Working directory of the job; the script's directory if unset.
    pub workdir: Option<PathBuf>,
    pub settings: SlurmSettings,
    pub after_ok: Vec<After>,
    pub array: Option<ArraySpec>,
    /// Shell lines the job runs (bash). On USR2 the payload should checkpoint
    /// and exit: exit 0 means the work is done, anything else requeues the job.
    pub body: Vec<String>,
}

/// Paths written for a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFiles {
    pub script: PathBuf,
    pub manifest: Option<PathBuf>,
}

impl JobSpec {
    /// A job with the given name, script path, log and body, and no settings,
    /// dependencies or array.
    pub fn new(
        name: impl Into<String>,
        script: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
        body: Vec<String>,
    ) -> JobSpec {
        JobSpec {
            name: name.into(),
            script: script.into(),
            log: log.into(),
            workdir: None,
            settings: SlurmSettings::default(),
            after_ok: Vec::new(),
            array: None,
            body,
        }
    }

    /// The manifest path for an array job.
    pub fn manifest_path(&self) -> PathBuf {
        let mut name = self.script.file_name().unwrap_or_default().to_os_string();
        name.push(".manifest.tsv");
        self.script.with_file_name(name)
    }

    fn invalid(&self, reason: impl Into<String>) -> SlurmError {
        SlurmError::InvalidJob {
            job: self.name.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SlurmError> {
        self.settings.validate()?;
        if self.name.is_empty() || self.name.contains(['\n', '\r', '"']) {
            return Err(self.invalid("the name must be non-empty, without newlines or `\"`"));
        }
        if self.body.is_empty() {
            return Err(self.invalid("the body has no lines to run"));
        }
        if self.script.file_name().is_none() {
            return Err(self.invalid(format!(
                "the script path {} names no file",
                self.script.display()
            )));
        }
        let mut paths = vec![("script", &self.script), ("log", &self.log)];
        if let Some(w) = &self.workdir {
            paths.push(("workdir", w));
        }
        for (what, path) in paths {
            let text = path.to_str().unwrap_or("\n");
            if !path.is_absolute() || text.contains(['\n', '\r', '"']) {
                return Err(self.invalid(format!(
                    "the {what} path {} must be absolute UTF-8 without newlines or `\"`",
                    path.display()
                )));
            }
        }
        if let Some(array) = &self.array {
            if array.items.is_empty() {
                return Err(self.invalid("the array has no items"));
            }
            if let Some(i) = array
                .items
                .iter()
                .position(|item| item.is_empty() || item.contains(['\t', '\n', '\r']))
            {
                return Err(self.invalid(format!(
                    "array item {i} ({:?}) is empty or has a tab or newline",
                    array.items[i]
                )));
            }
            if array.max_parallel == Some(0) {
                return Err(self.invalid("the array's max_parallel must be at least 1"));
            }
            if !self.log.to_string_lossy().contains("%a") {
                return Err(self.invalid(format!(
                    "the log path {} of an array job must contain `%a` (the task index)",
                    self.log.display()
                )));
            }
        }
        Ok(())
    }

    /// The job script, with `after_ok` resolved to `after` (job ids in Slurm).
    pub fn render(&self, after: &[JobId]) -> Result<String, SlurmError> {
        self.validate()?;
        let mut options = vec![
            format!("--job-name={}", self.name),
            format!("--output={}", self.log.display()),
            "--open-mode=append".to_string(),
            format!("--signal=B:USR2@{CHECKPOINT_SIGNAL_SECS}"),
            "--requeue".to_string(),
        ];
        let workdir = match &self.workdir {
            Some(w) => w.as_path(),
            None => self.script.parent().unwrap_or(Path::new("/")),
        };
        options.push(format!("--chdir={}", workdir.display()));
        if let Some(array) = &self.array {
            let last = array.items.len() - 1;
            options.push(match array.max_parallel {
                Some(p) => format!("--array=0-{last}%{p}"),
                None => format!("--array=0-{last}"),
            });
        }
        if !after.is_empty() {
            let ids: Vec<String> = after.iter().map(|id| id.to_string()).collect();
            options.push(format!("--dependency=afterok:{}", ids.join(":")));
            // Without it a job whose dependency failed would stay pending forever.
            options.push("--kill-on-invalid-dep=yes".to_string());
        }
        options.extend(self.settings.sbatch_args());

        let mut s = String::new();
        s.push_str("#!/bin/bash\n");
        let _ = writeln!(
            s,
            "# Job `{}`, written by spur for `sbatch --parsable`.",
            self.name
        );
        for option in &options {
            let _ = writeln!(s, "#SBATCH {}", sbatch_quote(option));
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "echo \"spur: job $SLURM_JOB_ID${{SLURM_ARRAY_TASK_ID:+ (task $SLURM_ARRAY_TASK_ID)}} start $((${{SLURM_RESTART_COUNT:-0}} + 1)) on $(hostname) at $(date -Is)\" >&2"
        );
        if self.array.is_some() {
            let manifest = shell_quote(&self.manifest_path().to_string_lossy());
            let _ = write!(
                s,
                "{ARRAY_ITEM_VAR}=$(awk -F'\\t' -v i=\"$SLURM_ARRAY_TASK_ID\" '$1 == i {{ sub(/^[^\\t]*\\t/, \"\"); print; exit }}' {manifest})\n\
                 if [ -z \"${ARRAY_ITEM_VAR}\" ]; then\n\
                 \x20   echo \"spur: task $SLURM_ARRAY_TASK_ID is not in the manifest \"{manifest} >&2\n\
                 \x20   exit 1\n\
                 fi\n\
                 export {ARRAY_ITEM_VAR}\n"
            );
        }
        s.push_str(PAYLOAD_START);
        for line in &self.body {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str(PAYLOAD_END);
        Ok(s)
    }

    /// Writes the script (and an array's manifest), `after_ok` resolved to `after`.
    pub fn write(&self, after: &[JobId]) -> Result<JobFiles, SlurmError> {
        let text = self.render(after)?;
        if let Some(dir) = self.script.parent() {
            fs::create_dir_all(dir).map_err(|source| SlurmError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let manifest = match &self.array {
            Some(array) => {
                let path = self.manifest_path();
                let mut m = String::new();
                for (i, item) in array.items.iter().enumerate() {
                    let _ = writeln!(m, "{i}\t{item}");
                }
                write_file(&path, &m)?;
                Some(path)
            }
            None => None,
        };
        write_file(&self.script, &text)?;
        Ok(JobFiles {
            script: self.script.clone(),
            manifest,
        })
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), SlurmError> {
    fs::write(path, text).map_err(|source| SlurmError::Write {
        path: path.to_path_buf(),
        source,
    })
}

// The payload runs in the background in its own process group (`set -m`), so
// the batch shell stays free to handle USR2 and can pass it to every process
// of the payload. The payload's own shell ignores USR2 via a no-op trap (not
// SIG_IGN, which its children would inherit) and keeps running its command.
const PAYLOAD_START: &str = "\
spur_pid=
spur_on_usr2() {
    echo \"spur: USR2 (time limit near): asking the payload to checkpoint\" >&2
    if [ -n \"$spur_pid\" ]; then
        kill -USR2 -- \"-$spur_pid\" 2>/dev/null
        wait \"$spur_pid\"
        spur_status=$?
        if [ \"$spur_status\" -eq 0 ]; then
            echo \"spur: the payload finished\" >&2
            exit 0
        fi
    fi
    echo \"spur: requeueing job $SLURM_JOB_ID\" >&2
    scontrol requeue \"$SLURM_JOB_ID\" || echo \"spur: scontrol requeue $SLURM_JOB_ID failed\" >&2
    exit \"${spur_status:-1}\"
}
trap spur_on_usr2 USR2

spur_payload() {
";

const PAYLOAD_END: &str = "\
}

set -m
( trap : USR2; spur_payload ) &
spur_pid=$!
set +m
wait \"$spur_pid\"
";

/// A value on an `#SBATCH` line: sbatch splits on whitespace and stops at `#`
/// unless the text is in double quotes (values with `"` are rejected earlier).
fn sbatch_quote(option: &str) -> String {
    match option.split_once('=') {
        Some((name, value)) if value.contains(|c: char| c.is_whitespace() || c == '#') => {
            format!("{name}=\"{value}\"")
        }
        _ => option.to_string(),
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec::new(
            "train a",
            "/cluster/runs/a/job.sh",
            "/cluster/runs/a/job #1.log",
            vec!["spur exec-node abc".into()],
        )
    }

    #[test]
    fn renders_options_and_body() {
        let mut job = spec();
        job.settings.partition = Some("gpu".into());
        job.after_ok = vec![After::Job(JobId(7)), After::InBatch(0)];
        let text = job.render(&[JobId(7), JobId(9)]).unwrap();
        for line in [
            "#!/bin/bash\n",
            "#SBATCH --job-name=\"train a\"\n",
            "#SBATCH --output=\"/cluster/runs/a/job #1.log\"\n",
            "#SBATCH --open-mode=append\n",
            "#SBATCH --signal=B:USR2@120\n",
            "#SBATCH --requeue\n",
            "#SBATCH --chdir=/cluster/runs/a\n",
            "#SBATCH --dependency=afterok:7:9\n",
            "#SBATCH --kill-on-invalid-dep=yes\n",
            "#SBATCH --partition=gpu\n",
            "spur_payload() {\nspur exec-node abc\n}\n",
            "scontrol requeue \"$SLURM_JOB_ID\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("--array"));
        // Options come before the first command, or sbatch ignores them.
        let first_command = text.find("\necho").unwrap();
        assert!(text.rfind("#SBATCH").unwrap() < first_command);
    }

    #[test]
    fn no_dependency_lines_without_dependencies() {
        let text = spec().render(&[]).unwrap();
        assert!(!text.contains("--dependency"));
        assert!(!text.contains("--kill-on-invalid-dep"));
    }

    #[test]
    fn array_writes_manifest_beside_script() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = spec();
        job.script = dir.path().join("cells.sh");
        job.log = dir.path().join("cells-%A_%a.log");
        job.array = Some(ArraySpec {
            items: vec!["cell-0".into(), "cell one".into(), "c'2".into()],
            max_parallel: Some(2),
        });
        let files = job.write(&[]).unwrap();
        let manifest = files.manifest.unwrap();
        assert_eq!(manifest, dir.path().join("cells.sh.manifest.tsv"));
        assert_eq!(
            fs::read_to_string(&manifest).unwrap(),
            "0\tcell-0\n1\tcell one\n2\tc'2\n"
        );
        let text = fs::read_to_string(files.script).unwrap();
        assert!(text.contains("#SBATCH --array=0-2%2\n"), "{text}");
        assert!(text.contains("export SPUR_ARRAY_ITEM\n"), "{text}");
    }

    #[test]
    fn rejects_bad_jobs() {
        let mut job = spec();
        job.array = Some(ArraySpec {
            items: vec!["a".into()],
            max_parallel: None,
        });
        let err = job.render(&[]).unwrap_err().to_string();
        assert!(err.contains("must contain `%a`"), "{err}");

        let mut job = spec();
        job.body.clear();
        assert!(job.render(&[]).is_err());

        let mut job = spec();
        job.array = Some(ArraySpec {
            items: vec!["a\tb".into()],
            max_parallel: None,
        });
        job.log = "/x/%a.log".into();
        assert!(job.render(&[]).is_err());

        let mut job = spec();
        job.script = "relative/job.sh".into();
        assert!(job.render(&[]).is_err());
    }
}
