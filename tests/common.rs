//! Helpers shared by the integration tests: a temp workspace with an
//! experiment file and its own cache, and the real `spur` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The shared data directory: `$SPUR_SHARED_DATA`, else `../shared/data`.
pub fn shared_data() -> std::path::PathBuf {
    std::env::var_os("SPUR_SHARED_DATA")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn spur(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_spur"));
        c.current_dir(self.dir.path())
            .env("SPUR_CACHE", self.cache())
            .env_remove("SPUR_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.spur().args(args).output().expect("spur runs")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "spur {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "spur {args:?} should fail but succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn plan_json(&self, file: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["plan", file, "--json"])).expect("plan --json is JSON")
    }
}

pub fn node_ids(plan: &serde_json::Value) -> std::collections::BTreeSet<String> {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A command-stage experiment shaped like a training grid: a per-seed
/// `prepare` (shared by reward arms) and a per-step `train` chain per cell.
/// Every execution appends a line to `$SPUR_TEST_LOG`.
pub const GRID: &str = r#"
name: toy
commands:
  prepare:
    run: echo "seed ${seed}" > ${out}/data.txt; echo prepare-${seed} >> "$SPUR_TEST_LOG"
    outputs: [data.txt]
  train:
    run: |
      if [ -n "${prev}" ]; then cat ${prev}/w.txt > ${out}/w.txt; fi
      echo "${reward} lr=${update.lr} step ${step} $(cat ${prepare}/data.txt)" >> ${out}/w.txt
      echo train-${reward}-${seed}-${step} >> "$SPUR_TEST_LOG"
      sleep ${delay}
    needs: [prepare]
    per_step: true
    outputs: [w.txt]
defaults:
  steps: 3
  update: {lr: 1.0e-6}
grid:
  reward: [gt, random]
  seed: [1, 2]
  delay: [0]
"#;
