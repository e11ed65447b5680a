//! `spur show ID`: a run record or a node manifest.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// A run id or node id, or a unique prefix of one (at least 4 characters).
    pub id: String,
}

pub fn run(args: ShowArgs, cache: &Path) -> Result<ExitCode> {
    let store = workspace::open_store(cache)?;
    let id = args.id.trim();
    if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("`{id}` is not an id: give at least 4 hexadecimal characters of a run or node id");
    }
    let (nodes, runs) = store.find(id)?;
    match (nodes.as_slice(), runs.as_slice()) {
        ([], []) => bail!(
            "no run or node in {} has an id starting with `{id}`",
            cache.display()
        ),
        ([node], []) => {
            let manifest = store.read_manifest(node)?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
        }
        ([], [run]) => {
            let record = store.read_run_record(run)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
        _ => {
            let mut names: Vec<String> =
                nodes.iter().map(|n| format!("node {}", n.hex())).collect();
            names.extend(runs.iter().map(|r| format!("run  {r}")));
            bail!("`{id}` is ambiguous; it starts:\n  {}", names.join("\n  "));
        }
    }
    Ok(ExitCode::SUCCESS)
}
