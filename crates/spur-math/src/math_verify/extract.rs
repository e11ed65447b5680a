//! Answer extraction with math-verify's default targets (LaTeX, then plain
//! expressions) and priorities: "final answer is … I hope" (0), "final answer
//! … is" and `\boxed{}` (50), "answer:" (100), "answer" (200), then any LaTeX
//! environment or number (300). Within a priority the rightmost match is
//! tried first; the first one that parses is the answer.

use std::sync::OnceLock;

use fancy_regex::Regex;

use super::envs;
use super::latex;
use super::normalize::{normalize, BoxedMode};
use super::value::{Expr, Value};

/// What `parse` returns: parsed answers, then the first matched text.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    Value(Value),
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Latex,
    Expr,
}

/// A regex-based pattern (the rare anchored forms and the plain numbers).
struct Pattern {
    re: Re,
    priority: u32,
    target: Target,
    /// Lower-case literals the text must contain for the pattern to match.
    needs: &'static [&'static str],
}

enum Re {
    /// Patterns with lookaround (backtracking engine).
    Fancy(Regex),
    /// Patterns without (linear-time engine, same leftmost-first semantics).
    Plain(regex::Regex),
}

/// A LaTeX environment (`$…$`, `$$…$$`, `\[…\]`, `\(…\)`, ` […] `, or a
/// plain `\frac{1}{2}`), with an optional percent sign after it, as
/// math-verify writes it. Only the rare "final answer is … I hope" form runs
/// through this regex; the other environment patterns are matched by hand in
/// `envs` (and checked against this regex in the tests).
fn latex_env(prefix: &str, boxed: bool) -> String {
    let percent = format!(r"(?P<{prefix}percent>(?:\\?%|[Pp]ercent|[Pp]ercentage|[Pp]ct))");
    let mut display_dollar = r"(?:[^$]|\$(?!\$))".to_string();
    let mut display_bracket = r"(?:[^\\]|\\(?!\]))".to_string();
    let mut inline_dollar = r"(?:\\[$]|[^\n$])".to_string();
    let mut inline_paren = r"(?:[^\\\n]|\\(?!\)))".to_string();
    let mut inline_bracket = r"[^\n\]\[]".to_string();
    for c in [
        &mut display_dollar,
        &mut display_bracket,
        &mut inline_dollar,
        &mut inline_paren,
        &mut inline_bracket,
    ] {
        *c = if boxed {
            format!(r"{c}*?\\boxed\{{{c}+?\}}{c}*?")
        } else {
            format!("{c}+?")
        };
    }
    let mut alts = vec![
        format!(r"(?<!\\)\$\$(?P<{prefix}latexDisplayDollar>{display_dollar})(?<!\\)\$\$"),
        format!(r"(?<!\\)\\\[(?P<{prefix}latexDisplayBracket>{display_bracket})(?<!\\)\\\]"),
        format!(r"(?<!\\|\d)\$(?P<{prefix}latexInlineDollar>{inline_dollar})(?<!\\)\$"),
        format!(r"(?<!\\)\\\((?P<{prefix}latexInlineParenthesis>{inline_paren})(?<!\\)\\\)"),
        format!(r"\s\[(?P<{prefix}latexInlineBracket>{inline_bracket})\]\s"),
    ];
    if !boxed {
        let n = r"-?\d+(?:[.,]\d+)?";
        alts.push(format!(
            r"(?P<{prefix}latexFraction>-?\\frac\{{{n}\}}\{{{n}\}})"
        ));
    }
    format!(r"(?:(?:{})\s*{percent}?)", alts.join("|"))
}

