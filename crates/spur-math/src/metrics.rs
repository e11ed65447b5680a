//! Eval metrics as in the paper's Table 1: accuracy overall, by subject and
//! level, share of parsable answers, "code reasoning" frequency and accuracy
//! with/without code; avg@k and pass@k for multi-sample evals.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One graded response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Problem identity (e.g. the MATH-500 `unique_id`); samples of one problem share it.
    pub problem: String,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
    pub response: String,
    pub extracted: String,
    pub correct: bool,
}

impl EvalRecord {
    /// The paper's "code reasoning": the response mentions "python".
    pub fn has_code(&self) -> bool {
        self.response.to_lowercase().contains("python")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Group {
    pub(crate) fn add(&mut self, correct: bool) {
        self.n += 1;
        self.correct += usize::from(correct);
        self.accuracy = self.correct as f64 / self.n as f64;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub overall: Group,
    pub by_subject: BTreeMap<String, Group>,
    pub by_level: BTreeMap<String, Group>,
    /// Share of responses with a non-empty extracted answer.
    pub parsable: f64,
    /// Share of responses that contain "python".
    pub code_frequency: f64,
    pub with_code: Group,
    pub without_code: Group,
}

/// Per-response metrics over all records (every sample counts once).
pub fn eval_metrics(records: &[EvalRecord]) -> EvalMetrics {
    let mut m = EvalMetrics::default();
    let mut parsable = 0usize;
    for r in records {
        m.overall.add(r.correct);
        if let Some(s) = &r.subject {
            m.by_subject.entry(s.clone()).or_default().add(r.correct);
        }
        if let Some(l) = &r.level {
            m.by_level.entry(l.clone()).or_default().add(r.correct);
        }
        parsable += usize::from(!r.extracted.is_empty());
        if r.has_code() {
            m.with_code.add(r.correct);
        } else {
            m.without_code.add(r.correct);
        }
    }
    if !records.is_empty() {
        m.parsable = parsable as f64 / records.len() as f64;
        m.code_frequency = m.with_code.n as f64 / records.len() as f64;
    }
    m
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MultiSampleMetrics {
    pub problems: usize,
    /// Samples per problem (the smallest count, if they differ).
    pub k: usize,
    /// Mean over problems of the share of correct samples.
    pub avg_at_k: f64,
    /// Share of problems with at least one correct sample among its first k.
    pub pass_at_k: f64,
}

/// avg@k and pass@k over records grouped by `problem` (in first-seen order).
pub fn multi_sample_metrics(records: &[EvalRecord]) -> MultiSampleMetrics {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
    for r in records {
        let g = groups.entry(&r.problem).or_default();
        if g.is_empty() {
            order.push(&r.problem);
        }
        g.push(r.correct);
    }
    if order.is_empty() {
        return MultiSampleMetrics::default();
    }
    let k = groups.values().map(Vec::len).min().unwrap_or(0);
    let mut avg = 0.0;
    let mut pass = 0.0;
    for p in &order {
        let g = &groups[p];
        avg += g.iter().filter(|c| **c).count() as f64 / g.len() as f64;
        pass += f64::from(u8::from(g[..k].iter().any(|c| *c)));
    }
    let n = order.len() as f64;
    MultiSampleMetrics {
        problems: order.len(),
        k,
        avg_at_k: avg / n,
        pass_at_k: pass / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(problem: &str, subject: &str, response: &str, correct: bool) -> EvalRecord {
        EvalRecord {
            problem: problem.into(),
            subject: Some(subject.into()),
            level: Some("1".into()),
            response: response.into(),
            extracted: if response.is_empty() {
                String::new()
            } else {
                "x".into()
            },
            correct,
        }
    }

    #[test]
    fn table_one_metrics() {
        let rs = vec![
            rec("a", "Algebra", "```python\n```", true),
            rec("b", "Algebra", "plain", false),
            rec("c", "Geometry", "", false),
            rec("d", "Geometry", "Python", true),
        ];
        let m = eval_metrics(&rs);
        assert_eq!(m.overall.correct, 2);
        assert_eq!(m.by_subject["Algebra"].accuracy, 0.5);
        assert_eq!(m.parsable, 0.75);
        assert_eq!(m.code_frequency, 0.5);
        assert_eq!(m.with_code.accuracy, 1.0);
        assert_eq!(m.without_code.accuracy, 0.0);
    }

    #[test]
    fn avg_and_pass() {
        let rs = vec![
            rec("a", "s", "r", true),
            rec("a", "s", "r", false),
            rec("b", "s", "r", false),
            rec("b", "s", "r", false),
        ];
        let m = multi_sample_metrics(&rs);
        assert_eq!((m.problems, m.k), (2, 2));
        assert_eq!(m.avg_at_k, 0.25);
        assert_eq!(m.pass_at_k, 0.5);
    }
}
