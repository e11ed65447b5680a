//! The Paper grader against the paper's own verdicts on real model outputs
//! (`../shared/data/grader/`, see its README): extraction and verdict per row.

use std::path::PathBuf;

use spur_math::{ExtractStyle, Grader};

/// Rows (file, 1-based line) where spur's Paper grader is known to differ
/// from the paper's verdict, with why. Keep in sync with docs/grading.md.
const KNOWN_VERDICT_DISAGREEMENTS: &[(&str, usize, &str)] = &[];

/// Rows where spur's extraction differs from `paper_extracted`.
const KNOWN_EXTRACTION_DISAGREEMENTS: &[(&str, usize, &str)] = &[];

fn shared_data() -> Option<PathBuf> {
    let dir = match std::env::var_os("SPUR_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    };
    if dir.join("grader/real_outputs.jsonl").is_file() {
        return Some(dir);
    }
    if std::env::var("SPUR_SKIP_SHARED_DATA").as_deref() == Ok("1") {
        return None;
    }
    panic!(
        "shared grader data not found at {} (set SPUR_SHARED_DATA to the folder that holds \
         grader/real_outputs.jsonl, or SPUR_SKIP_SHARED_DATA=1 to skip this test)",
        dir.display()
    );
}

fn check(file: &str, min_agreement: f64) {
    let Some(dir) = shared_data() else {
        eprintln!("SPUR_SKIP_SHARED_DATA=1: skipping {file}");
        return;
    };
    let path = dir.join("grader").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut verdicts = Vec::new();
    let mut extractions = Vec::new();
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{file}:{}: no {k}", i + 1))
        };
        let verdict = Grader::Paper.grade(s("response"), s("gold"), ExtractStyle::Default);
        rows += 1;
        if verdict.extracted != s("paper_extracted") {
            extractions.push((
                i + 1,
                verdict.extracted.clone(),
                s("paper_extracted").to_string(),
            ));
        }
        if Some(verdict.correct) != v["paper_verdict"].as_bool() {
            verdicts.push((i + 1, s("gold").to_string(), verdict.extracted));
        }
    }
    let known_v: Vec<usize> = KNOWN_VERDICT_DISAGREEMENTS
        .iter()
        .filter(|k| k.0 == file)
        .map(|k| k.1)
        .collect();
    let known_e: Vec<usize> = KNOWN_EXTRACTION_DISAGREEMENTS
        .iter()
        .filter(|k| k.0 == file)
        .map(|k| k.1)
        .collect();
    let got_v: Vec<usize> = verdicts.iter().map(|d| d.0).collect();
    let got_e: Vec<usize> = extractions.iter().map(|d| d.0).collect();
    assert_eq!(
        got_e, known_e,
        "{file}: extraction disagreements (line, spur, paper): {extractions:?}"
    );
    assert_eq!(
        got_v, known_v,
        "{file}: verdict disagreements (line, gold, extracted): {verdicts:?}"
    );
    let agreement = 1.0 - verdicts.len() as f64 / rows as f64;
    assert!(
        agreement >= min_agreement,
        "{file}: agreement {agreement} < {min_agreement}"
    );
}

#[test]
fn math500_outputs_agree_with_paper() {
    check("real_outputs.jsonl", 0.995);
}

#[test]
fn aime_amc_outputs_agree_with_paper() {
    check("real_outputs_aime_amc.jsonl", 0.995);
}

/// The strict grader only departs from the paper where the paper is wrong:
/// on MATH-500 every changed verdict is math-verify's (the README's
/// "math-verify better" categories), and it changes most of them.
#[test]
fn strict_changes_only_paper_failures() {
    let Some(dir) = shared_data() else {
        return;
    };
    let path = dir.join("grader/real_outputs.jsonl");
    let text = std::fs::read_to_string(&path).expect("readable corpus");
    let mut changed = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        let (gold, response) = (
            v["gold"].as_str().expect("gold"),
            v["response"].as_str().expect("response"),
        );
        let paper = Grader::Paper
            .grade(response, gold, ExtractStyle::Default)
            .correct;
        let strict = Grader::Strict
            .grade(response, gold, ExtractStyle::Default)
            .correct;
        if paper != strict {
            changed += 1;
            assert_eq!(
                Some(strict),
                v["math_verify_verdict"].as_bool(),
                "line {}: gold {gold:?}",
                i + 1
            );
        }
    }
    assert!(changed >= 35, "strict changed only {changed} verdicts");
}