/// The environments pattern with up to five chained followers.
fn latex_envs_regex(boxed: bool) -> String {
    if boxed {
        let next: String = (1..=5)
            .map(|i| {
                format!(
                    r"\s*(?:\s*(?:,?and|,?or|,)\s*{})?",
                    latex_env(&format!("next{i}_"), true)
                )
            })
            .collect();
        format!("{}{next}", latex_env("first_", true))
    } else {
        let next: String = (1..=5)
            .map(|i| {
                format!(
                    r"(?:\s*(?:,?and|,?or|,)\s*{})?",
                    latex_env(&format!("next{i}_"), false)
                )
            })
            .collect();
        format!("(?:{}{next})", latex_env("first_", false))
    }
}

fn regex_patterns() -> Vec<Pattern> {
    let envs = latex_envs_regex(false);
    let number = concat!(
        r"(?:",
        r"(?P<integer1>-?[1-9]\d{0,2}(?:[ ,]\d{3})+)(?P<decimal1>\.\d+)?|",
        r"(?P<integer2>-?\d+)(?P<decimal2>[.,]\d+)|",
        r"(?P<decimal3>\.\d+)|",
        r"(?P<integer3>-?\d+)",
        r")(?P<percent>\s*(?:%|[Pp]ercent|\s*[Pp]ercentage|\s*[Pp]ct))?"
    );
    // math-verify's number pattern starts with `(?<!\d)`; every use of it
    // follows whitespace, `=`, `**` or a currency sign, so it always holds.
    let ops = r"\+\-\*×\/\^\(\)÷";
    let all = format!(r"[\d\.\s{ops}]");
    let expr = format!(r"(?P<expr>-?\(?-?\d{all}*[{ops}]{all}+\)?)");
    let currency = r"\$€£¥₹₽₪₩₫฿₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₴₵₶₷₸₹₺₻₼₽₾₿";
    let prefix = r"(?:^|\s|\=)(?:\*\*)?";
    let suffix = r"(?:\*\*)?(?:\.|,|:|\s|\)|\$|$)";
    let expr_anchored = format!("(?:{prefix}{expr}{suffix})");
    let number_anchored = format!("(?:{prefix}[{currency}]?{number})");
    let either = format!("(?:{expr_anchored}|{number_anchored})");
    let answer = "(?i:answer)";
    let fancy = |re: String, priority, target, needs| {
        Some(Pattern {
            re: Re::Fancy(Regex::new(&re).ok()?),
            priority,
            target,
            needs,
        })
    };
    let plain = |re: String, priority, target, needs| {
        Some(Pattern {
            re: Re::Plain(regex::Regex::new(&re).ok()?),
            priority,
            target,
            needs,
        })
    };
    vec![
        fancy(
            format!(r"(?s)(?i:final answer is)\:?\s*{envs}\.?\s?I hope"),
            0,
            Target::Latex,
            &["final answer is", "i hope"],
        ),
        fancy(
            format!(r"(?i:final answer is)\:?\s*{either}\.?\s?I hope"),
            0,
            Target::Expr,
            &["final answer is", "i hope"],
        ),
        plain(
            r"(?s)(?P<first_latexBoxed>\\boxed\{.+\})".to_string(),
            50,
            Target::Latex,
            &["\\boxed"],
        ),
        plain(
            format!(r"(?i:final answer.{{0,100}}?)\s+is\:?{either}"),
            50,
            Target::Expr,
            &["final answer"],
        ),
        fancy(
            format!(r"{answer}:(?:.{{0,100}}=\s*|.{{0,50}}?){either}(?!\s*=)"),
            100,
            Target::Expr,
            &["answer"],
        ),
        fancy(
            format!(r"{answer}(?:.{{0,100}}=\s*|.{{0,50}}?){either}(?!\s*=)"),
            200,
            Target::Expr,
            &["answer"],
        ),
        plain(expr_anchored, 300, Target::Expr, &[]),
        plain(number_anchored, 300, Target::Expr, &[]),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn patterns() -> &'static [Pattern] {
    static P: OnceLock<Vec<Pattern>> = OnceLock::new();
    P.get_or_init(regex_patterns)
}

/// Number of regex patterns that compiled (all 8, in a correct build).
pub fn pattern_count() -> usize {
    patterns().len()
}

/// Texts longer than this are cut to their last part (bounds the work).
const MAX_TEXT: usize = 20_000;

/// What a match holds, owned.
enum Found {
    /// LaTeX pieces: (text, percent sign after it, read the last box only).
    Latex(Vec<(String, bool, bool)>),
    Expr {
        integer: String,
        decimal: String,
        percent: bool,
        expr: String,
    },
}

struct Candidate {
    start: usize,
    end: usize,
    order: usize,
    found: Found,
}

fn from_envs(text: &str, m: &envs::EnvsMatch) -> Found {
    Found::Latex(
        m.envs
            .iter()
            .map(|e| (text[e.content.0..e.content.1].to_string(), e.percent, false))
            .collect(),
    )
}

const GROUP_KINDS: [&str; 7] = [
    "latexDisplayDollar",
    "latexDisplayBracket",
    "latexInlineDollar",
    "latexInlineParenthesis",
    "latexInlineBracket",
    "latexFraction",
    "latexBoxed",
];

/// The capture groups of a regex match, by name.
trait Groups {
    fn group(&self, name: &str) -> Option<&str>;
}

impl Groups for fancy_regex::Captures<'_> {
    fn group(&self, name: &str) -> Option<&str> {
        self.name(name).map(|m| m.as_str())
    }
}

