//! `spur lock FILE` writes FILE.lock; `spur run --locked` checks it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use spur_plan::Plan;

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct LockArgs {
    /// Experiment file.
    pub file: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct LockFile {
    /// sha256 of every external input (weights, data, command inputs).
    inputs: BTreeMap<String, String>,
}

fn lock_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

fn inputs(plan: &Plan) -> BTreeMap<String, String> {
    plan.externals
        .iter()
        .map(|e| (e.key.clone(), e.hash.hex()))
        .collect()
}

pub fn run(args: LockArgs, cache: &Path) -> Result<ExitCode> {
    let loaded = workspace::load(&args.file, cache)?;
    let lock = LockFile {
        inputs: inputs(&loaded.plan),
    };
    let path = lock_path(&args.file);
    let text = serde_yaml::to_string(&lock)?;
    spur_store::write_atomic(
        &path,
        format!("# written by `spur lock`; checked by `spur run --locked`\n{text}").as_bytes(),
    )?;
    println!(
        "wrote {} ({} inputs pinned)",
        path.display(),
        lock.inputs.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Fail, naming every difference, when the inputs no longer match the lock.
pub fn check(file: &Path, plan: &Plan) -> Result<()> {
    let path = lock_path(file);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--locked needs {}; create it with `spur lock {}`",
            path.display(),
            file.display()
        )
    })?;
    let locked: LockFile = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid lock file", path.display()))?;
    let now = inputs(plan);
    let mut problems = Vec::new();
    for (key, hash) in &now {
        match locked.inputs.get(key) {
            None => problems.push(format!("{key}: not in the lock file (new input)")),
            Some(old) if old != hash => {
                problems.push(format!("{key}: changed (locked {old}, now {hash})"))
            }
            _ => {}
        }
    }
    for key in locked.inputs.keys().filter(|k| !now.contains_key(*k)) {
        problems.push(format!("{key}: in the lock file but no longer used"));
    }
    if !problems.is_empty() {
        bail!(
            "inputs differ from {}:\n  {}\n  = help: restore the inputs, or run `spur lock {}` to accept them",
            path.display(),
            problems.join("\n  "),
            file.display()
        );
    }
    Ok(())
}
