//! Times submitting a grid shaped like the paper's: per model a shared step-0
//! eval and a labelling job, one job per run chain depending on both, and a few
//! job arrays after them. Everything is cancelled afterwards.
//!
//!   scripts/slurm-test-cluster.sh start
//!   SLURM_CONF=/tmp/spur-slurm/slurm.conf cargo run -p spur-slurm --example submit_grid -- [RUNS] [ARRAYS] [ARRAY_SIZE]
//!
//! Defaults: 170 runs over 8 models, 3 arrays of 100 tasks.

use std::time::{Duration, Instant};

use spur_slurm::{After, ArraySpec, JobId, JobSpec, Slurm};

const MODELS: usize = 8;

fn arg(n: usize, default: usize) -> usize {
    match std::env::args().nth(n) {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("argument {n} must be a number, got {text:?}");
            std::process::exit(2)
        }),
    }
}

/// User and system CPU seconds of this process and of its waited-for children
/// (the sbatch processes), from /proc/self/stat.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17 of the whole line: 11-14 here.
    let tick = 100.0; // USER_HZ on Linux
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    (get(11) + get(12), get(13) + get(14))
}

fn grid(dir: &std::path::Path, runs: usize, arrays: usize, array_size: usize) -> Vec<JobSpec> {
    let job = |name: String, after: Vec<After>| {
        let mut spec = JobSpec::new(
            name.clone(),
            dir.join(format!("{name}.sh")),
            dir.join(format!("{name}.log")),
            vec![format!("spur exec-node {name}")],
        );
        spec.after_ok = after;
        spec.settings.time_limit = Some("1-00:00:00".into());
        spec
    };
    let mut specs = Vec::new();
    for m in 0..MODELS {
        specs.push(job(format!("model{m}-eval0"), vec![]));
        specs.push(job(format!("model{m}-labels"), vec![]));
    }
    for r in 0..runs {
        let m = r % MODELS;
        specs.push(job(
            format!("run{r}"),
            vec![After::InBatch(2 * m), After::InBatch(2 * m + 1)],
        ));
    }
    for a in 0..arrays {
        let mut spec = job(format!("sweep{a}"), vec![After::InBatch(2 * (a % MODELS))]);
        spec.log = dir.join(format!("sweep{a}-%a.log"));
        spec.array = Some(ArraySpec {
            items: (0..array_size).map(|i| format!("cell{i}")).collect(),
            max_parallel: Some(8),
        });
        specs.push(spec);
    }
    specs
}

fn main() {
    let (runs, arrays, array_size) = (arg(1, 170), arg(2, 3), arg(3, 100));
    let slurm = Slurm::from_env();
    let dir = tempfile::tempdir().expect("a temporary directory");

    // spur's own work: render and write every script and manifest.
    let specs = grid(&dir.path().join("dry"), runs, arrays, array_size);
    let start = Instant::now();
    for spec in &specs {
        let after: Vec<JobId> = spec
            .after_ok
            .iter()
            .map(|a| match a {
                After::Job(id) => *id,
                // Placeholder ids: nothing is submitted here.
                After::InBatch(j) => JobId(1_000_000 + *j as u64),
            })
            .collect();
        spec.write(&after).expect("writing job files");
    }
    let render = start.elapsed();

    let specs = grid(&dir.path().join("real"), runs, arrays, array_size);
    let (cpu0, child0) = cpu_seconds();
    let start = Instant::now();
    let submitted = match slurm.submit_batch(&specs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("submission failed: {e}");
            std::process::exit(1)
        }
    };
    let total = start.elapsed();
    let (cpu1, child1) = cpu_seconds();

    let ids: Vec<JobId> = submitted.iter().map(|s| s.id).collect();
    let start = Instant::now();
    let states = slurm.query(&ids);
    let query = start.elapsed();
    if let Err(e) = slurm.cancel(&ids) {
        eprintln!("could not cancel the benchmark's jobs ({e}); cancel them with scancel");
    }
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "submitted {} jobs ({} runs, {} shared, {} arrays x {} tasks = {} tasks in all)",
        ids.len(),
        runs,
        2 * MODELS,
        arrays,
        array_size,
        ids.len() - arrays + arrays * array_size
    );
    println!("total wall time of submit_batch:  {:.3} s", secs(total));
    println!(
        "  per sbatch call:                {:.1} ms",
        1e3 * secs(total) / ids.len() as f64
    );
    println!("spur's own work (render+write):   {:.3} s", secs(render));
    println!("spur process CPU during submit:   {:.3} s", cpu1 - cpu0);
    println!("sbatch processes' CPU:            {:.3} s", child1 - child0);
    match states {
        Ok(states) => println!(
            "query of all their states:        {:.3} s ({} records)",
            secs(query),
            states.len()
        ),
        Err(e) => println!("query of their states failed: {e}"),
    }
}
