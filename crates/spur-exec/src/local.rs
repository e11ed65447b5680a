//! The local executor: units on a thread pool, accelerator units serialised
//! per device, failures confined to the runs they belong to.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Instant, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use spur_plan::{Hash, Node, Role};
use spur_stages::{interrupt, InputDir, NodeContext, Resource, Session};
use spur_store::{NodeManifest, StoreError};

use crate::{units, ExecError, Executor, Job, Options, Outcome, RunFailure, Unit};

pub struct LocalExecutor;

/// Progress: on a terminal, an overall bar with ETA plus one line per
/// worker; piped or logged (a file, a Slurm log), one line per finished node.
pub struct Progress {
    _multi: MultiProgress,
    total: ProgressBar,
    workers: Vec<ProgressBar>,
    /// Print a line per finished node (progress wanted, stdout not a terminal).
    lines: bool,
}

impl Progress {
    fn new(enabled: bool, nodes: u64, workers: usize) -> Progress {
        let terminal = std::io::stdout().is_terminal();
        let multi = MultiProgress::with_draw_target(if enabled && terminal {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        });
        let total = multi.add(ProgressBar::new(nodes));
        total.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} nodes  {elapsed} elapsed, ETA {eta}",
            )
            .expect("valid template"),
        );
        let workers = (0..workers)
            .map(|_| {
                let w = multi.add(ProgressBar::new_spinner());
                w.set_style(
                    ProgressStyle::with_template("  {spinner} {msg}").expect("valid template"),
                );
                w
            })
            .collect();
        Progress {
            _multi: multi,
            total,
            workers,
            lines: enabled && !terminal,
        }
    }

    /// Counts a finished node and, when logging, prints
    /// `[done/total] kind step N: label (Ts)`.
    fn node_done(&self, what: impl FnOnce() -> String) {
        let what = self.lines.then(what);
        // Counting and printing under one lock: two workers finishing at once get their own
        // numbers, in order, and their lines never interleave.
        let mut out = std::io::stdout().lock();
        self.total.inc(1);
        if let Some(what) = what {
            let total = self.total.length().unwrap_or(0);
            let _ = writeln!(out, "[{}/{total}] {what}", self.total.position());
        }
    }

    fn worker(&self, msg: String) {
        let i = rayon::current_thread_index().unwrap_or(0) % self.workers.len().max(1);
        if let Some(w) = self.workers.get(i) {
            w.set_message(msg);
            w.tick();
        }
    }

    fn finish(&self) {
        for w in &self.workers {
            w.finish_and_clear();
        }
        self.total.finish_and_clear();
    }
}

/// Devices handed out to accelerator units, one unit per device at a time.
struct Devices {
    free: Mutex<Vec<String>>,
    returned: Condvar,
}

impl Devices {
    fn take(&self) -> String {
        let mut free = self.free.lock().expect("device lock");
        loop {
            if let Some(d) = free.pop() {
                return d;
            }
            free = self.returned.wait(free).expect("device lock");
        }
    }

    fn give(&self, d: String) {
        self.free.lock().expect("device lock").push(d);
        self.returned.notify_one();
    }
}

struct State<'a> {
    job: &'a Job<'a>,
    options: &'a Options,
    units: Vec<Unit>,
    dependents: Vec<Vec<usize>>,
    waiting: Vec<AtomicUsize>,
    stop: &'a AtomicBool,
    devices: Devices,
    progress: Progress,
    outcome: Mutex<Outcome>,
}

