//! The results table: one row per model × reward (× other axes) × eval,
//! with the baseline, the final accuracy over seeds and how many seeds have
//! reached it.

use std::collections::BTreeSet;

use spur_math::Grader;

use crate::probe_table::{self, ProbeRow, PROBE_CAPTION};
use crate::runs::{RunView, State};
use crate::ReportInput;

/// Runs that differ only in seed, in grid order.
#[derive(Clone, Debug)]
pub struct Group {
    pub model: String,
    pub reward: String,
    pub variant: String,
    /// Indices into the input's runs.
    pub runs: Vec<usize>,
}

impl Group {
    /// `reward` or `reward (variant)`: a plot line's name.
    pub fn line_label(&self) -> String {
        if self.variant.is_empty() {
            self.reward.clone()
        } else {
            format!("{} ({})", self.reward, self.variant)
        }
    }
}

pub fn groups(input: &ReportInput) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, run) in input.runs.iter().enumerate() {
        let same = |g: &&mut Group| {
            g.model == run.model && g.reward == run.reward && g.variant == run.variant
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.runs.push(i),
            None => groups.push(Group {
                model: run.model.clone(),
                reward: run.reward.clone(),
                variant: run.variant.clone(),
                runs: vec![i],
            }),
        }
    }
    groups
}

