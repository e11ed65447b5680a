//! How often graders disagree: per-grader accuracy, each pair's one-sided
//! counts, and where the verdicts differ. `spur grade --compare` prints it
//! for a JSONL file; the eval stage records it for every evaluation, so a
//! reported gain can be checked against the grader that produced it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::Group;
use crate::Grader;

/// How many disagreeing line numbers a comparison keeps.
pub const DISAGREE_LINES_KEPT: usize = 20;

/// Verdicts of several graders on the same responses, summed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraderComparison {
    /// Responses compared.
    pub n: usize,
    /// Each grader's correct count and accuracy, by name.
    pub by_grader: BTreeMap<String, Group>,
    /// Every pair, in the order the graders were given.
    pub pairs: Vec<PairCounts>,
    /// Responses on which not all graders agree.
    pub disagree: usize,
    /// The first [`DISAGREE_LINES_KEPT`] of those, as 1-based line numbers.
    pub disagree_lines: Vec<usize>,
    /// The graders in the order [`GraderComparison::add`] takes their verdicts.
    #[serde(skip)]
    graders: Vec<Grader>,
}

/// One pair of graders: responses only `a` calls correct, only `b` does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairCounts {
    pub a: String,
    pub b: String,
    pub a_only: usize,
    pub b_only: usize,
}

impl GraderComparison {
    pub fn new(graders: &[Grader]) -> GraderComparison {
        let mut pairs = Vec::new();
        for (i, a) in graders.iter().enumerate() {
            for b in &graders[i + 1..] {
                pairs.push(PairCounts {
                    a: a.name().into(),
                    b: b.name().into(),
                    a_only: 0,
                    b_only: 0,
                });
            }
        }
        GraderComparison {
            graders: graders.to_vec(),
            by_grader: graders
                .iter()
                .map(|g| (g.name().to_string(), Group::default()))
                .collect(),
            pairs,
            ..GraderComparison::default()
        }
    }

    /// Adds one response: `verdicts[i]` is the verdict of the `i`-th grader
    /// given to [`GraderComparison::new`]; `line` is where it was read.
    pub fn add(&mut self, line: usize, verdicts: &[bool]) {
        debug_assert_eq!(self.graders.len(), verdicts.len());
        self.n += 1;
        for (g, &v) in self.graders.iter().zip(verdicts) {
            if let Some(group) = self.by_grader.get_mut(g.name()) {
                group.add(v);
            }
        }
        let mut pair = self.pairs.iter_mut();
        for (i, &a) in verdicts.iter().enumerate() {
            for &b in &verdicts[i + 1..] {
                if let Some(p) = pair.next() {
                    p.a_only += usize::from(a && !b);
                    p.b_only += usize::from(b && !a);
                }
            }
        }
        if verdicts.iter().any(|&v| v != verdicts[0]) {
            self.disagree += 1;
            if self.disagree_lines.len() < DISAGREE_LINES_KEPT {
                self.disagree_lines.push(line);
            }
        }
    }

    /// The accuracy under `grader`, if it was compared.
    pub fn accuracy(&self, grader: Grader) -> Option<f64> {
        self.by_grader.get(grader.name()).map(|g| g.accuracy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_pair_one_sided() {
        let graders = [Grader::Paper, Grader::Strict, Grader::MathVerify];
        let mut c = GraderComparison::new(&graders);
        c.add(1, &[true, true, true]);
        c.add(2, &[false, true, true]);
        c.add(3, &[false, false, true]);
        c.add(4, &[false, false, false]);
        assert_eq!(c.n, 4);
        assert_eq!(c.by_grader["paper"].correct, 1);
        assert_eq!(c.by_grader["math_verify"].accuracy, 0.75);
        let pair = |a: &str, b: &str| {
            let p = c.pairs.iter().find(|p| p.a == a && p.b == b).unwrap();
            (p.a_only, p.b_only)
        };
        assert_eq!(pair("paper", "strict"), (0, 1));
        assert_eq!(pair("paper", "math_verify"), (0, 2));
        assert_eq!(pair("strict", "math_verify"), (0, 1));
        assert_eq!(c.disagree, 2);
        assert_eq!(c.disagree_lines, vec![2, 3]);
        assert_eq!(c.accuracy(Grader::Strict), Some(0.5));
    }

    #[test]
    fn keeps_only_the_first_disagreeing_lines() {
        let graders = [Grader::Paper, Grader::Strict];
        let mut c = GraderComparison::new(&graders);
        for line in 1..=100 {
            c.add(line, &[line % 2 == 0, false]);
        }
        assert_eq!(c.disagree, 50);
        assert_eq!(c.disagree_lines.len(), DISAGREE_LINES_KEPT);
        assert_eq!(c.disagree_lines[..3], [2, 4, 6]);
    }
}
