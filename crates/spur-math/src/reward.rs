//! The paper's rewards as pure functions of (response, label, seed).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use spur_core::{RewardBase, RewardExpr};

use crate::{last_box, Error, ExtractStyle, Grader};

/// One reward, possibly compound.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reward {
    /// 1 if the extracted answer is equivalent to the label (`ground_truth`,
    /// `majority_vote` and `incorrect` differ only in where the label comes from).
    Correct { grader: Grader, style: ExtractStyle },
    /// 1 if the response has a non-empty `\boxed{…}` (no fallback extraction).
    Format,
    /// 1 with probability `gamma`, drawn from the seed alone.
    Random { gamma: f64 },
    /// 1 if the lowercased response contains "python".
    Python,
    /// 0 if some substring of 10–256 characters repeats ≥ 10 times in a row.
    NoRepetition,
    /// `inverse_X` = 1 − X.
    Inverse(Box<Reward>),
    /// `A_AND_B` = 1 iff both are 1 (the product).
    And(Box<Reward>, Box<Reward>),
}

/// A reward as named in an experiment file, e.g. `format_AND_inverse_python`,
/// `random` (with `gamma`), `random0.5`, `ground_truth_r1_style`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardSpec {
    pub name: String,
    pub reward: Reward,
}

/// The settings a reward reads besides its name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardOptions {
    /// Probability of reward 1 for `random` (a `random<γ>` name carries its own).
    pub gamma: Option<f64>,
    /// The grader of answer-checking rewards.
    pub grader: Grader,
    /// Answer extraction; unset, each term's own (`_r1_style` terms extract the R1 way).
    pub style: Option<ExtractStyle>,
}

impl RewardSpec {
    /// Parses a reward name. `params` may hold `gamma` (number, for `random`),
    /// `grader` ("paper" | "strict" | "math_verify") and `style` ("default" | "r1" | "box_only").
    pub fn parse(
        name: &str,
        params: &serde_json::Map<String, serde_json::Value>,
    ) -> crate::Result<RewardSpec> {
        let bad = |message: String| Error::BadReward {
            name: name.to_string(),
            message,
        };
        let grader = match params.get("grader") {
            None => Grader::Paper,
            Some(serde_json::Value::String(s)) => s.parse()?,
            Some(other) => return Err(bad(format!("'grader' must be a string, got {other}"))),
        };
        let style = match params.get("style") {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s.parse::<ExtractStyle>()?),
            Some(other) => return Err(bad(format!("'style' must be a string, got {other}"))),
        };
        let gamma = match params.get("gamma") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(g) => Some(g),
                None => return Err(bad(format!("'gamma' must be a number in [0, 1], got {v}"))),
            },
        };
        for key in params.keys() {
            if !matches!(key.as_str(), "grader" | "style" | "gamma") {
                return Err(bad(format!(
                    "unknown parameter '{key}' (known: gamma, grader, style)"
                )));
            }
        }
        Self::new(
            name,
            &RewardOptions {
                gamma,
                grader,
                style,
            },
        )
    }

    /// The reward `name` (in [`RewardExpr`]'s grammar) with its settings.
    pub fn new(name: &str, options: &RewardOptions) -> crate::Result<RewardSpec> {
        let bad = |message: String| Error::BadReward {
            name: name.to_string(),
            message,
        };
        let RewardOptions {
            gamma,
            grader,
            style,
        } = options.clone();
        if let Some(g) = gamma.filter(|g| !(0.0..=1.0).contains(g)) {
            return Err(bad(format!("'gamma' must be a number in [0, 1], got {g}")));
        }
        let expr = RewardExpr::parse(name).map_err(|e| bad(e.to_string()))?;
        let mut terms = expr.terms.iter().map(|t| {
            let style = if t.r1_style {
                ExtractStyle::R1
            } else {
                style.unwrap_or_default()
            };
            let reward = match t.base {
                // The label says what is right: the problem's answer, the majority vote, the
                // wrong label or the one example's answer.
                RewardBase::GroundTruth
                | RewardBase::MajorityVote
                | RewardBase::Incorrect
                | RewardBase::OneShot => Reward::Correct { grader, style },
                RewardBase::Format => Reward::Format,
                RewardBase::Python => Reward::Python,
                RewardBase::NoRepetition => Reward::NoRepetition,
                RewardBase::Random => match t.gamma.or(gamma) {
                    Some(gamma) => Reward::Random { gamma },
                    None => {
                        return Err(bad(
                            "'random' needs a 'gamma' parameter (probability of reward 1)".into(),
                        ))
                    }
                },
                RewardBase::Command => {
                    return Err(bad(
                        "a `command` reward is scored by its command, not by spur-math".into(),
                    ))
                }
            };
            Ok(if t.inverted {
                Reward::Inverse(Box::new(reward))
            } else {
                reward
            })
        });
        let first = terms
            .next()
            .unwrap_or_else(|| Err(bad("the reward has no term".into())))?;
        let reward =
            terms.try_fold(first, |acc, t| Ok(Reward::And(Box::new(acc), Box::new(t?))))?;
        Ok(RewardSpec {
            name: name.to_string(),
            reward,
        })
    }

    /// The reward of one response. `label` is the reference answer (gold or
    /// majority label); `seed` must identify the sample (see [`sample_seed`]).
    pub fn evaluate(&self, response: &str, label: &str, seed: u64) -> f32 {
        self.reward.evaluate(response, label, seed)
    }
}

