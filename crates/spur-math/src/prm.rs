//! PRM800K's `grade_answer(given, ground_truth)` (`math_grade.py` in the
//! paper's code): Hendrycks normalisation, a second normalisation through
//! pylatexenc, then an element-wise symbolic check.

use std::sync::OnceLock;

use regex::Regex;

use crate::{expr, hendrycks, latex2text, pyfloat};

/// The paper's verdict for an already extracted answer.
pub fn grade_answer(given: &str, ground_truth: &str) -> bool {
    if hendrycks::normalize_answer(ground_truth) == hendrycks::normalize_answer(given) {
        return true;
    }
    let gt = normalize(ground_truth);
    let given = normalize(given);
    if gt == given {
        return true;
    }
    if given.is_empty() {
        return false;
    }
    let gt_elems = split_tuple(&gt);
    let given_elems = split_tuple(&given);
    if gt_elems.len() > 1
        && (gt.chars().next() != given.chars().next() || gt.chars().last() != given.chars().last())
    {
        return false;
    }
    if gt_elems.len() != given_elems.len() {
        return false;
    }
    // An empty tuple on both sides leaves Python's `is_correct` unset (a
    // NameError); it cannot happen as both strings are non-empty here.
    gt_elems.iter().zip(&given_elems).all(|(g, a)| {
        if is_frac(g) && is_frac(a) {
            // Unreduced fractions must match as written.
            g == a
        } else if str_is_int(g) != str_is_int(a) {
            false
        } else {
            equal_under_sympy(g, a)
        }
    })
}

struct Patterns {
    text: Regex,
    units: Vec<Regex>,
    circ: Regex,
    comma_bang: Regex,
    dash: Regex,
    mixed: Regex,
    frac: Regex,
    commas: Regex,
    bad: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        let units = [
            "degree",
            "cm",
            "centimeter",
            "meter",
            "mile",
            "second",
            "minute",
            "hour",
            "day",
            "week",
            "month",
            "year",
            "foot",
            "feet",
            "inch",
            "yard",
        ];
        Patterns {
            text: Regex::new(r"^\\text\{(.+?)\}$").expect("valid regex"),
            units: units
                .iter()
                .map(|u| Regex::new(&format!(r"{u}(es)?(s)? *(\^[0-9]+)?")).expect("valid regex"))
                .collect(),
            circ: Regex::new(r"\^ *\\circ").expect("valid regex"),
            comma_bang: Regex::new(r",\\! *").expect("valid regex"),
            dash: Regex::new(r"- *").expect("valid regex"),
            mixed: Regex::new(r"([0-9]) +([0-9])").expect("valid regex"),
            frac: Regex::new(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$").expect("valid regex"),
            commas: Regex::new(r"(\d)(,)(\d\d\d)($|\D)").expect("valid regex"),
            bad: Regex::new(r"\^[0-9]+\^|\^[0-9][0-9]+").expect("valid regex"),
        }
    })
}

/// `_normalize(expr)`, the grader's second normalisation.
pub fn normalize(input: &str) -> String {
    let p = patterns();
    let mut e = match p.text.captures(input) {
        Some(c) => c[1].to_string(),
        None => input.to_string(),
    };
    e = e
        .replace("\\%", "%")
        .replace("\\$", "$")
        .replace(['$', '%'], "");
    e = e.replace(" or ", " , ").replace(" and ", " , ");
    e = e
        .replace("million", "*10^6")
        .replace("billion", "*10^9")
        .replace("trillion", "*10^12");
    for re in &p.units {
        e = re.replace_all(&e, "").into_owned();
    }
    e = p.circ.replace_all(&e, "").into_owned();
    if e.starts_with('{') && e.ends_with('}') {
        e = if e.len() >= 2 {
            e[1..e.len() - 1].to_string()
        } else {
            String::new()
        };
    }
    e = p.comma_bang.replace_all(&e, "").into_owned();
    if let Some(x) = pyfloat::parse(&e) {
        if pyfloat::is_int(x) {
            if let Some(s) = pyfloat::int_string(x.round_ties_even()) {
                e = s;
            }
        }
    }
    if e.contains('\\') {
        if let Some(t) = parse_latex(&e) {
            e = t;
        }
    }
    e = p.dash.replace_all(&e, "-").into_owned();
    e = p.mixed.replace_all(&e, "${1}+${2}").into_owned();
    e = e.replace(' ', "").replace(['{', '}'], "");
    e = e.to_lowercase();
    if str_is_int(&e) {
        if let Some(s) = pyfloat::parse(&e.replace(',', "")).and_then(pyfloat::int_string) {
            e = s;
        }
    }
    e
}

