//! `spur report FILE [--out DIR]`: the experiment's table, plots and one
//! self-contained `index.html`, from its run records (spur-report writes
//! them; this file gathers the records and sample responses).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use spur_ops::{record, workspace};
use spur_plan::{Hash, Plan};
use spur_report::{ExperimentInfo, RecordFile, ReportInput, RunInput, Sample};
use spur_spec::scalar_text;
use spur_store::Store;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Experiment file.
    pub file: PathBuf,
    /// Output directory (default: reports/<experiment name> under the
    /// current directory). An earlier report there is replaced whole.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Sample responses shown per run and eval (from its latest finished eval).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub samples: usize,
}

pub fn run(args: ReportArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let (exp, plan, store) = (&loaded.experiment, &loaded.plan, &loaded.store);
    let mut runs = Vec::with_capacity(plan.runs.len());
    for (r, spec) in exp.runs.iter().enumerate() {
        let id = &plan.runs[r].id;
        let path = store.run_record_path(id);
        let record = store
            .read_run_record(id)
            .with_context(|| format!("cannot read the run record {}", path.display()))?
            .map(|r| RecordFile {
                path,
                record: record::with_cached_nodes(store, r),
            });
        let p = &spec.params;
        let variant = spec
            .cell
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "model" | "reward" | "seed"))
            .map(|(k, v)| format!("{k}={}", scalar_text(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let samples = match &record {
            Some(_) => samples(store, plan, r, args.samples),
            None => Vec::new(),
        };
        runs.push(RunInput {
            id: id.clone(),
            label: spec.label(),
            model: p.model.clone().unwrap_or_else(|| "(no model)".into()),
            reward: p.reward.clone().unwrap_or_else(|| "(no reward)".into()),
            seed: p.seed.to_string(),
            variant,
            record,
            eval_names: eval_names(plan, r),
            samples,
        });
    }
    if runs.iter().all(|r| r.record.is_none()) {
        bail!(
            "no run of {} has a record in {} yet: run `spur run {}` first \
             (or pass the --cache it ran with)",
            exp.path.display(),
            store.root().display(),
            exp.path.display()
        );
    }
    let input = ReportInput {
        experiment: ExperimentInfo {
            name: exp.name.clone(),
            path: std::fs::canonicalize(&exp.path)
                .unwrap_or_else(|_| exp.path.clone())
                .display()
                .to_string(),
            sha256: hex::encode(Sha256::digest(exp.text.as_bytes())),
            description: exp.description.clone(),
        },
        runs,
    };
    let out = args
        .out
        .unwrap_or_else(|| Path::new("reports").join(spur_report::safe_file_name(&exp.name)));
    let written = spur_report::write_report(&input, &out)
        .with_context(|| format!("no report of {} written", exp.path.display()))?;
    for w in &written.warnings {
        eprintln!("warning: {w}");
    }
    println!("report of {} in {}:", exp.name, out.display());
    for f in &written.files {
        println!("  {f}");
    }
    println!(
        "runs: {} finished, {} unfinished, {} not started, of {}",
        written.runs_finished,
        written.runs_unfinished,
        written.runs_not_started,
        written.runs_total
    );
    Ok(ExitCode::SUCCESS)
}

/// Eval node id → eval name (`math500`…) for run `r`, from the plan.
fn eval_names(plan: &Plan, r: usize) -> BTreeMap<String, String> {
    plan.runs[r]
        .nodes
        .iter()
        .map(|&n| &plan.nodes[n as usize])
        .filter_map(|n| Some((n.id.hex(), n.eval_name()?)))
        .collect()
}

/// The first `n` responses of run `r`'s latest finished node of each eval.
fn samples(store: &Store, plan: &Plan, r: usize, n: usize) -> Vec<Sample> {
    if n == 0 {
        return Vec::new();
    }
    let mut latest: BTreeMap<String, (u32, Hash)> = BTreeMap::new();
    for &i in &plan.runs[r].nodes {
        let node = &plan.nodes[i as usize];
        let Some(name) = node.eval_name() else {
            continue;
        };
        if !store.is_cached(&node.id) {
            continue;
        }
        let newer = latest.get(&name).is_none_or(|(step, _)| node.step > *step);
        if newer {
            latest.insert(name, (node.step, node.id));
        }
    }
    let mut out = Vec::new();
    for (eval, (step, id)) in latest {
        // As everywhere in spur: verify an artifact before reading it.
        if let Err(e) = store.verify(&id) {
            eprintln!(
                "warning: {e}; run {}'s {eval} responses are left out of the report \
                 (`spur run` recomputes the entry)",
                plan.runs[r].id
            );
            continue;
        }
        let path = store.out_dir(&id).join(spur_stages::EVAL_RECORDS_FILE);
        match read_samples(&path, &eval, step, n) {
            Ok(s) => out.extend(s),
            Err(e) => eprintln!(
                "warning: {}: {e:#}; its responses are left out",
                path.display()
            ),
        }
    }
    out
}

fn read_samples(path: &Path, eval: &str, step: u32, n: usize) -> Result<Vec<Sample>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::with_capacity(n);
    for (i, line) in BufReader::new(file).lines().take(n).enumerate() {
        let line: Value =
            serde_json::from_str(&line?).with_context(|| format!("line {} is not JSON", i + 1))?;
        let rec = &line["record"];
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        out.push(Sample {
            eval: eval.to_string(),
            step: u64::from(step),
            problem: text(&rec["problem"]),
            gold: text(&line["gold"]),
            extracted: text(&rec["extracted"]),
            correct: rec["correct"].as_bool().unwrap_or(false),
            response: text(&rec["response"]),
        });
    }
    Ok(out)
}
