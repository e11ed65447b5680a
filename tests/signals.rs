//! SIGINT/SIGTERM during `spur run`: the command's whole process tree is
//! stopped, staging directories are removed, published nodes stay cached,
//! and spur exits with 128 + the signal; a second signal exits at once.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{count_lines, Workspace};

/// `first` finishes at once; `slow` starts a grandchild, records its pid and
/// waits for it, unless `$SPUR_TEST_FAST` is set. `$SPUR_TRAP` lets the
/// shell (and so its children) ignore SIGTERM.
const EXP: &str = r#"
commands:
  first:
    run: echo first >> "$SPUR_TEST_LOG"; echo done > ${out}/a.txt
    outputs: [a.txt]
  slow:
    run: |
      if [ -n "$SPUR_TEST_FAST" ]; then cp ${first}/a.txt ${out}/b.txt; exit 0; fi
      if [ -n "$SPUR_TRAP" ]; then trap '' TERM; fi
      sleep 300 &
      echo $! > "$SPUR_TEST_PID.tmp" && mv "$SPUR_TEST_PID.tmp" "$SPUR_TEST_PID"
      wait
    needs: [first]
    outputs: [b.txt]
"#;

const DEADLINE: Duration = Duration::from_secs(60);

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < DEADLINE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let mut status = None;
    wait_for("spur to exit", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// Gone, or a zombie nobody has reaped yet.
fn is_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid}");
}

struct Started {
    child: Child,
    grandchild: String,
    stderr: mpsc::Receiver<String>,
}

/// Starts spur with `args` and waits until the slow command's grandchild runs.
fn start(ws: &Workspace, args: &[&str], trap: bool) -> Started {
    let pid_file = ws.path("grandchild.pid");
    let mut cmd = ws.spur();
    cmd.args(args)
        .env("SPUR_TEST_LOG", ws.path("log"))
        .env("SPUR_TEST_PID", &pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if trap {
        cmd.env("SPUR_TRAP", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, stderr) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    wait_for("the grandchild's pid file", || pid_file.exists());
    let grandchild = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(!is_gone(&grandchild));
    Started {
        child,
        grandchild,
        stderr,
    }
}

fn staging_dirs(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// After the stop: nothing left behind, `first` still cached.
fn check_after(ws: &Workspace, started: &Started) {
    wait_for("the grandchild to die", || is_gone(&started.grandchild));
    assert_eq!(staging_dirs(&ws.cache()), Vec::<String>::new());
    let rerun = ws
        .spur()
        .args(["run", "exp.yaml"])
        .env("SPUR_TEST_LOG", ws.path("log"))
        .env("SPUR_TEST_FAST", "1")
        .output()
        .unwrap();
    assert!(rerun.status.success());
    let stdout = String::from_utf8_lossy(&rerun.stdout);
    assert!(stdout.contains("computed 1 node,"), "{stdout}");
    assert_eq!(count_lines(&ws.path("log")), 1, "`first` ran once");
}

fn stop_with(name: &str, code: i32) {
    let ws = Workspace::new();
    ws.write("exp.yaml", EXP);
    let mut started = start(&ws, &["run", "exp.yaml"], false);
    signal(started.child.id(), name);
    let status = wait_exit(&mut started.child);
    assert_eq!(status.code(), Some(code), "{status}");
    check_after(&ws, &started);
}

#[test]
fn sigterm_stops_the_command_tree_and_keeps_published_nodes() {
    stop_with("TERM", 143);
}

#[test]
fn sigint_stops_the_command_tree_and_keeps_published_nodes() {
    stop_with("INT", 130);
}

#[test]
fn a_second_sigint_exits_at_once() {
    let ws = Workspace::new();
    ws.write("exp.yaml", EXP);
    // The command ignores SIGTERM, so the first SIGINT cannot stop it.
    let mut started = start(&ws, &["run", "exp.yaml"], true);
    signal(started.child.id(), "INT");
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let line = started
            .stderr
            .recv_timeout(left)
            .expect("spur reports the stop");
        if line.contains("again to exit at once") {
            break;
        }
    }
    assert!(started.child.try_wait().unwrap().is_none(), "still waiting");
    signal(started.child.id(), "INT");
    let status = wait_exit(&mut started.child);
    assert_eq!(status.code(), Some(130), "{status}");
    wait_for("the grandchild to die", || is_gone(&started.grandchild));
}

/// `spur exec-node` (a Slurm job's payload) on the same experiment.
fn exec_node(ws: &Workspace, name: &str) -> (Started, ExitStatus) {
    ws.write("exp.yaml", EXP);
    let plan = ws.plan_json("exp.yaml");
    let run = format!("run:{}", plan["runs"][0]["id"].as_str().unwrap());
    let mut started = start(ws, &["exec-node", "exp.yaml", &run], false);
    signal(started.child.id(), name);
    let status = wait_exit(&mut started.child);
    (started, status)
}

#[test]
fn exec_node_stops_on_sigterm() {
    let ws = Workspace::new();
    let (started, status) = exec_node(&ws, "TERM");
    assert_eq!(status.code(), Some(143), "{status}");
    check_after(&ws, &started);
}

#[test]
fn exec_node_passes_usr2_on_to_the_command() {
    // The command's shell and its job end on USR2 (their default action),
    // as when they shared the job's process group; exec-node then stops
    // for the requeue (75).
    let ws = Workspace::new();
    let (started, status) = exec_node(&ws, "USR2");
    assert_eq!(status.code(), Some(75), "{status}");
    check_after(&ws, &started);
}
