//! Submitting the pending part of a plan to Slurm, and what its jobs run.
//!
//! Every unit of [`units`] becomes one job: a run's fused chain
//! (`run:<run id>`) or a shared node (`node:<node id>`); chains wait for the
//! shared nodes they read with `afterok`. A job runs
//! `spur --cache DIR exec-node FILE WORK` on its compute node, which computes
//! that work with [`crate::LocalExecutor::execute_units`]: the same locks and
//! atomic publish as a local run, so the cache (on a filesystem every node
//! mounts) is the only channel between jobs. Each submission is recorded in
//! `<cache>/slurm/<experiment>/jobs.json`, beside its scripts and logs, so that
//! status, cancel and the next submission know the experiment's jobs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use spur_plan::{Hash, Plan, PlanExperiment};
use spur_slurm::{After, JobId, JobInfo, JobSpec, JobState, Slurm, SlurmError, SlurmSettings};
use spur_stages::{Registry, Resource};

use crate::{units, ExecError, Executor, Job, Options, Unit};

#[derive(Debug, thiserror::Error)]
pub enum SlurmExecError {
    #[error("{}: executor.slurm: {message}", file.display())]
    Settings { file: PathBuf, message: String },
    #[error(transparent)]
    Slurm(#[from] SlurmError),
    #[error(transparent)]
    Store(#[from] spur_store::StoreError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a job list written by spur ({source}); move it aside to start a new one", path.display())]
    Book {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("`{0}` names no unit of work: expected `run:<run id>` (16 hex digits) or `node:<node id>` (64 hex digits)")]
    BadWork(String),
    #[error("{work} is not in the plan of {}: the experiment changed since the job was submitted; submit it again", file.display())]
    NotInPlan { work: Work, file: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SlurmExecError + '_ {
    move |source| SlurmExecError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What one job computes: a run's fused chain or one shared node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Work {
    /// The nodes only this run uses, in order (run id as in the plan).
    Run(String),
    /// A node that several runs use.
    Node(Hash),
}

impl Work {
    /// The unit's work, named so that the same work has the same name in
    /// every submission.
    pub fn of(plan: &Plan, unit: &Unit) -> Work {
        match unit.run {
            Some(r) => Work::Run(plan.runs[r].id.clone()),
            None => Work::Node(plan.nodes[unit.nodes[0] as usize].id),
        }
    }

    /// The nodes of this work that are not in `cached`, as a unit that waits
    /// for nothing (its job waited for its dependencies).
    pub fn unit(&self, plan: &Plan, cached: &HashSet<Hash>) -> Option<Unit> {
        match self {
            Work::Run(id) => {
                let r = plan.runs.iter().position(|run| &run.id == id)?;
                let nodes = plan.runs[r]
                    .nodes
                    .iter()
                    .copied()
                    .filter(|&n| {
                        let node = &plan.nodes[n as usize];
                        node.runs.len() == 1 && !cached.contains(&node.id)
                    })
                    .collect();
                Some(Unit {
                    nodes,
                    after: Vec::new(),
                    run: Some(r),
                })
            }
            Work::Node(id) => {
                let n = plan.position(id)?;
                Some(Unit {
                    nodes: if cached.contains(id) {
                        Vec::new()
                    } else {
                        vec![n]
                    },
                    after: Vec::new(),
                    run: None,
                })
            }
        }
    }

    /// The runs this work belongs to (all of a shared node's runs).
    pub fn runs(&self, plan: &Plan) -> Vec<usize> {
        match self {
            Work::Run(id) => plan
                .runs
                .iter()
                .position(|r| &r.id == id)
                .into_iter()
                .collect(),
            Work::Node(id) => plan
                .node(id)
                .map(|n| n.runs.iter().map(|&r| r as usize).collect())
                .unwrap_or_default(),
        }
    }
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Work::Run(id) => write!(f, "run:{id}"),
            Work::Node(id) => write!(f, "node:{}", id.hex()),
        }
    }
}

impl FromStr for Work {
    type Err = SlurmExecError;

