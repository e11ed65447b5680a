//! Against a real one-node Slurm started by `scripts/slurm-test-cluster.sh`.
//! Where it cannot be started (not root, no Debian packages) the tests print
//! why and pass without checking anything, unless `SPUR_SLURM_REQUIRED=1`
//! (as in CI), where that is a failure.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use spur_slurm::{
    After, ArraySpec, GpuOption, JobId, JobInfo, JobSpec, JobState, Slurm, SlurmError,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts (or finds) the test cluster once per test binary; `None` to skip.
fn cluster() -> Option<Slurm> {
    static CONF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let state = std::env::var("SPUR_SLURM_STATE").unwrap_or_else(|_| "/tmp/spur-slurm".into());
        let script = repo_root().join("scripts/slurm-test-cluster.sh");
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
        Ok(conf) => Some(Slurm::with_conf(conf)),
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

fn job(dir: &Path, name: &str, body: &[&str]) -> JobSpec {
    JobSpec::new(
        name,
        dir.join(format!("{name}.sh")),
        dir.join(format!("{name}.log")),
        body.iter().map(|l| l.to_string()).collect(),
    )
}

/// Polls until every job (every array task) has finished.
fn wait_finished(slurm: &Slurm, ids: &[JobId]) -> Vec<JobInfo> {
    let start = Instant::now();
    loop {
        let jobs = slurm.query(ids).unwrap();
        let all_known = ids.iter().all(|id| jobs.iter().any(|j| j.job == *id));
        if all_known && jobs.iter().all(|j| j.state.is_finished()) {
            return jobs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "jobs still not finished after 120 s: {jobs:#?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn info(jobs: &[JobInfo], id: JobId) -> &JobInfo {
    jobs.iter()
        .find(|j| j.job == id)
        .unwrap_or_else(|| panic!("job {id} missing from {jobs:#?}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn afterok_chain_runs_in_order_and_shows_its_dependencies() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let order = dir.path().join("order.txt");
    let append = |name: &str| format!("echo {name} >> '{}'", order.display());
    let mut b = job(dir.path(), "b", &[&append("b")]);
    b.after_ok = vec![After::InBatch(0)];
    let mut c = job(dir.path(), "c", &["sleep 1", &append("c")]);
    c.after_ok = vec![After::InBatch(0), After::InBatch(1)];
    let specs = vec![job(dir.path(), "a", &["sleep 2", &append("a")]), b, c];
    let ids: Vec<JobId> = slurm
        .submit_batch(&specs)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();

    // While `a` runs, `c` waits on both `a` and `b`.
    let shown = slurm.show_job(ids[2]).unwrap();
    let dependency = shown[0].dependency.as_deref().unwrap_or_default();
    assert!(
        dependency.contains(&format!("afterok:{}", ids[0]))
            && dependency.contains(&format!("afterok:{}", ids[1])),
        "{dependency}"
    );
    assert_eq!(shown[0].state, JobState::Pending);
    assert_eq!(shown[0].reason.as_deref(), Some("Dependency"));
    assert_eq!(
        shown[0].stdout.as_deref(),
        Some(dir.path().join("c.log").as_path())
    );

    let jobs = wait_finished(&slurm, &ids);
    for id in &ids {
        assert_eq!(info(&jobs, *id).state, JobState::Completed);
    }
    assert_eq!(read(&order), "a\nb\nc\n");
    assert!(read(&dir.path().join("a.log")).contains(&format!("spur: job {} start 1", ids[0])));
}

#[test]
fn a_failing_job_cancels_only_its_dependents() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = job(dir.path(), "root", &["true"]);
    let mut fail = job(dir.path(), "fail", &["echo failing", "exit 3"]);
    fail.after_ok = vec![After::InBatch(0)];
    let mut child = job(dir.path(), "child", &["true"]);
    child.after_ok = vec![After::InBatch(1)];
    let mut grandchild = job(dir.path(), "grandchild", &["true"]);
    grandchild.after_ok = vec![After::InBatch(2)];
    let mut sibling = job(dir.path(), "sibling", &["sleep 1"]);
    sibling.after_ok = vec![After::InBatch(0)];
    let ids: Vec<JobId> = slurm
        .submit_batch(&[root, fail, child, grandchild, sibling])
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();

    let jobs = wait_finished(&slurm, &ids);
    assert_eq!(info(&jobs, ids[0]).state, JobState::Completed);
    let failed = info(&jobs, ids[1]);
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.exit_code.map(|e| e.code), Some(3));
    assert_eq!(
        failed.stdout.as_deref(),
        Some(dir.path().join("fail.log").as_path())
    );
    for id in [ids[2], ids[3]] {
        let j = info(&jobs, id);
        assert_eq!(j.state, JobState::Cancelled, "{j:?}");
        assert_eq!(j.reason.as_deref(), Some("DependencyNeverSatisfied"));
    }
    assert_eq!(info(&jobs, ids[4]).state, JobState::Completed);
}

#[test]
fn array_tasks_read_their_items_from_the_manifest() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let items: Vec<String> = (0..5).map(|i| format!("cell {i}")).collect();
    let mut cells = job(
        dir.path(),
        "cells",
        &[&format!(
            "echo \"$SPUR_ARRAY_ITEM\" > '{}'/$SLURM_ARRAY_TASK_ID",
            out.display()
        )],
    );
    cells.log = dir.path().join("cells-%a.log");
    cells.array = Some(ArraySpec {
        items: items.clone(),
        max_parallel: Some(2),
    });
    // One job after the whole array.
    let mut gather = job(
        dir.path(),
        "gather",
        &[&format!(
            "cat '{0}'/0 '{0}'/1 '{0}'/2 '{0}'/3 '{0}'/4 > '{0}'/all",
            out.display()
        )],
    );
    gather.after_ok = vec![After::InBatch(0)];
    let submitted = slurm.submit_batch(&[cells, gather]).unwrap();
    let manifest = submitted[0].files.manifest.clone().unwrap();
    assert_eq!(manifest, dir.path().join("cells.sh.manifest.tsv"));
    let ids: Vec<JobId> = submitted.iter().map(|s| s.id).collect();

    let jobs = wait_finished(&slurm, &ids);
    let tasks: Vec<&JobInfo> = jobs.iter().filter(|j| j.job == ids[0]).collect();
    assert_eq!(tasks.len(), 5, "{tasks:#?}");
    assert!(tasks.iter().all(|t| t.state == JobState::Completed));
    assert_eq!(
        read(&out.join("all")),
        "cell 0\ncell 1\ncell 2\ncell 3\ncell 4\n"
    );
    assert!(read(&dir.path().join("cells-3.log")).contains("(task 3)"));
}

#[test]
fn cancel_ends_running_and_pending_jobs() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut after = job(dir.path(), "after", &["true"]);
    after.after_ok = vec![After::InBatch(0)];
    let ids: Vec<JobId> = slurm
        .submit_batch(&[job(dir.path(), "long", &["sleep 300"]), after])
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    slurm.cancel(&ids).unwrap();
    let jobs = wait_finished(&slurm, &ids);
    for id in &ids {
        assert_eq!(info(&jobs, *id).state, JobState::Cancelled);
    }
    // Cancelling finished jobs again is harmless.
    slurm.cancel(&ids).unwrap();
}

#[test]
fn fake_gpus_reach_the_job_as_cuda_visible_devices() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut specs = Vec::new();
    for option in [GpuOption::Gres, GpuOption::Gpus] {
        let name = format!("{option:?}").to_lowercase();
        let mut spec = job(
            dir.path(),
            &name,
            &[&format!(
                "echo \"$CUDA_VISIBLE_DEVICES\" > '{}/{name}.cvd'",
                dir.path().display()
            )],
        );
        spec.settings.gpus = Some(2);
        spec.settings.gpu_type = Some("fake".into());
        spec.settings.gpu_option = option;
        spec.settings.cpus_per_gpu = Some(1);
        spec.settings.mem_per_gpu = Some("200M".into());
        specs.push(spec);
    }
    let ids: Vec<JobId> = slurm
        .submit_batch(&specs)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    let jobs = wait_finished(&slurm, &ids);
    for (id, name) in ids.iter().zip(["gres", "gpus"]) {
        assert_eq!(info(&jobs, *id).state, JobState::Completed);
        let cvd = read(&dir.path().join(format!("{name}.cvd")));
        let devices: Vec<u32> = cvd
            .trim()
            .split(',')
            .map(|d| d.parse().unwrap_or_else(|_| panic!("{name}: {cvd:?}")))
            .collect();
        assert_eq!(devices.len(), 2, "{name}: {cvd:?}");
        assert!(
            devices.iter().all(|d| *d < 4) && devices[0] != devices[1],
            "{cvd:?}"
        );
    }
}