/// `_parse_latex`: pylatexenc's text rendering with sympy-friendly names.
fn parse_latex(e: &str) -> Option<String> {
    let e = e
        .replace("\\tfrac", "\\frac")
        .replace("\\dfrac", "\\frac")
        .replace("\\frac", " \\frac");
    let t = latex2text::latex_to_text(&e)?;
    let t = t
        .replace('√', "sqrt")
        .replace('π', "pi")
        .replace('∞', "inf")
        .replace('∪', "U")
        .replace(['·', '×'], "*");
    Some(t.trim().to_string())
}

fn strip_properly_formatted_commas(e: &str) -> String {
    let re = &patterns().commas;
    let mut cur = e.to_string();
    loop {
        let next = re.replace_all(&cur, "${1}${3}${4}").into_owned();
        if next == cur {
            return next;
        }
        cur = next;
    }
}

fn is_frac(e: &str) -> bool {
    patterns().frac.is_match(e)
}

fn str_is_int(e: &str) -> bool {
    pyfloat::parse(&strip_properly_formatted_commas(e)).is_some_and(pyfloat::is_int)
}

const TUPLE_CHARS: [char; 4] = ['(', ')', '[', ']'];

/// `split_tuple`: the elements of a tuple or interval, else the whole string.
pub(crate) fn split_tuple(e: &str) -> Vec<String> {
    let e = strip_properly_formatted_commas(e);
    if e.is_empty() {
        return Vec::new();
    }
    let chars: Vec<char> = e.chars().collect();
    let n = chars.len();
    if n > 2
        && TUPLE_CHARS.contains(&chars[0])
        && TUPLE_CHARS.contains(&chars[n - 1])
        && !chars[1..n - 1].iter().any(|c| TUPLE_CHARS.contains(c))
    {
        let inner: String = chars[1..n - 1].iter().collect();
        inner.split(',').map(|s| s.trim().to_string()).collect()
    } else {
        vec![e]
    }
}

/// `are_equal_under_sympy`, with `should_allow_eval`'s skip rules.
fn equal_under_sympy(gt: &str, given: &str) -> bool {
    let e = format!("({gt})-({given})");
    if !should_allow_eval(&e) {
        return false;
    }
    expr::is_zero(&e.replace('^', "**"))
}

fn should_allow_eval(e: &str) -> bool {
    let stripped = e.replace("sqrt", "").replace("frac", "");
    let mut letters: Vec<char> = stripped.chars().filter(|c| c.is_alphabetic()).collect();
    letters.sort_unstable();
    letters.dedup();
    letters.len() <= 2 && !e.contains("^{") && !e.contains("^(") && !patterns().bad.is_match(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_prm800k() {
        assert_eq!(normalize(r"\frac{11+9a}{20}"), "11+9a/20");
        assert_eq!(normalize(r"1\frac{4}{5}"), "1+4/5");
        assert_eq!(normalize("10.0"), "10");
        assert_eq!(normalize(r"15\mbox{ cm}^2"), "15^2");
        assert_eq!(normalize(r"\text{East}"), "east");
        assert_eq!(normalize("1,000"), "1000");
    }

    #[test]
    fn grades_like_prm800k() {
        assert!(grade_answer(r"\frac{1}{2}", "0.5"));
        assert!(grade_answer("142", "142.0"));
        assert!(grade_answer("25", "025"));
        assert!(grade_answer(r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"));
        assert!(!grade_answer(r"\frac{2240}{78125}", r"\frac{448}{15625}"));
        assert!(!grade_answer("-2,1", "1,-2"));
        assert!(!grade_answer("15", r"15\mbox{ cm}^2"));
        assert!(grade_answer("(1,2)", "(1, 2)"));
    }
}
