//! Writing run records ([`RunRecord`], one per run under `cache/runs/<run id>.json`),
//! rewritten atomically at the start and end of every invocation.

use anyhow::Result;
use sha2::{Digest, Sha256};
use spur_plan::Plan;
use spur_spec::Experiment;
use spur_store::{
    ExperimentRef, NodeEntry, NodeManifest, NodeState, Provenance, RunRecord, RunStatus, Store,
};

pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What every record of one invocation shares.
pub struct RecordContext {
    pub experiment: ExperimentRef,
    pub provenance: Provenance,
    pub started_at: String,
}

impl RecordContext {
    pub fn new(exp: &Experiment, plan: &Plan) -> RecordContext {
        let mut provenance = crate::provenance::build_and_host();
        provenance.git = crate::provenance::git(&exp.dir);
        provenance.inputs = plan
            .externals
            .iter()
            .map(|e| (e.key.clone(), e.hash.hex()))
            .collect();
        let path = std::fs::canonicalize(&exp.path).unwrap_or_else(|_| exp.path.clone());
        RecordContext {
            experiment: ExperimentRef {
                path: path.display().to_string(),
                name: exp.name.clone(),
                sha256: hex::encode(Sha256::digest(exp.text.as_bytes())),
            },
            provenance,
            started_at: now_rfc3339(),
        }
    }
}

/// The part of a node's record entry that its manifest decides.
fn set_state(entry: &mut NodeEntry, manifest: Option<NodeManifest>) {
    entry.status = if manifest.is_some() {
        NodeState::Cached
    } else {
        NodeState::Pending
    };
    entry.seconds = manifest.as_ref().map(|m| m.seconds);
    entry.finished_at = manifest.as_ref().map(|m| m.finished_at.clone());
    entry.metrics = manifest.map(|m| m.metrics);
}

/// `record` with the nodes finished since it was written filled in from their manifests:
/// `spur run` rewrites records when an invocation starts and ends, and a reader during a run
/// should see what is done.
pub fn with_cached_nodes(store: &Store, mut record: RunRecord) -> RunRecord {
    for entry in record
        .nodes
        .iter_mut()
        .filter(|n| n.status == NodeState::Pending)
    {
        let manifest =
            spur_plan::Hash::from_hex(&entry.id).and_then(|id| store.read_manifest(&id).ok());
        if manifest.is_some() {
            set_state(entry, manifest);
        }
    }
    record
}

/// Write run `r`'s record with the current state of its nodes.
pub fn write(
    store: &Store,
    exp: &Experiment,
    plan: &Plan,
    r: usize,
    ctx: &RecordContext,
    status: RunStatus,
    error: Option<&str>,
) -> Result<()> {
    let run = &plan.runs[r];
    let spec = &exp.runs[r];
    let nodes: Vec<NodeEntry> = run
        .nodes
        .iter()
        .map(|&n| {
            let node = &plan.nodes[n as usize];
            let mut entry = NodeEntry {
                id: node.id.hex(),
                kind: node.kind.name().to_string(),
                step: node.step,
                shared: node.runs.len() > 1,
                eval: node.eval_name(),
                status: NodeState::Pending,
                seconds: None,
                finished_at: None,
                metrics: None,
            };
            set_state(&mut entry, store.read_manifest(&node.id).ok());
            entry
        })
        .collect();
    // An unreadable record (another spur version's, a damaged one) is replaced.
    let previous = store
        .read_run_record(&run.id)
        .inspect_err(|e| tracing::warn!("{e}"))
        .ok()
        .flatten();
    let first_started_at = previous
        .map(|p| p.first_started_at)
        .unwrap_or_else(|| ctx.started_at.clone());
    let record = RunRecord {
        run_id: run.id.clone(),
        status,
        error: error.map(str::to_string),
        experiment: ctx.experiment.clone(),
        cell: spec
            .cell
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        params: spur_spec::to_json(&spec.params),
        reward: spec.reward.clone(),
        first_started_at,
        started_at: ctx.started_at.clone(),
        finished_at: (status != RunStatus::Running).then(now_rfc3339),
        nodes_done: nodes
            .iter()
            .filter(|n| n.status == NodeState::Cached)
            .count(),
        nodes_total: nodes.len(),
        provenance: ctx.provenance.clone(),
        nodes,
    };
    store.write_run_record(&run.id, &record)?;
    Ok(())
}
