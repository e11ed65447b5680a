//! Grading throughput of spur's paper grader, single-threaded, on JSONL files
//! of `{"gold", "response", "paper_verdict"}` rows. Prints one JSON line.
//!
//!     cargo run --release -p spur-math --example bench_grader -- FILE.jsonl...

use std::path::Path;

use spur_math::bench;
use spur_math::Grader;

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: bench_grader FILE.jsonl...");
        std::process::exit(2);
    }
    let paths: Vec<&Path> = files.iter().map(Path::new).collect();
    let rows = match bench::load_corpus(&paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench_grader: {e}");
            std::process::exit(1);
        }
    };
    // One warm-up pass (lazy regexes), then enough passes for ~2 s.
    let warm = bench::grade_corpus(&rows, Grader::Paper, 1);
    let repeat = ((2.0 / warm.seconds).ceil() as usize).clamp(1, 50);
    let r = bench::grade_corpus(&rows, Grader::Paper, repeat);
    println!(
        "{{\"grader\":\"spur-paper\",\"rows\":{},\"passes\":{},\"seconds\":{:.3},\"responses_per_sec\":{:.1},\"agree_with_paper\":{},\"corpus_rows\":{}}}",
        r.rows, repeat, r.seconds, r.responses_per_sec, r.agree_with_paper, rows.len()
    );
}
