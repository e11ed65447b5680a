//! Every MATH-500 gold, written verbatim in a box, graded against itself.
//! The paper's grader rejects exactly five of them (the grader README lists
//! them); the strict grader accepts all 500.

use std::path::PathBuf;

use spur_math::{ExtractStyle, Grader};

const PAPER_NEVER_CORRECT: &[&str] = &[
    "test/intermediate_algebra/662.json",
    "test/prealgebra/105.json",
    "test/intermediate_algebra/431.json",
    "test/precalculus/768.json",
    "test/intermediate_algebra/2015.json",
];

fn golds() -> Option<Vec<(String, String)>> {
    let dir = match std::env::var_os("SPUR_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    };
    let path = dir.join("math500.jsonl");
    if !path.is_file() {
        if std::env::var("SPUR_SKIP_SHARED_DATA").as_deref() == Ok("1") {
            return None;
        }
        panic!(
            "{} not found (set SPUR_SHARED_DATA to the shared data folder, or \
             SPUR_SKIP_SHARED_DATA=1 to skip this test)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(&path).expect("readable math500.jsonl");
    Some(
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                (
                    v["unique_id"].as_str().expect("id").to_string(),
                    v["answer"].as_str().expect("answer").to_string(),
                )
            })
            .collect(),
    )
}

fn rejected(grader: Grader) -> Option<Vec<String>> {
    let golds = golds()?;
    assert_eq!(golds.len(), 500);
    Some(
        golds
            .iter()
            .filter(|(_, gold)| {
                let response = format!("The final answer is $\\boxed{{{gold}}}$.");
                !grader.grade(&response, gold, ExtractStyle::Default).correct
            })
            .map(|(id, _)| id.clone())
            .collect(),
    )
}

#[test]
fn paper_rejects_exactly_the_known_five() {
    if let Some(mut r) = rejected(Grader::Paper) {
        let mut want: Vec<String> = PAPER_NEVER_CORRECT.iter().map(|s| s.to_string()).collect();
        r.sort();
        want.sort();
        assert_eq!(r, want);
    }
}

#[test]
fn strict_accepts_every_gold() {
    if let Some(r) = rejected(Grader::Strict) {
        assert!(r.is_empty(), "strict rejects: {r:?}");
    }
}
