//! `spur gc FILE…`: remove cache entries no given experiment references.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};

use spur_ops::workspace;

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Experiments whose nodes are kept.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Delete (without it, only report what would be deleted).
    #[arg(long)]
    pub yes: bool,
}

pub fn run(args: GcArgs, cache: &Path) -> Result<ExitCode> {
    let store = workspace::open_store(cache)?;
    let registry = workspace::registry();
    let mut keep = HashSet::new();
    for file in &args.files {
        let exp = spur_spec::load(file)?;
        let plan = workspace::plan(&exp, &store, &registry)?;
        keep.extend(plan.nodes.iter().map(|n| n.id));
    }
    let Some(_exclusive) = store.try_lock_exclusive()? else {
        bail!(
            "a `spur run` is using {}; run gc when it has finished",
            cache.display()
        );
    };
    let report = store.gc(&keep, args.yes)?;
    let verb = if args.yes { "removed" } else { "would remove" };
    println!(
        "{verb} {} node{} and {} leftover temporary director{} ({:.1} MB); kept {} referenced nodes",
        report.nodes.len(),
        if report.nodes.len() == 1 { "" } else { "s" },
        report.temporaries,
        if report.temporaries == 1 { "y" } else { "ies" },
        report.bytes as f64 / 1e6,
        keep.len()
    );
    for link in &report.links {
        println!(
            "{verb} symbolic link {} (gc never follows links in the cache)",
            link.display()
        );
    }
    if !args.yes && (!report.nodes.is_empty() || report.temporaries > 0 || !report.links.is_empty())
    {
        println!("dry run: pass --yes to delete");
    }
    Ok(ExitCode::SUCCESS)
}
