//! The `math_verify` grader against the Python library's verdicts:
//! math-verify's own test-suite cases (`tests/data/math_verify_cases.jsonl`,
//! made by `scripts/math_verify_cases.py`) and the real model outputs of the
//! shared grader corpus (`../shared/data/grader/`, skipped when absent).

use std::path::PathBuf;

use spur_math::math_verify;
use spur_math::{ExtractStyle, Grader};

/// Agreement wanted on math-verify's test-suite cases.
const MIN_CASES: f64 = 0.95;
/// Agreement wanted on the real MATH-500 outputs.
const MIN_REAL: f64 = 0.99;

fn show(s: &str) -> String {
    let s: String = s
        .chars()
        .rev()
        .take(160)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    s.replace('\n', "⏎")
}

#[test]
fn test_suite_cases() {
    // SPUR_MV_CASES: another file of the same shape (for development).
    let path = match std::env::var_os("SPUR_MV_CASES") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/math_verify_cases.jsonl")
        }
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows = 0;
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let (gold, pred) = (
            v["gold"].as_str().unwrap_or_default(),
            v["pred"].as_str().unwrap_or_default(),
        );
        let want = v["verdict"].as_bool().unwrap_or_default();
        let got = math_verify::verify(&math_verify::parse(gold), &math_verify::parse(pred));
        rows += 1;
        if got != want {
            bad.push(format!(
                "  {} want {want}: gold {:?} pred {:?} | ours {} / {}",
                v["source"],
                show(gold),
                show(pred),
                math_verify::describe(&math_verify::parse(gold)),
                math_verify::describe(&math_verify::parse(pred))
            ));
        }
    }
    let agree = (rows - bad.len()) as f64 / rows as f64;
    eprintln!(
        "math-verify test-suite cases: {}/{rows} agree ({:.1}%)",
        rows - bad.len(),
        100.0 * agree
    );
    for b in &bad {
        eprintln!("{b}");
    }
    assert!(agree >= MIN_CASES, "agreement {agree:.3} below {MIN_CASES}");
}

fn shared_data() -> Option<PathBuf> {
    let dir = match std::env::var_os("SPUR_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    };
    dir.join("grader/real_outputs.jsonl")
        .is_file()
        .then_some(dir)
}

fn real(file: &str, min: f64) {
    let Some(dir) = shared_data() else {
        eprintln!("shared grader data not found (set SPUR_SHARED_DATA): skipping {file}");
        return;
    };
    let path = dir.join("grader").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows = 0;
    let mut agree = [0usize; 3];
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{file}:{}: {e}", i + 1));
        let s = |k: &str| v[k].as_str().unwrap_or_default();
        let want = v["math_verify_verdict"].as_bool().unwrap_or_default();
        rows += 1;
        for (k, g) in [Grader::Paper, Grader::Strict, Grader::MathVerify]
            .into_iter()
            .enumerate()
        {
            let verdict = g.grade(s("response"), s("gold"), ExtractStyle::Default);
            if verdict.correct == want {
                agree[k] += 1;
            } else if g == Grader::MathVerify {
                bad.push(format!(
                    "  line {} want {want}: gold {:?} extracted {:?} | response …{:?}",
                    i + 1,
                    s("gold"),
                    verdict.extracted,
                    show(s("response"))
                ));
            }
        }
    }
    let pct = |n: usize| 100.0 * n as f64 / rows as f64;
    eprintln!(
        "{file}: agreement with math_verify_verdict over {rows} rows: paper {:.2}%, strict {:.2}%, math_verify {:.2}%",
        pct(agree[0]),
        pct(agree[1]),
        pct(agree[2])
    );
    for b in &bad {
        eprintln!("{b}");
    }
    let got = agree[2] as f64 / rows as f64;
    assert!(
        got >= min,
        "{file}: math_verify agreement {got:.4} below {min}"
    );
}

#[test]
fn real_outputs() {
    real("real_outputs.jsonl", MIN_REAL);
}

#[test]
fn real_outputs_aime_amc() {
    real("real_outputs_aime_amc.jsonl", MIN_REAL);
}