impl Reward {
    pub fn evaluate(&self, response: &str, label: &str, seed: u64) -> f32 {
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        match self {
            Reward::Correct { grader, style } => b(grader.grade(response, label, *style).correct),
            Reward::Format => b(last_box(response).is_some_and(|c| !c.trim().is_empty())),
            Reward::Random { gamma } => b(unit_interval(seed) < *gamma),
            Reward::Python => b(response.to_lowercase().contains("python")),
            Reward::NoRepetition => b(no_repetition(response)),
            Reward::Inverse(x) => 1.0 - x.evaluate(response, label, seed),
            Reward::And(x, y) => {
                x.evaluate(response, label, seed) * y.evaluate(response, label, seed)
            }
        }
    }
}

/// A seed for one sample, from the node's seed and the sample's coordinates
/// (e.g. step, prompt index, sample index), by chained splitmix64.
pub fn sample_seed(base: u64, parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(splitmix64(base), |acc, p| splitmix64(acc ^ splitmix64(*p)))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) from a seed.
fn unit_interval(seed: u64) -> f64 {
    (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// True unless some substring of 10–256 characters occurs at least 10 times
/// in a row (the paper's `no_repetition`).
pub fn no_repetition(text: &str) -> bool {
    let c: Vec<char> = text.chars().collect();
    for period in 10..=256usize {
        let need = 9 * period;
        if c.len() < 10 * period {
            break;
        }
        // Positions j with c[j] == c[j + period]; ten copies in a row need
        // 9 * period consecutive such positions.
        let mut run = 0;
        for j in 0..c.len() - period {
            if c[j] == c[j + period] {
                run += 1;
                if run >= need {
                    return false;
                }
            } else {
                run = 0;
            }
        }
    }
    true
}

/// The majority-vote label: the most common non-empty extracted answer.
/// Ties go to the answer seen first, as Python's `Counter.most_common` does.
/// `None` when no sample has an answer.
pub fn majority_label<S: AsRef<str>>(extracted: &[S]) -> Option<String> {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, a) in extracted.iter().enumerate() {
        let a = a.as_ref();
        if a.is_empty() {
            continue;
        }
        counts.entry(a).or_insert((0, i)).0 += 1;
    }
    counts
        .into_iter()
        .max_by(|(_, (n1, i1)), (_, (n2, i2))| n1.cmp(n2).then(i2.cmp(i1)))
        .map(|(a, _)| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> RewardSpec {
        RewardSpec::parse(name, &serde_json::Map::new()).expect("parses")
    }

    #[test]
    fn compounds() {
        let r = spec("format_AND_inverse_python");
        assert_eq!(r.evaluate(r"\boxed{3}", "3", 0), 1.0);
        assert_eq!(r.evaluate(r"python: \boxed{3}", "3", 0), 0.0);
        assert_eq!(r.evaluate("3", "3", 0), 0.0);
        assert_eq!(
            spec("ground_truth").evaluate(r"\boxed{0.5}", r"\frac12", 0),
            1.0
        );
        assert_eq!(spec("math_r1_style").evaluate(r"\boxed{4}", "4", 0), 0.0);
        assert_eq!(
            spec("math_r1_style").evaluate("<answer>4</answer>", "4", 0),
            1.0
        );
        assert!(RewardSpec::parse("random", &serde_json::Map::new()).is_err());
        assert!(RewardSpec::parse("nonsense", &serde_json::Map::new()).is_err());
    }

    #[test]
    fn random_is_deterministic_and_calibrated() {
        let r = spec("random0.3");
        let ones: f32 = (0..10_000u64)
            .map(|i| r.evaluate("x", "y", sample_seed(42, &[i])))
            .sum();
        assert!((2800.0..3200.0).contains(&ones), "{ones}");
        assert_eq!(r.evaluate("a", "b", 7), r.evaluate("c", "d", 7));
        assert_eq!(spec("random0").evaluate("a", "b", 1), 0.0);
    }

    #[test]
    fn repetition() {
        assert!(no_repetition("The answer is 4."));
        assert!(!no_repetition(&"I think so. ".repeat(10)));
        assert!(no_repetition(&"I think so. ".repeat(9)));
        assert!(!no_repetition(&"ab".repeat(50)));
        assert!(no_repetition(&"ab".repeat(49)));
    }

    #[test]
    fn majority() {
        assert_eq!(
            majority_label(&["1", "", "2", "2", "1"]).as_deref(),
            Some("1")
        );
        assert_eq!(majority_label(&["", "3", "2", "2"]).as_deref(), Some("2"));
        assert_eq!(majority_label::<&str>(&["", ""]), None);
    }
}
