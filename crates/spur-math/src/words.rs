//! English number words → digits, with the behaviour of PyPI `word2number` 1.1
//! (`w2n.word_to_num`) as Qwen's `strip_string` calls it: any string with at
//! least one number word in it is replaced by the number, other words ignored.

use crate::pyfloat;

fn value(word: &str) -> Option<u64> {
    Some(match word {
        "zero" => 0,
        "one" => 1,
        "two" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" => 9,
        "ten" => 10,
        "eleven" => 11,
        "twelve" => 12,
        "thirteen" => 13,
        "fourteen" => 14,
        "fifteen" => 15,
        "sixteen" => 16,
        "seventeen" => 17,
        "eighteen" => 18,
        "nineteen" => 19,
        "twenty" => 20,
        "thirty" => 30,
        "forty" => 40,
        "fifty" => 50,
        "sixty" => 60,
        "seventy" => 70,
        "eighty" => 80,
        "ninety" => 90,
        "hundred" => 100,
        "thousand" => 1_000,
        "million" => 1_000_000,
        "billion" => 1_000_000_000,
        _ => return None,
    })
}

/// `str(w2n.word_to_num(text))`, or `text` unchanged where it raises.
pub fn convert_word_number(text: &str) -> String {
    word_to_num(text).unwrap_or_else(|| text.to_string())
}

fn word_to_num(text: &str) -> Option<String> {
    let sentence = text.replace('-', " ").to_lowercase();
    if !sentence.is_empty() && sentence.chars().all(|c| c.is_numeric()) {
        // `str.isdigit()` then `int()`: only plain decimal digits convert.
        if sentence.bytes().all(|b| b.is_ascii_digit()) {
            let trimmed = sentence.trim_start_matches('0');
            return Some(if trimmed.is_empty() { "0" } else { trimmed }.to_string());
        }
        return None;
    }
    let mut words: Vec<&str> = sentence
        .split_whitespace()
        .filter(|w| *w == "point" || value(w).is_some())
        .collect();
    if words.is_empty() {
        return None;
    }
    let count = |w: &str, ws: &[&str]| ws.iter().filter(|x| **x == w).count();
    if ["thousand", "million", "billion", "point"]
        .iter()
        .any(|w| count(w, &words) > 1)
    {
        return None;
    }
    let mut decimals: Vec<&str> = Vec::new();
    if let Some(p) = words.iter().position(|w| *w == "point") {
        decimals = words[p + 1..].to_vec();
        words.truncate(p);
    }
    let index = |w: &str| words.iter().position(|x| *x == w);
    let (bi, mi, ti) = (index("billion"), index("million"), index("thousand"));
    let before = |a: Option<usize>, b: Option<usize>| matches!((a, b), (Some(a), Some(b)) if a < b);
    if before(ti, mi) || before(ti, bi) || before(mi, bi) {
        return None;
    }
    let mut total: u128 = 0;
    if words.len() == 1 {
        total = value(words[0])? as u128;
    } else if words.len() > 1 {
        if let Some(b) = bi {
            total += formation(&words[..b])? * 1_000_000_000;
        }
        if let Some(m) = mi {
            let from = bi.map_or(0, |b| b + 1);
            total += formation(words.get(from..m)?)? * 1_000_000;
        }
        if let Some(t) = ti {
            let from = mi.or(bi).map_or(0, |x| x + 1);
            total += formation(words.get(from..t)?)? * 1_000;
        }
        let last = words.len() - 1;
        let hundreds = if ti.is_some() && ti != Some(last) {
            formation(&words[ti? + 1..])?
        } else if mi.is_some() && mi != Some(last) {
            formation(&words[mi? + 1..])?
        } else if bi.is_some() && bi != Some(last) {
            formation(&words[bi? + 1..])?
        } else if ti.is_none() && mi.is_none() && bi.is_none() {
            formation(&words)?
        } else {
            0
        };
        total += hundreds;
    }
    if decimals.is_empty() {
        return Some(total.to_string());
    }
    const DIGITS: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let mut frac = String::from("0.");
    for w in &decimals {
        match DIGITS.iter().position(|d| d == w) {
            Some(d) => frac.push(char::from(b'0' + d as u8)),
            // `get_decimal_sum` returns the int 0: the total stays an int.
            None => return Some(total.to_string()),
        }
    }
    let x = total as f64 + frac.parse::<f64>().ok()?;
    Some(pyfloat::repr(x))
}

/// `number_formation`: the value of a group of up to four number words.
/// `None` where Python raises (an empty group, or "point" inside one).
fn formation(words: &[&str]) -> Option<u128> {
    let n: Vec<u128> = words
        .iter()
        .map(|w| value(w).map(u128::from))
        .collect::<Option<_>>()?;
    Some(match n.len() {
        0 => return None,
        4 => n[0] * n[1] + n[2] + n[3],
        3 => n[0] * n[1] + n[2],
        2 if n.contains(&100) => n[0] * n[1],
        2 => n[0] + n[1],
        _ => n[0],
    })
}

#[cfg(test)]
mod tests {
    use super::convert_word_number as c;

    #[test]
    fn converts_like_word2number() {
        assert_eq!(c("five"), "5");
        assert_eq!(c("Two hundred and one"), "201");
        assert_eq!(c("one solution"), "1");
        assert_eq!(c("007"), "7");
        assert_eq!(c("-5"), "-5");
        assert_eq!(c("x+1"), "x+1");
        assert_eq!(c("two point five"), "2.5");
        assert_eq!(c("point"), "0");
        assert_eq!(c("thousand thousand"), "thousand thousand");
        // word2number's own arithmetic, bug included.
        assert_eq!(c("three million two thousand"), "3003002");
    }
}
