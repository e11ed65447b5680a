//! Answer extraction with math-verify's default targets (LaTeX, then plain
//! expressions) and priorities: "final answer is … I hope" (0), "final answer
//! … is" and `\boxed{}` (50), "answer:" (100), "answer" (200), then any LaTeX
//! environment or number (300). Within a priority the rightmost match is
//! tried first; the first one that parses is the answer.

use std::sync::OnceLock;

use fancy_regex::{Captures, Regex};

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

struct Pattern {
    re: Regex,
    priority: u32,
    target: Target,
    /// A lowercase literal the text must contain for the pattern to match.
    needs: Option<&'static str>,
}

/// A LaTeX environment (`$…$`, `$$…$$`, `\[…\]`, `\(…\)`, ` […] `, or a
/// plain `\frac{1}{2}`), with an optional percent sign after it.
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
        alts.push(format!(r"(?P<{prefix}latexFraction>-?\\frac\{{{n}\}}\{{{n}\}})"));
    }
    format!(r"(?:(?:{})\s*{percent}?)", alts.join("|"))
}

fn latex_patterns() -> Vec<Pattern> {
    let next: String = (1..=5)
        .map(|i| format!(r"(?:\s*(?:,?and|,?or|,)\s*{})?", latex_env(&format!("next{i}_"), false)))
        .collect();
    let envs = format!("(?:{}{next})", latex_env("first_", false));
    let answer = "(?i:answer)";
    let mut out = vec![
        (format!(r"(?i:final answer is)\:?\s*{envs}\.?\s?I hope"), 0, Some("final answer is")),
        (format!(r"(?i:final answer.{{0,100}}?)\s+is\:?\s*{envs}"), 50, Some("final answer")),
        (format!(r"{answer}:.{{0,50}}?{envs}"), 100, Some("answer")),
        (format!(r"{answer}.{{0,50}}?{envs}"), 200, Some("answer")),
        (envs.clone(), 300, None),
    ];
    let next_boxed: String = (1..=5)
        .map(|i| format!(r"\s*(?:\s*(?:,?and|,?or|,)\s*{})?", latex_env(&format!("next{i}_"), true)))
        .collect();
    out.push((format!("{}{next_boxed}", latex_env("first_", true)), 50, Some("\\boxed")));
    out.push((r"(?P<first_latexBoxed>\\boxed\{.+\})".to_string(), 50, Some("\\boxed")));
    out.into_iter()
        .filter_map(|(re, priority, needs)| {
            Some(Pattern {
                re: Regex::new(&format!("(?s){re}")).ok()?,
                priority,
                target: Target::Latex,
                needs,
            })
        })
        .collect()
}

fn expr_patterns() -> Vec<Pattern> {
    let number = concat!(
        r"(?<!\d)(?:",
        r"(?P<integer1>-?[1-9]\d{0,2}(?:[ ,]\d{3})+)(?P<decimal1>\.\d+)?|",
        r"(?P<integer2>-?\d+)(?P<decimal2>[.,]\d+)|",
        r"(?P<decimal3>\.\d+)|",
        r"(?P<integer3>-?\d+)",
        r")(?P<percent>\s*(?:%|[Pp]ercent|\s*[Pp]ercentage|\s*[Pp]ct))?"
    );
    let ops = r"\+\-\*\×\/\^\(\)\÷";
    let all = format!(r"[\d\.\s{ops}]");
    let expr = format!(r"(?P<expr>-?\(?-?\d{all}*[{ops}]{all}+\)?)");
    let currency = r"\$€£¥₹₽₪₩₫฿₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₴₵₶₷₸₹₺₻₼₽₾₿";
    let prefix = r"(?:^|\s|\=)(?:\*\*)?";
    let suffix = r"(?:\*\*)?(?:\.|,|:|\s|\)|\$|$)";
    let expr_anchored = format!("(?:{prefix}{expr}{suffix})");
    let number_anchored = format!("(?:{prefix}[{currency}]?{number})");
    let either = format!("(?:{expr_anchored}|{number_anchored})");
    let answer = "(?i:answer)";
    let list = vec![
        (format!(r"(?i:final answer is)\:?\s*{either}\.?\s?I hope"), 0, Some("final answer is")),
        (format!(r"(?i:final answer.{{0,100}}?)\s+is\:?{either}"), 50, Some("final answer")),
        (format!(r"{answer}:(?:.{{0,100}}=\s*|.{{0,50}}?){either}(?!\s*=)"), 100, Some("answer")),
        (format!(r"{answer}(?:.{{0,100}}=\s*|.{{0,50}}?){either}(?!\s*=)"), 200, Some("answer")),
        (expr_anchored, 300, None),
        (number_anchored, 300, None),
    ];
    list.into_iter()
        .filter_map(|(re, priority, needs)| {
            Some(Pattern {
                re: Regex::new(&re).ok()?,
                priority,
                target: Target::Expr,
                needs,
            })
        })
        .collect()
}

