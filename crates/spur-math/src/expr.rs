//! The symbolic check of PRM800K's grader: `sympy.simplify(parse_expr(s)) == 0`
//! for `s = "(gold)-(given)"`, parsed as sympy's `parse_expr` with implicit
//! multiplication reads it (Python tokens, `^` already turned into `**`).
//!
//! Instead of simplifying, the difference is evaluated: exactly with rational
//! arithmetic when it only involves rationals and integer powers, otherwise in
//! complex floating point at random points for its symbols (sympy symbols are
//! complex, so identities that only hold for positive reals, such as
//! `sqrt(x^2) = x`, are rejected as sympy rejects them).

use num_bigint::BigInt;
use num_complex::Complex64;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// Whether `expr` is identically zero as sympy would decide. `false` where
/// sympy raises (syntax errors, tuples, unknown functions).
pub fn is_zero(expr: &str) -> bool {
    let Some(tokens) = tokenize(expr) else {
        return false;
    };
    let tokens = implicit_multiplication(split_names(tokens));
    let mut p = Parser { t: &tokens, i: 0 };
    let Some(ast) = p.sum() else {
        return false;
    };
    if p.i != tokens.len() {
        return false;
    }
    let mut symbols = Vec::new();
    ast.symbols(&mut symbols);
    if let Some(v) = ast.exact() {
        return v.is_zero();
    }
    let has_float = ast.has_float();
    let mut finite = 0;
    for point in 0..4u64 {
        let values: Vec<Complex64> = (0..symbols.len())
            .map(|k| sample(point, k as u64))
            .collect();
        let env = Env {
            symbols: &symbols,
            values: &values,
        };
        let Some((d, scale)) = ast.eval_diff(&env) else {
            continue;
        };
        if !(d.re.is_finite() && d.im.is_finite()) {
            continue;
        }
        finite += 1;
        let tol = if has_float { 4.0 * f64::EPSILON } else { 1e-9 };
        if d.norm() > tol * scale.max(1.0) {
            return false;
        }
    }
    finite > 0
}

/// A fixed pseudo-random complex point (splitmix64 of the point and symbol).
pub(crate) fn sample(point: u64, symbol: u64) -> Complex64 {
    let u = |k: u64| {
        let mut z = point
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(symbol.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            .wrapping_add(k);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    };
    // Both half-planes, away from 0, so that branch-dependent identities fail.
    let r = 0.5 + 1.5 * u(1);
    let theta = std::f64::consts::TAU * u(2);
    Complex64::from_polar(r, theta)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// An integer literal.
    Int(BigInt),
    /// A float literal (sympy `Float`).
    Float(f64),
    /// `2j`: an imaginary literal.
    Imag(f64),
    Name(String),
    Op(&'static str),
}

const FUNCTIONS: &[&str] = &["sqrt", "ln"];

/// Python's tokenizer, for the characters an answer can hold. `None` for
/// anything Python or sympy would reject.
fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, ' ' | '\t' | '\n' | '\r' | '\x0c') {
            i += 1;
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let (tok, next) = number(&c, i)?;
            out.push(tok);
            i = next;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let name: String = c[start..i].iter().collect();
            if matches!(name.as_str(), "if" | "in" | "is" | "or" | "as") {
                return None;
            }
            out.push(Tok::Name(name));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let op: &'static str = match two.as_str() {
                "**" => "**",
                "//" => "//",
                _ => match ch {
                    '+' => "+",
                    '-' => "-",
                    '*' => "*",
                    '/' => "/",
                    '%' => "%",
                    '(' => "(",
                    ')' => ")",
                    '!' => "!",
                    _ => return None,
                },
            };
            i += op.len();
            out.push(Tok::Op(op));
        }
    }
    Some(out)
}

