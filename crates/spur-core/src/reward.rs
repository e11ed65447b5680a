//! The reward grammar, in one place: the spec validates a reward's `kind`
//! with it, the planner asks it what a reward needs (labels, a command, one
//! example), the reward stage and spur-math evaluate what it parsed.
//!
//! ```text
//! kind   := term ("_AND_" term)*          the product of the terms' rewards
//! term   := "inverse_"* base suffix?      each inverse_ turns r into 1 − r
//! suffix := "_r1_style" | "_r1_only"      extract answers the R1 way
//! base   := ground_truth | majority_vote | incorrect | one_shot | format
//!         | random | random<γ> | python | no_repetition | command
//! ```
//!
//! The paper's code names some rewards differently; those names are read as
//! aliases (`math`, `box_only_format`, `contain_python_wo_backticks`). A
//! `command` reward is a user's program and stands alone.

use std::fmt;

/// What one term of a reward measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardBase {
    /// Correct against the problem's answer.
    GroundTruth,
    /// Correct against the majority vote of the model's own samples.
    MajorityVote,
    /// Correct against a wrong majority label, on the problems that have one.
    Incorrect,
    /// Correct against the answer of a single training example.
    OneShot,
    /// A non-empty `\boxed{}`.
    Format,
    /// Bernoulli(γ).
    Random,
    /// The response mentions python.
    Python,
    NoRepetition,
    /// A user's command scores the responses.
    Command,
}

impl RewardBase {
    /// The canonical names, for messages and suggestions.
    pub const NAMES: [&'static str; 9] = [
        "ground_truth",
        "majority_vote",
        "incorrect",
        "format",
        "random",
        "python",
        "no_repetition",
        "one_shot",
        "command",
    ];

    /// The base a name stands for, with the γ of a `random<γ>` name.
    fn parse(name: &str) -> Option<(RewardBase, Option<f64>)> {
        let base = match name {
            "ground_truth" | "math" => RewardBase::GroundTruth,
            "majority_vote" => RewardBase::MajorityVote,
            "incorrect" => RewardBase::Incorrect,
            "one_shot" => RewardBase::OneShot,
            "format" | "box_only_format" => RewardBase::Format,
            "random" => RewardBase::Random,
            "python" | "contain_python_wo_backticks" => RewardBase::Python,
            "no_repetition" => RewardBase::NoRepetition,
            "command" => RewardBase::Command,
            other => {
                let gamma: f64 = other.strip_prefix("random")?.parse().ok()?;
                return (0.0..=1.0)
                    .contains(&gamma)
                    .then_some((RewardBase::Random, Some(gamma)));
            }
        };
        Some((base, None))
    }

    /// Whether the term grades the response's answer against a label.
    pub fn grades_answers(self) -> bool {
        matches!(
            self,
            RewardBase::GroundTruth
                | RewardBase::MajorityVote
                | RewardBase::Incorrect
                | RewardBase::OneShot
        )
    }
}

/// One factor of a reward.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardTerm {
    pub base: RewardBase,
    /// An odd number of `inverse_` prefixes: the reward is 1 − r.
    pub inverted: bool,
    /// Answers are extracted the R1 way (`_r1_style`, `_r1_only`).
    pub r1_style: bool,
    /// γ written in the name (`random0.3`); otherwise the reward's `gamma`.
    pub gamma: Option<f64>,
}

/// A parsed reward kind: the product of its terms.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardExpr {
    pub terms: Vec<RewardTerm>,
}

/// Why a reward kind does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewardKindError {
    /// `part` (a term of the kind) names no reward.
    Unknown { part: String },
    /// `command` combined with another term or inverted: a command scores alone.
    CommandNotAlone,
}

impl fmt::Display for RewardKindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewardKindError::Unknown { part } => write!(f, "unknown reward kind `{part}`"),
            RewardKindError::CommandNotAlone => f.write_str(
                "a `command` reward stands alone: it cannot be inverted or combined with _AND_ \
                 (score the combination in the command itself)",
            ),
        }
    }
}

impl std::error::Error for RewardKindError {}

