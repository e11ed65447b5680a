//! The graders: `Paper` reproduces the paper's verdicts exactly, failures
//! included; `Strict` fixes the failures that are plainly wrong (see
//! docs/grading.md for the list).

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::extract::{self, ExtractStyle};
use crate::math_verify;
use crate::prm;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grader {
    /// Qwen2.5-Math extraction + PRM800K `grade_answer`, as the paper ran them.
    #[default]
    Paper,
    /// The paper's grader with its obvious failures fixed.
    Strict,
    /// HuggingFace Math-Verify 0.9 (`verify(parse("$"+gold+"$"), parse(response))`),
    /// ported to Rust (see docs/grading.md).
    MathVerify,
}

impl From<spur_core::params::GraderName> for Grader {
    fn from(name: spur_core::params::GraderName) -> Self {
        use spur_core::params::GraderName;
        match name {
            GraderName::Paper => Grader::Paper,
            GraderName::Strict => Grader::Strict,
            GraderName::MathVerify => Grader::MathVerify,
        }
    }
}

impl Grader {
    /// Every grader, in the order tables show them.
    pub const ALL: [Grader; 3] = [Grader::Paper, Grader::Strict, Grader::MathVerify];

    pub fn name(self) -> &'static str {
        match self {
            Grader::Paper => "paper",
            Grader::Strict => "strict",
            Grader::MathVerify => "math_verify",
        }
    }

    /// The answer this grader reads from `response`.
    pub fn extract(self, response: &str, style: ExtractStyle) -> String {
        match self {
            Grader::Paper => extract::extract_answer(response, style),
            Grader::Strict => extract::extract_answer_strict(response, style),
            Grader::MathVerify => math_verify::extracted_text(&math_verify::parse(response)),
        }
    }

    /// Whether an extracted answer is equivalent to the gold answer.
    pub fn is_equivalent(self, extracted: &str, gold: &str) -> bool {
        match self {
            Grader::Paper => prm::grade_answer(extracted, gold),
            Grader::Strict => strict_equivalent(extracted, gold),
            // The extracted text is read again as a response would be.
            Grader::MathVerify => math_verify::verify(
                &math_verify::parse_gold(gold),
                &math_verify::parse(&format!("${extracted}$")),
            ),
        }
    }

    /// Extracts and grades in one go.
    pub fn grade(self, response: &str, gold: &str, style: ExtractStyle) -> Verdict {
        if self == Grader::MathVerify {
            let (extracted, correct) = math_verify::grade(response, gold);
            return Verdict { extracted, correct };
        }
        let extracted = self.extract(response, style);
        let correct = self.is_equivalent(&extracted, gold);
        Verdict { extracted, correct }
    }
}

impl std::str::FromStr for Grader {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "paper" => Ok(Grader::Paper),
            "strict" => Ok(Grader::Strict),
            "math_verify" => Ok(Grader::MathVerify),
            other => Err(crate::Error::UnknownName {
                what: "grader",
                name: other.to_string(),
                expected: "paper, strict, math_verify",
            }),
        }
    }
}

/// An extracted answer and its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub extracted: String,
    pub correct: bool,
}

fn strict_equivalent(extracted: &str, gold: &str) -> bool {
    let given = strict_clean(extracted);
    let golds = gold_variants(gold);
    golds.iter().any(|g| {
        prm::grade_answer(&given, g)
            || prm::grade_answer(&group_fracs(&given), &group_fracs(g))
            || unordered_equal(&given, g)
    })
}

/// The gold as written, plus the gold with its units, variable prefix and
/// number-base subscript removed, and a `\pm` expanded into both values.
fn gold_variants(gold: &str) -> Vec<String> {
    let mut out = vec![gold.to_string()];
    let clean = strict_clean(gold);
    if clean != gold {
        out.push(clean.clone());
    }
    if let Some((a, b)) = clean.split_once("\\pm") {
        let a = a.trim();
        let b = b.trim();
        if !a.is_empty() && !b.is_empty() && !b.contains("\\pm") {
            out.push(format!("{a}+{b},{a}-{b}"));
        }
    }
    out
}

