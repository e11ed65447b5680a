//! `spur run --executor slurm`, `spur status`, `spur cancel` and
//! `spur exec-node` through the real binary, against a real one-node Slurm
//! started by `scripts/slurm-test-cluster.sh`. Where it cannot be started (not
//! root, no Debian packages) the cluster tests print why and pass without
//! checking anything, unless `SPUR_SLURM_REQUIRED=1` (as in CI).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Workspace;
use spur_exec::slurm::{JobBook, JobRecord, Work};
use spur_exec::spur_slurm::{JobId, JobInfo, JobState, Slurm};

/// The test cluster's `slurm.conf`, started once per test binary; `None` to skip.
fn cluster() -> Option<PathBuf> {
    static CONF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let state = std::env::var("SPUR_SLURM_STATE").unwrap_or_else(|_| "/tmp/spur-slurm".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-test-cluster.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&state)
            .output()
            .map_err(|e| format!("could not run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(Path::new(&state).join("slurm.conf"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    match conf {
        Ok(conf) => Some(conf.clone()),
        Err(why) => {
            if std::env::var("SPUR_SLURM_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("SPUR_SLURM_REQUIRED=1 but the test cluster did not start: {why}");
            }
            // Straight to stderr: the test harness hides `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (no Slurm): scripts/slurm-test-cluster.sh start failed: {why}"
            );
            None
        }
    }
}

/// A workspace whose `spur` (and so the jobs it submits) talks to the cluster.
struct SlurmWorkspace {
    ws: Workspace,
    conf: PathBuf,
    slurm: Slurm,
}

impl SlurmWorkspace {
    fn new(conf: PathBuf, experiment: &str) -> SlurmWorkspace {
        let ws = Workspace::new();
        ws.write("exp.yaml", experiment);
        SlurmWorkspace {
            slurm: Slurm::with_conf(&conf),
            ws,
            conf,
        }
    }

