//! Hand-written matchers for math-verify's LaTeX-environment regexes (the
//! slow part of extraction when run through a backtracking regex engine).
//!
//! Each function returns exactly the matches Python's `re.finditer` gives
//! for the corresponding pattern: one environment (`$$…$$`, `\[…\]`, `$…$`,
//! `\(…\)`, ` […] `, or a plain `\frac{1}{2}`) with the shortest content
//! that closes it, an optional percent sign, and up to five more
//! environments joined by "and" / "or" / ",". In the "boxed" variant every
//! environment must contain a `\boxed{…}`.

/// The kind of environment (the regex group name without prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    DisplayDollar,
    DisplayBracket,
    InlineDollar,
    InlineParenthesis,
    InlineBracket,
    Fraction,
}

/// One matched environment: the byte range of its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub kind: Kind,
    pub content: (usize, usize),
    pub percent: bool,
}

/// A whole match: its byte range and its environments (first, then chained).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvsMatch {
    pub start: usize,
    pub end: usize,
    pub envs: Vec<Env>,
}

fn char_at(t: &str, i: usize) -> Option<char> {
    t.get(i..)?.chars().next()
}

fn prev_char(t: &str, i: usize) -> Option<char> {
    t.get(..i)?.chars().next_back()
}

fn next_pos(t: &str, i: usize) -> usize {
    match t.as_bytes().get(i) {
        Some(&c) if c < 0x80 => i + 1,
        _ => i + char_at(t, i).map_or(1, char::len_utf8),
    }
}