    fn from_str(s: &str) -> Result<Work, SlurmExecError> {
        let hex = |t: &str, len: usize| t.len() == len && t.bytes().all(|b| b.is_ascii_hexdigit());
        match s.split_once(':') {
            Some(("run", id)) if hex(id, 16) => Ok(Work::Run(id.to_ascii_lowercase())),
            Some(("node", id)) if hex(id, 64) => Hash::from_hex(id)
                .map(Work::Node)
                .ok_or_else(|| SlurmExecError::BadWork(s.to_string())),
            _ => Err(SlurmExecError::BadWork(s.to_string())),
        }
    }
}

impl TryFrom<String> for Work {
    type Error = SlurmExecError;

    fn try_from(s: String) -> Result<Work, SlurmExecError> {
        s.parse()
    }
}

impl From<Work> for String {
    fn from(w: Work) -> String {
        w.to_string()
    }
}

/// The `executor: {slurm: {…}}` block of an experiment; defaults without one.
pub fn settings(exp: &PlanExperiment) -> Result<SlurmSettings, SlurmExecError> {
    let block = exp
        .executor
        .as_ref()
        .and_then(|e| e.get("slurm"))
        .filter(|s| !s.is_null());
    let Some(block) = block else {
        return Ok(SlurmSettings::default());
    };
    let err = |message: String| SlurmExecError::Settings {
        file: exp.path.clone(),
        message,
    };
    let settings: SlurmSettings =
        serde_json::from_value(block.clone()).map_err(|e| err(e.to_string()))?;
    settings.validate().map_err(|e| err(e.to_string()))?;
    Ok(settings)
}

/// Where an experiment's scripts, logs and job list live, under the cache root.
pub fn slurm_dir(cache: &Path, exp: &PlanExperiment) -> PathBuf {
    let name: String = exp
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() || name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    };
    cache.join("slurm").join(name)
}

/// One submitted job, as `jobs.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    /// Slurm's job id.
    pub id: u64,
    pub work: Work,
    pub name: String,
    /// Jobs it waits for (`afterok`).
    pub after: Vec<u64>,
    pub script: PathBuf,
    pub log: PathBuf,
    /// Seconds since the Unix epoch.
    pub submitted_at: u64,
}

impl JobRecord {
    pub fn job_id(&self) -> JobId {
        JobId(self.id)
    }
}

/// Every job submitted for one experiment, oldest first.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobBook {
    pub jobs: Vec<JobRecord>,
}

impl JobBook {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("jobs.json")
    }

    /// The list in `dir`, empty if nothing was submitted from there.
    pub fn load(dir: &Path) -> Result<JobBook, SlurmExecError> {
        let path = JobBook::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| SlurmExecError::Book { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JobBook::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn save(&self, dir: &Path) -> Result<(), SlurmExecError> {
        let bytes = serde_json::to_vec_pretty(self).expect("job records serialise");
        spur_store::write_atomic(&JobBook::path(dir), &bytes)?;
        Ok(())
    }

    /// The latest job of each unit of work.
    pub fn latest(&self) -> HashMap<&Work, &JobRecord> {
        let mut latest = HashMap::new();
        for job in &self.jobs {
            latest.insert(&job.work, job);
        }
        latest
    }
}

/// Slurm's view of these jobs, by job id (one entry per job: none of spur's
/// jobs are arrays). Jobs Slurm has forgotten are missing.
pub fn job_states(slurm: &Slurm, ids: &[JobId]) -> Result<HashMap<JobId, JobInfo>, SlurmError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    Ok(slurm.query(&ids)?.into_iter().map(|j| (j.job, j)).collect())
}

/// Whether a job will still compute its work: queued or running, and not
/// waiting for a job that failed (Slurm cancels such a job at its next pass).
fn still_coming(job: &JobRecord, states: &HashMap<JobId, JobInfo>) -> bool {
    let Some(info) = states.get(&job.job_id()) else {
        return false;
    };
    if info.state.is_finished() || info.reason.as_deref() == Some("DependencyNeverSatisfied") {
        return false;
    }
    job.after.iter().all(|a| match states.get(&JobId(*a)) {
        Some(d) => !d.state.is_finished() || d.state == JobState::Completed,
        None => true,
    })
}

