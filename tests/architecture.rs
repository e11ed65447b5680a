//! The crate graph that ARCHITECTURE.md draws, checked against `cargo
//! metadata`: a dependency between workspace crates that the drawing does not
//! have fails here, so the document and the code cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Each workspace crate and the workspace crates it may depend on (normal and
/// build dependencies; tests may use more). Dependencies flow one way: the
/// vocabulary and the ML crates at the bottom, then spec → plan → stages →
/// exec → ops, the binary on top.
const ALLOWED: &[(&str, &[&str])] = &[
    ("spur-core", &[]),
    ("spur-spec", &["spur-core"]),
    ("spur-math", &["spur-core"]),
    ("spur-slurm", &[]),
    ("spur-lm", &[]),
    ("spur-rl", &["spur-lm", "spur-core"]),
    ("spur-mistralrs", &["spur-lm"]),
    ("spur-report", &["spur-math", "spur-store"]),
    ("spur-store", &["spur-core"]),
    ("spur-plan", &["spur-core", "spur-spec"]),
    (
        "spur-stages",
        &[
            "spur-core",
            "spur-plan",
            "spur-lm",
            "spur-rl",
            "spur-math",
            "spur-mistralrs",
        ],
    ),
    (
        "spur-exec",
        &[
            "spur-core",
            "spur-plan",
            "spur-store",
            "spur-stages",
            "spur-slurm",
        ],
    ),
    (
        "spur-ops",
        &[
            "spur-core",
            "spur-spec",
            "spur-plan",
            "spur-store",
            "spur-stages",
            "spur-exec",
            "spur-lm",
        ],
    ),
];

/// The ML crates know nothing of orchestration.
const ML_CRATES: &[&str] = &["spur-math", "spur-lm", "spur-rl", "spur-mistralrs"];
const ORCHESTRATION: &[&str] = &[
    "spur-spec",
    "spur-plan",
    "spur-store",
    "spur-stages",
    "spur-exec",
    "spur-ops",
    "spur-slurm",
    "spur-report",
];

/// Workspace crate → the workspace crates it depends on (normal and build).
fn workspace_edges() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str())
                .filter(|name| members.contains(*name))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn workspace_crates_depend_only_as_architecture_md_draws() {
    let edges = workspace_edges();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (krate, deps) in &edges {
        if krate == "spur" {
            continue; // The binary may use every crate.
        }
        let Some(may) = allowed.get(krate.as_str()) else {
            problems.push(format!(
                "{krate} is not in ARCHITECTURE.md's graph (add it there and to ALLOWED)"
            ));
            continue;
        };
        for dep in deps {
            if !may.contains(&dep.as_str()) {
                problems.push(format!("{krate} depends on {dep}"));
            }
        }
    }
    for ml in ML_CRATES {
        for dep in edges.get(*ml).into_iter().flatten() {
            if ORCHESTRATION.contains(&dep.as_str()) {
                problems.push(format!(
                    "ML crate {ml} depends on orchestration crate {dep}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "crate graph: {problems:#?}");
}