impl Groups for regex::Captures<'_> {
    fn group(&self, name: &str) -> Option<&str> {
        self.name(name).map(|m| m.as_str())
    }
}

fn from_groups(caps: &dyn Groups, target: Target) -> Found {
    match target {
        Target::Latex => {
            let mut pieces = Vec::new();
            for prefix in ["first", "next1", "next2", "next3", "next4", "next5"] {
                let hit = GROUP_KINDS.iter().find_map(|kind| {
                    caps.group(&format!("{prefix}_{kind}"))
                        .filter(|s| !s.is_empty())
                        .map(|s| (*kind, s))
                });
                if let Some((kind, s)) = hit {
                    let percent = caps
                        .group(&format!("{prefix}_percent"))
                        .is_some_and(|p| !p.is_empty());
                    pieces.push((s.to_string(), percent, kind == "latexBoxed"));
                }
            }
            Found::Latex(pieces)
        }
        Target::Expr => {
            let get = |names: &[&str]| {
                names
                    .iter()
                    .find_map(|n| caps.group(n).filter(|s| !s.is_empty()))
                    .unwrap_or("")
                    .to_string()
            };
            Found::Expr {
                integer: get(&["integer1", "integer2", "integer3"]),
                decimal: get(&["decimal1", "decimal2", "decimal3"]),
                percent: caps.group("percent").is_some_and(|p| !p.is_empty()),
                expr: caps.group("expr").unwrap_or("").to_string(),
            }
        }
    }
}