#[test]
fn a_rejected_submission_reports_slurm_and_submits_nothing_else() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let first = job(dir.path(), "first", &["sleep 300"]);
    let mut bad = job(dir.path(), "bad", &["true"]);
    bad.settings.partition = Some("no-such-partition".into());
    let mut after = job(dir.path(), "after", &["true"]);
    after.after_ok = vec![After::InBatch(0)];
    let err = slurm.submit_batch(&[first, bad, after]).unwrap_err();
    let SlurmError::BatchStopped {
        index,
        source,
        cancelled,
        cancel_error,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*index, 1);
    assert!(cancel_error.is_none(), "{err}");
    match source.as_ref() {
        SlurmError::Rejected { job, message, .. } => {
            assert_eq!(job, "bad");
            assert!(message.contains("invalid partition"), "{message}");
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string()
            .contains("invalid partition specified: no-such-partition"),
        "{err}"
    );
    assert_eq!(cancelled.len(), 1);
    let jobs = wait_finished(&slurm, cancelled);
    assert_eq!(info(&jobs, cancelled[0]).state, JobState::Cancelled);
    assert!(!dir.path().join("after.sh").exists());

    // More GPUs than the node has: rejected too.
    let mut greedy = job(dir.path(), "greedy", &["true"]);
    greedy.settings.gpus = Some(8);
    match slurm.submit(&greedy).unwrap_err() {
        SlurmError::Rejected { message, .. } => {
            assert!(
                message.contains("Requested node configuration is not available"),
                "{message}"
            )
        }
        other => panic!("{other}"),
    }
}

