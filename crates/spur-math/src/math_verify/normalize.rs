//! LaTeX clean-up before parsing, as math-verify's default
//! `LatexExtractionConfig` runs it (latex2sympy2_extended's `normalize_latex`
//! with basic LaTeX, units, malformed operators and nits on), and the
//! `\boxed{}` content extraction it starts with.

use std::sync::OnceLock;

use fancy_regex::Regex as FancyRegex;
use regex::Regex;

/// Which boxed contents `extract_boxed` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxedMode {
    /// Every `\boxed{}` / `\fbox{}`, joined by commas.
    All,
    /// The last box, plus boxes right before it that look like parts of the
    /// same answer (close by, or a separator between them).
    Last,
}

/// Unit words removed from the end of an answer (`5 cm`, `12 feet`).
const UNITS: &[&str] = &[
    "integerpoint",
    "feet",
    "sue",
    "digit",
    "pound",
    "meal",
    "edge",
    "student",
    "children ticket",
    "multiple",
    "east",
    "degree",
    "mph",
    "kmph",
    "ft",
    "m square",
    " m east",
    "sq m",
    "deg",
    "mile",
    "q .",
    "monkey",
    "prime",
    "ratio",
    "profit of rs",
    "rd",
    "o",
    "gm",
    "p . m",
    "lb",
    "tile",
    "per",
    "dm",
    "lt",
    "gain",
    "ab",
    "way",
    "west",
    "a .",
    "b .",
    "c .",
    "d .",
    "e .",
    "f .",
    "g .",
    "h .",
    "t",
    "h",
    "no change",
    "men",
    "soldier",
    "pie",
    "bc",
    "excess",
    "st",
    "inches",
    "noon",
    "cent",
    "by",
    "gal",
    "kmh",
    "c",
    "acre",
    "rise",
    "a . m",
    "th",
    "π r 2",
    "sq",
    "mark",
    "l",
    "toy",
    "coin",
    "sq . m",
    "gallon",
    "° f",
    "profit",
    "minw",
    "yr",
    "women",
    "am",
    "pm",
    "hr",
    "cu cm",
    "square",
    "v â € ™",
    "are",
    "rupee",
    "rounds",
    "cubic",
    "cc",
    "mtr",
    "s",
    "ohm",
    "number",
    "kmph",
    "day",
    "hour",
    "minute",
    "min",
    "second",
    "man",
    "woman",
    "sec",
    "cube",
    "mt",
    "sq inch",
    "mp",
    "∏ cm ³",
    "hectare",
    "more",
    "sec",
    "unit",
    "cu . m",
    "cm 2",
    "rs .",
    "rs",
    "kg",
    "g",
    "month",
    "km",
    "m",
    "cm",
    "mm",
    "apple",
    "liter",
    "loss",
    "yard",
    "pure",
    "year",
    "increase",
    "decrease",
    "d",
    "less",
    "Surface",
    "litre",
    "pi sq m",
    "s .",
    "metre",
    "meter",
    "inch",
];

