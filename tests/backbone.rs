//! The backbone end to end through the real binary: planning, sharing,
//! hashing, caching, resuming, concurrency and corruption.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{count_lines, node_ids, Workspace, GRID};

fn setup(grid: &str) -> (Workspace, std::path::PathBuf) {
    let ws = Workspace::new();
    ws.write("exp.yaml", grid);
    let log = ws.path("executions.log");
    (ws, log)
}

#[test]
fn plan_counts_and_sharing() {
    let (ws, _) = setup(GRID);
    let plan = ws.plan_json("exp.yaml");
    let runs = plan["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    assert_eq!(
        runs[0]["cell"],
        serde_json::json!({"reward": "gt", "seed": 1, "delay": 0})
    );
    // 2 prepare (one per seed, shared by both rewards) + 4 runs × 3 steps.
    let nodes = plan["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2 + 12);
    let shared: Vec<_> = nodes
        .iter()
        .filter(|n| n["runs"].as_array().unwrap().len() > 1)
        .collect();
    assert_eq!(shared.len(), 2);
    for n in &shared {
        assert_eq!(n["kind"], "command");
        assert_eq!(n["runs"].as_array().unwrap().len(), 2);
        assert!(n["deps"].as_array().unwrap().is_empty());
    }
    for n in nodes {
        assert_eq!(n["status"], "pending");
        assert_eq!(n["id"].as_str().unwrap().len(), 64);
    }
    let summary = ws.ok(&["plan", "exp.yaml"]);
    assert!(summary.contains("runs:   4"), "{summary}");
    assert!(summary.contains("to run: 14"), "{summary}");
}

#[test]
fn hashes_ignore_formatting_and_follow_parameters() {
    let (ws, _) = setup(GRID);
    let base = node_ids(&ws.plan_json("exp.yaml"));

    // Keys reordered, comments and blank lines added, flow style changed.
    let reformatted = GRID
        .replace(
            "defaults:\n  steps: 3\n  update: {lr: 1.0e-6}\n",
            "defaults:   # the defaults\n\n  update:\n    lr: 0.000001\n  steps: 3\n",
        )
        .replace("name: toy\n", "# a comment\nname: toy\n");
    ws.write("exp.yaml", &reformatted);
    assert_eq!(node_ids(&ws.plan_json("exp.yaml")), base);

    // One arm's parameter changed (lr for reward=random): exactly that arm's
    // train nodes change; the shared prepare nodes and the other arm stay.
    let changed = format!(
        "{GRID}overrides:\n  - match: {{reward: random}}\n    set: {{update: {{lr: 2.0e-6}}}}\n"
    );
    ws.write("exp.yaml", &changed);
    let plan = ws.plan_json("exp.yaml");
    let now = node_ids(&plan);
    let gone: BTreeSet<_> = base.difference(&now).collect();
    let new: BTreeSet<_> = now.difference(&base).collect();
    assert_eq!(gone.len(), 6, "2 seeds × 3 steps of the random arm");
    assert_eq!(new.len(), 6);
    let random_runs: BTreeSet<String> = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["cell"]["reward"] == "random")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["runs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| random_runs.contains(r.as_str().unwrap()))
        })
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    let new: BTreeSet<String> = new.into_iter().cloned().collect();
    assert_eq!(new, expected);
}