/// One Python number literal starting at `i`: int (a leading `0` ends the
/// literal, so `012` reads as `0` then `12`), float, or imaginary.
fn number(c: &[char], start: usize) -> Option<(Tok, usize)> {
    let digits = |mut i: usize| -> usize {
        while i < c.len()
            && (c[i].is_ascii_digit()
                || (c[i] == '_'
                    && i > start
                    && c[i - 1].is_ascii_digit()
                    && c.get(i + 1).is_some_and(char::is_ascii_digit)))
        {
            i += 1;
        }
        i
    };
    let int_end = digits(start);
    let mut end = int_end;
    let mut is_float = false;
    if c.get(end) == Some(&'.') {
        is_float = true;
        end = digits(end + 1);
    }
    if matches!(c.get(end), Some('e') | Some('E')) {
        let mut k = end + 1;
        if matches!(c.get(k), Some('+') | Some('-')) {
            k += 1;
        }
        if c.get(k).is_some_and(char::is_ascii_digit) {
            is_float = true;
            end = digits(k);
        }
    }
    let text: String = c[start..end].iter().filter(|ch| **ch != '_').collect();
    if matches!(c.get(end), Some('j') | Some('J')) {
        return Some((Tok::Imag(text.parse().ok()?), end + 1));
    }
    if is_float {
        return Some((Tok::Float(text.parse().ok()?), end));
    }
    // Decimal integers: "0" (or "00…") stands alone; others have no leading 0.
    if c[start] == '0' {
        let mut k = start;
        while k < int_end && (c[k] == '0' || c[k] == '_') {
            k += 1;
        }
        return Some((Tok::Int(BigInt::zero()), k));
    }
    Some((Tok::Int(text.parse().ok()?), end))
}

