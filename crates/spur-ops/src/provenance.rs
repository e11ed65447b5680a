//! Where a result came from: the code (git state, Cargo.lock), the machine.

use std::path::Path;

use sha2::{Digest, Sha256};
use spur_store::{GitState, Host, Provenance};

/// spur's own dependency pins, embedded at build time.
const CARGO_LOCK: &[u8] = include_bytes!("../../../Cargo.lock");

/// Git state of the workspace holding `path` (`None` outside a repository).
pub fn git(path: &Path) -> Option<GitState> {
    let repo = git2::Repository::discover(path).ok()?;
    let head = repo.head().ok();
    let commit = head
        .as_ref()
        .and_then(|h| h.peel_to_commit().ok())
        .map(|c| c.id().to_string());
    let branch = head
        .as_ref()
        .filter(|h| h.is_branch())
        .and_then(|h| h.shorthand().map(str::to_string));
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true).include_ignored(false);
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    // The uncommitted diff (tracked files, against HEAD), hashed.
    let diff_sha256 = (|| -> Result<String, git2::Error> {
        let tree = repo.head()?.peel_to_tree()?;
        let diff = repo.diff_tree_to_workdir_with_index(Some(&tree), None)?;
        let mut h = Sha256::new();
        diff.print(git2::DiffFormat::Patch, |_, _, line| {
            h.update([line.origin() as u8]);
            h.update(line.content());
            true
        })?;
        Ok(hex::encode(h.finalize()))
    })()
    .ok();
    Some(GitState {
        commit,
        branch,
        dirty,
        diff_sha256: if dirty { diff_sha256 } else { None },
        workdir: repo.workdir().map(|p| p.display().to_string()),
    })
}

fn first_line_of(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

/// The GPUs `nvidia-smi` reports, if any.
fn accelerators() -> Vec<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// Everything about this build and machine that a record pins; `git` and `inputs` are the
/// experiment's, filled in by the caller.
pub fn build_and_host() -> Provenance {
    Provenance {
        spur_version: env!("CARGO_PKG_VERSION").to_string(),
        cargo_lock_sha256: hex::encode(Sha256::digest(CARGO_LOCK)),
        host: Host {
            name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .ok(),
            cpu: first_line_of("/proc/cpuinfo", "model name"),
            cores: std::thread::available_parallelism().map(|n| n.get()).ok(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        },
        accelerators: accelerators(),
        git: None,
        inputs: Default::default(),
    }
}