/// After any whitespace from `i`.
fn skip_ws(t: &str, mut i: usize) -> usize {
    while let Some(c) = char_at(t, i) {
        if !c.is_whitespace() {
            break;
        }
        i += c.len_utf8();
    }
    i
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// Tracks the `\boxed{X}` the boxed variant requires before the closer.
struct BoxedNeed {
    active: bool,
    /// Where the first `\boxed{` starts.
    open: Option<usize>,
    /// Closing is allowed from here (after the `}` ending a non-empty X).
    close_from: Option<usize>,
}

impl BoxedNeed {
    fn new(active: bool) -> BoxedNeed {
        BoxedNeed {
            active,
            open: None,
            close_from: None,
        }
    }
    /// Sees the content byte at `j`.
    fn see(&mut self, t: &str, j: usize) {
        if !self.active || self.close_from.is_some() {
            return;
        }
        let c = t.as_bytes()[j];
        if (self.open.is_none() && c != b'\\') || (self.open.is_some() && c != b'}') {
            return;
        }
        match self.open {
            None => {
                if t[j..].starts_with("\\boxed{") {
                    self.open = Some(j);
                }
            }
            Some(p) => {
                if j >= p + 8 && t.as_bytes()[j] == b'}' {
                    self.close_from = Some(j + 1);
                }
            }
        }
    }
    fn may_close(&self, k: usize) -> bool {
        !self.active || self.close_from.is_some_and(|c| k >= c)
    }
}

/// `$$ … $$`: content of chars other than a `$` followed by `$`.
fn display_dollar(t: &str, from: usize, boxed: bool) -> Option<usize> {
    let b = t.as_bytes();
    let mut need = BoxedNeed::new(boxed);
    let mut j = from;
    while j < b.len() {
        if b[j] == b'$' && b.get(j + 1) == Some(&b'$') {
            if j > from && b[j - 1] != b'\\' && need.may_close(j) {
                return Some(j);
            }
            return None;
        }
        need.see(t, j);
        j = next_pos(t, j);
    }
    None
}

/// `\[ … \]`: content of chars other than a `\` followed by `]`.
fn display_bracket(t: &str, from: usize, boxed: bool) -> Option<usize> {
    let b = t.as_bytes();
    let mut need = BoxedNeed::new(boxed);
    let mut j = from;
    while j < b.len() {
        if b[j] == b'\\' && b.get(j + 1) == Some(&b']') {
            if j > from && b[j - 1] != b'\\' && need.may_close(j) {
                return Some(j);
            }
            return None;
        }
        need.see(t, j);
        j = next_pos(t, j);
    }
    None
}

/// `$ … $`: one line; `\$` is content.
fn inline_dollar(t: &str, from: usize, boxed: bool) -> Option<usize> {
    let b = t.as_bytes();
    let mut need = BoxedNeed::new(boxed);
    let mut j = from;
    while j < b.len() {
        match b[j] {
            b'$' => {
                if j > from && b[j - 1] != b'\\' && need.may_close(j) {
                    return Some(j);
                }
                return None;
            }
            b'\n' => return None,
            b'\\' if b.get(j + 1) == Some(&b'$') => {
                j += 2;
                continue;
            }
            _ => {}
        }
        need.see(t, j);
        j = next_pos(t, j);
    }
    None
}

/// `\( … \)`: one line.
fn inline_parenthesis(t: &str, from: usize, boxed: bool) -> Option<usize> {
    let b = t.as_bytes();
    let mut need = BoxedNeed::new(boxed);
    let mut j = from;
    while j < b.len() {
        if b[j] == b'\\' && b.get(j + 1) == Some(&b')') {
            if j > from && b[j - 1] != b'\\' && need.may_close(j) {
                return Some(j);
            }
            return None;
        }
        if b[j] == b'\n' {
            return None;
        }
        need.see(t, j);
        j = next_pos(t, j);
    }
    None
}

/// ` [ … ] `: one line, no brackets inside, whitespace after `]`.
fn inline_bracket(t: &str, from: usize, boxed: bool) -> Option<usize> {
    let b = t.as_bytes();
    let mut need = BoxedNeed::new(boxed);
    let mut j = from;
    while j < b.len() {
        match b[j] {
            b']' => {
                let ws_after = char_at(t, j + 1).is_some_and(char::is_whitespace);
                if j > from && ws_after && need.may_close(j) {
                    return Some(j);
                }
                return None;
            }
            b'\n' | b'[' => return None,
            _ => {}
        }
        need.see(t, j);
        j = next_pos(t, j);
    }
    None
}

/// `-?\d+(?:[.,]\d+)?` then `}`: the position after the `}`.
fn frac_number(t: &str, mut i: usize) -> Option<usize> {
    let b = t.as_bytes();
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    if i == start {
        return None;
    }
    if matches!(b.get(i), Some(b'.' | b',')) && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    (b.get(i) == Some(&b'}')).then_some(i + 1)
}

/// `-?\frac{N}{N}`: the end of the match.
fn fraction(t: &str, i: usize) -> Option<usize> {
    let s = if t.as_bytes().get(i) == Some(&b'-') {
        i + 1
    } else {
        i
    };
    if !t[s..].starts_with("\\frac{") {
        return None;
    }
    let after = frac_number(t, s + 6)?;
    if t.as_bytes().get(after) != Some(&b'{') {
        return None;
    }
    frac_number(t, after + 1)
}

/// The optional `\s*` + percent sign after an environment: (end, percent).
fn percent_after(t: &str, k: usize) -> (usize, bool) {
    let q = skip_ws(t, k);
    let rest = &t[q..];
    for p in ["\\%", "%", "percent", "Percent", "pct", "Pct"] {
        if rest.starts_with(p) {
            return (q + p.len(), true);
        }
    }
    (q, false)
}

/// One environment starting exactly at `i` (alternatives in regex order).
fn env_at(t: &str, i: usize, boxed: bool) -> Option<(Env, usize)> {
    let rest = t.get(i..)?;
    let prev = prev_char(t, i);
    let done = |kind: Kind, from: usize, close: usize, closer_len: usize| {
        let (end, percent) = percent_after(t, close + closer_len);
        Some((
            Env {
                kind,
                content: (from, close),
                percent,
            },
            end,
        ))
    };
    if rest.starts_with("$$") && prev != Some('\\') {
        if let Some(k) = display_dollar(t, i + 2, boxed) {
            return done(Kind::DisplayDollar, i + 2, k, 2);
        }
    }
    if rest.starts_with("\\[") && prev != Some('\\') {
        if let Some(k) = display_bracket(t, i + 2, boxed) {
            return done(Kind::DisplayBracket, i + 2, k, 2);
        }
    }
    if rest.starts_with('$') && prev != Some('\\') && !prev.is_some_and(is_digit) {
        if let Some(k) = inline_dollar(t, i + 1, boxed) {
            return done(Kind::InlineDollar, i + 1, k, 1);
        }
    }
    if rest.starts_with("\\(") && prev != Some('\\') {
        if let Some(k) = inline_parenthesis(t, i + 2, boxed) {
            return done(Kind::InlineParenthesis, i + 2, k, 2);
        }
    }
    if let Some(c) = char_at(t, i).filter(|c| c.is_whitespace()) {
        let o = i + c.len_utf8();
        if t.as_bytes().get(o) == Some(&b'[') {
            if let Some(k) = inline_bracket(t, o + 1, boxed) {
                let ws = char_at(t, k + 1).map_or(1, char::len_utf8);
                return done(Kind::InlineBracket, o + 1, k, 1 + ws);
            }
        }
    }
    if !boxed {
        if let Some(end) = fraction(t, i) {
            let (end2, percent) = percent_after(t, end);
            return Some((
                Env {
                    kind: Kind::Fraction,
                    content: (i, end),
                    percent,
                },
                end2,
            ));
        }
    }
    None
}

/// `\s*` then an environment: greedy, giving back one whitespace char for
/// the ` [ … ] ` form.
fn env_after_ws(t: &str, p: usize, boxed: bool) -> Option<(Env, usize)> {
    let q = skip_ws(t, p);
    if let Some(m) = env_at(t, q, boxed) {
        return Some(m);
    }
    if q > p {
        let back = q - prev_char(t, q).map_or(1, char::len_utf8);
        return env_at(t, back, boxed);
    }
    None
}

/// `,?and|,?or|,` at `p`: the position after it, in regex alternative order.
fn separators(t: &str, p: usize) -> Vec<usize> {
    let rest = &t[p..];
    let mut out = Vec::new();
    for s in [",and", "and", ",or", "or", ","] {
        if rest.starts_with(s) {
            out.push(p + s.len());
        }
    }
    out
}

/// The first environment at `i` and its chained followers.
fn envs_at(t: &str, i: usize, boxed: bool) -> Option<EnvsMatch> {
    let (first, mut end) = env_at(t, i, boxed)?;
    let mut envs = vec![first];
    for _ in 0..5 {
        if boxed {
            end = skip_ws(t, end);
        }
        let p = skip_ws(t, end);
        let next = separators(t, p)
            .into_iter()
            .find_map(|s| env_after_ws(t, s, boxed));
        match next {
            Some((env, e)) => {
                envs.push(env);
                end = e;
            }
            None => break,
        }
    }
    Some(EnvsMatch {
        start: i,
        end,
        envs,
    })
}

/// `finditer` of the environments pattern (priority 300, or 50 when boxed).
pub fn find_all(t: &str, boxed: bool) -> Vec<EnvsMatch> {
    let b = t.as_bytes();
    let mut out = Vec::new();
    // A boxed match contains a `\boxed{`, so none starts after the last one.
    let limit = if boxed {
        t.rfind("\\boxed{").map_or(0, |k| k + 1)
    } else {
        b.len()
    };
    let mut cursors = (0usize, 0usize);
    let mut i = 0;
    // Every alternative starts at a `$` or `\`, at `-\frac{`, or at the
    // whitespace before a `[`: jump between those bytes, trying starts in
    // increasing order as the regex does.
    while i < limit {
        let Some(k) = memchr::memchr3(b'$', b'\\', b'[', &b[i..limit.min(b.len())]) else {
            break;
        };
        let j = i + k;
        let mut starts: [Option<usize>; 2] = [None, None];
        match b[j] {
            b'[' => {
                if let Some(c) = prev_char(t, j).filter(|c| c.is_whitespace()) {
                    let s = j - c.len_utf8();
                    if s >= i {
                        starts[0] = Some(s);
                    }
                }
            }
            b'\\' => {
                if !boxed && j > i && b[j - 1] == b'-' && b[j..].starts_with(b"\\frac{") {
                    starts[0] = Some(j - 1);
                }
                if matches!(b.get(j + 1), Some(b'[' | b'('))
                    || (!boxed && b[j..].starts_with(b"\\frac{"))
                {
                    starts[1] = Some(j);
                }
            }
            _ => starts[1] = Some(j),
        }
        let mut matched = false;
        for s in starts.into_iter().flatten() {
            // Boxed inline forms (one line) need a `\boxed{` on this line.
            if boxed && !display_start(b, s) && !box_on_line(t, s, &mut cursors) {
                continue;
            }
            if let Some(m) = envs_at(t, s, boxed) {
                i = m.end.max(s + 1);
                out.push(m);
                matched = true;
                break;
            }
        }
        if !matched {
            i = j + 1;
        }
    }
    out
}

/// Whether a display environment (`$$`, `\\[`) starts at `i`.
fn display_start(b: &[u8], i: usize) -> bool {
    b[i..].starts_with(b"$$") || b[i..].starts_with(b"\\[")
}

/// Whether a `\boxed{` starts after `i` before the next newline after
/// `i`; `cursors` caches both (start them at 0).
fn box_on_line(t: &str, i: usize, cursors: &mut (usize, usize)) -> bool {
    let find = |from: usize, pat: &str| {
        t.get(from..)
            .and_then(|r| r.find(pat))
            .map_or(usize::MAX, |k| from + k)
    };
    if cursors.0 != usize::MAX && cursors.0 <= i {
        cursors.0 = find(i + 1, "\\boxed{");
    }
    if cursors.1 != usize::MAX && cursors.1 <= i {
        cursors.1 = find(i + 1, "\n");
    }
    cursors.0 != usize::MAX && cursors.0 < cursors.1
}

/// Search for the lower-case `word` in `lower` (the text, ASCII
/// lower-cased: same byte offsets) from `from`.
fn find_ci(lower: &str, word: &str, from: usize) -> Option<usize> {
    lower.get(from..)?.find(word).map(|k| from + k)
}

/// `(?i:answer):?.{0,50}?ENVS` (priority 100 with the colon, 200 without).
pub fn find_answer(t: &str, colon: bool) -> Vec<EnvsMatch> {
    let mut out = Vec::new();
    let mut from = 0;
    let lower = t.to_ascii_lowercase();
    while let Some(a) = find_ci(&lower, "answer", from) {
        let mut p = a + 6;
        if colon {
            if t.as_bytes().get(p) != Some(&b':') {
                from = a + 1;
                continue;
            }
            p += 1;
        }
        let mut found = None;
        let mut q = p;
        for _ in 0..=50 {
            if let Some(m) = envs_at(t, q, false) {
                found = Some(m);
                break;
            }
            if q >= t.len() {
                break;
            }
            q = next_pos(t, q);
        }
        match found {
            Some(m) => {
                from = m.end;
                out.push(EnvsMatch { start: a, ..m });
            }
            None => from = a + 1,
        }
    }
    out
}

/// `(?i:final answer.{0,100}?)\s+is\:?\s*ENVS` (priority 50).
pub fn find_final_answer(t: &str) -> Vec<EnvsMatch> {
    let mut out = Vec::new();
    let mut from = 0;
    let lower = t.to_ascii_lowercase();
    while let Some(a) = find_ci(&lower, "final answer", from) {
        let mut found = None;
        let mut p = a + 12;
        for _ in 0..=100 {
            let r = skip_ws(t, p);
            if r > p && t[r..].starts_with("is") {
                let mut s = r + 2;
                if t.as_bytes().get(s) == Some(&b':') {
                    s += 1;
                }
                let q = skip_ws(t, s);
                let m = envs_at(t, q, false).or_else(|| {
                    (q > s)
                        .then(|| q - prev_char(t, q).map_or(1, char::len_utf8))
                        .and_then(|b| envs_at(t, b, false))
                });
                if let Some(m) = m {
                    found = Some(m);
                    break;
                }
            }
            if p >= t.len() {
                break;
            }
            p = next_pos(t, p);
        }
        match found {
            Some(m) => {
                from = m.end;
                out.push(EnvsMatch { start: a, ..m });
            }
            None => from = a + 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(t: &str, boxed: bool) -> Vec<String> {
        find_all(t, boxed)
            .iter()
            .flat_map(|m| {
                m.envs
                    .iter()
                    .map(|e| t[e.content.0..e.content.1].to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn environments() {
        assert_eq!(
            contents("so $x$ and $$y$$ or \\[z\\] then \\(w\\) a [v] b", false),
            vec!["x", "y", "z", "w", "v"]
        );
        assert_eq!(contents("cost 5$ and $3$", false), vec!["3"]);
        assert_eq!(contents("$a$ $\\boxed{1}$", true), vec!["\\boxed{1}"]);
        assert_eq!(
            contents("\\frac{1}{2} and -\\frac{3}{4}", false),
            vec!["\\frac{1}{2}", "-\\frac{3}{4}"]
        );
        let m = find_all("$1$, $2$ and $3$ %", false);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].envs.len(), 3);
        assert!(m[0].envs[2].percent);
    }

    #[test]
    fn anchored() {
        let t = "The answer: is $5$.";
        assert_eq!(find_answer(t, true).len(), 1);
        assert_eq!(
            find_final_answer("The final answer is $\\frac{1}{2}$. I hope").len(),
            1
        );
    }
}