/// sympy's `auto_symbol` + `split_symbols`: an unknown multi-letter name is a
/// product of one-letter symbols (digit runs become numbers); names with `_`
/// or that are Greek letters stay whole.
fn split_names(tokens: Vec<Tok>) -> Vec<Tok> {
    const GREEK: &[&str] = &[
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
        "lambda", "mu", "nu", "xi", "omicron", "rho", "sigma", "tau", "upsilon", "phi", "chi",
        "psi", "omega",
    ];
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Tok::Name(n)
                if n.chars().count() > 1
                    && !n.contains('_')
                    && !FUNCTIONS.contains(&n.as_str())
                    && !matches!(n.as_str(), "pi" | "oo")
                    && !GREEK.contains(&n.as_str()) =>
            {
                let chars: Vec<char> = n.chars().collect();
                let mut k = 0;
                while k < chars.len() {
                    if chars[k].is_ascii_digit() {
                        let s = k;
                        while k < chars.len() && chars[k].is_ascii_digit() {
                            k += 1;
                        }
                        let digits: String = chars[s..k].iter().collect();
                        out.push(Tok::Int(digits.parse().unwrap_or_default()));
                    } else {
                        out.push(Tok::Name(chars[k].to_string()));
                        k += 1;
                    }
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn is_atom(t: &Tok) -> bool {
    match t {
        Tok::Name(n) => !FUNCTIONS.contains(&n.as_str()),
        Tok::Int(_) | Tok::Float(_) | Tok::Imag(_) => true,
        Tok::Op(_) => false,
    }
}

/// sympy's `implicit_multiplication`: a `*` between juxtaposed factors.
fn implicit_multiplication(tokens: Vec<Tok>) -> Vec<Tok> {
    let mut out: Vec<Tok> = Vec::with_capacity(tokens.len() * 2);
    for t in tokens {
        if let Some(prev) = out.last() {
            let prev_ends = is_atom(prev) || matches!(prev, Tok::Op(")") | Tok::Op("!"));
            let next_starts = is_atom(&t)
                || matches!(t, Tok::Op("("))
                || matches!(&t, Tok::Name(n) if FUNCTIONS.contains(&n.as_str()));
            if prev_ends && next_starts {
                out.push(Tok::Op("*"));
            }
        }
        out.push(t);
    }
    out
}

#[derive(Debug)]
enum Ast {
    Rational(BigRational),
    Float(f64),
    Imag(f64),
    Pi,
    Infinity,
    Symbol(String),
    Neg(Box<Ast>),
    Bin(char, Box<Ast>, Box<Ast>),
    Sqrt(Box<Ast>),
    Ln(Box<Ast>),
    Factorial(Box<Ast>),
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
}

impl Parser<'_> {
    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.t.get(self.i), Some(Tok::Op(o)) if *o == op) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn sum(&mut self) -> Option<Ast> {
        let mut lhs = self.term()?;
        loop {
            let op = if self.eat("+") {
                '+'
            } else if self.eat("-") {
                '-'
            } else {
                return Some(lhs);
            };
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(self.term()?));
        }
    }

    fn term(&mut self) -> Option<Ast> {
        let mut lhs = self.unary()?;
        loop {
            let op = if self.eat("*") {
                '*'
            } else if self.eat("/") {
                '/'
            } else if self.eat("//") || self.eat("%") {
                // floor division and modulo leave sympy expressions that are
                // not worth modelling; treat as unparseable.
                return None;
            } else {
                return Some(lhs);
            };
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Option<Ast> {
        if self.eat("-") {
            return Some(Ast::Neg(Box::new(self.unary()?)));
        }
        if self.eat("+") {
            return self.unary();
        }
        self.power()
    }

    fn power(&mut self) -> Option<Ast> {
        let base = self.postfix()?;
        if self.eat("**") {
            let exp = self.unary()?;
            return Some(Ast::Bin('^', Box::new(base), Box::new(exp)));
        }
        Some(base)
    }

    fn postfix(&mut self) -> Option<Ast> {
        let mut a = self.primary()?;
        while self.eat("!") {
            a = Ast::Factorial(Box::new(a));
        }
        Some(a)
    }

    fn primary(&mut self) -> Option<Ast> {
        let tok = self.t.get(self.i)?.clone();
        self.i += 1;
        Some(match tok {
            Tok::Int(n) => Ast::Rational(BigRational::from_integer(n)),
            Tok::Float(x) => Ast::Float(x),
            Tok::Imag(x) => Ast::Imag(x),
            Tok::Op("(") => {
                let inner = self.sum()?;
                if !self.eat(")") {
                    return None;
                }
                inner
            }
            Tok::Op(_) => return None,
            Tok::Name(n) => match n.as_str() {
                "pi" => Ast::Pi,
                "oo" => Ast::Infinity,
                "sqrt" | "ln" => {
                    if !self.eat("(") {
                        return None;
                    }
                    let arg = self.sum()?;
                    if !self.eat(")") {
                        return None;
                    }
                    if n == "sqrt" {
                        Ast::Sqrt(Box::new(arg))
                    } else {
                        Ast::Ln(Box::new(arg))
                    }
                }
                // Other sympy names of at most two letters (re, im, ff, rf,
                // li, fu, nan…) are functions or constants we do not model.
                "re" | "im" | "ff" | "rf" | "li" | "fu" | "nan" | "zoo" => return None,
                _ => Ast::Symbol(n),
            },
        })
    }
}

struct Env<'a> {
    symbols: &'a [String],
    values: &'a [Complex64],
}

impl Ast {
    fn symbols(&self, out: &mut Vec<String>) {
        match self {
            Ast::Symbol(s) if !out.contains(s) => out.push(s.clone()),
            Ast::Neg(a) | Ast::Sqrt(a) | Ast::Ln(a) | Ast::Factorial(a) => a.symbols(out),
            Ast::Bin(_, a, b) => {
                a.symbols(out);
                b.symbols(out);
            }
            _ => {}
        }
    }

    fn has_float(&self) -> bool {
        match self {
            Ast::Float(_) | Ast::Imag(_) => true,
            Ast::Neg(a) | Ast::Sqrt(a) | Ast::Ln(a) | Ast::Factorial(a) => a.has_float(),
            Ast::Bin(_, a, b) => a.has_float() || b.has_float(),
            _ => false,
        }
    }

    /// The exact rational value, when the expression is a rational number
    /// reached by rational operations and perfect-square roots.
    fn exact(&self) -> Option<BigRational> {
        match self {
            Ast::Rational(r) => Some(r.clone()),
            Ast::Neg(a) => Some(-a.exact()?),
            Ast::Bin(op, a, b) => {
                let (x, y) = (a.exact()?, b.exact()?);
                match op {
                    '+' => Some(x + y),
                    '-' => Some(x - y),
                    '*' => Some(x * y),
                    '/' if !y.is_zero() => Some(x / y),
                    '^' if y.is_integer() => {
                        let e = y.to_integer().to_i32()?;
                        if e.unsigned_abs() > 4096 || (x.is_zero() && e < 0) {
                            return None;
                        }
                        Some(if e >= 0 {
                            pow(&x, e as u32)
                        } else {
                            pow(&x.recip(), e.unsigned_abs())
                        })
                    }
                    _ => None,
                }
            }
            Ast::Sqrt(a) => {
                let x = a.exact()?;
                if x.is_negative() {
                    return None;
                }
                let (n, d) = (x.numer().sqrt(), x.denom().sqrt());
                let r = BigRational::new(n, d);
                (&r * &r == x).then_some(r)
            }
            Ast::Factorial(a) => {
                let x = a.exact()?;
                let n = x.is_integer().then(|| x.to_integer().to_u32()).flatten()?;
                if n > 1000 {
                    return None;
                }
                Some(BigRational::from_integer(
                    (1..=n)
                        .map(BigInt::from)
                        .product::<BigInt>()
                        .max(BigInt::one()),
                ))
            }
            _ => None,
        }
    }

    /// For the top-level `(gold)-(given)`: the difference and the size of
    /// the two sides, to judge rounding noise against.
    fn eval_diff(&self, env: &Env) -> Option<(Complex64, f64)> {
        match self {
            Ast::Bin('-', a, b) => {
                let (x, y) = (a.eval(env)?, b.eval(env)?);
                Some((x - y, x.norm().max(y.norm())))
            }
            other => {
                let v = other.eval(env)?;
                Some((v, v.norm()))
            }
        }
    }

    fn eval(&self, env: &Env) -> Option<Complex64> {
        Some(match self {
            Ast::Rational(r) => Complex64::new(r.to_f64()?, 0.0),
            Ast::Float(x) => Complex64::new(*x, 0.0),
            Ast::Imag(x) => Complex64::new(0.0, *x),
            Ast::Pi => Complex64::new(std::f64::consts::PI, 0.0),
            Ast::Infinity => Complex64::new(f64::INFINITY, 0.0),
            Ast::Symbol(s) => {
                let k = env.symbols.iter().position(|x| x == s)?;
                env.values[k]
            }
            Ast::Neg(a) => -a.eval(env)?,
            Ast::Sqrt(a) => a.eval(env)?.sqrt(),
            Ast::Ln(a) => a.eval(env)?.ln(),
            Ast::Factorial(a) => {
                let _ = a;
                Complex64::new(self.exact()?.to_f64()?, 0.0)
            }
            Ast::Bin(op, a, b) => {
                let x = a.eval(env)?;
                match op {
                    '+' => x + b.eval(env)?,
                    '-' => x - b.eval(env)?,
                    '*' => x * b.eval(env)?,
                    '/' => {
                        let y = b.eval(env)?;
                        if y.norm() == 0.0 {
                            return None;
                        }
                        x / y
                    }
                    _ => match b.exact() {
                        Some(e)
                            if e.is_integer()
                                && e.abs() < BigRational::from_integer(4096.into()) =>
                        {
                            let n = e.to_integer().to_i32()?;
                            if x.norm() == 0.0 && n < 0 {
                                return None;
                            }
                            x.powi(n)
                        }
                        _ => {
                            let y = b.eval(env)?;
                            if x.norm() == 0.0 {
                                if y.re > 0.0 {
                                    Complex64::new(0.0, 0.0)
                                } else {
                                    return None;
                                }
                            } else {
                                (y * x.ln()).exp()
                            }
                        }
                    },
                }
            }
        })
    }
}

fn pow(x: &BigRational, e: u32) -> BigRational {
    let mut acc = BigRational::one();
    for _ in 0..e {
        acc *= x;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn sympy_verdicts() {
        for (s, want) in [
            ("(3sqrt(3)/4)-(3/4sqrt(3))", true),
            ("(1/2)-(0.5)", true),
            ("(0.1x)-(x/10)", true),
            ("(sqrt(2+sqrt(3)))-((sqrt(6)+sqrt(2))/2)", true),
            ("(sqrt(x**2))-(x)", false),
            ("(x/x)-(1)", true),
            ("(012)", true),
            ("(1,2)-(1,2)", false),
            ("(x+1)**2-(x**2+2x+1)", true),
            ("(2/3)-(0.667)", false),
            ("(pi)-(3.14159265358979)", false),
            ("(sqrt8)-(2sqrt(2))", false),
            ("(5!)-(120)", true),
            ("(2**(1/2))-(sqrt(2))", true),
            ("(1/0)-(1/0)", false),
            ("(x=5)-(5)", false),
        ] {
            assert_eq!(is_zero(s), want, "{s}");
        }
    }
}
