//! PRM800K's `math_normalize.normalize_answer`: the Hendrycks MATH
//! normalisation, the first string comparison of `grade_answer`.

use std::sync::OnceLock;

use regex::Regex;

use crate::extract::{fix_a_slash_b, fix_fracs_checked};

/// `normalize_answer(answer)`. Where Python raises inside `_strip_string`
/// (an `\sqrt` or `\frac` at the very end, or two `"\text{ "`), the answer
/// is returned as it stood after the `\text{}` unwrapping, as Python does.
pub fn normalize_answer(answer: &str) -> String {
    let mut answer = answer.trim().to_string();
    static TEXT: OnceLock<Regex> = OnceLock::new();
    let re = TEXT.get_or_init(|| Regex::new(r"^\\text\{(.+?)\}$").expect("valid regex"));
    if let Some(c) = re.captures(&answer) {
        answer = c[1].trim().to_string();
    }
    strip_string(&answer).unwrap_or(answer)
}

fn strip_string(input: &str) -> Option<String> {
    let mut s = input.replace('\n', "");
    s = s.replace("\\!", "");
    s = s.replace("\\\\", "\\");
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "");
    s = remove_right_units(&s)?;
    s = s.replace("\\%", "");
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    let parts: Vec<&str> = s.split('=').collect();
    if parts.len() == 2 && parts[0].chars().count() <= 2 {
        s = parts[1].to_string();
    }
    s = fix_sqrt(&s)?;
    s = s.replace(' ', "");
    s = fix_fracs_checked(&s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    Some(fix_a_slash_b(&s, false))
}

/// Everything before `"\text{ "` (a unit). Two of them make Python's assert fail.
fn remove_right_units(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split("\\text{ ").collect();
    match parts.len() {
        1 => Some(s.to_string()),
        2 => Some(parts[0].to_string()),
        _ => None,
    }
}

/// `\sqrt3` → `\sqrt{3}` (one character). An `\sqrt` at the end raises in Python.
fn fix_sqrt(s: &str) -> Option<String> {
    if !s.contains("\\sqrt") {
        return Some(s.to_string());
    }
    let mut pieces = s.split("\\sqrt");
    let mut out = pieces.next().unwrap_or("").to_string();
    for piece in pieces {
        let first = piece.chars().next()?;
        out.push_str("\\sqrt");
        if first != '{' {
            out.push('{');
            out.push(first);
            out.push('}');
            out.push_str(&piece[first.len_utf8()..]);
        } else {
            out.push_str(piece);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::normalize_answer as n;

    #[test]
    fn hendrycks() {
        assert_eq!(n(r"\text{ (A) }"), "(A)");
        assert_eq!(n(r"\dfrac12"), r"\frac{1}{2}");
        assert_eq!(n("0.5"), r"\frac{1}{2}");
        assert_eq!(n("k = 3/4"), r"\frac{3}{4}");
        assert_eq!(n(r"5\text{ cm}"), "5");
        assert_eq!(n(r"\sqrt3+1"), r"\sqrt{3}+1");
        // Python raises on a trailing \sqrt and returns the input.
        assert_eq!(n(r"2 \sqrt"), r"2 \sqrt");
        assert_eq!(n(r"1\text{ a}\text{ b}"), r"1\text{ a}\text{ b}");
    }
}