/// Eval names in the report, sorted.
pub fn eval_names(views: &[RunView]) -> Vec<String> {
    views
        .iter()
        .flat_map(|v| v.evals.iter().map(|e| e.eval.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[derive(Clone, Debug)]
pub struct Row {
    pub model: String,
    pub reward: String,
    pub variant: String,
    /// `None` where no run of the group has a record to say.
    pub eval: Option<String>,
    /// The last planned eval step.
    pub final_step: Option<u64>,
    pub baseline: Option<f64>,
    /// (seed, accuracy at the final step), for the seeds that reached it.
    pub finals: Vec<(String, f64)>,
    pub seeds_total: usize,
    /// Why some seeds are missing: `seed 3 at step 2`, `seed 4 not started`.
    pub missing: Vec<String>,
    /// The same accuracies under each grader, in [`Table::graders`] order.
    pub by_grader: Vec<GraderCell>,
    /// Final-eval responses on which the graders disagree, and all of them,
    /// summed over the seeds that reached the final eval.
    pub disagreement: Option<(u64, u64)>,
}

/// One grader's baseline and final mean in a row.
#[derive(Clone, Debug, PartialEq)]
pub struct GraderCell {
    pub baseline: Option<f64>,
    pub final_mean: Option<f64>,
}

impl GraderCell {
    pub fn delta(&self) -> Option<f64> {
        Some(self.final_mean? - self.baseline?)
    }
}

impl Row {
    pub fn mean(&self) -> Option<f64> {
        mean(self.finals.iter().map(|f| f.1))
    }

    /// Sample standard deviation (n − 1); none for fewer than two seeds.
    pub fn std(&self) -> Option<f64> {
        let n = self.finals.len();
        let m = self.mean()?;
        (n >= 2).then(|| {
            let ss: f64 = self.finals.iter().map(|f| (f.1 - m).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        })
    }

    pub fn delta(&self) -> Option<f64> {
        Some(self.mean()? - self.baseline?)
    }

    pub fn seeds(&self) -> String {
        format!("{}/{}", self.finals.len(), self.seeds_total)
    }

    pub fn note(&self) -> String {
        if self.eval.is_none() {
            return "no run started".into();
        }
        if self.finals.is_empty() && self.missing.is_empty() {
            return "nothing finished".into();
        }
        let mut note = String::new();
        if self.finals.is_empty() {
            note.push_str("nothing finished; ");
        } else if !self.missing.is_empty() {
            note.push_str("partial; ");
        }
        note.push_str(&self.missing.join("; "));
        note.trim_end_matches("; ").to_string()
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

pub struct Table {
    pub experiment: String,
    pub rows: Vec<Row>,
    pub has_variants: bool,
    /// Graders the eval metrics have verdicts of: spur's own in their usual
    /// order, then any other.
    pub graders: Vec<String>,
    /// The policy probe's rows, where runs recorded one.
    pub probe: Vec<ProbeRow>,
}

fn grader_names(views: &[RunView]) -> Vec<String> {
    let found: BTreeSet<String> = views
        .iter()
        .flat_map(|v| &v.evals)
        .flat_map(|e| e.grader_names())
        .collect();
    let ours = Grader::ALL.map(Grader::name);
    let mut names: Vec<String> = ours
        .iter()
        .filter(|g| found.contains(**g))
        .map(|g| g.to_string())
        .collect();
    names.extend(found.into_iter().filter(|g| !ours.contains(&g.as_str())));
    names
}

impl Table {
    pub fn build(input: &ReportInput, views: &[RunView]) -> Table {
        let all_evals = eval_names(views);
        let graders = grader_names(views);
        let mut rows = Vec::new();
        for g in groups(input) {
            let mut evals: Vec<String> =
                eval_names(&g.runs.iter().map(|&i| views[i].clone()).collect::<Vec<_>>());
            if evals.is_empty() {
                evals = all_evals.clone();
            }
            if evals.is_empty() {
                rows.push(Row {
                    model: g.model.clone(),
                    reward: g.reward.clone(),
                    variant: g.variant.clone(),
                    eval: None,
                    final_step: None,
                    baseline: None,
                    finals: Vec::new(),
                    seeds_total: g.runs.len(),
                    missing: Vec::new(),
                    by_grader: Vec::new(),
                    disagreement: None,
                });
                continue;
            }
            for eval in evals {
                rows.push(row(input, views, &g, &eval, &graders));
            }
        }
        Table {
            experiment: input.experiment.name.clone(),
            has_variants: rows.iter().any(|r| !r.variant.is_empty()),
            rows,
            graders,
            probe: probe_table::rows(input, views),
        }
    }

    /// The "by grader" table's header: one column per grader, then the
    /// final-eval disagreements.
    pub fn grader_header(&self) -> Vec<String> {
        let mut h = vec!["model".to_string(), "reward".into()];
        if self.has_variants {
            h.push("variant".into());
        }
        h.push("eval".into());
        h.extend(self.graders.iter().map(|g| format!("{g}: final (Δ)")));
        h.push("disagree".into());
        h
    }

    /// Rows that have per-grader numbers (evals recorded before the eval
    /// stage graded three ways have none).
    pub fn grader_rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| {
            r.by_grader
                .iter()
                .any(|c| c.baseline.is_some() || c.final_mean.is_some())
        })
    }

    /// Display cells of the "by grader" table (accuracies in %).
    pub fn grader_cells(&self, r: &Row) -> Vec<String> {
        let mut c = vec![r.model.clone(), r.reward.clone()];
        if self.has_variants {
            c.push(r.variant.clone());
        }
        c.push(r.eval.clone().unwrap_or_else(|| "—".into()));
        for cell in &r.by_grader {
            c.push(match (cell.final_mean, cell.delta()) {
                (Some(m), Some(d)) => format!("{:.1} ({:+.1})", 100.0 * m, 100.0 * d),
                (Some(m), None) => format!("{:.1}", 100.0 * m),
                (None, _) => "—".into(),
            });
        }
        c.push(match r.disagreement {
            Some((d, n)) => format!("{d}/{n}"),
            None => "—".into(),
        });
        c
    }

    pub fn header(&self) -> Vec<&'static str> {
        let mut h = vec!["model", "reward"];
        if self.has_variants {
            h.push("variant");
        }
        h.extend([
            "eval",
            "baseline",
            "final (mean ± std)",
            "Δ",
            "seeds",
            "note",
        ]);
        h
    }

    /// Display cells, the same for Markdown and HTML (accuracies in %).
    pub fn cells(&self, r: &Row) -> Vec<String> {
        let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{:.1}", 100.0 * v));
        let mut c = vec![r.model.clone(), r.reward.clone()];
        if self.has_variants {
            c.push(r.variant.clone());
        }
        let final_cell = match (r.mean(), r.std()) {
            (Some(m), Some(s)) => format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s),
            (Some(m), None) => format!("{:.1}", 100.0 * m),
            (None, _) => "—".into(),
        };
        let eval = match (&r.eval, r.final_step) {
            (Some(e), Some(s)) => format!("{e} (step {s})"),
            (Some(e), None) => e.clone(),
            (None, _) => "—".into(),
        };
        c.extend([
            eval,
            pct(r.baseline),
            final_cell,
            r.delta()
                .map_or("—".into(), |d| format!("{:+.1}", 100.0 * d)),
            r.seeds(),
            r.note(),
        ]);
        c
    }

    pub fn markdown(&self) -> String {
        // `\<` keeps a Markdown renderer from reading `<…>` as HTML.
        let esc = |s: &str| s.replace('|', "\\|").replace('<', "\\<").replace('\n', " ");
        let mut out = format!("# {}: results\n\n", esc(&self.experiment));
        out.push_str(CAPTION);
        out.push_str("\n\n");
        let header = self.header();
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        for r in &self.rows {
            let cells: Vec<String> = self.cells(r).iter().map(|c| esc(c)).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        if self.grader_rows().next().is_some() {
            out.push_str("\n## By grader\n\n");
            out.push_str(GRADER_CAPTION);
            out.push_str("\n\n");
            let header = self.grader_header();
            out.push_str(&format!("| {} |\n", header.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            for r in self.grader_rows() {
                let cells: Vec<String> = self.grader_cells(r).iter().map(|c| esc(c)).collect();
                out.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
        }
        if !self.probe.is_empty() {
            out.push_str("\n## Policy probe\n\n");
            out.push_str(PROBE_CAPTION);
            out.push_str("\n\n");
            let header = probe_table::header(self.has_variants);
            out.push_str(&format!("| {} |\n", header.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            for r in &self.probe {
                let cells: Vec<String> = probe_table::cells(r, self.has_variants)
                    .iter()
                    .map(|c| esc(c))
                    .collect();
                out.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
        }
        out
    }

    /// Machine-readable: accuracies as fractions, every seed's final value.
    pub fn csv(&self) -> String {
        let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        let mut out = String::from(
            "model,reward,variant,eval,final_step,baseline,final_mean,final_std,delta,\
             seeds_finished,seeds_total,final_by_seed",
        );
        for g in &self.graders {
            out.push_str(&format!(",baseline_{g},final_mean_{g}"));
        }
        if !self.graders.is_empty() {
            out.push_str(",disagree,responses");
        }
        out.push_str(",note\n");
        for r in &self.rows {
            let by_seed = r
                .finals
                .iter()
                .map(|(s, v)| format!("{s}={v:.6}"))
                .collect::<Vec<_>>()
                .join(";");
            let mut fields = vec![
                r.model.clone(),
                r.reward.clone(),
                r.variant.clone(),
                r.eval.clone().unwrap_or_default(),
                r.final_step.map_or(String::new(), |s| s.to_string()),
                num(r.baseline),
                num(r.mean()),
                num(r.std()),
                num(r.delta()),
                r.finals.len().to_string(),
                r.seeds_total.to_string(),
                by_seed,
            ];
            for k in 0..self.graders.len() {
                let cell = r.by_grader.get(k);
                fields.push(num(cell.and_then(|c| c.baseline)));
                fields.push(num(cell.and_then(|c| c.final_mean)));
            }
            if !self.graders.is_empty() {
                let (d, n) = r.disagreement.unzip();
                fields.push(d.map_or(String::new(), |d| d.to_string()));
                fields.push(n.map_or(String::new(), |n| n.to_string()));
            }
            fields.push(r.note());
            let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&line.join(","));
            out.push('\n');
        }
        out
    }
}

pub const CAPTION: &str = "Accuracy in %. Baseline: the model's step-0 eval. \
Final: the eval at the last planned step, mean ± sample standard deviation (n − 1) \
over the seeds that reached it; Δ = final mean − baseline. \
Seeds: seeds that reached the final eval / seeds in the grid.";

pub const GRADER_CAPTION: &str = "The same evaluations under each grader: final mean \
accuracy in % over the seeds that reached the final eval, and in brackets its change from \
the step-0 baseline under that grader. Disagree: final-eval responses on which the graders' \
verdicts differ / responses graded, summed over those seeds. A gain that holds under one \
grader only is the grader's, not the training's.";

pub(crate) fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

fn row(input: &ReportInput, views: &[RunView], g: &Group, eval: &str, graders: &[String]) -> Row {
    let nodes = |i: usize| views[i].evals.iter().filter(move |e| e.eval == eval);
    let final_step = g.runs.iter().flat_map(|&i| nodes(i)).map(|e| e.step).max();
    let baseline = mean(
        g.runs
            .iter()
            .flat_map(|&i| nodes(i))
            .filter(|e| e.step == 0)
            .filter_map(|e| e.metric("accuracy")),
    );
    let mut finals = Vec::new();
    let mut missing = Vec::new();
    let mut final_nodes = Vec::new();
    for &i in &g.runs {
        let seed = &input.runs[i].seed;
        let last = nodes(i)
            .filter(|e| Some(e.step) == final_step)
            .find_map(|e| Some((e.metric("accuracy")?, e)));
        match (last, views[i].state) {
            (Some((acc, node)), _) => {
                finals.push((seed.clone(), acc));
                final_nodes.push(node);
            }
            (None, State::NotStarted) => missing.push(format!("seed {seed} not started")),
            (None, state) => {
                let at = match views[i].latest_eval_step() {
                    Some(s) => format!("last eval at step {s}"),
                    None => "no eval yet".into(),
                };
                let how = if state == State::Failed {
                    "failed"
                } else {
                    "unfinished"
                };
                missing.push(format!("seed {seed} {how}, {at}"));
            }
        }
    }
    let by_grader = graders
        .iter()
        .map(|grader| GraderCell {
            baseline: mean(
                g.runs
                    .iter()
                    .flat_map(|&i| nodes(i))
                    .filter(|e| e.step == 0)
                    .filter_map(|e| e.grader_accuracy(grader)),
            ),
            final_mean: mean(final_nodes.iter().filter_map(|e| e.grader_accuracy(grader))),
        })
        .collect();
    let disagreement = final_nodes
        .iter()
        .filter_map(|e| e.disagreement())
        .reduce(|(d, n), (d2, n2)| (d + d2, n + n2));
    Row {
        model: g.model.clone(),
        reward: g.reward.clone(),
        variant: g.variant.clone(),
        eval: Some(eval.to_string()),
        final_step,
        baseline,
        finals,
        seeds_total: g.runs.len(),
        missing,
        by_grader,
        disagreement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, accuracy, STEPS};

    fn table() -> Table {
        let input = testdata::input();
        let views = testdata::views(&input);
        Table::build(&input, &views)
    }

    fn find<'a>(t: &'a Table, model: &str, reward: &str, eval: &str) -> &'a Row {
        t.rows
            .iter()
            .find(|r| r.model == model && r.reward == reward && r.eval.as_deref() == Some(eval))
            .unwrap()
    }

    #[test]
    fn one_row_per_model_reward_and_eval() {
        let t = table();
        assert_eq!(t.rows.len(), 2 * 2 * 2);
        assert!(!t.has_variants);
    }

    #[test]
    fn complete_cell_has_mean_std_delta() {
        let t = table();
        let r = find(&t, "alpha", "ground_truth", "math500");
        let finals: Vec<f64> = (1..=3)
            .map(|s| accuracy("alpha", "ground_truth", s, STEPS))
            .collect();
        let m = finals.iter().sum::<f64>() / 3.0;
        let sd = (finals.iter().map(|f| (f - m).powi(2)).sum::<f64>() / 2.0).sqrt();
        assert_eq!(r.final_step, Some(STEPS));
        assert!((r.mean().unwrap() - m).abs() < 1e-12);
        assert!((r.std().unwrap() - sd).abs() < 1e-12);
        assert!((r.delta().unwrap() - (m - 0.5)).abs() < 1e-12);
        assert_eq!(r.baseline, Some(0.5));
        assert_eq!(r.seeds(), "3/3");
        assert_eq!(r.note(), "");
    }

    #[test]
    fn partial_cells_say_what_is_missing() {
        let t = table();
        let r = find(&t, "alpha", "random", "math500");
        assert_eq!(r.seeds(), "2/3");
        assert_eq!(r.note(), "partial; seed 3 unfinished, last eval at step 2");
        let r = find(&t, "beta", "random", "math500");
        assert_eq!(r.seeds(), "1/3");
        assert!(r.note().contains("seed 2 failed"), "{}", r.note());
        assert!(r.note().contains("seed 3 not started"), "{}", r.note());
        // One seed: a mean, no standard deviation.
        assert!(r.mean().is_some() && r.std().is_none());
    }

    #[test]
    fn a_cell_with_nothing_finished_says_so() {
        let mut input = testdata::input();
        for run in input.runs.iter_mut().filter(|r| r.model == "beta") {
            run.record = None;
        }
        let views = testdata::views(&input);
        let t = Table::build(&input, &views);
        let r = find(&t, "beta", "random", "math500");
        assert_eq!(r.seeds(), "0/3");
        assert!(r.note().starts_with("nothing finished"), "{}", r.note());
        assert_eq!(t.cells(r)[4], "—");
    }

    #[test]
    fn markdown_and_csv_carry_every_row() {
        let t = table();
        let md = t.markdown();
        let (results, rest) = md.split_once("## By grader").unwrap();
        let (by_grader, probe) = rest.split_once("## Policy probe").unwrap();
        let rows = |part: &str| part.lines().filter(|l| l.starts_with("| ")).count();
        assert_eq!((rows(results), rows(by_grader)), (1 + 8, 1 + 8));
        // One probe row per model × reward.
        assert_eq!(rows(probe), 1 + 4);
        assert!(
            md.contains("| alpha | random | math500 (step 4) | 50.0 |"),
            "{md}"
        );
        assert!(md.contains("2/3"));
        let csv = t.csv();
        assert_eq!(csv.lines().count(), 1 + 8);
        let line = csv
            .lines()
            .find(|l| l.starts_with("alpha,random,,math500,"))
            .unwrap();
        assert!(line.contains(",2,3,1=0.580000;2=0.600000,"), "{line}");
        assert!(line.ends_with("\"partial; seed 3 unfinished, last eval at step 2\""));
    }

    #[test]
    fn the_grader_table_shows_each_graders_gain_and_the_disagreements() {
        let t = table();
        assert_eq!(t.graders, ["paper", "strict", "math_verify"]);
        let r = find(&t, "alpha", "ground_truth", "math500");
        let paper_mean = r.mean().unwrap();
        assert_eq!(r.by_grader[0].final_mean, Some(paper_mean));
        assert_eq!(r.by_grader[0].delta(), r.delta());
        // strict: one point above paper at both ends, so the same gain.
        assert!((r.by_grader[1].delta().unwrap() - r.delta().unwrap()).abs() < 1e-12);
        // math_verify: four points more at step 4.
        assert!((r.by_grader[2].delta().unwrap() - r.delta().unwrap() - 0.04).abs() < 1e-12);
        // Three seeds at step 4: 9 disagreements in 500 responses each.
        assert_eq!(r.disagreement, Some((27, 1500)));
        let cells = t.grader_cells(r);
        assert_eq!(cells[..3], ["alpha", "ground_truth", "math500"]);
        assert_eq!(cells.last().unwrap(), "27/1500");
        let md = t.markdown();
        assert!(md.contains("## By grader"), "{md}");
        assert!(
            md.contains("| model | reward | eval | paper: final (Δ) | strict: final (Δ) | math_verify: final (Δ) | disagree |"),
            "{md}"
        );
        let csv = t.csv();
        let header = csv.lines().next().unwrap();
        assert!(header.ends_with(
            "final_by_seed,baseline_paper,final_mean_paper,baseline_strict,final_mean_strict,\
             baseline_math_verify,final_mean_math_verify,disagree,responses,note"
        ));
        let line = csv
            .lines()
            .find(|l| l.starts_with("alpha,ground_truth,,math500,"))
            .unwrap();
        assert!(
            line.contains(",0.500000,") && line.contains(",27,1500,"),
            "{line}"
        );
    }

    #[test]
    fn records_without_grader_verdicts_leave_the_grader_table_out() {
        let mut input = testdata::input();
        for run in &mut input.runs {
            if let Some(file) = &mut run.record {
                for node in &mut file.record.nodes {
                    if let Some(m) = node.metrics.as_mut().and_then(|m| m.as_object_mut()) {
                        m.remove("graders");
                    }
                }
            }
        }
        let views = testdata::views(&input);
        let t = Table::build(&input, &views);
        assert!(t.graders.is_empty());
        assert!(!t.markdown().contains("By grader"));
        assert!(t
            .csv()
            .lines()
            .next()
            .unwrap()
            .ends_with("final_by_seed,note"));
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
