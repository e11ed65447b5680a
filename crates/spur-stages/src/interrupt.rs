//! Stopping on SIGINT or SIGTERM: which signal asked this process to stop,
//! and the process groups of the command children to stop with it.
//!
//! Each child leads its own process group, so a stop reaches everything it
//! started (a shell's background jobs too) and a terminal's Ctrl-C reaches
//! only spur, which decides what to stop.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use rustix::process::{kill_process_group, waitid, Pid, Signal, WaitId, WaitIdOptions};

/// The first stop signal received, 0 while none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Leaders (= group ids) of the running children.
static GROUPS: Mutex<Vec<Pid>> = Mutex::new(Vec::new());

fn groups() -> std::sync::MutexGuard<'static, Vec<Pid>> {
    // The list stays valid even if a holder panicked.
    GROUPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The signal that asked this process to stop, if one did.
pub fn requested() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Records a stop (the first one counts) and sends SIGTERM to every running
/// child's group: SIGTERM rather than SIGINT, which a non-interactive
/// shell's background jobs ignore. No new child starts afterwards.
pub fn request(signal: i32) {
    if SIGNAL
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return;
    }
    for &group in groups().iter() {
        let _ = kill_process_group(group, Signal::TERM);
    }
}

/// Passes `signal` on to every running child's group, as if the children
/// shared spur's own group (e.g. Slurm's USR2 warning before a time limit).
pub fn forward(signal: i32) {
    let Some(signal) = Signal::from_named_raw(signal) else {
        return;
    };
    for &group in groups().iter() {
        let _ = kill_process_group(group, signal);
    }
}

/// Kills every running child's group outright, for a process about to exit.
pub fn kill_all() {
    for &group in groups().iter() {
        let _ = kill_process_group(group, Signal::KILL);
    }
}

/// Runs `cmd` to completion as the leader of a new process group. After a
/// stop was requested it starts nothing (an `Interrupted` error), and a
/// stopped child's descendants are killed with it.
pub fn status(cmd: &mut Command) -> io::Result<ExitStatus> {
    let child = spawn_in_group(cmd)?;
    wait_in_group(child)
}

/// As [`status`], feeding `input` to the child's stdin and collecting its
/// stdout and stderr.
pub fn output(cmd: &mut Command, input: Vec<u8>) -> io::Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in_group(cmd)?;
    let stdin = child.stdin.take();
    // Separate threads, so that a child blocked on a full pipe never deadlocks us.
    let writer = std::thread::spawn(move || stdin.map_or(Ok(()), |mut s| s.write_all(&input)));
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes)?;
            }
            io::Result::Ok(bytes)
        })
    };
    let stdout = read_all(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read_all(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_in_group(child)?;
    let joined = |t: std::thread::JoinHandle<io::Result<Vec<u8>>>| {
        t.join()
            .unwrap_or_else(|_| Err(io::Error::other("a pipe reader panicked")))
    };
    let (stdout, stderr) = (joined(stdout)?, joined(stderr)?);
    match writer.join() {
        // A child that exits without reading all its input is judged by its status.
        Ok(Err(e)) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
        Err(_) => return Err(io::Error::other("the stdin writer panicked")),
        _ => {}
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Starts `cmd` as the leader of a new process group and registers it for
/// [`request`], unless a stop was already requested.
fn spawn_in_group(cmd: &mut Command) -> io::Result<Child> {
    cmd.process_group(0);
    // Held across spawn and registration, so `request` either sees the
    // child or is seen here.
    let mut groups = groups();
    if requested().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "stopped by a signal",
        ));
    }
    let child = cmd.spawn()?;
    groups.push(Pid::from_child(&child));
    Ok(child)
}

/// Waits for a child of [`spawn_in_group`], then unregisters it; after a
/// stop, whatever of its group outlived it is killed.
fn wait_in_group(mut child: Child) -> io::Result<ExitStatus> {
    let pid = Pid::from_child(&child);
    // Wait without reaping: the unreaped leader keeps its group id from
    // being reused while the rest of its group is killed below.
    let exited = loop {
        match waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other,
        }
    };
    {
        let mut groups = groups();
        groups.retain(|&g| g != pid);
        if requested().is_some() {
            // Whatever outlived the shell (e.g. a job that ignores SIGTERM).
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
    exited?;
    child.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_leads_its_own_group() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let status = status(
            Command::new("bash")
                .arg("-c")
                .arg("cut -d' ' -f5 /proc/$$/stat > \"$1\"; echo $$ >> \"$1\"")
                .arg("bash")
                .arg(out.path()),
        )
        .unwrap();
        assert!(status.success());
        let text = std::fs::read_to_string(out.path()).unwrap();
        let ids: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(ids.len(), 2, "{text}");
        assert_eq!(ids[0], ids[1], "pgid == pid");
    }
}