    fn spur(&self, args: &[&str]) -> Output {
        self.ws
            .spur()
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .env("SPUR_TEST_LOG", self.ws.path("executions.log"))
            .env("SPUR_TEST_GATE", self.ws.path("gate"))
            .env("SPUR_TEST_FAIL", self.ws.path("fail"))
            .output()
            .expect("spur runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.spur(args);
        assert!(
            out.status.success(),
            "spur {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn touch(&self, name: &str) {
        self.ws.write(name, "");
    }

    fn book(&self) -> JobBook {
        JobBook::load(&self.ws.cache().join("slurm").join(self.name())).unwrap()
    }

    fn name(&self) -> String {
        let text = std::fs::read_to_string(self.ws.path("exp.yaml")).unwrap();
        let line = text.lines().find(|l| l.starts_with("name: ")).unwrap();
        line["name: ".len()..].trim().to_string()
    }

    /// Run label (`reward=gt,seed=1`) by run id, from `spur plan --json`.
    fn labels(&self) -> HashMap<String, String> {
        let plan = self.ws.plan_json("exp.yaml");
        plan["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let cell = r["cell"].as_object().unwrap();
                let label: Vec<String> = cell.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (r["id"].as_str().unwrap().to_string(), label.join(","))
            })
            .collect()
    }

    /// What each recorded job computes, as a readable key: the run's label for
    /// a chain, `shared:<labels of its runs>` for a shared node.
    fn key(&self, job: &JobRecord) -> String {
        let labels = self.labels();
        match &job.work {
            Work::Run(id) => labels[id].clone(),
            Work::Node(id) => {
                let plan = self.ws.plan_json("exp.yaml");
                let node = plan["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["id"] == id.hex())
                    .unwrap()
                    .clone();
                let mut runs: Vec<String> = node["runs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| labels[r.as_str().unwrap()].clone())
                    .collect();
                runs.sort();
                format!("shared:{}", runs.join("|"))
            }
        }
    }

    /// Polls until every job has finished.
    fn wait_finished(&self, jobs: &[JobRecord]) -> HashMap<JobId, JobInfo> {
        let ids: Vec<JobId> = jobs.iter().map(JobRecord::job_id).collect();
        let start = Instant::now();
        loop {
            let infos: HashMap<JobId, JobInfo> = self
                .slurm
                .query(&ids)
                .unwrap()
                .into_iter()
                .map(|j| (j.job, j))
                .collect();
            if ids
                .iter()
                .all(|id| infos.get(id).is_some_and(|j| j.state.is_finished()))
            {
                return infos;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "jobs still not finished after 120 s: {infos:#?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for SlurmWorkspace {
    fn drop(&mut self) {
        // Leave nothing queued behind a failed test.
        let ids: Vec<JobId> = self.book().jobs.iter().map(JobRecord::job_id).collect();
        if let Ok(infos) = self.slurm.query(&ids) {
            let live: Vec<JobId> = infos
                .iter()
                .filter(|j| !j.state.is_finished())
                .map(|j| j.job)
                .collect();
            let _ = self.slurm.cancel(&live);
        }
    }
}

/// A training-shaped grid: a per-seed `prepare` shared by both reward arms,
/// and a per-step `train` chain per cell. `prepare` waits (up to 60 s) for the
/// file `$SPUR_TEST_GATE`; while `$SPUR_TEST_FAIL` exists, seed 2's `prepare`
/// and step 2 of the (random, 1) cell fail.
const GRID: &str = r#"
name: slurmtoy
executor:
  slurm:
    time_limit: "5"
commands:
  prepare:
    run: |
      for i in $(seq 600); do [ -e "$SPUR_TEST_GATE" ] && break; sleep 0.1; done
      if [ ${seed} = 2 ] && [ -e "$SPUR_TEST_FAIL" ]; then echo "prepare ${seed} fails"; exit 3; fi
      echo "seed ${seed}" > ${out}/data.txt
      echo prepare-${seed} >> "$SPUR_TEST_LOG"
    outputs: [data.txt]
  train:
    run: |
      if [ ${reward}-${seed}-${step} = random-1-2 ] && [ -e "$SPUR_TEST_FAIL" ]; then echo "train fails"; exit 4; fi
      if [ -n "${prev}" ]; then cat ${prev}/w.txt > ${out}/w.txt; fi
      echo "${reward} step ${step} $(cat ${prepare}/data.txt)" >> ${out}/w.txt
      echo train-${reward}-${seed}-${step} >> "$SPUR_TEST_LOG"
    needs: [prepare]
    per_step: true
    outputs: [w.txt]
defaults:
  steps: 2
grid:
  reward: [gt, random]
  seed: [1, 2]
"#;

fn by_key(sw: &SlurmWorkspace, jobs: &[JobRecord]) -> BTreeMap<String, JobRecord> {
    let map: BTreeMap<String, JobRecord> = jobs.iter().map(|j| (sw.key(j), j.clone())).collect();
    assert_eq!(map.len(), jobs.len(), "one job per unit: {jobs:#?}");
    map
}

const SHARED_1: &str = "shared:reward=\"gt\",seed=1|reward=\"random\",seed=1";
const SHARED_2: &str = "shared:reward=\"gt\",seed=2|reward=\"random\",seed=2";

#[test]
fn dependencies_failures_and_resubmission() {
    let Some(conf) = cluster() else { return };
    let sw = SlurmWorkspace::new(conf, GRID);
    sw.touch("fail");
    let out = sw.ok(&["run", "exp.yaml", "--executor", "slurm"]);
    assert!(out.contains("submitted 6 jobs to Slurm"), "{out}");

    // Two shared jobs, and four chains each after its seed's shared job.
    let first = by_key(&sw, &sw.book().jobs);
    let keys: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "reward=\"gt\",seed=1",
            "reward=\"gt\",seed=2",
            "reward=\"random\",seed=1",
            "reward=\"random\",seed=2",
            SHARED_1,
            SHARED_2,
        ]
    );
    for (cell, shared) in [
        ("reward=\"gt\",seed=1", SHARED_1),
        ("reward=\"random\",seed=1", SHARED_1),
        ("reward=\"gt\",seed=2", SHARED_2),
        ("reward=\"random\",seed=2", SHARED_2),
    ] {
        let chain = &first[cell];
        let prepare = &first[shared];
        assert_eq!(chain.after, [prepare.id], "{cell}");
        assert!(prepare.after.is_empty());
        assert!(out.contains(&chain.id.to_string()), "{out}");
        // Slurm holds the chain back until `prepare` (waiting at the gate) is done.
        let shown = sw.slurm.show_job(chain.job_id()).unwrap();
        let dependency = shown[0].dependency.as_deref().unwrap_or_default();
        assert!(
            dependency.contains(&format!("afterok:{}", prepare.id)),
            "{cell}: {dependency}"
        );
        assert_eq!(shown[0].state, JobState::Pending);
        assert_eq!(shown[0].reason.as_deref(), Some("Dependency"));
        let script = std::fs::read_to_string(&chain.script).unwrap();
        assert!(
            script.contains("#SBATCH --kill-on-invalid-dep=yes\n"),
            "{script}"
        );
        assert!(script.contains("#SBATCH --time=5\n"), "{script}");
        assert!(script.contains(" exec-node "), "{script}");
        assert!(chain.log.starts_with(sw.ws.cache().join("slurm/slurmtoy")));
    }
    let status = sw.ok(&["status", "exp.yaml"]);
    assert!(status.contains("(chain): PENDING (Dependency)"), "{status}");

    // Submitting again while everything is queued submits nothing.
    let again = sw.ok(&["run", "exp.yaml", "--executor", "slurm"]);
    assert!(
        again.contains("6 units are already queued or running, not submitted again"),
        "{again}"
    );
    assert_eq!(sw.book().jobs.len(), 6);

    // Seed 2's prepare fails: only its two chains are cancelled. The
    // (random, 1) chain fails at step 2, after step 1 was cached.
    sw.touch("gate");
    let states = sw.wait_finished(&sw.book().jobs);
    let state = |key: &str| &states[&first[key].job_id()];
    assert_eq!(state(SHARED_1).state, JobState::Completed);
    assert_eq!(state("reward=\"gt\",seed=1").state, JobState::Completed);
    assert_eq!(state(SHARED_2).state, JobState::Failed);
    assert_eq!(state(SHARED_2).exit_code.map(|c| c.code), Some(1));
    assert_eq!(state("reward=\"random\",seed=1").state, JobState::Failed);
    for cell in ["reward=\"gt\",seed=2", "reward=\"random\",seed=2"] {
        assert_eq!(state(cell).state, JobState::Cancelled, "{cell}");
        assert_eq!(
            state(cell).reason.as_deref(),
            Some("DependencyNeverSatisfied"),
            "{cell}"
        );
    }
    let failed_log = std::fs::read_to_string(&first["reward=\"random\",seed=1"].log).unwrap();
    assert!(failed_log.contains("train fails"), "{failed_log}");

    let status = sw.ok(&["status", "exp.yaml"]);
    let failed_chain = format!(
        "slurm job {} (chain): FAILED (NonZeroExitCode), exit 1:0, log {}",
        first["reward=\"random\",seed=1"].id,
        first["reward=\"random\",seed=1"].log.display()
    );
    assert!(status.contains(&failed_chain), "{status}");
    assert!(
        status.contains("(chain): CANCELLED (DependencyNeverSatisfied)"),
        "{status}"
    );
    assert!(status.contains("(shared prepare step 0, "), "{status}");
    let gt1 = status
        .lines()
        .find(|l| l.contains("reward=gt,seed=1"))
        .unwrap();
    assert!(gt1.contains("finished"), "{status}");

    // The rerun submits only what is missing: seed 2's prepare and chains,
    // and step 2 of (random, 1).
    std::fs::remove_file(sw.ws.path("fail")).unwrap();
    let out = sw.ok(&["run", "exp.yaml", "--executor", "slurm"]);
    assert!(out.contains("submitted 4 jobs"), "{out}");
    let book = sw.book();
    let second = by_key(&sw, &book.jobs[6..]);
    let keys: Vec<&str> = second.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "reward=\"gt\",seed=2",
            "reward=\"random\",seed=1",
            "reward=\"random\",seed=2",
            SHARED_2
        ]
    );
    assert!(second["reward=\"random\",seed=1"].after.is_empty());
    let states = sw.wait_finished(&book.jobs[6..]);
    assert!(
        states.values().all(|j| j.state == JobState::Completed),
        "{states:#?}"
    );

    // Every node ran exactly once, and the results are in the cache.
    let log = std::fs::read_to_string(sw.ws.path("executions.log")).unwrap();
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "prepare-1",
            "prepare-2",
            "train-gt-1-1",
            "train-gt-1-2",
            "train-gt-2-1",
            "train-gt-2-2",
            "train-random-1-1",
            "train-random-1-2",
            "train-random-2-1",
            "train-random-2-2",
        ]
    );
    let local = sw.ok(&["run", "exp.yaml"]);
    assert!(local.contains("nothing to do: 4 runs, 10 nodes"), "{local}");
    let status = sw.ok(&["status", "exp.yaml"]);
    assert_eq!(status.matches("finished").count(), 4, "{status}");
    assert!(!status.contains("slurm job"), "{status}");
}