#[derive(Debug, Default)]
pub struct Submission {
    /// This submission's scripts and logs (unset when nothing was submitted).
    pub dir: Option<PathBuf>,
    /// Jobs submitted now, in submission order.
    pub submitted: Vec<JobRecord>,
    /// Earlier jobs still queued or running whose work was not submitted again.
    pub queued: Vec<JobRecord>,
    /// Wall time spent writing the scripts and in `sbatch`.
    pub sbatch: Duration,
}

/// Submits every pending unit of the job's runs that no earlier job of this
/// experiment still has queued or running, in dependency order. Slurm
/// rejecting one job cancels those already submitted, and nothing is recorded.
/// Queues a job's pending units on Slurm, one batch job each with `afterok` dependencies, and
/// returns once they are queued (`spur run --executor slurm`); the jobs run `spur exec-node`.
pub struct SlurmExecutor {
    pub slurm: Slurm,
    /// The experiment's validated `executor: {slurm: …}` block ([`settings`]).
    pub settings: SlurmSettings,
    /// The `spur` binary the jobs run; it must be at this path on the compute nodes.
    pub spur: PathBuf,
}

impl Executor for SlurmExecutor {
    type Report = Submission;

    /// The options are the local executor's (threads, devices): a job's resources come from
    /// the settings.
    fn execute(&self, job: &Job, _options: &Options) -> Result<Submission, ExecError> {
        Ok(self.submit(job)?)
    }
}