fn now() -> String {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Executor for LocalExecutor {
    type Report = Outcome;

    fn execute(&self, job: &Job, options: &Options) -> Result<Outcome, ExecError> {
        let store = job.store;
        let mut cached = store.cached_ids()?;
        let mut outcome = Outcome::default();
        if options.verify {
            let ids: HashSet<Hash> = job
                .runs
                .iter()
                .flat_map(|&r| job.plan.runs[r].nodes.iter())
                .map(|&n| job.plan.nodes[n as usize].id)
                .filter(|id| cached.contains(id))
                .collect();
            for id in ids {
                if let Err(e) = store.verify(&id) {
                    match store.quarantine(&id)? {
                        Some(dest) => {
                            tracing::warn!("{e}; moved to {}, to be recomputed", dest.display())
                        }
                        None => tracing::warn!("{e}; it has gone meanwhile, to be recomputed"),
                    }
                    cached.remove(&id);
                    outcome.corrupted.push((id, e.to_string()));
                }
            }
        }
        let units = units(job.plan, &job.runs, &cached);
        run_units(job, options, units, outcome, &AtomicBool::new(false))
    }
}

impl LocalExecutor {
    /// Runs the given units, e.g. a cluster job's share of the plan, in this
    /// process. Setting `stop` (from a signal handler) stops every unit after
    /// the node it is computing; published nodes stay cached.
    pub fn execute_units(
        &self,
        job: &Job,
        units: Vec<Unit>,
        options: &Options,
        stop: &AtomicBool,
    ) -> Result<Outcome, ExecError> {
        run_units(job, options, units, Outcome::default(), stop)
    }
}

fn run_units(
    job: &Job,
    options: &Options,
    units: Vec<Unit>,
    outcome: Outcome,
    stop: &AtomicBool,
) -> Result<Outcome, ExecError> {
    if units.is_empty() {
        return Ok(outcome);
    }
    let mut dependents = vec![Vec::new(); units.len()];
    for (u, unit) in units.iter().enumerate() {
        for &d in &unit.after {
            dependents[d].push(u);
        }
    }
    let pending: u64 = units.iter().map(|u| u.nodes.len() as u64).sum();
    let jobs = options.jobs.max(1);
    let state = State {
        job,
        options,
        waiting: units
            .iter()
            .map(|u| AtomicUsize::new(u.after.len()))
            .collect(),
        dependents,
        units,
        stop,
        devices: Devices {
            free: Mutex::new(options.devices.iter().rev().cloned().collect()),
            returned: Condvar::new(),
        },
        progress: Progress::new(options.progress, pending, jobs),
        outcome: Mutex::new(outcome),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .build()
        .map_err(|e| ExecError::Other(format!("cannot start worker threads: {e}")))?;
    pool.scope(|s| {
        for (u, unit) in state.units.iter().enumerate() {
            if unit.after.is_empty() {
                let state = &state;
                s.spawn(move |s| state.run_unit(u, s));
            }
        }
    });
    state.progress.finish();
    let mut outcome = state.outcome.into_inner().expect("outcome lock");
    let done: usize = outcome.computed.len() + outcome.reused;
    outcome.skipped = (pending as usize).saturating_sub(done + outcome.failures.len());
    Ok(outcome)
}

impl<'a> State<'a> {
    /// Stop taking work: a failure (without keep_going), USR2, or SIGINT/SIGTERM.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || interrupt::requested().is_some()
    }

    fn run_unit(&'a self, u: usize, scope: &rayon::Scope<'a>) {
        if self.stopping() {
            return;
        }
        let unit = &self.units[u];
        let needs_device = unit.nodes.iter().any(|&n| {
            let node = &self.job.plan.nodes[n as usize];
            self.job
                .registry
                .get(node.kind)
                .is_some_and(|s| s.resource(node) == Resource::Accelerator)
        });
        let device = needs_device.then(|| self.devices.take());
        let devices: Vec<String> = device.iter().cloned().collect();
        let mut session = Session::default();
        let mut failed = false;
        for &n in &unit.nodes {
            if self.stopping() {
                failed = true;
                break;
            }
            // On error the node's staging directory is already removed.
            if let Err(message) = self.ensure(n, &devices, &mut session) {
                // A node cut short by a stop signal is not its run's failure.
                if interrupt::requested().is_none() {
                    self.fail(unit, n, message);
                }
                failed = true;
                break;
            }
        }
        if let Some(d) = device {
            self.devices.give(d);
        }
        if failed {
            return; // dependents never become ready
        }
        for &d in &self.dependents[u] {
            if self.waiting[d].fetch_sub(1, Ordering::SeqCst) == 1 {
                scope.spawn(move |s| self.run_unit(d, s));
            }
        }
    }

    fn fail(&self, unit: &Unit, n: u32, message: String) {
        let node = &self.job.plan.nodes[n as usize];
        let runs: Vec<usize> = match unit.run {
            Some(r) => vec![r],
            None => node
                .runs
                .iter()
                .map(|&r| r as usize)
                .filter(|r| self.job.runs.contains(r))
                .collect(),
        };
        let mut outcome = self.outcome.lock().expect("outcome lock");
        for run in runs {
            outcome.failures.push(RunFailure {
                run,
                node: Some(node.id),
                message: message.clone(),
            });
        }
        if !self.options.keep_going {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Make node `n` cached: computed here, or by another process meanwhile.
    fn ensure(&self, n: u32, devices: &[String], session: &mut Session) -> Result<(), String> {
        let plan = self.job.plan;
        let store = self.job.store;
        let node = &plan.nodes[n as usize];
        let reused = || {
            // Another process finished it while this one waited.
            self.outcome.lock().expect("outcome lock").reused += 1;
            self.progress.node_done(|| {
                format!(
                    "{} step {}: computed by another process",
                    node.kind, node.step
                )
            });
            Ok(())
        };
        if store.is_cached(&node.id) {
            return reused();
        }
        let _lock = store.lock_node(&node.id).map_err(|e| e.to_string())?;
        if store.is_cached(&node.id) {
            return reused();
        }
        self.quarantine_orphan(node)?;
        let stage =
            self.job.registry.get(node.kind).ok_or_else(|| {
                spur_stages::StageError::Unavailable { kind: node.kind }.to_string()
            })?;
        let label = node
            .runs
            .first()
            .map(|&r| self.job.plan.runs[r as usize].label.clone())
            .unwrap_or_default();
        self.progress
            .worker(format!("{label}: {} step {}", node.kind, node.step));

        let inputs = self.input_dirs(node, devices)?;
        let staging = store.stage(&node.id).map_err(|e| e.to_string())?;
        let out = staging.out();
        let log = out.parent().expect("staging has a parent").join("log");
        let started = Instant::now();
        let started_at = now();
        let mut ctx = NodeContext {
            node,
            inputs,
            externals: node
                .externals
                .iter()
                .map(|&e| &plan.externals[e as usize])
                .collect(),
            out: &out,
            log: &log,
            devices,
            session,
        };
        let metrics = stage.run(&mut ctx).map_err(|e| {
            format!(
                "{} step {} ({}): {e}",
                node.kind,
                node.step,
                &node.id.hex()[..12]
            )
        })?;
        let manifest = NodeManifest {
            metrics,
            started_at,
            finished_at: now(),
            seconds: started.elapsed().as_secs_f64(),
            ..self.manifest_of(node)
        };
        store
            .publish(staging, manifest, &stage.declared_outputs(node))
            .map_err(|e| format!("{} step {}: {e}", node.kind, node.step))?;
        self.apply_materialisation(n, stage.prunable())?;
        self.outcome
            .lock()
            .expect("outcome lock")
            .computed
            .push(node.id);
        self.progress.node_done(|| {
            let shared = match node.runs.len() {
                0 | 1 => String::new(),
                n => format!(", shared by {n} runs"),
            };
            format!(
                "{} step {}: {label}{shared} ({:.1}s)",
                node.kind,
                node.step,
                started.elapsed().as_secs_f64()
            )
        });
        Ok(())
    }

    /// A node directory without a manifest is no entry, but would block publishing this one:
    /// it is moved aside (and reported as corrupted).
    fn quarantine_orphan(&self, node: &Node) -> Result<(), String> {
        let Some(dest) = self
            .job
            .store
            .quarantine(&node.id)
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let why = "its directory has no manifest".to_string();
        tracing::warn!(
            "cache entry {} is corrupted: {why}; moved to {}, recomputing",
            node.id.hex(),
            dest.display()
        );
        self.outcome
            .lock()
            .expect("outcome lock")
            .corrupted
            .push((node.id, why));
        Ok(())
    }

    /// The published directories of `node`'s inputs, each made readable first.
    fn input_dirs(&self, node: &Node, devices: &[String]) -> Result<Vec<InputDir>, String> {
        let plan = self.job.plan;
        node.inputs
            .iter()
            .map(|input| {
                let dep = &plan.nodes[input.node as usize];
                self.ensure_input(input.node, devices)?;
                Ok(InputDir {
                    role: input.role,
                    node: dep.id,
                    out: self.job.store.out_dir(&dep.id),
                })
            })
            .collect()
    }

    /// What `node`'s manifest records of its identity and origin (the run's times and
    /// metrics are the caller's).
    fn manifest_of(&self, node: &Node) -> NodeManifest {
        let plan = self.job.plan;
        NodeManifest {
            id: node.id.hex(),
            kind: node.kind.name().to_string(),
            version: node.version,
            step: node.step,
            inputs: node
                .inputs
                .iter()
                .map(|i| plan.nodes[i.node as usize].id.hex())
                .collect(),
            externals: node
                .externals
                .iter()
                .map(|&e| plan.externals[e as usize].hash.hex())
                .collect(),
            params: (*node.params).clone(),
            host: host(),
            spur_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    /// Make input node `n` readable. It is verified before use; a corrupted
    /// entry is moved aside and recomputed, never read. One whose artifacts
    /// were pruned (an earlier step's checkpoint) is computed again, which
    /// in turn recomputes its own pruned inputs: the chain restarts from the
    /// last checkpoint still cached, or from the model's own weights.
    fn ensure_input(&self, n: u32, devices: &[String]) -> Result<(), String> {
        let store = self.job.store;
        let dep = &self.job.plan.nodes[n as usize];
        let name = format!("{} step {} ({})", dep.kind, dep.step, &dep.id.hex()[..12]);
        match store.verify(&dep.id) {
            Ok(manifest) if manifest.pruned.is_empty() => return Ok(()),
            Ok(manifest) => {
                tracing::warn!(
                    "{name} is needed again but the materialisation policy pruned its {}; \
                     recomputing it from the last checkpoint still cached or the model's own weights",
                    manifest.pruned.join(", ")
                );
                store.remove_entry(&dep.id).map_err(|e| e.to_string())?;
            }
            Err(e @ StoreError::Corrupted { .. }) => {
                match store.quarantine(&dep.id).map_err(|e| e.to_string())? {
                    Some(dest) => {
                        tracing::warn!("{e}; moved to {}, recomputing", dest.display());
                        self.outcome
                            .lock()
                            .expect("outcome lock")
                            .corrupted
                            .push((dep.id, e.to_string()));
                    }
                    // Removed since the plan was made (by hand, or quarantined
                    // by another process).
                    None => tracing::warn!("{name} is no longer in the cache; computing it"),
                }
            }
            Err(e) => return Err(e.to_string()),
        }
        self.ensure(n, devices, &mut Session::default())?;
        store.verify(&dep.id).map(drop).map_err(|e| e.to_string())
    }

    /// Once step k's checkpoint exists, step k-1's is deleted unless the
    /// policy keeps it (every `materialize.checkpoint_every` steps).
    fn apply_materialisation(&self, n: u32, prunable: &[&str]) -> Result<(), String> {
        if prunable.is_empty() {
            return Ok(());
        }
        let plan = self.job.plan;
        let node = &plan.nodes[n as usize];
        let Some(prev) = node
            .inputs
            .iter()
            .find(|i| matches!(i.role, Role::Policy | Role::Prev))
            .map(|i| &plan.nodes[i.node as usize])
        else {
            return Ok(());
        };
        if prev.kind != node.kind {
            return Ok(());
        }
        let every = node
            .runs
            .first()
            .map(|&r| self.job.plan.runs[r as usize].checkpoint_every)
            .unwrap_or(0);
        if every > 0 && prev.step % every == 0 {
            return Ok(());
        }
        let names: Vec<String> = prunable.iter().map(|s| s.to_string()).collect();
        self.job
            .store
            .prune(&prev.id, &names)
            .map_err(|e| e.to_string())
    }
}
