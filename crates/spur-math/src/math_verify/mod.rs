//! A Rust port of HuggingFace Math-Verify 0.9's default grading,
//! `verify(parse("$" + gold + "$"), parse(response))`: its answer extraction
//! (LaTeX environments, `\boxed{}`, "final answer is", plain numbers and
//! expressions, by priority), its LaTeX normalization, and its comparison
//! rules (sets and unordered lists, intervals and inequalities, equations and
//! labelled answers, matrices, percentages, numeric rounding to 6 places,
//! symbolic equality).
//!
//! sympy's symbolic work is replaced by bounded evaluation (exact rationals,
//! or complex floating point at fixed random points), so each answer takes
//! bounded time and no timeout is needed. docs/grading-math-verify.md lists
//! where the verdicts can differ from the Python library.

mod compare;
mod envs;
mod extract;
mod latex;
mod normalize;
mod value;

pub use extract::Parsed;

/// math-verify's `parse(text)` with its default extraction targets: the
/// first answer that parses, then the text of the first match.
pub fn parse(text: &str) -> Vec<Parsed> {
    extract::parse(text)
}

/// math-verify's `verify(gold, pred)` with its default settings.
pub fn verify(gold: &[Parsed], pred: &[Parsed]) -> bool {
    compare::verify(gold, pred)
}

/// The gold answer as math-verify's users parse it: `parse("$" + gold + "$")`,
/// or `parse("\boxed{" + gold + "}")` if that finds nothing.
pub fn parse_gold(gold: &str) -> Vec<Parsed> {
    let p = parse(&format!("${gold}$"));
    if !p.is_empty() {
        return p;
    }
    parse(&format!("\\boxed{{{gold}}}"))
}

/// The text math-verify extracted (the first matched text), `""` if none.
pub fn extracted_text(parsed: &[Parsed]) -> String {
    parsed
        .iter()
        .find_map(|p| match p {
            Parsed::Text(t) => Some(t.clone()),
            Parsed::Value(_) => None,
        })
        .unwrap_or_default()
}

/// Grades `response` against `gold`: the extracted text and the verdict.
pub fn grade(response: &str, gold: &str) -> (String, bool) {
    let pred = parse(response);
    let correct = verify(&parse_gold(gold), &pred);
    (extracted_text(&pred), correct)
}

/// Number of extraction regexes that compiled (for a self-check).
pub fn pattern_count() -> usize {
    extract::pattern_count()
}

/// A short text form of parsed answers (for diagnostics).
pub fn describe(parsed: &[Parsed]) -> String {
    parsed
        .iter()
        .map(|p| match p {
            Parsed::Value(v) => v.key(),
            Parsed::Text(t) => format!("{t:?}"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