impl SlurmExecutor {
    fn submit(&self, job: &Job) -> Result<Submission, SlurmExecError> {
        let slurm = &self.slurm;
        let (plan, store) = (job.plan, job.store);
        let cache = std::fs::canonicalize(store.root()).map_err(io_err(store.root()))?;
        let exp = &plan.experiment;
        let file = std::fs::canonicalize(&exp.path).map_err(io_err(&exp.path))?;
        let dir = slurm_dir(&cache, exp);

        // One submitter at a time per experiment: from reading the job list to
        // recording what was submitted.
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join("jobs.lock");
        let lock = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;

        let cached = store.cached_ids()?;
        let units = units(plan, &job.runs, &cached);
        let order = topological(&units);
        let works: Vec<Work> = units.iter().map(|u| Work::of(plan, u)).collect();

        let mut book = JobBook::load(&dir)?;
        let latest = book.latest();
        let earlier: Vec<&JobRecord> = works
            .iter()
            .filter_map(|w| latest.get(w).copied())
            .collect();
        let ids: Vec<JobId> = earlier
            .iter()
            .flat_map(|j| std::iter::once(j.id).chain(j.after.iter().copied()))
            .map(JobId)
            .collect();
        let states = if ids.is_empty() {
            HashMap::new()
        } else {
            job_states(slurm, &ids)?
        };

        enum Assigned {
            Queued(JobId),
            New(usize),
        }
        let mut assigned: Vec<Option<Assigned>> = (0..units.len()).map(|_| None).collect();
        let mut submission = Submission::default();
        let mut planned: Vec<usize> = Vec::new();
        for &u in &order {
            if let Some(earlier) = latest.get(&works[u]).filter(|j| still_coming(j, &states)) {
                assigned[u] = Some(Assigned::Queued(earlier.job_id()));
                submission.queued.push((*earlier).clone());
            } else {
                assigned[u] = Some(Assigned::New(planned.len()));
                planned.push(u);
            }
        }
        if planned.is_empty() {
            return Ok(submission);
        }

        let sub = new_submission_dir(&dir)?;
        let exp_name = &exp.name;
        let mut specs = Vec::with_capacity(planned.len());
        for &u in &planned {
            let unit = &units[u];
            let (name, stem) = match &works[u] {
                Work::Run(id) => {
                    let r = unit.run.expect("a chain's work names its run");
                    (
                        format!("{exp_name}/{}", plan.runs[r].label),
                        format!("run-{id}"),
                    )
                }
                Work::Node(id) => {
                    let node = &plan.nodes[unit.nodes[0] as usize];
                    let what = node
                        .params
                        .get("command")
                        .and_then(|c| c.as_str())
                        .unwrap_or(node.kind.name());
                    let short = &id.hex()[..12];
                    (
                        format!("{exp_name}/{what}@{}-{short}", node.step),
                        format!("node-{}-{short}", node.kind.name()),
                    )
                }
            };
            let body = vec![format!(
                "{} --cache {} exec-node {} {}",
                shell_quote(&self.spur),
                shell_quote(&cache),
                shell_quote(&file),
                works[u]
            )];
            let mut spec = JobSpec::new(
                name.replace(['\n', '\r', '"'], "_"),
                sub.join(format!("{stem}.sh")),
                sub.join(format!("{stem}.log")),
                body,
            );
            spec.settings = if needs_accelerator(plan, job.registry, unit) {
                self.settings.clone()
            } else {
                without_gpus(&self.settings)
            };
            spec.after_ok = unit
                .after
                .iter()
                .map(|&d| match assigned[d] {
                    Some(Assigned::Queued(id)) => After::Job(id),
                    Some(Assigned::New(i)) => After::InBatch(i),
                    None => unreachable!("units are assigned in dependency order"),
                })
                .collect();
            specs.push(spec);
        }

        let started = Instant::now();
        let result = slurm.submit_batch(&specs);
        submission.sbatch = started.elapsed();
        let submitted = match result {
            Ok(s) => s,
            Err(e) => {
                // Nothing of this submission is queued: keep no empty directory.
                let _ = std::fs::remove_dir_all(&sub);
                return Err(e.into());
            }
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for ((&u, spec), s) in planned.iter().zip(&specs).zip(&submitted) {
            let after = spec
                .after_ok
                .iter()
                .map(|a| match a {
                    After::Job(id) => id.0,
                    After::InBatch(i) => submitted[*i].id.0,
                })
                .collect();
            submission.submitted.push(JobRecord {
                id: s.id.0,
                work: works[u].clone(),
                name: spec.name.clone(),
                after,
                script: s.files.script.clone(),
                log: spec.log.clone(),
                submitted_at: now,
            });
        }
        book.jobs.extend(submission.submitted.iter().cloned());
        book.save(&dir)?;
        submission.dir = Some(sub);
        Ok(submission)
    }
}

/// Unit indices such that every unit comes after the units it waits for.
fn topological(units: &[Unit]) -> Vec<usize> {
    let mut waiting: Vec<usize> = units.iter().map(|u| u.after.len()).collect();
    let mut dependents = vec![Vec::new(); units.len()];
    for (u, unit) in units.iter().enumerate() {
        for &d in &unit.after {
            dependents[d].push(u);
        }
    }
    let mut order: Vec<usize> = (0..units.len()).filter(|&u| waiting[u] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let u = order[next];
        next += 1;
        for &d in &dependents[u] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                order.push(d);
            }
        }
    }
    order
}

/// `submit-N` under `dir`, numbered after the last one.
fn new_submission_dir(dir: &Path) -> Result<PathBuf, SlurmExecError> {
    let last = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("submit-"))
                .and_then(|n| n.parse::<u32>().ok())
        })
        .max()
        .unwrap_or(0);
    for n in last + 1.. {
        let sub = dir.join(format!("submit-{n}"));
        match std::fs::create_dir(&sub) {
            Ok(()) => return Ok(sub),
            // Left by a submitter that failed before recording anything.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&sub)(e)),
        }
    }
    unreachable!("some submission number is free")
}

fn needs_accelerator(plan: &Plan, registry: &Registry, unit: &Unit) -> bool {
    unit.nodes.iter().any(|&n| {
        let node = &plan.nodes[n as usize];
        registry
            .get(node.kind)
            .is_some_and(|s| s.resource(node) == Resource::Accelerator)
    })
}