#[test]
fn near_the_time_limit_the_payload_checkpoints_and_the_job_requeues() {
    let Some(slurm) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut spec = job(
        dir.path(),
        "resumable",
        &[
            "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then",
            "  trap 'echo checkpointed; exit 5' USR2",
            "  echo working",
            "  sleep 300 & wait $!",
            "else",
            "  echo resumed",
            "fi",
        ],
    );
    // A one-minute limit is already within `--signal=B:USR2@120`, so Slurm
    // signals the job at its next time-limit check, well before killing it.
    spec.settings.time_limit = Some("1".into());
    let id = slurm.submit(&spec).unwrap().id;

    let jobs = wait_finished(&slurm, &[id]);
    let j = info(&jobs, id);
    assert_eq!(j.state, JobState::Completed, "{j:?}");
    assert_eq!(j.restarts, Some(1));
    let text = read(&dir.path().join("resumable.log"));
    let at = |s: &str| {
        text.find(s)
            .unwrap_or_else(|| panic!("no {s:?} in\n{text}"))
    };
    assert!(at("working") < at("checkpointed"));
    assert!(at("checkpointed") < at(&format!("requeueing job {id}")));
    assert!(at("requeueing") < at("start 2"));
    assert!(at("start 2") < at("resumed"));
}
