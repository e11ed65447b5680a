//! `index.html`: one self-contained page (plots as data: URIs, no scripts,
//! no external URLs). Rendered by minijinja with HTML auto-escaping, so
//! text from the experiment file or a model's output is always text.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::plots::{Drawn, HEIGHT, WIDTH};
use crate::probe_table::{self, PROBE_CAPTION};
use crate::runs::{RunView, State};
use crate::table::{Table, CAPTION, GRADER_CAPTION};
use crate::{ReportError, ReportInput, Result};

/// Responses longer than this are cut in the page (the eval artifact keeps
/// them whole).
const MAX_RESPONSE_CHARS: usize = 4000;

const TEMPLATE_NAME: &str = "index.html";

pub fn render(
    input: &ReportInput,
    views: &[RunView],
    table: &Table,
    drawn: &[Drawn],
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // The name's `.html` turns on HTML auto-escaping.
    env.add_template(TEMPLATE_NAME, include_str!("templates/index.html"))
        .map_err(template_err)?;
    let count = |s: State| views.iter().filter(|v| v.state == s).count();
    let rows: Vec<Value> = table
        .rows
        .iter()
        .map(|r| json!({"cells": table.cells(r), "partial": r.finals.len() < r.seeds_total}))
        .collect();
    let figures: Vec<Value> = drawn
        .iter()
        .map(|d| {
            json!({
                "title": d.figure.title,
                "caption": d.figure.caption,
                "src": format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(&d.png)
                ),
                "width": WIDTH,
                "height": HEIGHT,
                "png_file": d.png_file,
                "svg_file": d.svg_file,
            })
        })
        .collect();
    let runs: Vec<Value> = input
        .runs
        .iter()
        .zip(views)
        .map(|(run, view)| {
            let samples: Vec<Value> = run
                .samples
                .iter()
                .map(|s| {
                    let chars = s.response.chars().count();
                    let shown: String = s.response.chars().take(MAX_RESPONSE_CHARS).collect();
                    json!({
                        "eval": s.eval,
                        "step": s.step,
                        "problem": s.problem,
                        "gold": s.gold,
                        "extracted": s.extracted,
                        "correct": s.correct,
                        "response": shown,
                        "truncated": chars > MAX_RESPONSE_CHARS,
                        "shown": MAX_RESPONSE_CHARS,
                    })
                })
                .collect();
            let provenance = view.provenance.as_ref().map(|p| {
                json!({
                    "commit": p.commit,
                    "branch": p.branch,
                    "dirty": p.dirty,
                    "diff_sha256": p.diff_sha256,
                    "cargo_lock_sha256": p.cargo_lock_sha256,
                    "spur_version": p.spur_version,
                    "host": p.host,
                    "accelerators": p.accelerators,
                    "inputs": p.inputs,
                })
            });
            json!({
                "label": run.label,
                "id": run.id,
                "state": state_class(view.state),
                "status": view.status_text(),
                "warnings": view.warnings,
                "started_at": view.started_at,
                "finished_at": view.finished_at,
                "provenance": provenance,
                "samples": samples,
            })
        })
        .collect();
    let ctx = json!({
        "experiment": {
            "name": input.experiment.name,
            "path": input.experiment.path,
            "sha256": input.experiment.sha256,
            "description": input.experiment.description,
        },
        "counts": {
            "total": views.len(),
            "finished": count(State::Finished),
            "not_started": count(State::NotStarted),
            "unfinished": count(State::Incomplete) + count(State::Failed),
        },
        "table": {"caption": CAPTION, "header": table.header(), "rows": rows},
        "grader_table": {
            "caption": GRADER_CAPTION,
            "header": table.grader_header(),
            "rows": table.grader_rows().map(|r| table.grader_cells(r)).collect::<Vec<_>>(),
        },
        "probe_table": {
            "caption": PROBE_CAPTION,
            "header": probe_table::header(table.has_variants),
            "rows": table.probe.iter().map(|r| probe_table::cells(r, table.has_variants)).collect::<Vec<_>>(),
        },
        "figures": figures,
        "runs": runs,
    });
    env.get_template(TEMPLATE_NAME)
        .and_then(|t| t.render(ctx))
        .map_err(template_err)
}

fn template_err(source: minijinja::Error) -> ReportError {
    ReportError::Template {
        file: TEMPLATE_NAME.into(),
        source,
    }
}

fn state_class(s: State) -> &'static str {
    match s {
        State::NotStarted => "not-started",
        State::Incomplete => "unfinished",
        State::Failed => "failed",
        State::Finished => "finished",
    }
}

#[cfg(test)]
mod tests {
    use crate::testdata::{self, COMMIT, DIFF, MATH_HASH, XSS};

    fn page() -> String {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("report");
        crate::write_report(&testdata::input(), &dir).unwrap();
        std::fs::read_to_string(dir.join("index.html")).unwrap()
    }

    #[test]
    fn text_from_the_experiment_and_the_model_is_escaped() {
        let html = page();
        assert!(
            !html.to_lowercase().contains("<script"),
            "unescaped <script"
        );
        assert!(html.contains("demo &lt;script&gt;alert(1)&lt;&#x2f;script&gt;"));
        // The response, with its & escaped too.
        assert!(html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt; &amp; more"));
        assert!(XSS.starts_with("<script"));
    }

    #[test]
    fn the_page_is_self_contained() {
        let html = page();
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("src=\"plots"));
        // Per model: accuracy and code for two evals, two clip sides, four probe metrics.
        assert_eq!(html.matches("<img class=\"plot\"").count(), 20);
        assert_eq!(
            html.matches("src=\"data:image&#x2f;png;base64,").count(),
            20
        );
        assert!(html.contains("<table id=\"probe\">"));
    }

    #[test]
    fn provenance_and_states_are_listed() {
        let html = page();
        assert!(html.contains(COMMIT));
        assert!(html.contains(DIFF));
        assert!(html.contains(MATH_HASH));
        assert!(html.contains("<th>dirty</th><td>yes</td>"));
        assert_eq!(html.matches("class=\"state finished\"").count(), 9);
        assert_eq!(html.matches("class=\"state unfinished\"").count(), 1);
        assert_eq!(html.matches("class=\"state failed\"").count(), 1);
        assert_eq!(html.matches("class=\"state not-started\"").count(), 1);
        assert!(html.contains("failed after"));
        assert!(html.contains("step 3: out of memory"));
        assert!(
            !html.contains("memory\nmore"),
            "only the error's first line"
        );
        assert!(html.contains("class=\"partial\""));
    }

    #[test]
    fn the_page_shows_accuracy_under_each_grader() {
        let html = page();
        assert!(html.contains("<table id=\"graders\">"), "no grader table");
        assert!(html.contains("<th>math_verify: final (Δ)</th>"));
        assert!(html.contains("<td>27&#x2f;1500</td>"), "disagreements");
    }
}