/// All matches of one priority, in math-verify's pattern order.
fn candidates(text: &str, lower: &str, priority: u32) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let push = |start: usize, end: usize, found: Found, out: &mut Vec<Candidate>| {
        let order = out.len();
        out.push(Candidate {
            start,
            end,
            order,
            found,
        });
    };
    let has_boxed = text.contains("\\boxed");
    // Hand-matched LaTeX patterns come first in math-verify's order at
    // priorities 50-300, except that at 50 "final answer … is" precedes the
    // boxed environments, which precede the plain `\boxed{…}`.
    match priority {
        50 => {
            if lower.contains("final answer") {
                for m in envs::find_final_answer(text) {
                    push(m.start, m.end, from_envs(text, &m), &mut out);
                }
            }
            if has_boxed {
                for m in envs::find_all(text, true) {
                    push(m.start, m.end, from_envs(text, &m), &mut out);
                }
            }
        }
        100 | 200 if lower.contains("answer") => {
            for m in envs::find_answer(text, priority == 100) {
                push(m.start, m.end, from_envs(text, &m), &mut out);
            }
        }
        300 => {
            for m in envs::find_all(text, false) {
                push(m.start, m.end, from_envs(text, &m), &mut out);
            }
        }
        _ => {}
    }
    for p in patterns().iter().filter(|p| p.priority == priority) {
        if p.needs.iter().any(|n| !lower.contains(n)) {
            continue;
        }
        match &p.re {
            Re::Fancy(re) => {
                // `finditer`, with each search started at the next place the
                // pattern's first literal occurs (no match can start before).
                let lead = p.needs.first().copied().unwrap_or("");
                let mut pos = 0;
                while let Some(k) = lower.get(pos..).and_then(|r| r.find(lead)) {
                    // A regex that gives up (backtracking limit) ends the search.
                    let Ok(Some(caps)) = re.captures_from_pos(text, pos + k) else {
                        break;
                    };
                    let Some(m) = caps.get(0) else { break };
                    push(m.start(), m.end(), from_groups(&caps, p.target), &mut out);
                    pos = if m.end() > m.start() {
                        m.end()
                    } else {
                        m.end() + 1
                    };
                }
            }
            Re::Plain(_) if p.target == Target::Latex => {
                // `(?s)\\boxed\{.+\}`: from the first `\boxed{` to the last
                // `}`, when some character lies between (a test checks this
                // against the regex).
                if let Some(m) = plain_boxed(text) {
                    let found = Found::Latex(vec![(text[m.0..m.1].to_string(), false, true)]);
                    push(m.0, m.1, found, &mut out);
                }
            }
            Re::Plain(re) => {
                for caps in re.captures_iter(text) {
                    let Some(m) = caps.get(0) else { continue };
                    push(m.start(), m.end(), from_groups(&caps, p.target), &mut out);
                }
            }
        }
    }
    out
}

/// The match of `(?s)\\boxed\{.+\}` (there is at most one).
fn plain_boxed(text: &str) -> Option<(usize, usize)> {
    let p = text.find("\\boxed{")?;
    let q = text.rfind('}')?;
    let first = p + "\\boxed{".len();
    // `.+` needs one character (of any width) before the `}`.
    (q > first).then_some((p, q + 1))
}

/// math-verify's `parse(text)` with its default configuration.
pub fn parse(text: &str) -> Vec<Parsed> {
    let text = if text.len() > MAX_TEXT {
        let mut cut = text.len() - MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        &text[cut..]
    } else {
        text
    };
    let lower = text.to_ascii_lowercase();
    let mut fallback: Option<String> = None;
    for priority in [0, 50, 100, 200, 300] {
        let mut matches = candidates(text, &lower, priority);
        // Rightmost end first, then leftmost start, then pattern order.
        matches.sort_by(|a, b| {
            b.end
                .cmp(&a.end)
                .then(a.start.cmp(&b.start))
                .then(a.order.cmp(&b.order))
        });
        for c in &matches {
            let (value, text) = match &c.found {
                Found::Latex(pieces) => extract_latex(pieces),
                Found::Expr {
                    integer,
                    decimal,
                    percent,
                    expr,
                } => extract_expr(integer, decimal, *percent, expr),
            };
            if fallback.is_none() && !text.is_empty() {
                fallback = Some(text);
            }
            if let Some(v) = value {
                let mut out = vec![Parsed::Value(v)];
                out.extend(fallback.map(Parsed::Text));
                return out;
            }
        }
    }
    fallback.map(Parsed::Text).into_iter().collect()
}

/// Parses normalized LaTeX; on failure, the part after the last `=` of a
/// chain `a = b = c` (math-verify's retry).
pub fn parse_latex(s: &str) -> Option<Value> {
    if let Some(v) = latex::parse(s) {
        return Some(v);
    }
    if !s.contains(',') && !s.contains(';') {
        let parts = split_equals(s);
        if parts.len() > 2 {
            return latex::parse(parts.last()?);
        }
    }
    None
}

