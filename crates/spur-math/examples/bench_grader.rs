//! Grading throughput of one of spur's graders (default: paper),
//! single-threaded, on JSONL files of `{"gold", "response", "paper_verdict"}`
//! rows. Prints one JSON line.
//!
//!     cargo run --release -p spur-math --example bench_grader -- [--grader NAME] FILE.jsonl...

use std::path::Path;

use spur_math::bench;
use spur_math::Grader;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut grader = Grader::Paper;
    if let Some(k) = args.iter().position(|a| a == "--grader") {
        let name = args.get(k + 1).cloned().unwrap_or_default();
        grader = match name.parse() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("bench_grader: {e}");
                std::process::exit(2);
            }
        };
        args.drain(k..(k + 2).min(args.len()));
    }
    let files = args;
    if files.is_empty() {
        eprintln!("usage: bench_grader [--grader paper|strict|math_verify] FILE.jsonl...");
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
    let warm = bench::grade_corpus(&rows, grader, 1);
    let repeat = ((2.0 / warm.seconds).ceil() as usize).clamp(1, 50);
    let r = bench::grade_corpus(&rows, grader, repeat);
    println!(
        "{{\"grader\":\"spur-{}\",\"rows\":{},\"passes\":{},\"seconds\":{:.3},\"responses_per_sec\":{:.1},\"agree_with_paper\":{},\"corpus_rows\":{}}}",
        grader.name(), r.rows, repeat, r.seconds, r.responses_per_sec, r.agree_with_paper, rows.len()
    );
}