fn patterns() -> &'static [Pattern] {
    static P: OnceLock<Vec<Pattern>> = OnceLock::new();
    P.get_or_init(|| {
        let mut all = latex_patterns();
        all.extend(expr_patterns());
        // Stable: LaTeX before expressions within a priority, as math-verify.
        all.sort_by_key(|p| p.priority);
        all
    })
}

/// Number of regex patterns that compiled (all of them, in a correct build).
pub fn pattern_count() -> usize {
    patterns().len()
}

/// Texts longer than this are cut to their last part (bounds regex work).
const MAX_TEXT: usize = 20_000;

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
    let lower = text.to_lowercase();
    let pats = patterns();
    let mut fallback: Option<String> = None;
    let mut k = 0;
    while k < pats.len() {
        let priority = pats[k].priority;
        let mut matches: Vec<(usize, usize, usize, Target, Captures)> = Vec::new();
        while k < pats.len() && pats[k].priority == priority {
            let p = &pats[k];
            k += 1;
            if p.needs.is_some_and(|n| !lower.contains(n)) {
                continue;
            }
            for caps in p.re.captures_iter(text) {
                // A regex that gives up (backtracking limit) counts as no match.
                let Ok(caps) = caps else { break };
                let Some(m) = caps.get(0) else { continue };
                let order = matches.len();
                matches.push((m.end(), m.start(), order, p.target, caps));
            }
        }
        // Rightmost end first, then leftmost start, then pattern order.
        matches.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (_, _, _, target, caps) in &matches {
            let (value, text) = match target {
                Target::Latex => extract_latex(caps),
                Target::Expr => extract_expr(caps),
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

fn extract_latex(caps: &Captures) -> (Option<Value>, String) {
    let mut values: Vec<Option<Value>> = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    let re = &patterns_for_names();
    for prefix in ["first", "next1", "next2", "next3", "next4", "next5"] {
        let Some((group, latex)) = re.iter().find_map(|kind| {
            caps.name(&format!("{prefix}_{kind}")).map(|m| (*kind, m.as_str()))
        }) else {
            continue;
        };
        let mode = if group == "latexBoxed" { BoxedMode::Last } else { BoxedMode::All };
        let norm = normalize(latex, mode);
        let percent = caps.name(&format!("{prefix}_percent")).is_some();
        let v = parse_latex(&norm).and_then(|v| if percent { to_pct(v) } else { Some(v) });
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

fn patterns_for_names() -> [&'static str; 7] {
    [
        "latexDisplayDollar",
        "latexDisplayBracket",
        "latexInlineDollar",
        "latexInlineParenthesis",
        "latexInlineBracket",
        "latexFraction",
        "latexBoxed",
    ]
}

fn to_pct(v: Value) -> Option<Value> {
    match v {
        Value::Expr(e) => Some(Value::Expr(Expr::Pct(Box::new(e)))),
        _ => None,
    }
}

fn extract_expr(caps: &Captures) -> (Option<Value>, String) {
    let get = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| caps.name(n).map(|m| m.as_str()).filter(|s| !s.is_empty()))
            .unwrap_or("")
    };
    let integer = get(&["integer1", "integer2", "integer3"]);
    let decimal = get(&["decimal1", "decimal2", "decimal3"]);
    let percent = caps.name("percent").is_some_and(|m| !m.as_str().is_empty());
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
    let expr = caps.name("expr").map(|m| m.as_str()).unwrap_or("");
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
        if c == '.' && i > 0 && chars[i - 1].is_ascii_digit() && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
            py.push('0');
        }
    }
    let v = latex::parse(&py.replace("**", "^")).filter(|v| matches!(v, Value::Expr(_)));
    (v, expr.to_string())
}

/// `2(3)` or `2 3`: not a Python expression.
fn has_implicit_product(s: &str) -> bool {
    let chars: Vec<char> = s.chars().filter(|c| !c.is_whitespace() || true).collect();
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
