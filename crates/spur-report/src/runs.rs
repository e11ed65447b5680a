//! Reading run records: the state of a run, its eval and update metrics by
//! step, and where its results came from.

use std::collections::HashMap;

use serde_json::Value;
use spur_math::GraderComparison;
use spur_store::{NodeState, RunStatus};

use crate::{ReportError, Result, RunInput};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    NotStarted,
    /// Started, not all nodes cached, not failed (running, stopped, killed).
    Incomplete,
    Failed,
    Finished,
}

/// One planned eval node of a run; `metrics` is set once it is cached.
#[derive(Clone, Debug)]
pub struct EvalNode {
    pub id: String,
    pub eval: String,
    pub step: u64,
    pub metrics: Option<Value>,
    /// `metrics.graders`: every grader's verdicts, where the eval recorded them.
    pub graders: Option<GraderComparison>,
}

impl EvalNode {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.as_ref()?.get(name)?.as_f64()
    }

    /// The accuracy under one grader (the eval stage records every grader's).
    pub fn grader_accuracy(&self, grader: &str) -> Option<f64> {
        Some(self.graders.as_ref()?.by_grader.get(grader)?.accuracy)
    }

    /// The graders this node has verdicts of.
    pub fn grader_names(&self) -> Vec<String> {
        self.graders
            .as_ref()
            .map(|g| g.by_grader.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// (responses on which the graders disagree, responses graded).
    pub fn disagreement(&self) -> Option<(u64, u64)> {
        let g = self.graders.as_ref()?;
        Some((g.disagree as u64, g.n as u64))
    }
}

/// Metrics of one finished update (GRPO step).
#[derive(Clone, Debug)]
pub struct UpdatePoint {
    pub step: u64,
    pub clip_fraction_low: f64,
    pub clip_fraction_high: f64,
    /// The policy probe after this update, where the run has one.
    pub probe: Option<ProbePoint>,
}

/// What the report reads of a policy probe (spur-stages' `ProbeMetrics`): after an update,
/// or of the base model at step 0.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct ProbePoint {
    pub entropy: f64,
    pub greedy_logprob: f64,
    pub opening_repeat: f64,
    pub greedy_repeat: f64,
    pub response_length: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Provenance {
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub dirty: Option<bool>,
    pub diff_sha256: Option<String>,
    pub cargo_lock_sha256: Option<String>,
    pub spur_version: Option<String>,
    pub host: Option<String>,
    pub accelerators: Vec<String>,
    /// External input key (`models.x`, `datasets.y`) → content hash.
    pub inputs: Vec<(String, String)>,
}

/// What the report needs of one run.
#[derive(Clone, Debug)]
pub struct RunView {
    pub state: State,
    /// The status `spur run` last recorded (`running`, `stopped`, …).
    pub recorded_status: Option<String>,
    pub error: Option<String>,
    pub nodes_done: usize,
    pub nodes_total: usize,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub evals: Vec<EvalNode>,
    pub updates: Vec<UpdatePoint>,
    /// The probe of the base model (step 0), where the run has one.
    pub probe_baseline: Option<ProbePoint>,
    pub provenance: Option<Provenance>,
    /// Things in the record the report had to leave out.
    pub warnings: Vec<String>,
}

fn probe_point(v: Option<&Value>) -> std::result::Result<Option<ProbePoint>, serde_json::Error> {
    v.filter(|v| !v.is_null())
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
}

impl RunView {
    fn not_started() -> RunView {
        RunView {
            state: State::NotStarted,
            recorded_status: None,
            error: None,
            nodes_done: 0,
            nodes_total: 0,
            started_at: None,
            finished_at: None,
            evals: Vec::new(),
            updates: Vec::new(),
            probe_baseline: None,
            provenance: None,
            warnings: Vec::new(),
        }
    }

    pub fn parse(run: &RunInput) -> Result<RunView> {
        let Some(file) = &run.record else {
            return Ok(RunView::not_started());
        };
        let bad = |problem: String| ReportError::Record {
            path: file.path.clone(),
            problem,
        };
        let record = &file.record;
        let mut view = RunView::not_started();
        for (i, node) in record.nodes.iter().enumerate() {
            let (id, step) = (node.id.as_str(), u64::from(node.step));
            let done = node.status == NodeState::Cached;
            view.nodes_done += usize::from(done);
            let metrics = node.metrics.as_ref().filter(|m| done && !m.is_null());
            match node.kind.as_str() {
                "eval" => {
                    let name = node
                        .eval
                        .as_deref()
                        .or_else(|| run.eval_names.get(id).map(String::as_str));
                    let Some(name) = name else {
                        view.warnings.push(format!(
                            "eval node {} (step {step}) is not in the current plan: left out",
                            short(id)
                        ));
                        continue;
                    };
                    let graders = match metrics.and_then(|m| m.get("graders")) {
                        Some(g) => Some(
                            serde_json::from_value(g.clone())
                                .map_err(|e| bad(format!("nodes[{i}].metrics.graders: {e}")))?,
                        ),
                        None => None,
                    };
                    view.evals.push(EvalNode {
                        id: id.to_string(),
                        eval: name.to_string(),
                        step,
                        metrics: metrics.cloned(),
                        graders,
                    });
                }
                "update" => {
                    if let Some(m) = metrics {
                        let f = |k: &str| m.get(k).and_then(Value::as_f64);
                        if let (Some(low), Some(high)) =
                            (f("clip_fraction_low"), f("clip_fraction_high"))
                        {
                            let probe = probe_point(m.get("probe"))
                                .map_err(|e| bad(format!("nodes[{i}].metrics.probe: {e}")))?;
                            view.updates.push(UpdatePoint {
                                step,
                                clip_fraction_low: low,
                                clip_fraction_high: high,
                                probe,
                            });
                        }
                    }
                }
                "probe" => {
                    view.probe_baseline = probe_point(metrics)
                        .map_err(|e| bad(format!("nodes[{i}].metrics: {e}")))?;
                }
                _ => {}
            }
        }
        view.nodes_total = record.nodes.len();
        view.recorded_status = Some(record.status.name().to_string());
        view.error = record.error.clone();
        view.started_at = Some(record.first_started_at.clone());
        view.finished_at = record.finished_at.clone();
        view.state = if view.nodes_done == view.nodes_total {
            State::Finished
        } else if record.status == RunStatus::Failed {
            State::Failed
        } else {
            State::Incomplete
        };
        view.provenance = Some(Provenance::from(&record.provenance));
        Ok(view)
    }

    /// One line for the status list.
    pub fn status_text(&self) -> String {
        match self.state {
            State::NotStarted => "not started".into(),
            State::Finished => format!("finished ({} nodes)", self.nodes_total),
            State::Failed => format!(
                "failed after {}/{} nodes: {}",
                self.nodes_done,
                self.nodes_total,
                self.error
                    .as_deref()
                    .and_then(|e| e.lines().next())
                    .unwrap_or("no error recorded")
            ),
            State::Incomplete => format!(
                "unfinished: {}/{} nodes (last recorded status: {})",
                self.nodes_done,
                self.nodes_total,
                self.recorded_status.as_deref().unwrap_or("none")
            ),
        }
    }

    /// Furthest step with a cached eval, for progress notes.
    pub fn latest_eval_step(&self) -> Option<u64> {
        self.evals
            .iter()
            .filter(|e| e.metrics.is_some())
            .map(|e| e.step)
            .max()
    }
}

/// Fill in eval metrics that one record has and another lacks: a shared
/// node (a model's step-0 eval) is one node in every record that lists it,
/// and a record written before another run computed it still says pending.
pub fn share_eval_metrics(views: &mut [RunView]) {
    let known: HashMap<String, (Value, Option<GraderComparison>)> = views
        .iter()
        .flat_map(|v| &v.evals)
        .filter_map(|e| Some((e.id.clone(), (e.metrics.clone()?, e.graders.clone()))))
        .collect();
    for e in views.iter_mut().flat_map(|v| &mut v.evals) {
        if e.metrics.is_none() {
            if let Some((metrics, graders)) = known.get(&e.id) {
                e.metrics = Some(metrics.clone());
                e.graders = graders.clone();
            }
        }
    }
}

impl From<&spur_store::Provenance> for Provenance {
    fn from(p: &spur_store::Provenance) -> Provenance {
        let git = p.git.clone().unwrap_or_default();
        let h = &p.host;
        let host = [
            h.name.as_deref(),
            h.cpu.as_deref(),
            Some(&h.os),
            Some(&h.arch),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
        Provenance {
            commit: git.commit,
            branch: git.branch,
            dirty: p.git.as_ref().map(|g| g.dirty),
            diff_sha256: git.diff_sha256,
            cargo_lock_sha256: Some(p.cargo_lock_sha256.clone()),
            spur_version: Some(p.spur_version.clone()),
            host: Some(host).filter(|h| !h.is_empty()),
            accelerators: p.accelerators.clone(),
            inputs: p.inputs.clone().into_iter().collect(),
        }
    }
}

pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    #[test]
    fn states_follow_the_nodes() {
        let input = testdata::input();
        let views = testdata::views(&input);
        let state_of = |label: &str| {
            let i = input.runs.iter().position(|r| r.label == label).unwrap();
            views[i].state
        };
        assert_eq!(
            state_of("model=alpha,reward=ground_truth,seed=1"),
            State::Finished
        );
        assert_eq!(
            state_of("model=alpha,reward=random,seed=3"),
            State::Incomplete
        );
        assert_eq!(
            state_of("model=beta,reward=random,seed=3"),
            State::NotStarted
        );
        assert_eq!(state_of("model=beta,reward=random,seed=2"), State::Failed);
    }

    #[test]
    fn provenance_is_read() {
        let input = testdata::input();
        let v = RunView::parse(&input.runs[0]).unwrap();
        let p = v.provenance.unwrap();
        assert_eq!(p.commit.as_deref(), Some(testdata::COMMIT));
        assert_eq!(p.dirty, Some(true));
        assert_eq!(p.diff_sha256.as_deref(), Some(testdata::DIFF));
        assert!(p
            .inputs
            .iter()
            .any(|(k, v)| k == "datasets.math500" && v == testdata::MATH_HASH));
    }

    #[test]
    fn unreadable_metrics_name_the_record_file() {
        let mut run = testdata::input().runs.remove(0);
        let file = run.record.as_mut().unwrap();
        let update = file
            .record
            .nodes
            .iter_mut()
            .find(|n| n.kind == "update")
            .unwrap();
        update.metrics.as_mut().unwrap()["probe"] = serde_json::json!({"entropy": "high"});
        let err = RunView::parse(&run).unwrap_err().to_string();
        assert!(err.contains("runs/"), "{err}");
        assert!(err.contains("metrics.probe"), "{err}");
    }

    #[test]
    fn a_pending_shared_eval_takes_the_metrics_another_record_has() {
        let input = testdata::input();
        let mut views = testdata::views(&input);
        // The stale record: its step-0 eval still pending.
        views[0].evals[0].metrics = None;
        share_eval_metrics(&mut views);
        assert!(views[0].evals[0].metrics.is_some());
    }
}