#[test]
fn cancel_selected_cells_then_everything() {
    let Some(conf) = cluster() else { return };
    let sw = SlurmWorkspace::new(conf, &GRID.replace("name: slurmtoy", "name: cancels"));
    sw.ok(&["run", "exp.yaml", "--executor", "slurm"]);
    let jobs = by_key(&sw, &sw.book().jobs);

    let out = sw.ok(&["cancel", "exp.yaml", "--only", "seed=1"]);
    assert!(out.contains("cancelled 3 jobs"), "{out}");
    let seed1 = [SHARED_1, "reward=\"gt\",seed=1", "reward=\"random\",seed=1"];
    let cancelled: Vec<JobRecord> = seed1.iter().map(|k| jobs[*k].clone()).collect();
    let states = sw.wait_finished(&cancelled);
    assert!(
        states.values().all(|j| j.state == JobState::Cancelled),
        "{states:#?}"
    );
    for key in [SHARED_2, "reward=\"gt\",seed=2", "reward=\"random\",seed=2"] {
        let info = &sw.slurm.query(&[jobs[key].job_id()]).unwrap()[0];
        assert!(!info.state.is_finished(), "{key}: {info:?}");
    }

    let out = sw.ok(&["cancel", "exp.yaml"]);
    assert!(out.contains("cancelled 3 jobs"), "{out}");
    let all: Vec<JobRecord> = jobs.values().cloned().collect();
    let states = sw.wait_finished(&all);
    assert!(
        states.values().all(|j| j.state == JobState::Cancelled),
        "{states:#?}"
    );
    let out = sw.ok(&["cancel", "exp.yaml"]);
    assert!(out.contains("no queued or running jobs"), "{out}");
    assert!(!sw.ws.path("executions.log").exists());
}