/// Splits at `=` not preceded by `\`, `<`, `!` or `>`.
fn split_equals(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut last = 0;
    let mut prev: Option<char> = None;
    for (i, c) in s.char_indices() {
        if c == '=' && !matches!(prev, Some('\\' | '<' | '!' | '>')) {
            out.push(&s[last..i]);
            last = i + 1;
        }
        prev = Some(c);
    }
    out.push(&s[last..]);
    out
}

fn extract_latex(pieces: &[(String, bool, bool)]) -> (Option<Value>, String) {
    let mut values: Vec<Option<Value>> = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    for (latex, percent, last_box) in pieces {
        let mode = if *last_box {
            BoxedMode::Last
        } else {
            BoxedMode::All
        };
        let norm = normalize(latex, mode);
        let v = parse_latex(&norm).and_then(|v| if *percent { to_pct(v) } else { Some(v) });
        texts.push(norm);
        values.push(v);
    }
    if values.is_empty() {
        return (None, String::new());
    }
    if values.len() > 1 && values.iter().all(Option::is_some) {
        let items: Vec<Value> = values.into_iter().flatten().collect();
        return (Some(latex::make_set(items)), texts.join(" and "));
    }
    (values.swap_remove(0), texts.swap_remove(0))
}

fn to_pct(v: Value) -> Option<Value> {
    match v {
        Value::Expr(e) => Some(Value::Expr(Expr::Pct(Box::new(e)))),
        _ => None,
    }
}

fn extract_expr(
    integer: &str,
    decimal: &str,
    percent: bool,
    expr: &str,
) -> (Option<Value>, String) {
    if !integer.is_empty() || !decimal.is_empty() {
        let mut int: String = integer.chars().filter(|c| *c != ',' && *c != ' ').collect();
        int = int.trim_start_matches('0').to_string();
        if int.is_empty() {
            int = "0".into();
        }
        let dec = decimal.replace(',', ".");
        let text = format!("{int}{dec}");
        let (neg, body) = match text.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, text.as_str()),
        };
        let Some(mut n) = latex::number(body) else {
            return (None, text);
        };
        if neg {
            n = n.neg();
        }
        if percent {
            n = Expr::Pct(Box::new(n));
        }
        return (Some(Value::Expr(n)), text);
    }
    if expr.is_empty() {
        return (None, String::new());
    }
    let clean = expr.replace('\n', " ");
    // Python syntax: no `×`, `÷` or implicit products.
    if clean.contains(['×', '÷']) || clean.contains(")(") || has_implicit_product(&clean) {
        return (None, expr.to_string());
    }
    // `3.` is a float in Python.
    let mut py = String::with_capacity(clean.len() + 4);
    let chars: Vec<char> = clean.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        py.push(c);
        if c == '.'
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())
        {
            py.push('0');
        }
    }
    let v = latex::parse(&py.replace("**", "^")).filter(|v| matches!(v, Value::Expr(_)));
    (v, expr.to_string())
}

