//! The policy-probe table: per model × reward (× other axes), the probe's
//! metrics of the base model and after the last update, over seeds, beside
//! how much of the updates' gradient the clip removed on each side.

use crate::runs::{ProbePoint, RunView};
use crate::table::{csv_field, groups, Group};
use crate::ReportInput;

pub const PROBE_CAPTION: &str = "The policy probe (fixed prompts, the base model's greedy \
responses to them, the same sampling seeds in every run). Each cell: the base model (step 0) → \
mean ± sample standard deviation (n − 1) over the seeds at the final step. Entropy in nats per \
token over the policy's own samples; mode log-prob: mean log-prob per token of the base \
model's greedy responses; opening: samples that begin with the greedy response's first \
tokens, in %; length in tokens. Clip high / low: share of update tokens whose gradient the \
upper / lower clip removed, in %, averaged over each seed's updates, then mean ± std over \
seeds.";

/// One row: a group of seeds with probe data.
#[derive(Clone, Debug)]
pub struct ProbeRow {
    pub group: Group,
    pub final_step: u64,
    pub baseline: Option<ProbePoint>,
    /// (seed label, probe at the final step), for the seeds that reached it.
    pub finals: Vec<(String, ProbePoint)>,
    /// Per seed: the mean clip fractions (high, low) over its updates.
    pub clip: Vec<(String, f64, f64)>,
}

/// (mean, sample std) of `values`; the std needs two values.
pub fn mean_std(values: &[f64]) -> Option<(f64, Option<f64>)> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = (n > 1)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    Some((mean, std))
}

/// Rows for the groups whose runs recorded a probe after some update.
pub fn rows(input: &ReportInput, views: &[RunView]) -> Vec<ProbeRow> {
    groups(input)
        .into_iter()
        .filter_map(|g| {
            let probed = |i: usize| views[i].updates.iter().filter(|u| u.probe.is_some());
            let final_step = g
                .runs
                .iter()
                .flat_map(|&i| probed(i))
                .map(|u| u.step)
                .max()?;
            let finals = g
                .runs
                .iter()
                .filter_map(|&i| {
                    let u = probed(i).find(|u| u.step == final_step)?;
                    Some((input.runs[i].seed.clone(), u.probe.clone()?))
                })
                .collect();
            let baseline = g.runs.iter().find_map(|&i| views[i].probe_baseline.clone());
            let clip = g
                .runs
                .iter()
                .filter_map(|&i| {
                    let u = &views[i].updates;
                    let n = u.len() as f64;
                    (!u.is_empty()).then(|| {
                        (
                            input.runs[i].seed.clone(),
                            u.iter().map(|u| u.clip_fraction_high).sum::<f64>() / n,
                            u.iter().map(|u| u.clip_fraction_low).sum::<f64>() / n,
                        )
                    })
                })
                .collect();
            Some(ProbeRow {
                group: g,
                final_step,
                baseline,
                finals,
                clip,
            })
        })
        .collect()
}

/// The probe metrics a row shows: (column, value, scale for display, decimals).
const COLUMNS: [(&str, fn(&ProbePoint) -> f64, f64, usize); 4] = [
    ("entropy", |p| p.entropy, 1.0, 3),
    ("mode log-prob", |p| p.greedy_logprob, 1.0, 3),
    ("opening (%)", |p| p.opening_repeat, 100.0, 1),
    ("length", |p| p.response_length, 1.0, 1),
];

fn spread(values: &[f64], scale: f64, decimals: usize) -> String {
    match mean_std(values) {
        Some((m, Some(s))) => format!("{:.*} ± {:.*}", decimals, m * scale, decimals, s * scale),
        Some((m, None)) => format!("{:.*}", decimals, m * scale),
        None => "—".into(),
    }
}

pub fn header(has_variants: bool) -> Vec<String> {
    let mut h = vec!["model".to_string(), "reward".into()];
    if has_variants {
        h.push("variant".into());
    }
    h.push("step".into());
    h.extend(COLUMNS.iter().map(|c| c.0.to_string()));
    h.extend([
        "clip high (%)".into(),
        "clip low (%)".into(),
        "seeds".into(),
    ]);
    h
}