struct Patterns {
    left: Regex,
    right: Regex,
    permutation: Regex,
    to_remove: Regex,
    to_replace: FancyRegex,
    command_slash: Regex,
    unit_superscript: Regex,
    units: Regex,
    separator: Regex,
    malformed: Vec<(Regex, &'static str)>,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        let units = UNITS.join("|");
        Patterns {
            left: Regex::new(r"\\m?left(\\\{|\{|\\\||\||\[|\(|\\rbracl|\\lgroup|\\lbrace|\\lbrack|\\vert|\\lvert|\\lceil|\\lfloor|\\vert|\\lvert|\\langle|\\llcorner|\\ulcorner)").expect("valid regex"),
            right: Regex::new(r"\\m?right(\\\}|\}|\\\||\||\]|\)|\\rbrack|\\rgroup|\\rbrace|\\rbrack|\\vert|\\rvert|\\rceil|\\rfloor|\\vert|\\rvert|\\rangle|\\lrcorner|\\urcorner)").expect("valid regex"),
            permutation: Regex::new(r"\(([a-zA-Z0-9+\-*/\\ ]+?)\)_\{([a-zA-Z0-9+\-*/\\ ]+?)\}").expect("valid regex"),
            // math-verify's `(?<!\\)["']` is checked in `normalize`.
            to_remove: Regex::new(r#"\\mathrm\{th\}|\\!\s*|\\text\s*\{\s*\}|\\\$|\$|["']|\\displaystyle"#).expect("valid regex"),
            // One alternation; the replacement is chosen by the group that matched.
            to_replace: FancyRegex::new(concat!(
                r"(?P<math>\\math(?:rm|it|bf))",
                r"|(?P<text>\\text(?:normal|bf|it|rm))",
                r"|(?P<frac>\\(?:d|t|c)frac)",
                r"|(?P<decimal_space>\s\.)",
                r"|(?P<decimal_brace>\{\.)",
                r"|(?P<approx>~=)",
                r"|(?P<comma>\s*\{\s*,\s*\})",
                r"|(?P<and_or>(?<![a-zA-Z])(,?\s*(?:and|or))(?![a-zA-Z]))",
                r"|(?P<and_or_text>(,?\s*\\text\{\s*(?:and|or)\s*\}))",
                r"|(?P<backslash_space>(?<!\\)\\\s)",
                r"|(?P<infinity>infinity)",
                r"|(?P<dot>,?(\\ldots))",
                r"|(?P<percentage>\s*\bpercentage\b)",
                r"|(?P<percentage_in_text>\\text\{percentage\})",
                r"|(?P<percent>\s*\bpercent\b)",
                r"|(?P<percent_in_text>\\text\{percent\})",
                r"|(?P<pct>\s*\bpct\b)",
                r"|(?P<pct_in_text>\\text\{pct\})",
                r"|(?P<inf>((?<!\\)inf(?!inity)))",
                r"|(?P<sqrt> sqrt)",
            ))
            .expect("valid regex"),
            command_slash: Regex::new(r"\\\\([a-zA-Z])").expect("valid regex"),
            unit_superscript: Regex::new(r"(\\(?:text|mbox)\{.*?\})(\^\d|\{\^\d\})?$").expect("valid regex"),
            units: Regex::new(&format!(r"(\d|\}}|\s)\s*(?:(?:{units})(?:s|es)?)\s*$")).expect("valid regex"),
            separator: Regex::new(r"\b(and|or)\b|,|;").expect("valid regex"),
            malformed: vec![
                (Regex::new(r"\^\s?\((.*?)\)").expect("valid regex"), r"^{$1}"),
                (Regex::new(r"sqrt\s?\((.*?)\)").expect("valid regex"), r"\sqrt{$1}"),
                (Regex::new(r"\\frac\s?(\d)\s?(\d+)").expect("valid regex"), r"\frac{$1}{$2}"),
                (Regex::new(r"\\log_\s?(\d)\s?(\d+)").expect("valid regex"), r"\log_{$1}{$2}"),
                (Regex::new(r"\\frac\s?\{(.*?)\}\s?(\d)").expect("valid regex"), r"\frac{$1}{$2}"),
                (Regex::new(r"\\frac\s?(\d)\s?\{(.*?)\}").expect("valid regex"), r"\frac{$1}{$2}"),
                (Regex::new(r"\\sqrt\s?(\d)").expect("valid regex"), r"\sqrt{$1}"),
            ],
        }
    })
}

const REPLACEMENTS: &[(&str, &str)] = &[
    ("math", r"\text"),
    ("text", r"\text"),
    ("frac", r"\frac"),
    ("decimal_space", " 0."),
    ("decimal_brace", "{0."),
    ("approx", r"\approx"),
    ("comma", ","),
    ("and_or", ","),
    ("and_or_text", ","),
    ("backslash_space", " "),
    ("infinity", r"\infty"),
    ("dot", " "),
    ("percentage", r"\%"),
    ("percentage_in_text", "%"),
    ("percent", r"\%"),
    ("percent_in_text", "%"),
    ("pct", r"\%"),
    ("pct_in_text", "%"),
    ("inf", r"\infty"),
    ("sqrt", r"\sqrt"),
];

/// `re.sub` with a fancy regex; the text is kept as it is if the regex
/// engine gives up (backtracking limit).
fn fancy_replace(
    re: &FancyRegex,
    text: &str,
    rep: impl Fn(&fancy_regex::Captures) -> String,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for caps in re.captures_iter(text) {
        let Ok(caps) = caps else {
            return text.to_string();
        };
        let Some(m) = caps.get(0) else { continue };
        out.push_str(&text[last..m.start()]);
        out.push_str(&rep(&caps));
        last = m.end();
    }
    out.push_str(&text[last..]);
    out
}