/// `2(3)` or `2 3`: not a Python expression.
fn has_implicit_product(s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    let mut prev_digit_end = false;
    let mut gap = false;
    for &c in &chars {
        if c.is_ascii_digit() || c == '.' {
            if prev_digit_end && gap {
                return true;
            }
            prev_digit_end = true;
            gap = false;
        } else if c.is_whitespace() {
            gap = true;
        } else if c == '(' {
            if prev_digit_end {
                return true;
            }
            prev_digit_end = false;
            gap = false;
        } else if c == ')' {
            prev_digit_end = true;
            gap = false;
        } else {
            prev_digit_end = false;
            gap = false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_patterns_compile() {
        assert_eq!(pattern_count(), 8);
    }

    /// Texts to check the hand matchers on: the fixture's, and the shared
    /// corpus responses when present.
    fn texts() -> Vec<String> {
        let mut out = Vec::new();
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let files = [
            root.join("tests/data/math_verify_cases.jsonl"),
            root.join("../../../shared/data/grader/real_outputs.jsonl"),
            root.join("../../../shared/data/grader/real_outputs_aime_amc.jsonl"),
        ];
        for (k, f) in files.iter().enumerate() {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            // Every 3rd corpus row (the regex side is slow in debug builds).
            let step = if k == 0 { 1 } else { 3 };
            for line in text.lines().step_by(step) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                for k in ["gold", "pred", "response"] {
                    if let Some(s) = v[k].as_str() {
                        out.push(s.to_string());
                    }
                }
            }
        }
        out.push("a $$x$$ $y$, $z$ and \\(w\\) or \\[v\\] [u] \\frac{1}{2} pct".to_string());
        out
    }

    /// (start, end, [(content, percent)]) of each match, from the regex.
    type Spans = Vec<(usize, usize, Vec<(String, bool)>)>;
    type Matcher = Box<dyn Fn(&str) -> Vec<envs::EnvsMatch>>;

    fn by_regex(re: &Regex, t: &str) -> Spans {
        re.captures_iter(t)
            .map_while(Result::ok)
            .filter_map(|c| {
                let m = c.get(0)?;
                let Found::Latex(pieces) = from_groups(&c, Target::Latex) else {
                    return None;
                };
                Some((
                    m.start(),
                    m.end(),
                    pieces.into_iter().map(|(s, p, _)| (s, p)).collect(),
                ))
            })
            .collect()
    }

    fn by_hand(ms: Vec<envs::EnvsMatch>, t: &str) -> Spans {
        ms.iter()
            .map(|m| {
                let pieces = m
                    .envs
                    .iter()
                    .map(|e| (t[e.content.0..e.content.1].to_string(), e.percent))
                    .collect();
                (m.start, m.end, pieces)
            })
            .collect()
    }

    /// The hand matchers give exactly the matches of math-verify's regexes.
    #[test]
    fn hand_matchers_equal_regexes() {
        let plain = latex_envs_regex(false);
        let cases: Vec<(Regex, Matcher)> = vec![
            (
                Regex::new(&format!("(?s){plain}")).expect("regex"),
                Box::new(|t| envs::find_all(t, false)),
            ),
            (
                Regex::new(&format!("(?s){}", latex_envs_regex(true))).expect("regex"),
                Box::new(|t| envs::find_all(t, true)),
            ),
            (
                Regex::new(&format!("(?s)(?i:answer):.{{0,50}}?{plain}")).expect("regex"),
                Box::new(|t| envs::find_answer(t, true)),
            ),
            (
                Regex::new(&format!("(?s)(?i:answer).{{0,50}}?{plain}")).expect("regex"),
                Box::new(|t| envs::find_answer(t, false)),
            ),
            (
                Regex::new(&format!(
                    r"(?s)(?i:final answer.{{0,100}}?)\s+is\:?\s*{plain}"
                ))
                .expect("regex"),
                Box::new(envs::find_final_answer),
            ),
        ];
        let boxed_re = regex::Regex::new(r"(?s)\\boxed\{.+\}").expect("regex");
        let mut checked = 0;
        for t in texts() {
            let want: Vec<(usize, usize)> = boxed_re
                .find_iter(&t)
                .map(|m| (m.start(), m.end()))
                .collect();
            assert_eq!(
                plain_boxed(&t).into_iter().collect::<Vec<_>>(),
                want,
                "plain boxed on {t:?}"
            );
            for (k, (re, hand)) in cases.iter().enumerate() {
                assert_eq!(
                    by_hand(hand(&t), &t),
                    by_regex(re, &t),
                    "pattern {k} on {t:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 1000);
    }
}