#[test]
fn rerun_executes_nothing_and_records_runs() {
    let (ws, log) = setup(GRID);
    let log_s = log.to_str().unwrap();
    let out = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", log_s)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count_lines(&log), 14);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("computed 14 nodes, 0 finished by another process"),
        "{stdout}"
    );
    // Piped output gets one line per finished node, counted, naming stage and run.
    let node_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(node_lines.len(), 14, "{stdout}");
    assert!(
        node_lines[0].starts_with("[1/14] command step "),
        "{stdout}"
    );
    assert!(node_lines[13].starts_with("[14/14] "), "{stdout}");
    assert!(node_lines.iter().all(|l| l.ends_with("s)")), "{stdout}");
    let again = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", log_s)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert_eq!(count_lines(&log), 14, "a rerun executes no node");

    // The chain really chains: step 3 saw steps 1 and 2.
    let plan = ws.plan_json("exp.yaml");
    assert!(plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["status"] == "cached"));
    let run_id = plan["runs"][0]["id"].as_str().unwrap();
    let record: serde_json::Value = serde_json::from_str(&ws.ok(&["show", run_id])).unwrap();
    assert_eq!(record["status"], "finished");
    assert_eq!(record["cell"]["reward"], "gt");
    assert_eq!(record["nodes_done"], 4);
    assert_eq!(record["experiment"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        record["provenance"]["cargo_lock_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    assert!(record["provenance"]["spur_version"].is_string());
    let last = record["nodes"].as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value = serde_json::from_str(&ws.ok(&["show", &last[..16]])).unwrap();
    assert_eq!(manifest["step"], 3);
    let w = std::fs::read_to_string(
        ws.cache()
            .join("nodes")
            .join(&last[..2])
            .join(&last)
            .join("out/w.txt"),
    )
    .unwrap();
    assert_eq!(w.lines().count(), 3, "{w}");
    assert!(w.contains("gt lr=1e-6 step 1 seed 1"), "{w}");

    // --only selects cells; status shows progress.
    let status = ws.ok(&["status", "exp.yaml", "--only", "reward=random,seed=2"]);
    assert_eq!(status.lines().count(), 2, "{status}");
    assert!(
        status.contains("finished") && status.contains("reward=random,seed=2"),
        "{status}"
    );
}

#[test]
fn only_selects_cells_and_rejects_unknown_axes() {
    let (ws, log) = setup(GRID);
    let out = ws
        .spur()
        .args(["run", "exp.yaml", "--only", "reward=random,seed=1"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(count_lines(&log), 1 + 3);
    let err = ws.fails(&["run", "exp.yaml", "--only", "rewrd=random"]);
    assert!(
        err.contains("`rewrd` is not a grid axis") && err.contains("did you mean `reward`"),
        "{err}"
    );
    let err = ws.fails(&["run", "exp.yaml", "--only", "reward=randm"]);
    assert!(err.contains("did you mean `random`"), "{err}");
}

#[test]
fn failure_stops_only_its_run_with_keep_going() {
    let grid = GRID.replace("      sleep ${delay}\n", "      sleep ${delay}\n      if [ ${reward} = random ] && [ ${seed} = 2 ] && [ ${step} = 2 ]; then echo boom >&2; exit 3; fi\n");
    let (ws, log) = setup(&grid);
    let out = ws
        .spur()
        .args(["run", "exp.yaml", "--keep-going", "-j", "1"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 run(s) failed") && stderr.contains("boom"),
        "{stderr}"
    );
    // Everything except the failing run's steps 2 (failed) and 3 (skipped) finished.
    let plan = ws.plan_json("exp.yaml");
    let pending = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "pending")
        .count();
    assert_eq!(pending, 2);
    let status = ws.ok(&["status", "exp.yaml"]);
    assert!(status.contains("failed"), "{status}");
    assert!(
        !ws.cache().join("tmp").read_dir().unwrap().any(|_| true),
        "no half-written entry is left"
    );
}

fn wait_for_lines(path: &std::path::Path, n: usize) {
    let start = Instant::now();
    while count_lines(path) < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {n} executions"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn resume_after_kill_recomputes_nothing_finished() {
    let grid = GRID.replace("delay: [0]", "delay: [0.3]");
    let (ws, log) = setup(&grid);
    let mut child = ws
        .spur()
        .args(["run", "exp.yaml", "-j", "1"])
        .env("SPUR_TEST_LOG", &log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lines(&log, 5);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let plan = ws.plan_json("exp.yaml");
    let finished: BTreeSet<String> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "cached")
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !finished.is_empty() && finished.len() < 14,
        "killed mid-run: {} finished",
        finished.len()
    );
    std::fs::remove_file(&log).unwrap();

    let out = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only what had not finished ran (the killed node itself may rerun).
    assert_eq!(count_lines(&log), 14 - finished.len());
    let plan = ws.plan_json("exp.yaml");
    assert!(plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["status"] == "cached"));
}

#[test]
fn concurrent_runners_compute_each_node_once() {
    let grid = GRID.replace("delay: [0]", "delay: [0.1]");
    let (ws, log) = setup(&grid);
    let spawn = || {
        ws.spur()
            .args(["run", "exp.yaml"])
            .env("SPUR_TEST_LOG", &log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let lines = std::fs::read_to_string(&log).unwrap();
    let unique: BTreeSet<&str> = lines.lines().collect();
    assert_eq!(
        lines.lines().count(),
        14,
        "each node ran exactly once:\n{lines}"
    );
    assert_eq!(unique.len(), 14);
}

#[test]
fn corrupted_entry_is_detected_and_recomputed() {
    let (ws, log) = setup(GRID);
    let out = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(out.status.success());
    // Corrupt a prepare node's artifact (same size, different bytes).
    let plan = ws.plan_json("exp.yaml");
    let prepare = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["deps"].as_array().unwrap().is_empty())
        .unwrap();
    let id = prepare["id"].as_str().unwrap();
    let data = ws
        .cache()
        .join("nodes")
        .join(&id[..2])
        .join(id)
        .join("out/data.txt");
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.replace('s', "S")).unwrap();

    std::fs::remove_file(&log).unwrap();
    let out = ws
        .spur()
        .args(["run", "exp.yaml", "--verify"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupted") && stderr.contains(&id[..12]),
        "{stderr}"
    );
    assert_eq!(
        count_lines(&log),
        1,
        "only the corrupted node was recomputed"
    );
    assert_eq!(std::fs::read_to_string(&data).unwrap(), text);
    assert_eq!(
        ws.cache().join("quarantine").read_dir().unwrap().count(),
        1,
        "the bad entry is kept aside"
    );

    // Without --verify, corruption of an input is caught when it is read:
    // truncate a step-1 output, drop step 2 so it must read it.
    let step1 = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| {
            n["deps"].as_array().unwrap().len() == 1 && n["runs"].as_array().unwrap().len() == 1
        })
        .unwrap();
    let s1 = step1["id"].as_str().unwrap();
    std::fs::write(
        ws.cache()
            .join("nodes")
            .join(&s1[..2])
            .join(s1)
            .join("out/w.txt"),
        "",
    )
    .unwrap();
    let step2 = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["deps"].as_array().unwrap().iter().any(|d| d == s1))
        .unwrap();
    let s2 = step2["id"].as_str().unwrap();
    std::fs::remove_dir_all(ws.cache().join("nodes").join(&s2[..2]).join(s2)).unwrap();
    std::fs::remove_file(&log).unwrap();
    let out = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", &log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count_lines(&log),
        2,
        "the corrupted step 1 and the missing step 2"
    );
}

