//! Python's `float()` and `int()` conversions, which the paper's grader uses to
//! decide what counts as a number.

use num_bigint::BigInt;
use num_traits::FromPrimitive;

/// `float(s)` as Python parses it: surrounding whitespace, an optional sign,
/// digits with single underscores between them, an optional fraction and
/// exponent, or `inf`/`infinity`/`nan` in any case. `None` where Python raises.
pub fn parse(s: &str) -> Option<f64> {
    let t = s.trim_matches(|c: char| c.is_whitespace());
    let (sign, body) = match t.as_bytes().first() {
        Some(b'+') => (1.0, &t[1..]),
        Some(b'-') => (-1.0, &t[1..]),
        _ => (1.0, t),
    };
    let lower = body.to_ascii_lowercase();
    match lower.as_str() {
        "inf" | "infinity" => return Some(sign * f64::INFINITY),
        "nan" => return Some(f64::NAN),
        _ => {}
    }
    let bytes = body.as_bytes();
    let mut clean = String::with_capacity(bytes.len());
    let mut i = 0;
    let digits = |i: &mut usize, clean: &mut String| -> usize {
        let start = *i;
        let mut n = 0;
        while *i < bytes.len() {
            let b = bytes[*i];
            if b.is_ascii_digit() {
                clean.push(b as char);
                n += 1;
                *i += 1;
            } else if b == b'_'
                && *i > start
                && *i + 1 < bytes.len()
                && bytes[*i - 1].is_ascii_digit()
                && bytes[*i + 1].is_ascii_digit()
            {
                *i += 1;
            } else {
                break;
            }
        }
        n
    };
    let int_digits = digits(&mut i, &mut clean);
    let mut frac_digits = 0;
    if i < bytes.len() && bytes[i] == b'.' {
        clean.push('.');
        i += 1;
        frac_digits = digits(&mut i, &mut clean);
    }
    if int_digits + frac_digits == 0 {
        return None;
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        clean.push('e');
        i += 1;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            clean.push(bytes[i] as char);
            i += 1;
        }
        if digits(&mut i, &mut clean) == 0 {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    clean.parse::<f64>().ok().map(|v| sign * v)
}

/// `str(int(x))` for a finite float (truncation toward zero), exact for any
/// magnitude as Python's arbitrary-precision ints are.
pub fn int_string(x: f64) -> Option<String> {
    BigInt::from_f64(x.trunc()).map(|b| b.to_string())
}

/// `abs(x - int(round(x))) <= 1e-7`, Python's `_is_int` (false for inf/nan,
/// where Python raises and the grader catches it).
pub fn is_int(x: f64) -> bool {
    if !x.is_finite() {
        return false;
    }
    let r = x.round_ties_even();
    // For |x| >= 2^53 the float is already an integer; the subtraction in
    // Python is done on a big int and converted back, which gives 0 as well.
    (x - r).abs() <= 1e-7
}

/// Python's `repr(float)` for the values the word-number conversion can make.
pub fn repr(x: f64) -> String {
    if x.is_finite() && x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_python() {
        assert_eq!(parse(" 1_000.5 "), Some(1000.5));
        assert_eq!(parse("1."), Some(1.0));
        assert_eq!(parse(".5"), Some(0.5));
        assert_eq!(parse("-2e3"), Some(-2000.0));
        assert!(parse("Infinity").unwrap().is_infinite());
        assert_eq!(parse("1__0"), None);
        assert_eq!(parse("_1"), None);
        assert_eq!(parse("1e"), None);
        assert_eq!(parse("."), None);
        assert_eq!(parse("0x10"), None);
        assert_eq!(parse("1,000"), None);
    }

    #[test]
    fn ints() {
        assert!(is_int(3.00000001));
        assert!(!is_int(3.5));
        assert!(!is_int(f64::INFINITY));
        assert_eq!(int_string(-3.9).unwrap(), "-3");
        assert_eq!(int_string(1e20).unwrap(), "100000000000000000000");
        assert_eq!(repr(5.0), "5.0");
        assert_eq!(repr(2.25), "2.25");
    }
}
