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
//! bounded time and no timeout is needed. docs/grading.md lists
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
    with_gold(gold, <[Parsed]>::to_vec)
}

/// Runs `f` on the parsed gold. Golds repeat (several samples per problem):
/// the last few parses are kept.
fn with_gold<T>(gold: &str, f: impl FnOnce(&[Parsed]) -> T) -> T {
    type Cache = std::cell::RefCell<Vec<(String, std::rc::Rc<Vec<Parsed>>)>>;
    thread_local! {
        static CACHE: Cache = const { std::cell::RefCell::new(Vec::new()) };
    }
    let hit = CACHE.with(|c| {
        c.borrow()
            .iter()
            .find(|(g, _)| g == gold)
            .map(|(_, p)| p.clone())
    });
    let parsed = match hit {
        Some(p) => p,
        None => {
            let p = std::rc::Rc::new(parse_gold_uncached(gold));
            CACHE.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() >= 32 {
                    c.remove(0);
                }
                c.push((gold.to_string(), p.clone()));
            });
            p
        }
    };
    f(&parsed)
}

fn parse_gold_uncached(gold: &str) -> Vec<Parsed> {
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
    let correct = with_gold(gold, |g| verify(g, &pred));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Random strings of LaTeX-ish pieces: no panic, bounded time.
    #[test]
    fn no_panic_on_noise() {
        const PIECES: &[&str] = &[
            "$",
            "$$",
            "\\boxed{",
            "}",
            "{",
            "\\frac",
            "\\(",
            "\\)",
            "\\[",
            "\\]",
            "[",
            "]",
            "(",
            ")",
            "1",
            "2.5",
            ",",
            " and ",
            "=",
            "<",
            "\\le",
            "\\pm",
            "x",
            "é",
            "€",
            "%",
            "\\%",
            "\\text{",
            "^",
            "_",
            "\\sqrt",
            "!",
            "\\begin{pmatrix}",
            "&",
            "\\\\",
            "\\end{pmatrix}",
            "answer:",
            "final answer is ",
            " ",
            "\n",
            "-",
            "/",
            "\\infty",
            "\\cup",
            "\\{",
            "\\}",
            ";",
            "e",
            "\\approx",
            "1,000",
            "\\left(",
        ];
        let mut state: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let n = (next() % 40) as usize;
            let s: String = (0..n)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            let g: String = (0..(n / 4))
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            let _ = grade(&s, &g);
        }
    }
}