/// Whether any of the `to_replace` alternatives can match (each needs one
/// of these pieces); most short answers need no replacement.
fn may_replace(text: &str) -> bool {
    const PIECES: &[&str] = &[
        "\\math", "\\text", "dfrac", "tfrac", "cfrac", "{.", "~=", ",", "and", "or", "inf",
        "ldots", "percent", "pct", " sqrt",
    ];
    if PIECES.iter().any(|p| text.contains(p)) {
        return true;
    }
    let mut prev: Option<char> = None;
    for c in text.chars() {
        if let Some(p) = prev {
            if (p.is_whitespace() && c == '.') || (p == '\\' && c.is_whitespace()) {
                return true;
            }
        }
        prev = Some(c);
    }
    false
}

/// `normalize_latex` with math-verify's default configuration.
pub fn normalize(text: &str, boxed: BoxedMode) -> String {
    let p = patterns();
    let mut text = extract_boxed(text, boxed);

    // Basic LaTeX.
    text = text
        .replace(r"\mathrm{T}", "T")
        .replace(r"\mathrm{d}", "d")
        .replace(r"{\rm d}", "d")
        .replace(r"\left[\begin{matrix}", r"\begin{bmatrix}")
        .replace(r"\end{matrix}\right]", r"\end{bmatrix}");
    text = p.left.replace_all(&text, "$1").into_owned();
    text = p.right.replace_all(&text, "$1").into_owned();
    text = p
        .permutation
        .replace_all(&text, r"\frac{($1)!}{(($1)-($2))!}")
        .into_owned();
    text = {
        // Quotes after a backslash stay (a lookbehind in math-verify).
        let src = text.as_str();
        let mut out = String::with_capacity(src.len());
        let mut last = 0;
        for m in p.to_remove.find_iter(src) {
            let quote = matches!(m.as_str(), "\"" | "'");
            if quote && src[..m.start()].ends_with('\\') {
                continue;
            }
            out.push_str(&src[last..m.start()]);
            last = m.end();
        }
        out.push_str(&src[last..]);
        out
    };
    if may_replace(&text) {
        text = fancy_replace(&p.to_replace, &text, |caps| {
            REPLACEMENTS
                .iter()
                .find(|(name, _)| caps.name(name).is_some())
                .map(|(_, r)| r.to_string())
                .unwrap_or_default()
        });
    }
    text = text.replace(['\n', '\t'], " ");
    if !text.contains("matrix") {
        text = p.command_slash.replace_all(&text, r"\$1").into_owned();
    }

    // Units.
    let cut = p.unit_superscript.replace(&text, "").trim().to_string();
    if !cut.is_empty() && cut != text {
        text = cut;
    }
    for _ in 0..2 {
        let cut = p.units.replace(&text, "$1").into_owned();
        if !cut.is_empty() && cut != text {
            text = cut;
        }
    }

    // Nits.
    if text.starts_with('.') {
        text.insert(0, '0');
    }
    if text == "0.5" {
        text = r"\frac{1}{2}".to_string();
    }

    // Malformed operators.
    for (re, rep) in &p.malformed {
        text = re.replace_all(&text, *rep).into_owned();
    }
    text = text.replace(" sqrt", r"\sqrt");
    text = fix_sqrt(&text);
    text = fix_fracs(&text);
    text = fix_a_slash_b(&text);
    text.trim().to_string()
}

/// `\sqrt3` → `\sqrt{3}`.
fn fix_sqrt(text: &str) -> String {
    if !text.contains(r"\sqrt") {
        return text.to_string();
    }
    let mut parts = text.split(r"\sqrt");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let part = part.trim_start();
        let mut chars = part.chars();
        match chars.next() {
            Some(c) if c != '{' && c != '[' => {
                out.push_str(&format!(r"\sqrt{{{c}}}{}", chars.as_str()));
            }
            _ => {
                out.push_str(r"\sqrt");
                out.push_str(part);
            }
        }
    }
    out
}

