//! `spur grade`: one grader, or several compared (`--compare`), on JSONL files.

mod common;

use common::Workspace;
use serde_json::Value;

/// Line 2 gives the roots in another order: `strict` and `math_verify` accept
/// it, the paper's grader (position by position) does not. Line 4 is not JSON.
const RESPONSES: &str = concat!(
    r#"{"id":"a","gold":"0.5","response":"So \\boxed{\\frac{1}{2}}"}"#,
    "\n",
    r#"{"id":"b","gold":"1,-2","response":"The roots are \\boxed{-2,1}"}"#,
    "\n",
    r#"{"id":"c","gold":"7","response":"\\boxed{8}"}"#,
    "\n",
    "not json\n",
);

fn workspace() -> Workspace {
    let ws = Workspace::new();
    ws.write("responses.jsonl", RESPONSES);
    ws
}

#[test]
fn compare_prints_each_graders_accuracy_and_where_they_disagree() {
    let ws = workspace();
    let out = ws.run(&[
        "grade",
        "--input",
        "responses.jsonl",
        "--compare",
        "paper,strict,math_verify",
    ]);
    // The bad line makes the exit status 1; the others are still compared.
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("responses.jsonl:4: not a JSON object"),
        "{stderr}"
    );
    assert!(stdout.contains("3 responses graded"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("paper")[1..], ["1", "33.33%"]);
    assert_eq!(row("strict")[1..], ["2", "66.67%"]);
    assert_eq!(row("math_verify")[1..], ["2", "66.67%"]);
    assert!(
        stdout.contains("1 of 3 responses get differing verdicts; lines: 2"),
        "{stdout}"
    );
    let pair = stdout
        .lines()
        .find(|l| l.starts_with("paper vs math_verify"))
        .unwrap();
    assert_eq!(pair.split_whitespace().collect::<Vec<_>>()[3..], ["0", "1"]);
    let pair = stdout
        .lines()
        .find(|l| l.starts_with("strict vs math_verify"))
        .unwrap();
    assert_eq!(pair.split_whitespace().collect::<Vec<_>>()[3..], ["0", "0"]);
}

#[test]
fn compare_json_and_output_carry_every_verdict() {
    let ws = workspace();
    let out = ws.run(&[
        "grade",
        "--input",
        "responses.jsonl",
        "--compare",
        "math_verify,paper",
        "--json",
        "--output",
        "graded.jsonl",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["graded"], 3);
    let c = &json["comparison"];
    assert_eq!(c["n"], 3);
    assert_eq!(c["by_grader"]["math_verify"]["correct"], 2);
    assert_eq!(c["by_grader"]["paper"]["correct"], 1);
    assert_eq!(c["pairs"][0]["a"], "math_verify");
    assert_eq!(c["pairs"][0]["b"], "paper");
    assert_eq!(c["pairs"][0]["a_only"], 1);
    assert_eq!(c["pairs"][0]["b_only"], 0);
    assert_eq!(c["disagree"], 1);
    assert_eq!(c["disagree_lines"], serde_json::json!([2]));
    assert_eq!(json["errors"][0]["line"], 4);

    let graded = std::fs::read_to_string(ws.path("graded.jsonl")).unwrap();
    let lines: Vec<Value> = graded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["id"], "b");
    assert_eq!(lines[1]["verdicts"]["math_verify"]["correct"], true);
    assert_eq!(lines[1]["verdicts"]["paper"]["correct"], false);
    // The graders appear in the order given.
    let first = graded.lines().next().unwrap();
    assert!(
        first.find("\"math_verify\"").unwrap() < first.find("\"paper\"").unwrap(),
        "{first}"
    );
}

#[test]
fn one_grader_writes_extracted_and_correct() {
    let ws = workspace();
    ws.write("good.jsonl", &RESPONSES.replace("not json\n", ""));
    let out = ws.ok(&["grade", "--input", "good.jsonl", "--grader", "math_verify"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let correct: Vec<&Value> = lines.iter().map(|l| &l["correct"]).collect();
    assert_eq!(
        correct,
        [&Value::Bool(true), &Value::Bool(true), &Value::Bool(false)]
    );
    assert!(lines.iter().all(|l| l["extracted"].is_string()));
}

#[test]
fn bad_grader_lists_are_refused_before_grading() {
    let ws = workspace();
    for (args, expected) in [
        (vec!["--compare", "paper,paper"], "names `paper` twice"),
        (
            vec!["--compare", "paper,math-verify"],
            "unknown grader 'math-verify'",
        ),
        (vec!["--compare", "strict"], "at least two graders"),
        (
            vec!["--grader", "strict", "--compare", "paper,strict"],
            "cannot be used with",
        ),
        (vec!["--json"], "--compare"),
    ] {
        let mut all = vec![
            "grade",
            "--input",
            "responses.jsonl",
            "--output",
            "out.jsonl",
        ];
        all.extend(args.iter().copied());
        let err = ws.fails(&all);
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in:\n{err}"
        );
        assert!(!ws.path("out.jsonl").exists(), "{args:?} wrote output");
    }
}