#[test]
fn gpus_reach_accelerator_jobs_only() {
    let Some(conf) = cluster() else { return };
    let grid = r#"
name: gpus
executor:
  slurm:
    gpus: 2
commands:
  cpu:
    run: echo "[$CUDA_VISIBLE_DEVICES]" > ${out}/devices.txt
    outputs: [devices.txt]
  gpu:
    run: echo "$CUDA_VISIBLE_DEVICES" > ${out}/devices.txt; echo ${seed} >> ${out}/devices.txt
    needs: [cpu]
    accelerator: true
    outputs: [devices.txt]
grid:
  seed: [1, 2]
"#;
    let sw = SlurmWorkspace::new(conf, grid);
    sw.ok(&["run", "exp.yaml", "--executor", "slurm"]);
    let jobs = sw.book().jobs;
    assert_eq!(jobs.len(), 3);
    let states = sw.wait_finished(&jobs);
    assert!(
        states.values().all(|j| j.state == JobState::Completed),
        "{states:#?}"
    );
    for job in &jobs {
        let script = std::fs::read_to_string(&job.script).unwrap();
        let gpu_line = script.contains("#SBATCH --gres=gpu:2\n");
        assert_eq!(gpu_line, matches!(job.work, Work::Run(_)), "{script}");
    }
    let plan = sw.ws.plan_json("exp.yaml");
    let mut seen = Vec::new();
    for node in plan["nodes"].as_array().unwrap() {
        assert_eq!(node["status"], "cached");
        let id = node["id"].as_str().unwrap();
        let text = std::fs::read_to_string(
            sw.ws
                .cache()
                .join(format!("nodes/{}/{id}/out/devices.txt", &id[..2])),
        )
        .unwrap();
        seen.push(text);
    }
    seen.sort();
    assert_eq!(seen[2], "[]\n", "{seen:?}");
    for (text, seed) in seen[..2].iter().zip(["1", "2"]) {
        let (devices, s) = text.trim_end().split_once('\n').unwrap();
        assert_eq!(s, seed);
        let ids: Vec<&str> = devices.split(',').collect();
        assert_eq!(ids.len(), 2, "{seen:?}");
        assert!(
            ids.iter().all(|d| d.parse::<u32>().is_ok_and(|d| d < 4)),
            "{seen:?}"
        );
    }
}

