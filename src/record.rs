//! Run records: one JSON document per run under `cache/runs/<run id>.json`,
//! rewritten atomically at the start and end of every invocation.

use anyhow::Result;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spur_plan::Plan;
use spur_spec::Experiment;
use spur_store::{NodeManifest, Store};

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
pub struct Context {
    pub experiment: Value,
    pub provenance: Value,
    pub started_at: String,
}

impl Context {
    pub fn new(exp: &Experiment, plan: &Plan) -> Context {
        let mut provenance = crate::provenance::build_and_host();
        provenance["git"] = crate::provenance::git(&exp.dir);
        provenance["inputs"] = plan
            .externals
            .iter()
            .map(|e| (e.key.clone(), json!(e.hash.hex())))
            .collect::<serde_json::Map<_, _>>()
            .into();
        Context {
            experiment: json!({
                "path": std::fs::canonicalize(&exp.path).unwrap_or_else(|_| exp.path.clone()).display().to_string(),
                "name": exp.name,
                "sha256": hex::encode(Sha256::digest(exp.text.as_bytes())),
            }),
            provenance,
            started_at: now_rfc3339(),
        }
    }
}

/// The part of a node's record entry that its manifest decides.
fn set_state(entry: &mut Value, manifest: Option<NodeManifest>) {
    entry["status"] = if manifest.is_some() {
        "cached"
    } else {
        "pending"
    }
    .into();
    entry["seconds"] = json!(manifest.as_ref().map(|m| m.seconds));
    entry["finished_at"] = json!(manifest.as_ref().map(|m| m.finished_at.clone()));
    entry["metrics"] = json!(manifest.map(|m| m.metrics));
}

/// `record` with the nodes finished since it was written filled in from
/// their manifests: `spur run` rewrites records when an invocation starts
/// and ends, and a reader during a run should see what is done.
pub fn with_cached_nodes(store: &Store, mut record: Value) -> Value {
    let Some(nodes) = record.get_mut("nodes").and_then(Value::as_array_mut) else {
        return record;
    };
    for entry in nodes.iter_mut().filter(|n| n["status"] == "pending") {
        let manifest = entry["id"]
            .as_str()
            .and_then(spur_plan::Hash::from_hex)
            .and_then(|id| store.read_manifest(&id).ok());
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
    ctx: &Context,
    status: &str,
    error: Option<&str>,
) -> Result<()> {
    let run = &plan.runs[r];
    let spec = &exp.runs[r];
    let mut done = 0;
    let nodes: Vec<Value> = run
        .nodes
        .iter()
        .map(|&n| {
            let node = &plan.nodes[n as usize];
            let manifest = store.read_manifest(&node.id).ok();
            done += usize::from(manifest.is_some());
            let mut entry = json!({
                "id": node.id.hex(),
                "kind": node.kind.name(),
                "step": node.step,
                "shared": node.runs.len() > 1,
                "eval": (node.kind == spur_plan::StageKind::Eval).then(|| node.params.get("name")).flatten(),
            });
            set_state(&mut entry, manifest);
            entry
        })
        .collect();
    let previous = store.read_run_record(&run.id)?;
    let first_started = previous
        .as_ref()
        .and_then(|p| p.get("first_started_at").cloned())
        .unwrap_or_else(|| json!(ctx.started_at));
    let record = json!({
        "run_id": run.id,
        "status": status,
        "error": error,
        "experiment": ctx.experiment,
        "cell": spec.cell,
        "params": spur_spec::to_json(&spec.params),
        "reward": spec.reward,
        "first_started_at": first_started,
        "started_at": ctx.started_at,
        "finished_at": if status == "running" { Value::Null } else { json!(now_rfc3339()) },
        "nodes_done": done,
        "nodes_total": run.nodes.len(),
        "provenance": ctx.provenance,
        "nodes": nodes,
    });
    store.write_run_record(&run.id, &record)?;
    Ok(())
}