pub fn cells(r: &ProbeRow, has_variants: bool) -> Vec<String> {
    let mut c = vec![r.group.model.clone(), r.group.reward.clone()];
    if has_variants {
        c.push(r.group.variant.clone());
    }
    c.push(r.final_step.to_string());
    for (_, value, scale, decimals) in COLUMNS {
        let finals: Vec<f64> = r.finals.iter().map(|(_, p)| value(p)).collect();
        let base = r.baseline.as_ref().map_or("—".to_string(), |b| {
            format!("{:.*}", decimals, value(b) * scale)
        });
        c.push(format!("{base} → {}", spread(&finals, scale, decimals)));
    }
    let high: Vec<f64> = r.clip.iter().map(|c| c.1).collect();
    let low: Vec<f64> = r.clip.iter().map(|c| c.2).collect();
    c.push(spread(&high, 100.0, 2));
    c.push(spread(&low, 100.0, 2));
    c.push(format!("{}/{}", r.finals.len(), r.group.runs.len()));
    c
}

/// Machine-readable, one line per seed and metric: the probe's final values (fractions as
/// fractions) beside the base model's, and the seed's mean clip fractions.
pub fn csv(rows: &[ProbeRow]) -> String {
    let metrics: [(&str, fn(&ProbePoint) -> f64); 5] = [
        ("entropy", |p| p.entropy),
        ("greedy_logprob", |p| p.greedy_logprob),
        ("opening_repeat", |p| p.opening_repeat),
        ("greedy_repeat", |p| p.greedy_repeat),
        ("response_length", |p| p.response_length),
    ];
    let mut out = String::from("model,reward,variant,step,seed,metric,baseline,final\n");
    for r in rows {
        let mut line = |seed: &str, metric: &str, base: String, value: f64| {
            let fields = [
                csv_field(&r.group.model),
                csv_field(&r.group.reward),
                csv_field(&r.group.variant),
                r.final_step.to_string(),
                csv_field(seed),
                metric.to_string(),
                base,
                format!("{value:.6}"),
            ];
            out.push_str(&fields.join(","));
            out.push('\n');
        };
        for (seed, p) in &r.finals {
            for (name, value) in metrics {
                let base = r
                    .baseline
                    .as_ref()
                    .map_or(String::new(), |b| format!("{:.6}", value(b)));
                line(seed, name, base, value(p));
            }
        }
        for (seed, high, low) in &r.clip {
            line(seed, "clip_fraction_high_mean", String::new(), *high);
            line(seed, "clip_fraction_low_mean", String::new(), *low);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    #[test]
    fn a_row_goes_from_the_base_model_to_the_seeds_at_the_last_probed_step() {
        let input = testdata::input();
        let views = testdata::views(&input);
        let rows = rows(&input, &views);
        let row = rows
            .iter()
            .find(|r| r.group.model == "alpha" && r.group.reward == "random")
            .unwrap();
        assert_eq!(row.final_step, testdata::STEPS);
        // Seed 3 stopped after step 2: the final values are seeds 1 and 2's.
        let seeds: Vec<&str> = row.finals.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(seeds, ["1", "2"]);
        let cells = cells(row, false);
        assert_eq!(cells[0..3], ["alpha", "random", "4"]);
        // Entropy 2 − 0.1·seed·step: 2.0 at step 0; 1.6 and 1.2 at step 4.
        assert_eq!(cells[3], "2.000 → 1.400 ± 0.283");
        // Clip high 0.002·seed at every update, every seed that updated counts.
        assert_eq!(cells[7], "0.40 ± 0.20");
        assert_eq!(cells[9], "2/3");
        assert_eq!(header(false).len(), cells.len());
    }

    #[test]
    fn the_csv_has_a_line_per_seed_and_metric() {
        let input = testdata::input();
        let views = testdata::views(&input);
        let csv = csv(&rows(&input, &views));
        let line = "alpha,random,,4,2,entropy,2.000000,1.200000";
        assert!(csv.lines().any(|l| l == line), "{csv}");
        assert!(csv
            .lines()
            .any(|l| l == "alpha,random,,4,3,clip_fraction_high_mean,,0.006000"));
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[1.0]), Some((1.0, None)));
    }
}