/// Settings for a job without accelerator nodes: the same, less the GPUs.
fn without_gpus(settings: &SlurmSettings) -> SlurmSettings {
    SlurmSettings {
        gpus: None,
        gpu_type: None,
        cpus_per_gpu: None,
        mem_per_gpu: None,
        ..settings.clone()
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// Cancels the jobs that are still queued or running; returns their ids.
pub fn cancel(slurm: &Slurm, jobs: &[&JobRecord]) -> Result<Vec<JobId>, SlurmError> {
    let ids: Vec<JobId> = jobs.iter().map(|j| j.job_id()).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let states = job_states(slurm, &ids)?;
    let mut live: Vec<JobId> = states
        .values()
        .filter(|j| !j.state.is_finished())
        .map(|j| j.job)
        .collect();
    live.sort_unstable();
    slurm.cancel(&live)?;
    Ok(live)
}

static USR2_RECEIVED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr2(_signal: libc::c_int) {
    USR2_RECEIVED.store(true, Ordering::SeqCst);
}

/// Sets the returned flag when the process receives USR2, which a spur job
/// is sent shortly before its time limit.
pub fn stop_on_usr2() -> std::io::Result<&'static AtomicBool> {
    let handler: extern "C" fn(libc::c_int) = on_usr2;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
    // `action` is fully initialised before use.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(&USR2_RECEIVED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(after: &[usize]) -> Unit {
        Unit {
            nodes: vec![0],
            after: after.to_vec(),
            run: None,
        }
    }

    #[test]
    fn topological_order_puts_dependencies_first() {
        // units() may list a chain before the shared nodes it waits for.
        let units = vec![unit(&[2, 3]), unit(&[]), unit(&[1]), unit(&[])];
        let order = topological(&units);
        assert_eq!(order.len(), 4);
        let pos = |u: usize| order.iter().position(|&x| x == u).unwrap();
        assert!(pos(2) < pos(0) && pos(3) < pos(0) && pos(1) < pos(2));
    }

    #[test]
    fn work_names_round_trip() {
        let run: Work = "run:0123456789abcdef".parse().unwrap();
        assert_eq!(run, Work::Run("0123456789abcdef".into()));
        let hex = "ab".repeat(32);
        let node: Work = format!("node:{hex}").parse().unwrap();
        assert_eq!(node.to_string(), format!("node:{hex}"));
        for bad in [
            "run:0123",
            "node:xyz",
            "0123456789abcdef",
            "cell:0123456789abcdef",
        ] {
            let err = bad.parse::<Work>().unwrap_err().to_string();
            assert!(err.contains("expected `run:<run id>`"), "{bad}: {err}");
        }
        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(json, "\"run:0123456789abcdef\"");
        assert_eq!(serde_json::from_str::<Work>(&json).unwrap(), run);
    }

    #[test]
    fn a_job_waiting_for_a_failed_job_is_not_coming() {
        let record = |id, after: &[u64]| JobRecord {
            id,
            work: Work::Run("0123456789abcdef".into()),
            name: "x".into(),
            after: after.to_vec(),
            script: "/s.sh".into(),
            log: "/s.log".into(),
            submitted_at: 0,
        };
        let info = |id, state, reason: Option<&str>| JobInfo {
            job: JobId(id),
            array_task: None,
            state,
            reason: reason.map(str::to_string),
            exit_code: None,
            restarts: None,
            stdout: None,
            dependency: None,
        };
        let states: HashMap<JobId, JobInfo> = [
            info(1, JobState::Failed, Some("NonZeroExitCode")),
            info(2, JobState::Completed, None),
            info(3, JobState::Pending, Some("Dependency")),
            info(4, JobState::Running, None),
            info(5, JobState::Pending, Some("DependencyNeverSatisfied")),
        ]
        .into_iter()
        .map(|j| (j.job, j))
        .collect();
        assert!(!still_coming(&record(3, &[1]), &states));
        assert!(still_coming(&record(3, &[2, 4]), &states));
        assert!(still_coming(&record(4, &[]), &states));
        assert!(!still_coming(&record(5, &[]), &states));
        assert!(!still_coming(&record(1, &[]), &states));
        // Slurm forgot it: it ended long ago.
        assert!(!still_coming(&record(9, &[]), &states));
    }
}
