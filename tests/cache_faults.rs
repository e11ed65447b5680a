//! Damaged and tampered caches, through the `spur` binary: entries without a
//! manifest, edited manifests, links in the cache's layout.

mod common;

use std::fs;
use std::path::PathBuf;

use common::{count_lines, Workspace};
use serde_json::Value;

/// A shared `prepare` node and one `score` node (with a metric) per seed.
const EXP: &str = r#"
name: faults
commands:
  prepare:
    run: echo data > ${out}/data.txt; echo prepare >> "$SPUR_TEST_LOG"
    outputs: [data.txt]
  score:
    run: |
      echo '{"accuracy": 0.25}' > ${out}/metrics.json
      cat ${prepare}/data.txt > ${out}/s.txt
      echo score-${seed} >> "$SPUR_TEST_LOG"
    needs: [prepare]
    outputs: [s.txt]
grid:
  seed: [1, 2]
"#;

struct Setup {
    ws: Workspace,
    log: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let ws = Workspace::new();
        ws.write("exp.yaml", EXP);
        let log = ws.path("log.txt");
        let s = Setup { ws, log };
        s.run(&["run", "exp.yaml"]);
        assert_eq!(count_lines(&s.log), 3);
        fs::remove_file(&s.log).unwrap();
        s
    }

    /// `spur ARGS` with the test log; requires success, returns (stdout, stderr).
    fn run(&self, args: &[&str]) -> (String, String) {
        let out = self
            .ws
            .spur()
            .args(args)
            .env("SPUR_TEST_LOG", &self.log)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "spur {args:?}:\n{stdout}\n{stderr}");
        (stdout, stderr)
    }

    fn nodes(&self) -> Vec<Value> {
        self.ws.plan_json("exp.yaml")["nodes"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The node ids of `prepare` and of the seeds' `score` nodes.
    fn ids(&self) -> (String, Vec<String>) {
        let id = |n: &Value| n["id"].as_str().unwrap().to_string();
        let nodes = self.nodes();
        let prepare = nodes
            .iter()
            .find(|n| n["deps"].as_array().unwrap().is_empty())
            .map(id)
            .unwrap();
        let scores = nodes
            .iter()
            .filter(|n| !n["deps"].as_array().unwrap().is_empty())
            .map(id)
            .collect();
        (prepare, scores)
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.ws.cache().join("nodes").join(&id[..2]).join(id)
    }

    fn quarantined(&self) -> usize {
        fs::read_dir(self.ws.cache().join("quarantine"))
            .unwrap()
            .count()
    }
}

#[test]
fn node_directory_without_manifest_is_moved_aside_and_recomputed() {
    let s = Setup::new();
    let (prepare, scores) = s.ids();
    fs::remove_file(s.node_dir(&prepare).join("manifest.json")).unwrap();
    // And a dependent that must read it.
    fs::remove_dir_all(s.node_dir(&scores[0])).unwrap();

    let (status, _) = s.run(&["status", "exp.yaml"]);
    assert!(!status.contains("finished"), "{status}");

    let (_, stderr) = s.run(&["run", "exp.yaml"]);
    assert!(
        stderr.contains(&format!(
            "cache entry {prepare} is corrupted: its directory has no manifest"
        )) && stderr.contains("has been recomputed"),
        "{stderr}"
    );
    assert_eq!(count_lines(&s.log), 2, "prepare and one score");
    assert_eq!(s.quarantined(), 1);
    let (stdout, _) = s.run(&["run", "exp.yaml"]);
    assert!(stdout.contains("nothing to do"), "{stdout}");
}

#[test]
fn edited_manifest_is_reported_and_recomputed_with_verify() {
    let s = Setup::new();
    let (_, scores) = s.ids();
    let id = &scores[0];
    let path = s.node_dir(id).join("manifest.json");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"accuracy\": 0.25"), "{text}");
    fs::write(
        &path,
        text.replace("\"accuracy\": 0.25", "\"accuracy\": 0.75"),
    )
    .unwrap();

    let out = s.ws.run(&["show", id]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success() && !stdout.contains("0.75"),
        "{stdout}"
    );
    assert!(
        stderr.contains(id.as_str()) && stderr.contains("changed after spur wrote it"),
        "{stderr}"
    );

    let (status, warnings) = s.run(&["status", "exp.yaml"]);
    assert_eq!(status.matches("finished").count(), 1, "{status}");
    assert!(
        warnings.contains(id.as_str()) && warnings.contains("changed after spur wrote it"),
        "{warnings}"
    );

    let (_, stderr) = s.run(&["run", "exp.yaml", "--verify"]);
    assert!(
        stderr.contains(&id[..12]) && stderr.contains("has been recomputed"),
        "{stderr}"
    );
    assert_eq!(count_lines(&s.log), 1, "only the edited node");
    assert_eq!(s.quarantined(), 1);
    let manifest: Value = serde_json::from_str(&s.ws.ok(&["show", id])).unwrap();
    assert_eq!(manifest["metrics"]["accuracy"], 0.25);
}

#[test]
fn gc_removes_a_linked_shard_not_its_target() {
    let s = Setup::new();
    // Named like a node, so following the link would take it for one.
    let outside = s.ws.path("elsewhere");
    let victim = outside.join("ab".repeat(32));
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("precious.txt"), "keep me").unwrap();
    let used: Vec<String> = s
        .nodes()
        .iter()
        .map(|n| n["id"].as_str().unwrap()[..2].to_string())
        .collect();
    let shard = (0..=255u8)
        .map(|b| format!("{b:02x}"))
        .find(|h| !used.contains(h))
        .unwrap();
    let link = s.ws.cache().join("nodes").join(&shard);
    std::os::unix::fs::symlink(&outside, &link).unwrap();

    let (stdout, _) = s.run(&["gc", "exp.yaml", "--yes"]);
    assert!(stdout.contains("removed symbolic link"), "{stdout}");
    assert!(fs::symlink_metadata(&link).is_err());
    assert_eq!(
        fs::read_to_string(victim.join("precious.txt")).unwrap(),
        "keep me"
    );
}