impl RewardExpr {
    pub fn parse(kind: &str) -> Result<RewardExpr, RewardKindError> {
        let terms = kind
            .split("_AND_")
            .map(|part| {
                let unknown = || RewardKindError::Unknown {
                    part: part.to_string(),
                };
                let mut name = part;
                let mut inverted = false;
                while let Some(rest) = name.strip_prefix("inverse_") {
                    name = rest;
                    inverted = !inverted;
                }
                let (name, r1_style) = match name
                    .strip_suffix("_r1_style")
                    .or_else(|| name.strip_suffix("_r1_only"))
                {
                    Some(n) => (n, true),
                    None => (name, false),
                };
                let (base, gamma) = RewardBase::parse(name).ok_or_else(unknown)?;
                Ok(RewardTerm {
                    base,
                    inverted,
                    r1_style,
                    gamma,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let command = terms.iter().any(|t| t.base == RewardBase::Command);
        if command && (terms.len() > 1 || terms[0].inverted || terms[0].r1_style) {
            return Err(RewardKindError::CommandNotAlone);
        }
        Ok(RewardExpr { terms })
    }

    /// Whether any term is `base`.
    pub fn uses(&self, base: RewardBase) -> bool {
        self.terms.iter().any(|t| t.base == base)
    }

    /// Whether a term needs `gamma` from the reward's definition.
    pub fn needs_gamma(&self) -> bool {
        self.terms
            .iter()
            .any(|t| t.base == RewardBase::Random && t.gamma.is_none())
    }

    /// Whether it grades against majority-vote labels (which a `label` node makes).
    pub fn needs_labels(&self) -> bool {
        self.uses(RewardBase::MajorityVote) || self.uses(RewardBase::Incorrect)
    }

    /// A user's command, which the reward stage runs instead of evaluating terms.
    pub fn is_command(&self) -> bool {
        self.uses(RewardBase::Command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(base: RewardBase) -> RewardTerm {
        RewardTerm {
            base,
            inverted: false,
            r1_style: false,
            gamma: None,
        }
    }

    #[test]
    fn compounds_inverses_suffixes_and_aliases() {
        let e = RewardExpr::parse("format_AND_inverse_python").unwrap();
        let inverse_python = RewardTerm {
            inverted: true,
            ..term(RewardBase::Python)
        };
        assert_eq!(e.terms, [term(RewardBase::Format), inverse_python]);
        // Two inverses cancel.
        let e = RewardExpr::parse("inverse_inverse_format").unwrap();
        assert_eq!(e.terms, [term(RewardBase::Format)]);
        let e = RewardExpr::parse("math_r1_style_AND_random0.3").unwrap();
        let r1 = RewardTerm {
            r1_style: true,
            ..term(RewardBase::GroundTruth)
        };
        let random = RewardTerm {
            gamma: Some(0.3),
            ..term(RewardBase::Random)
        };
        assert_eq!(e.terms, [r1, random]);
        assert!(!e.needs_gamma());
        assert!(RewardExpr::parse("random").unwrap().needs_gamma());
        for name in RewardBase::NAMES {
            assert!(RewardExpr::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn what_a_reward_needs() {
        let e = RewardExpr::parse("incorrect_AND_format").unwrap();
        assert!(e.needs_labels() && !e.is_command() && e.uses(RewardBase::Format));
        assert!(RewardExpr::parse("majority_vote").unwrap().needs_labels());
        assert!(!RewardExpr::parse("ground_truth").unwrap().needs_labels());
        assert!(RewardExpr::parse("command").unwrap().is_command());
    }

    #[test]
    fn unknown_parts_and_a_command_that_is_not_alone_are_refused() {
        let unknown = |part: &str| RewardKindError::Unknown { part: part.into() };
        assert_eq!(
            RewardExpr::parse("format_AND_pyhton"),
            Err(unknown("pyhton"))
        );
        assert_eq!(RewardExpr::parse("random1.5"), Err(unknown("random1.5")));
        assert_eq!(RewardExpr::parse(""), Err(unknown("")));
        for kind in ["format_AND_command", "inverse_command", "command_r1_style"] {
            assert_eq!(
                RewardExpr::parse(kind),
                Err(RewardKindError::CommandNotAlone),
                "{kind}"
            );
        }
    }
}
