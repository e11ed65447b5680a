//! The parsed answer model: expressions, sets, tuples, intervals, relations
//! and matrices, standing in for the sympy objects math-verify compares.
//!
//! Expressions are evaluated, not simplified: exactly in rationals where
//! they only involve rationals and small integer powers, otherwise in complex
//! floating point at fixed pseudo-random points for their symbols. All work
//! is bounded (exponent and factorial sizes, number of digits).

use num_bigint::BigInt;
use num_complex::Complex64;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// A number literal: its exact value and whether it was written as a float.
#[derive(Clone, Debug, PartialEq)]
pub struct Num {
    pub value: BigRational,
    pub float: bool,
}

impl Num {
    pub fn int(v: i64) -> Num {
        Num {
            value: BigRational::from_integer(BigInt::from(v)),
            float: false,
        }
    }
    pub fn is_integer(&self) -> bool {
        !self.float && self.value.is_integer()
    }
}

/// Named functions.
#[derive(Clone, Debug, PartialEq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Exp,
    /// `log(x, base)`.
    Log,
    Abs,
    Floor,
    Ceil,
    Factorial,
    Binom,
    /// A function the answer defines, such as `f(x)`.
    Undefined(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Num(Num),
    Sym(String),
    E,
    Pi,
    /// `oo` (`-oo` is `-1 * oo`).
    Inf,
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
    /// `x %`: `x * 1/100` kept unevaluated (math-verify compares `10%` to `10`).
    Pct(Box<Expr>),
}

impl Expr {
    pub fn int(v: i64) -> Expr {
        Expr::Num(Num::int(v))
    }
    pub fn neg(self) -> Expr {
        match self {
            Expr::Num(n) => Expr::Num(Num {
                value: -n.value,
                float: n.float,
            }),
            e => Expr::Mul(vec![Expr::int(-1), e]),
        }
    }
    pub fn sub(a: Expr, b: Expr) -> Expr {
        Expr::Add(vec![a, b.neg()])
    }
    pub fn div(a: Expr, b: Expr) -> Expr {
        Expr::Mul(vec![a, Expr::Pow(Box::new(b), Box::new(Expr::int(-1)))])
    }
    pub fn pow(a: Expr, b: Expr) -> Expr {
        Expr::Pow(Box::new(a), Box::new(b))
    }