#[test]
fn lock_pins_inputs_and_gc_collects_unreferenced() {
    let ws = Workspace::new();
    ws.write("script.sh", "echo hello > \"$1/out.txt\"\n");
    ws.write("exp.yaml", "commands:\n  hello:\n    run: bash ${inputs.script} ${out}\n    inputs: {script: script.sh}\n    outputs: [out.txt]\n");
    ws.ok(&["lock", "exp.yaml"]);
    assert!(ws.path("exp.yaml.lock").exists());
    ws.ok(&["run", "--locked", "exp.yaml"]);
    let before = node_ids(&ws.plan_json("exp.yaml"));
    ws.write("script.sh", "echo changed > \"$1/out.txt\"\n");
    let err = ws.fails(&["run", "--locked", "exp.yaml"]);
    assert!(
        err.contains("commands.hello.inputs.script") && err.contains("changed"),
        "{err}"
    );
    // Input content is part of the id.
    assert_ne!(node_ids(&ws.plan_json("exp.yaml")), before);
    ws.ok(&["run", "exp.yaml"]);
    let dry = ws.ok(&["gc", "exp.yaml"]);
    assert!(dry.contains("would remove 1 node"), "{dry}");
    assert!(ws
        .ok(&["gc", "exp.yaml", "--yes"])
        .contains("removed 1 node"));
    assert!(ws.ok(&["run", "exp.yaml"]).contains("nothing to do"));
}
