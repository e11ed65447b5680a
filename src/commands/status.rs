//! `spur status FILE`: how far each run has got, from the cache and run
//! records, and for runs submitted to Slurm, from Slurm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use spur_exec::slurm::{job_states, slurm_dir, JobBook, JobRecord, Work};
use spur_exec::spur_slurm::{JobId, JobInfo, JobState, Slurm};
use spur_plan::{Plan, PlanExperiment};

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// Only these cells: `axis=value[|value],…`.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: StatusArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let runs = workspace::select_runs(exp, args.only.as_deref())?;
    let mut cached = workspace::cached(store)?;
    // A manifest that fails its own sha256 (or cannot be read) is no entry.
    let mut corrupt = Vec::new();
    for n in workspace::nodes_of(plan, &runs) {
        let id = plan.nodes[n as usize].id;
        if cached.contains(&id) {
            if let Err(e) = store.read_manifest(&id) {
                cached.remove(&id);
                corrupt.push(e);
            }
        }
    }
    let slurm = SlurmView::load(store, &plan.experiment)?;
    println!(
        "{:<16}  {:>13}  {:>5}  {:<9}  cell",
        "run", "nodes", "step", "state"
    );
    for r in runs {
        let run = &plan.runs[r];
        let done = run
            .nodes
            .iter()
            .filter(|&&n| cached.contains(&plan.nodes[n as usize].id))
            .count();
        let step = run
            .nodes
            .iter()
            .filter(|&&n| cached.contains(&plan.nodes[n as usize].id))
            .map(|&n| plan.nodes[n as usize].step)
            .max()
            .unwrap_or(0);
        let record = store.read_run_record(&run.id)?;
        let recorded = record.as_ref().map_or("not started", |r| r.status.name());
        let finished = done == run.nodes.len();
        // Slurm's jobs for what the run still lacks: its chain, shared nodes.
        let jobs: Vec<&JobRecord> = match &slurm {
            Some(view) if !finished => {
                let mut works = vec![Work::Run(run.id.clone())];
                works.extend(
                    run.nodes
                        .iter()
                        .map(|&n| &plan.nodes[n as usize])
                        .filter(|n| n.runs.len() > 1 && !cached.contains(&n.id))
                        .map(|n| Work::Node(n.id)),
                );
                works.iter().filter_map(|w| view.latest.get(w)).collect()
            }
            _ => Vec::new(),
        };
        let chain_state = jobs
            .iter()
            .find(|j| matches!(j.work, Work::Run(_)))
            .and_then(|j| slurm.as_ref()?.info(j))
            .map(|i| i.state.to_string())
            .filter(|s| s != "COMPLETED");
        // A record saying "running" from a process that died is stale.
        let state = if finished {
            "finished"
        } else if let Some(s) = chain_state.as_deref() {
            s
        } else if recorded == "finished" || recorded == "running" {
            "incomplete"
        } else {
            recorded
        };
        println!(
            "{:<16}  {:>6}/{:<6}  {:>5}  {:<9}  {}",
            run.id,
            done,
            run.nodes.len(),
            step,
            state,
            exp.runs[r].label()
        );
        if let Some(err) = record.as_ref().and_then(|r| r.error.as_deref()) {
            if state == "failed" {
                println!("{:18}error: {}", "", err.lines().next().unwrap_or(""));
            }
        }
        if let Some(view) = &slurm {
            for job in jobs {
                println!("{:18}{}", "", view.describe(job, plan));
            }
        }
    }
    for e in &corrupt {
        eprintln!(
            "warning: {e}; counted as not done (`spur run {} --verify` moves it aside and recomputes it)",
            args.file.display()
        );
    }
    if let Some(SlurmView { states: Err(e), .. }) = &slurm {
        eprintln!("warning: cannot ask Slurm about this experiment's jobs: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The experiment's latest Slurm job for each unit of work, and Slurm's view
/// of those jobs (an error where Slurm cannot be asked, e.g. off the cluster).
struct SlurmView {
    latest: HashMap<Work, JobRecord>,
    states: Result<HashMap<JobId, JobInfo>, String>,
}

impl SlurmView {
    fn load(store: &spur_store::Store, exp: &PlanExperiment) -> Result<Option<SlurmView>> {
        let book = JobBook::load(&slurm_dir(store.root(), exp))?;
        if book.jobs.is_empty() {
            return Ok(None);
        }
        let latest: HashMap<Work, JobRecord> = book
            .latest()
            .into_iter()
            .map(|(w, j)| (w.clone(), j.clone()))
            .collect();
        let ids: Vec<JobId> = latest.values().map(JobRecord::job_id).collect();
        let states = job_states(&Slurm::from_env(), &ids).map_err(|e| e.to_string());
        Ok(Some(SlurmView { latest, states }))
    }

    fn info(&self, job: &JobRecord) -> Option<&JobInfo> {
        self.states.as_ref().ok()?.get(&job.job_id())
    }

    /// `slurm job 12 (chain): FAILED, exit 3:0, log /…/run-….log`.
    fn describe(&self, job: &JobRecord, plan: &Plan) -> String {
        let what = match &job.work {
            Work::Run(_) => "chain".to_string(),
            Work::Node(id) => match plan.node(id) {
                Some(n) => format!(
                    "shared {} step {}, {}",
                    n.params
                        .get("command")
                        .and_then(|c| c.as_str())
                        .unwrap_or(n.kind.name()),
                    n.step,
                    &id.hex()[..12]
                ),
                None => format!("shared node {}", &id.hex()[..12]),
            },
        };
        let log = job.log.display();
        let state = match (&self.states, self.info(job)) {
            (Err(_), _) => format!("state unknown (Slurm did not answer); log {log}"),
            (Ok(_), None) => format!("no longer known to Slurm; log {log}"),
            (Ok(_), Some(info)) => {
                let mut s = info.state.to_string();
                if let Some(reason) = &info.reason {
                    s.push_str(&format!(" ({reason})"));
                }
                let ended_badly = info.state.is_finished() && info.state != JobState::Completed;
                let exit = info
                    .exit_code
                    .filter(|c| ended_badly && (c.code, c.signal) != (0, 0));
                if let Some(code) = exit {
                    s.push_str(&format!(", exit {code}"));
                }
                // A job cancelled before it started has no log.
                if (ended_badly || info.state == JobState::Running) && job.log.exists() {
                    s.push_str(&format!(", log {log}"));
                }
                s
            }
        };
        format!("slurm job {} ({what}): {state}", job.id)
    }
}