    /// A number literal (sympy `Number`), or a percentage of one.
    pub fn atomic_number(&self) -> Option<&Num> {
        match self {
            Expr::Num(n) => Some(n),
            Expr::Pct(e) => match e.as_ref() {
                Expr::Num(n) => Some(n),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn has_float(&self) -> bool {
        match self {
            Expr::Num(n) => n.float,
            Expr::Add(v) | Expr::Mul(v) | Expr::Call(_, v) => v.iter().any(Expr::has_float),
            Expr::Pow(a, b) => a.has_float() || b.has_float(),
            Expr::Pct(e) => e.has_float(),
            _ => false,
        }
    }

    pub fn symbols(&self, out: &mut Vec<String>) {
        match self {
            Expr::Sym(s) if !out.contains(s) => out.push(s.clone()),
            Expr::Sym(_) => {}
            Expr::Add(v) | Expr::Mul(v) => v.iter().for_each(|e| e.symbols(out)),
            Expr::Call(f, v) => {
                if let Func::Undefined(name) = f {
                    // f(x) as one unknown per distinct call.
                    let key = format!(
                        "{name}({})",
                        v.iter().map(Expr::key).collect::<Vec<_>>().join(",")
                    );
                    if !out.contains(&key) {
                        out.push(key);
                    }
                } else {
                    v.iter().for_each(|e| e.symbols(out));
                }
            }
            Expr::Pow(a, b) => {
                a.symbols(out);
                b.symbols(out);
            }
            Expr::Pct(e) => e.symbols(out),
            _ => {}
        }
    }

    pub fn is_free_of_symbols(&self) -> bool {
        let mut s = Vec::new();
        self.symbols(&mut s);
        s.is_empty()
    }

    /// A canonical text form (for ordering and structural comparison).
    pub fn key(&self) -> String {
        match self {
            Expr::Num(n) => {
                if n.float {
                    format!("{}f", n.value)
                } else {
                    n.value.to_string()
                }
            }
            Expr::Sym(s) => s.clone(),
            Expr::E => "E".into(),
            Expr::Pi => "pi".into(),
            Expr::Inf => "oo".into(),
            Expr::Add(v) => format!(
                "({})",
                v.iter().map(Expr::key).collect::<Vec<_>>().join("+")
            ),
            Expr::Mul(v) => format!(
                "({})",
                v.iter().map(Expr::key).collect::<Vec<_>>().join("*")
            ),
            Expr::Pow(a, b) => format!("({})^({})", a.key(), b.key()),
            Expr::Call(f, v) => format!(
                "{f:?}[{}]",
                v.iter().map(Expr::key).collect::<Vec<_>>().join(",")
            ),
            Expr::Pct(e) => format!("{}%", e.key()),
        }
    }

    /// The exact rational value, where the expression is a rational number
    /// reachable with bounded work.
    pub fn exact(&self) -> Option<BigRational> {
        match self {
            Expr::Num(n) => Some(n.value.clone()),
            Expr::Add(v) => {
                let mut s = BigRational::zero();
                for e in v {
                    s += e.exact()?;
                }
                Some(s)
            }
            Expr::Mul(v) => {
                let mut s = BigRational::one();
                for e in v {
                    s *= e.exact()?;
                }
                Some(s)
            }
            Expr::Pow(a, b) => {
                let base = a.exact()?;
                let exp = b.exact()?;
                exact_pow(&base, &exp)
            }
            Expr::Pct(e) => Some(e.exact()? / BigRational::from_integer(BigInt::from(100))),
            Expr::Call(Func::Factorial, v) => {
                let n = v.first()?.exact()?;
                if !n.is_integer() || n.is_negative() {
                    return None;
                }
                let n = n.to_integer().to_u32()?;
                if n > 300 {
                    return None;
                }
                let mut f = BigInt::one();
                for k in 2..=n {
                    f *= k;
                }
                Some(BigRational::from_integer(f))
            }
            Expr::Call(Func::Binom, v) => {
                let n = v.first()?.exact()?;
                let k = v.get(1)?.exact()?;
                if !n.is_integer() || !k.is_integer() {
                    return None;
                }
                let n = n.to_integer().to_i64()?;
                let k = k.to_integer().to_i64()?;
                if k < 0 || n < 0 || k > n {
                    return Some(BigRational::zero());
                }
                if n > 10_000 {
                    return None;
                }
                let k = k.min(n - k);
                let mut r = BigInt::one();
                for i in 0..k {
                    r = r * (n - i) / (i + 1);
                }
                Some(BigRational::from_integer(r))
            }
            Expr::Call(Func::Abs, v) => Some(v.first()?.exact()?.abs()),
            Expr::Call(Func::Floor, v) => Some(BigRational::from_integer(
                v.first()?.exact()?.floor().to_integer(),
            )),
            Expr::Call(Func::Ceil, v) => Some(BigRational::from_integer(
                v.first()?.exact()?.ceil().to_integer(),
            )),
            _ => None,
        }
    }

    /// The value at `env` (symbol values), in complex floating point.
    pub fn eval(&self, env: &dyn Fn(&str) -> Complex64) -> Complex64 {
        let nan = Complex64::new(f64::NAN, f64::NAN);
        match self {
            Expr::Num(n) => Complex64::new(rat_to_f64(&n.value), 0.0),
            Expr::Sym(s) => env(s),
            Expr::E => Complex64::new(std::f64::consts::E, 0.0),
            Expr::Pi => Complex64::new(std::f64::consts::PI, 0.0),
            Expr::Inf => Complex64::new(f64::INFINITY, 0.0),
            Expr::Add(v) => v.iter().map(|e| e.eval(env)).sum(),
            Expr::Mul(v) => {
                let mut p = Complex64::new(1.0, 0.0);
                for e in v {
                    let x = e.eval(env);
                    // Real-only arithmetic keeps infinities meaningful.
                    if p.im == 0.0 && x.im == 0.0 {
                        p = Complex64::new(p.re * x.re, 0.0);
                    } else {
                        p *= x;
                    }
                }
                p
            }
            Expr::Pow(a, b) => {
                let base = a.eval(env);
                if let Some(k) = b
                    .exact()
                    .filter(|k| k.is_integer())
                    .and_then(|k| k.to_integer().to_i32())
                {
                    if base.im == 0.0 {
                        return Complex64::new(base.re.powi(k), 0.0);
                    }
                    return base.powi(k);
                }
                let exp = b.eval(env);
                // Roots of negative reals: sympy takes the principal (complex)
                // root, as `powc` below does.
                if base.im == 0.0 && exp.im == 0.0 && base.re >= 0.0 {
                    return Complex64::new(base.re.powf(exp.re), 0.0);
                }
                if base == Complex64::new(0.0, 0.0) {
                    return Complex64::new(0.0, 0.0);
                }
                base.powc(exp)
            }
            Expr::Pct(e) => e.eval(env) / 100.0,
            Expr::Call(f, v) => {
                let x = v.first().map(|e| e.eval(env)).unwrap_or(nan);
                let real = x.im == 0.0;
                match f {
                    Func::Sin => x.sin(),
                    Func::Cos => x.cos(),
                    Func::Tan => x.tan(),
                    Func::Cot => 1.0 / x.tan(),
                    Func::Sec => 1.0 / x.cos(),
                    Func::Csc => 1.0 / x.sin(),
                    Func::Asin if real && x.re.abs() <= 1.0 => Complex64::new(x.re.asin(), 0.0),
                    Func::Acos if real && x.re.abs() <= 1.0 => Complex64::new(x.re.acos(), 0.0),
                    Func::Asin => x.asin(),
                    Func::Acos => x.acos(),
                    Func::Atan => x.atan(),
                    Func::Sinh => x.sinh(),
                    Func::Cosh => x.cosh(),
                    Func::Tanh => x.tanh(),
                    Func::Exp => x.exp(),
                    Func::Log => {
                        let base = v
                            .get(1)
                            .map(|e| e.eval(env))
                            .unwrap_or(Complex64::new(std::f64::consts::E, 0.0));
                        if real && x.re > 0.0 && base.im == 0.0 && base.re > 0.0 {
                            Complex64::new(x.re.ln() / base.re.ln(), 0.0)
                        } else {
                            x.ln() / base.ln()
                        }
                    }
                    Func::Abs => Complex64::new(x.norm(), 0.0),
                    Func::Floor if real => Complex64::new(x.re.floor(), 0.0),
                    Func::Ceil if real => Complex64::new(x.re.ceil(), 0.0),
                    Func::Factorial | Func::Binom => match self.exact() {
                        Some(r) => Complex64::new(rat_to_f64(&r), 0.0),
                        None if real && v.len() == 1 => Complex64::new(gamma(x.re + 1.0), 0.0),
                        None => nan,
                    },
                    Func::Undefined(name) => {
                        let key = format!(
                            "{name}({})",
                            v.iter().map(Expr::key).collect::<Vec<_>>().join(",")
                        );
                        env(&key)
                    }
                    _ => nan,
                }
            }
        }
    }

    /// The value as a real number, when it is free of symbols.
    pub fn real(&self) -> Option<f64> {
        if let Some(r) = self.exact() {
            return Some(rat_to_f64(&r));
        }
        if !self.is_free_of_symbols() {
            return None;
        }
        let z = self.eval(&|_| Complex64::new(f64::NAN, 0.0));
        if z.im.abs() <= 1e-12 * z.re.abs().max(1.0) && !z.re.is_nan() {
            Some(z.re)
        } else {
            None
        }
    }
}

/// `base ^ exp` exactly, for integer exponents (bounded size) and exact roots.
fn exact_pow(base: &BigRational, exp: &BigRational) -> Option<BigRational> {
    if exp.is_integer() {
        let e = exp.to_integer().to_i64()?;
        if base.is_zero() {
            return if e > 0 {
                Some(BigRational::zero())
            } else if e == 0 {
                Some(BigRational::one())
            } else {
                None
            };
        }
        if base.abs().is_one() {
            return Some(if e % 2 == 0 { base.abs() } else { base.clone() });
        }
        let bits = base.numer().bits().max(base.denom().bits()) as i64;
        if e.abs() * bits > 4096 {
            return None;
        }
        let r = num_traits::pow(base.clone(), e.unsigned_abs() as usize);
        return Some(if e < 0 { r.recip() } else { r });
    }
    // Rational exponent p/q: exact when the q-th root is.
    let q = exp.denom().to_u32()?;
    if q > 16 || base.is_negative() {
        return None;
    }
    let root = |n: &BigInt| -> Option<BigInt> {
        let r = n.nth_root(q);
        (r.pow(q) == *n).then_some(r)
    };
    let b = BigRational::new(root(base.numer())?, root(base.denom())?);
    exact_pow(&b, &BigRational::from_integer(exp.numer().clone()))
}

pub fn rat_to_f64(r: &BigRational) -> f64 {
    if let (Some(n), Some(d)) = (r.numer().to_f64(), r.denom().to_f64()) {
        if n.is_finite() && d.is_finite() && d != 0.0 {
            return n / d;
        }
    }
    // Very large parts: scale both down.
    let shift = r.numer().bits().max(r.denom().bits()).saturating_sub(1000);
    let n = (r.numer() >> shift).to_f64().unwrap_or(f64::NAN);
    let d = (r.denom() >> shift).to_f64().unwrap_or(f64::NAN);
    n / d
}

/// Lanczos approximation of the gamma function (for `x!` of non-integers).
fn gamma(x: f64) -> f64 {
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

/// Relation operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    /// The operator with its sides swapped (`<` ↔ `>`).
    pub fn flipped(self) -> RelOp {
        match self {
            RelOp::Lt => RelOp::Gt,
            RelOp::Gt => RelOp::Lt,
            RelOp::Le => RelOp::Ge,
            RelOp::Ge => RelOp::Le,
            o => o,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rel {
    pub op: RelOp,
    pub lhs: Value,
    pub rhs: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Expr(Expr),
    /// A finite set, in the order written (duplicates removed).
    Set(Vec<Value>),
    Tuple(Vec<Value>),
    Interval {
        lo: Expr,
        hi: Expr,
        lo_open: bool,
        hi_open: bool,
    },
    Union(Vec<Value>),
    /// One relation, or a chain / conjunction of them (`a < x < b`).
    Rel(Vec<Rel>),
    Matrix {
        rows: usize,
        cols: usize,
        items: Vec<Expr>,
    },
    Reals,
    Empty,
}

impl Value {
    pub fn key(&self) -> String {
        match self {
            Value::Expr(e) => e.key(),
            Value::Set(v) => format!(
                "{{{}}}",
                v.iter().map(Value::key).collect::<Vec<_>>().join(",")
            ),
            Value::Tuple(v) => format!(
                "({})",
                v.iter().map(Value::key).collect::<Vec<_>>().join(",")
            ),
            Value::Interval {
                lo,
                hi,
                lo_open,
                hi_open,
            } => format!(
                "{}{},{}{}",
                if *lo_open { '(' } else { '[' },
                lo.key(),
                hi.key(),
                if *hi_open { ')' } else { ']' }
            ),
            Value::Union(v) => v.iter().map(Value::key).collect::<Vec<_>>().join("U"),
            Value::Rel(r) => r
                .iter()
                .map(|r| format!("{}{:?}{}", r.lhs.key(), r.op, r.rhs.key()))
                .collect::<Vec<_>>()
                .join("&"),
            Value::Matrix { rows, cols, items } => format!(
                "M{rows}x{cols}[{}]",
                items.iter().map(Expr::key).collect::<Vec<_>>().join(",")
            ),
            Value::Reals => "Reals".into(),
            Value::Empty => "EmptySet".into(),
        }
    }

    pub fn is_set_like(&self) -> bool {
        matches!(
            self,
            Value::Set(_)
                | Value::Tuple(_)
                | Value::Interval { .. }
                | Value::Union(_)
                | Value::Reals
                | Value::Empty
        )
    }
}