#[test]
fn a_rejected_job_fails_with_slurms_message_and_queues_nothing() {
    let Some(conf) = cluster() else { return };
    // The shared CPU job is accepted, then the chain asks for more GPUs than
    // the node has: spur reports Slurm's message and cancels the first job.
    let grid = r#"
name: rejected
executor:
  slurm:
    gpus: 8
commands:
  cpu:
    run: echo cpu > ${out}/x.txt
  gpu:
    run: echo gpu ${seed} > ${out}/x.txt
    needs: [cpu]
    accelerator: true
grid:
  seed: [1, 2]
"#;
    let sw = SlurmWorkspace::new(conf, grid);
    let out = sw.spur(&["run", "exp.yaml", "--executor", "slurm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Slurm rejected job `rejected/seed=1`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Requested node configuration is not available"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cancelled the 1 job(s) it had submitted"),
        "{stderr}"
    );
    assert!(sw.book().jobs.is_empty());
    assert!(!sw.ws.cache().join("slurm/rejected/submit-1").exists());

    // A misspelt setting is caught before anything is submitted.
    sw.ws.write(
        "exp.yaml",
        &grid.replace("gpus: 8", "gpus: 1\n    partion: debug"),
    );
    let out = sw.spur(&["run", "exp.yaml", "--executor", "slurm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("executor.slurm: unknown field `partion`"),
        "{stderr}"
    );
}

/// Without Slurm: `exec-node` stops after the node it is computing when it
/// gets USR2 (exit 75, so the job script requeues), and a second start
/// resumes from the cache.
#[test]
fn exec_node_stops_after_the_current_node_on_usr2() {
    let ws = Workspace::new();
    ws.write(
        "exp.yaml",
        r#"
name: usr2
commands:
  step:
    run: |
      trap : USR2  # exec-node passes USR2 on to the command, as Slurm does
      echo step-${step} >> "$SPUR_TEST_LOG"
      if [ ${step} = 1 ]; then touch "$SPUR_TEST_GATE"; sleep 1; fi
      echo ${step} > ${out}/s.txt
    per_step: true
    outputs: [s.txt]
defaults:
  steps: 3
"#,
    );
    let plan = ws.plan_json("exp.yaml");
    let run = format!("run:{}", plan["runs"][0]["id"].as_str().unwrap());
    let exec = || {
        ws.spur()
            .args(["exec-node", "exp.yaml", &run])
            .env("SPUR_TEST_LOG", ws.path("executions.log"))
            .env("SPUR_TEST_GATE", ws.path("started"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = exec();
    let start = Instant::now();
    while !ws.path("started").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "step 1 never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-USR2", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("stopped on USR2"), "{stderr}");
    let log = std::fs::read_to_string(ws.path("executions.log")).unwrap();
    assert_eq!(log, "step-1\n");
    let status = ws.ok(&["status", "exp.yaml"]);
    assert!(status.contains("1/3"), "{status}");
    assert!(status.contains("stopped"), "{status}");

    let out = exec().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(ws.path("executions.log")).unwrap();
    assert_eq!(log, "step-1\nstep-2\nstep-3\n");
    assert!(ws.ok(&["run", "exp.yaml"]).contains("nothing to do"));

    let bad = ws.fails(&["exec-node", "exp.yaml", "run:0123"]);
    assert!(bad.contains("expected `run:<run id>`"), "{bad}");
    let gone = ws.fails(&["exec-node", "exp.yaml", "run:0123456789abcdef"]);
    assert!(gone.contains("is not in the plan of exp.yaml"), "{gone}");
}