struct Patterns {
    unit: Regex,
    prefix: Regex,
    base: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| Patterns {
        unit: Regex::new(r"\s*\\(?:mbox|text)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?\s*$")
            .expect("valid regex"),
        prefix: Regex::new(r"^\s*[a-zA-Z]\s*(?:=|\\in)\s*").expect("valid regex"),
        base: Regex::new(r"^(\d+)_\{?\d+\}?$").expect("valid regex"),
    })
}

/// Removes a trailing unit (`15\mbox{ cm}^2`), a leading `x =` / `x \in`, and
/// a base subscript (`2516_8`).
fn strict_clean(s: &str) -> String {
    let p = patterns();
    let mut s = s.trim().to_string();
    let cut = p.unit.replace(&s, "").into_owned();
    if !cut.trim().is_empty() {
        s = cut;
    }
    s = p.prefix.replace(&s, "").into_owned();
    if let Some(c) = p.base.captures(&s) {
        s = c[1].to_string();
    }
    s
}

/// `\frac{A}{B}` → `\frac{(A)}{(B)}` where A or B is more than a number or
/// letter, so that pylatexenc's `A/B` keeps the grouping (the paper's grader
/// reads `\frac{9a+11}{20}` as `9a+11/20`).
fn group_fracs(s: &str) -> String {
    if !s.contains("\\frac") {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    let frac: Vec<char> = "\\frac".chars().collect();
    while i < chars.len() {
        if chars[i..].starts_with(&frac) {
            out.push_str("\\frac");
            i += frac.len();
            for _ in 0..2 {
                if chars.get(i) != Some(&'{') {
                    break;
                }
                let mut depth = 0;
                let start = i;
                while i < chars.len() {
                    match chars[i] {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                let inner: String = chars[start + 1..i.min(chars.len())].iter().collect();
                // Plain numbers stay as they are: mixed numbers (`2\frac{2}{5}`)
                // and the unreduced-fraction rule depend on it.
                if inner.chars().all(char::is_alphanumeric) {
                    out.push_str(&format!("{{{inner}}}"));
                } else {
                    out.push_str(&format!("{{({})}}", group_fracs(&inner)));
                }
                i += 1;
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// A bare comma-separated list (no enclosing brackets) compared as a multiset:
/// every gold element must match a different given element.
fn unordered_equal(given: &str, gold: &str) -> bool {
    let split = |s: &str| -> Option<Vec<String>> {
        let t = s.trim().trim_start_matches('{').trim_end_matches('}');
        let t = t.trim_start_matches("\\{").trim_end_matches("\\}");
        if t.starts_with(['(', '[']) || !t.contains(',') {
            return None;
        }
        Some(t.split(',').map(|x| x.trim().to_string()).collect())
    };
    let (Some(g), Some(mut a)) = (split(gold), split(given)) else {
        return false;
    };
    if g.len() != a.len() {
        return false;
    }
    for ge in &g {
        match a.iter().position(|ae| prm::grade_answer(ae, ge)) {
            Some(k) => {
                a.swap_remove(k);
            }
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_fixes() {
        let s = Grader::Strict;
        assert!(s.is_equivalent("-2,1", "1,-2"));
        assert!(s.is_equivalent("15", r"15\mbox{ cm}^2"));
        assert!(s.is_equivalent("[-2,7]", r"x \in [-2,7]"));
        assert!(s.is_equivalent(r"\frac{9a+11}{20}", r"\frac{11+9a}{20}"));
        assert!(s.is_equivalent(r"3+2\sqrt{2},3-2\sqrt{2}", r"3 \pm 2 \sqrt{2}"));
        assert!(s.is_equivalent("2516", "2516_8"));
        assert!(!s.is_equivalent("1,2", "1,-2"));
        assert!(!s.is_equivalent(r"2\frac{2}{5}", r"1\frac{4}{5}"));
        assert!(!s.is_equivalent(r"\frac{2240}{78125}", r"\frac{448}{15625}"));
        assert!(!Grader::Paper.is_equivalent("-2,1", "1,-2"));
    }
}