/// `\frac12` → `\frac{1}{2}`, `\frac1{2}` → `\frac{1}{2}`.
fn fix_fracs(text: &str) -> String {
    let mut parts = text.split(r"\frac");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let part = part.trim_start();
        out.push_str(r"\frac");
        let chars: Vec<char> = part.chars().collect();
        if chars.first() == Some(&'{') {
            out.push_str(part);
        } else if chars.len() < 2 {
            return text.to_string();
        } else {
            let (a, b) = (chars[0], chars[1]);
            let rest: String = chars[2..].iter().collect();
            if b != '{' {
                out.push_str(&format!("{{{a}}}{{{b}}}{rest}"));
            } else {
                out.push_str(&format!("{{{a}}}{b}{rest}"));
            }
        }
    }
    out
}

/// `2/3` (the whole answer) → `\frac{2}{3}`.
fn fix_a_slash_b(text: &str) -> String {
    let Some((a, b)) = text.split_once('/') else {
        return text.to_string();
    };
    if b.contains('/') {
        return text.to_string();
    }
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) if format!("{x}/{y}") == text => format!(r"\frac{{{x}}}{{{y}}}"),
        _ => text.to_string(),
    }
}

/// The contents of the `\boxed{}` / `\fbox{}` in `text`, read from the right;
/// `text` itself when there is none.
pub fn extract_boxed(text: &str, mode: BoxedMode) -> String {
    let bytes = text.as_bytes();
    let mut results: Vec<String> = Vec::new();
    let mut current = text.len();
    let mut max_pos = text.len();
    let mut last_start: Option<usize> = None;
    loop {
        let boxed = text[..current].rfind(r"\boxed");
        let fbox = text[..current].rfind(r"\fbox");
        let (start, cmd_len) = match (boxed, fbox) {
            (None, None) => break,
            (Some(b), Some(f)) if f > b => (f, 5),
            (Some(b), _) => (b, 6),
            (None, Some(f)) => (f, 5),
        };
        let mut next = start + cmd_len;
        while next < max_pos && (bytes[next] as char).is_ascii_whitespace() {
            next += 1;
        }
        if next >= max_pos {
            break;
        }
        if bytes[next] != b'{' {
            if results.is_empty() {
                results.push(text[next..].to_string());
            }
            break;
        }
        // Matching brace, before max_pos.
        let mut depth = 1;
        let mut end = None;
        let mut i = next;
        while i + 1 < max_pos {
            i += 1;
            match bytes[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            if results.is_empty() {
                results.push(text[next..].to_string());
            }
            break;
        };
        let content = text[next + 1..end].trim().to_string();
        if mode == BoxedMode::Last {
            if let Some(ls) = last_start {
                let prev = results.last().map(String::as_str).unwrap_or("");
                let between = &text[(end + 1).min(ls)..ls];
                let between_len = between.chars().count();
                let ok = between_len < 10
                    || (prev != content
                        && between_len < 70
                        && patterns().separator.is_match(between));
                if !ok {
                    break;
                }
            }
        }
        if results.last() != Some(&content) {
            results.push(content);
        }
        last_start = Some(start);
        max_pos = start;
        current = start;
    }
    if results.is_empty() {
        return text.to_string();
    }
    results.reverse();
    results.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_contents() {
        assert_eq!(
            extract_boxed(r"so \boxed{\frac{1}{2}}.", BoxedMode::Last),
            r"\frac{1}{2}"
        );
        assert_eq!(
            extract_boxed(r"\boxed{1} and \boxed{2}", BoxedMode::Last),
            "1,2"
        );
        assert_eq!(
            extract_boxed(
                r"\boxed{1} then a long stretch of words without any separator here \boxed{2}",
                BoxedMode::Last
            ),
            "2"
        );
        assert_eq!(extract_boxed("no box", BoxedMode::All), "no box");
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize(r"\dfrac12", BoxedMode::All), r"\frac{1}{2}");
        assert_eq!(normalize(r"15\mbox{ cm}^2", BoxedMode::All), "15");
        assert_eq!(normalize(r"5 \text{ dollars}", BoxedMode::All), "5");
        assert_eq!(
            normalize(r"\left( 1, 2 \right)", BoxedMode::All),
            "( 1, 2 )"
        );
        assert_eq!(normalize("10 percent", BoxedMode::All), r"10\%");
        assert_eq!(normalize("3/4", BoxedMode::All), r"\frac{3}{4}");
        assert_eq!(normalize(r"\sqrt2", BoxedMode::All), r"\sqrt{2}");
    }
}
