//! math-verify's `verify(gold, pred)` with its defaults (float rounding 6,
//! strict, no set/relation comparison unless the prediction is a set).
//!
//! The order of checks follows math-verify's `sympy_expr_eq`: assignments
//! (`x = 3`) are reduced to their value when the other side is not an
//! equation, a relation is turned into a set when the prediction is a set,
//! then relations, sets/tuples/intervals, symbols and finally numbers and
//! expressions are compared.

use num_bigint::BigInt;
use num_complex::Complex64;
use num_rational::BigRational;
use num_traits::{Signed, ToPrimitive, Zero};

use super::extract::Parsed;
use super::value::{rat_to_f64, Expr, Func, Rel, RelOp, Value};

/// Decimal places floats are rounded to before comparing.
const FLOAT_ROUNDING: u32 = 6;

/// Whether any gold answer matches any predicted answer.
pub fn verify(gold: &[Parsed], pred: &[Parsed]) -> bool {
    gold.iter().any(|g| {
        pred.iter().any(|p| match (g, p) {
            (Parsed::Value(a), Parsed::Value(b)) => expr_eq(a, b, 0),
            (Parsed::Text(a), Parsed::Text(b)) => {
                let (a, b) = (a.trim(), b.trim());
                !a.is_empty() && a == b
            }
            _ => false,
        })
    })
}

/// Recursion limit for nested comparisons.
const MAX_DEPTH: usize = 12;

fn is_relation(v: &Value) -> bool {
    matches!(v, Value::Rel(r) if !r.is_empty())
}

fn is_equation(v: &Value) -> bool {
    matches!(v, Value::Rel(r) if !r.is_empty() && r.iter().all(|r| r.op == RelOp::Eq))
}

fn is_assignment(v: &Value) -> bool {
    is_equation(v) && matches!(v, Value::Rel(r) if only_symbols(&r[0].lhs))
}

/// latex2sympy2's `is_expr_of_only_symbols`.
fn only_symbols(v: &Value) -> bool {
    match v {
        Value::Expr(e) => expr_only_symbols(e),
        Value::Tuple(items) | Value::Set(items) => {
            !items.is_empty() && items.iter().all(only_symbols)
        }
        _ => false,
    }
}

fn expr_only_symbols(e: &Expr) -> bool {
    match e {
        Expr::Sym(_) => true,
        Expr::Add(v) | Expr::Mul(v) | Expr::Call(_, v) => {
            !v.is_empty() && v.iter().all(expr_only_symbols)
        }
        Expr::Pow(a, b) => {
            if **b == Expr::int(-1) && expr_only_symbols(a) {
                return true;
            }
            expr_only_symbols(a) && expr_only_symbols(b)
        }
        _ => false,
    }
}

fn first_last(v: &Value) -> Option<(&Value, &Value)> {
    match v {
        Value::Rel(r) => Some((&r.first()?.lhs, &r.last()?.rhs)),
        _ => None,
    }
}

fn is_sympy_set(v: &Value) -> bool {
    matches!(
        v,
        Value::Set(_) | Value::Interval { .. } | Value::Union(_) | Value::Reals | Value::Empty
    )
}

pub fn expr_eq(gold: &Value, pred: &Value, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let mut gold = gold.clone();
    let mut pred = pred.clone();
    let gold_assign = is_assignment(&gold);
    let pred_assign = is_assignment(&pred);
    let gold_eqn = is_equation(&gold);
    let pred_eqn = is_equation(&pred);
    if gold_assign {
        if let Some((l, r)) = first_last(&gold) {
            gold = Value::Rel(vec![Rel {
                op: RelOp::Eq,
                lhs: l.clone(),
                rhs: r.clone(),
            }]);
        }
    }
    if pred_assign {
        if let Some((l, r)) = first_last(&pred) {
            pred = Value::Rel(vec![Rel {
                op: RelOp::Eq,
                lhs: l.clone(),
                rhs: r.clone(),
            }]);
        }
    }
    if pred_eqn && !gold_eqn {
        if let Some((_, r)) = first_last(&pred) {
            pred = r.clone();
        }
    } else if gold_assign && !pred_eqn {
        if let Some((_, r)) = first_last(&gold) {
            gold = r.clone();
        }
    }
    if is_relation(&gold) && is_sympy_set(&pred) {
        if let Some(s) = relation_as_set(&gold) {
            gold = s;
        }
    }
    if structural_eq(&gold, &pred) {
        return true;
    }
    if is_relation(&gold) && is_relation(&pred) {
        return compare_relational(&gold, &pred, depth);
    }
    if gold.is_set_like() || pred.is_set_like() {
        return compare_sets(&gold, &pred, depth);
    }
    let (Value::Expr(_) | Value::Matrix { .. }, Value::Expr(_) | Value::Matrix { .. }) =
        (&gold, &pred)
    else {
        return false;
    };
    if matches!(gold, Value::Expr(Expr::Sym(_))) || matches!(pred, Value::Expr(Expr::Sym(_))) {
        return compare_symbols(&gold, &pred);
    }
    numeric_eq(&gold, &pred) || symbolic_eq(&gold, &pred)
}

/// sympy's `==` on the parsed objects: the same structure (a set's order
/// does not count).
fn structural_eq(a: &Value, b: &Value) -> bool {
    canonical_key(a) == canonical_key(b)
}

fn canonical_key(v: &Value) -> String {
    match v {
        Value::Set(items) => {
            let mut k: Vec<String> = items.iter().map(canonical_key).collect();
            k.sort();
            k.dedup();
            format!("{{{}}}", k.join(","))
        }
        Value::Expr(e) => match e.exact() {
            // Numbers are evaluated on construction in sympy (`\frac{4}{2}` is 2).
            Some(r) if matches!(e, Expr::Num(_)) => r.to_string(),
            _ => e.key(),
        },
        v => v.key(),
    }
}

fn compare_relational(gold: &Value, pred: &Value, depth: usize) -> bool {
    let (Value::Rel(g), Value::Rel(p)) = (gold, pred) else {
        return false;
    };
    if g.len() > 1 || p.len() > 1 {
        if g.len() != p.len() || g.len() < 2 {
            return false;
        }
        return g.iter().zip(p).all(|(a, b)| {
            compare_relational(
                &Value::Rel(vec![a.clone()]),
                &Value::Rel(vec![b.clone()]),
                depth + 1,
            )
        });
    }
    let (g, p) = (&g[0], &p[0]);
    let diff = |r: &Rel, flip: bool| -> Option<Expr> {
        let (Value::Expr(l), Value::Expr(r)) = (&r.lhs, &r.rhs) else {
            return None;
        };
        Some(if flip {
            Expr::sub(r.clone(), l.clone())
        } else {
            Expr::sub(l.clone(), r.clone())
        })
    };
    if g.op == p.op {
        if let (Some(a), Some(b)) = (diff(g, false), diff(p, false)) {
            if expr_eq(&Value::Expr(a), &Value::Expr(b), depth + 1) {
                return true;
            }
        }
    }
    if g.op.flipped() == p.op {
        if let (Some(a), Some(b)) = (diff(g, false), diff(p, true)) {
            if expr_eq(&Value::Expr(a), &Value::Expr(b), depth + 1) {
                return true;
            }
        }
    }
    // sympy's solve-and-compare, for what it amounts to on the relations
    // seen in answers: the same relation up to a constant factor.
    if let (Some(a), Some(b)) = (diff(g, false), diff(p, false)) {
        if let Some(ratio) = constant_ratio(&a, &b) {
            return match (g.op, p.op) {
                (RelOp::Eq, RelOp::Eq) => ratio != 0.0,
                (x, y) if x == y => ratio > 0.0 && single_symbol(&a),
                (x, y) if x.flipped() == y => ratio < 0.0 && single_symbol(&a),
                _ => false,
            };
        }
    }
    false
}

fn single_symbol(e: &Expr) -> bool {
    let mut s = Vec::new();
    e.symbols(&mut s);
    s.len() == 1
}

/// `a / b` when it is the same non-zero real number at every sample point.
fn constant_ratio(a: &Expr, b: &Expr) -> Option<f64> {
    let mut syms = Vec::new();
    a.symbols(&mut syms);
    b.symbols(&mut syms);
    if syms.is_empty() {
        return None;
    }
    let mut ratio: Option<f64> = None;
    for point in 0..3u64 {
        let env = |name: &str| sample(point, name);
        let (x, y) = (a.eval(&env), b.eval(&env));
        if !finite(x) || !finite(y) || y.norm() < 1e-12 {
            return None;
        }
        let r = x / y;
        if r.im.abs() > 1e-9 * r.norm().max(1.0) || r.re.abs() < 1e-12 {
            return None;
        }
        match ratio {
            None => ratio = Some(r.re),
            Some(q) if (q - r.re).abs() <= 1e-9 * q.abs().max(1.0) => {}
            Some(_) => return None,
        }
    }
    ratio
}

/// `x < 3` → (-oo, 3); `-2 < x \le 5` → (-2, 5]; `x = 3` → {3}.
fn relation_as_set(v: &Value) -> Option<Value> {
    let Value::Rel(rels) = v else { return None };
    let mut lo: (f64, Option<Expr>, bool) = (f64::NEG_INFINITY, None, true);
    let mut hi: (f64, Option<Expr>, bool) = (f64::INFINITY, None, true);
    let mut var: Option<String> = None;
    for r in rels {
        let (op, bound) = match (&r.lhs, &r.rhs) {
            (Value::Expr(x), Value::Expr(b)) if is_variable(x) && b.is_free_of_symbols() => {
                let s = x.key();
                if *var.get_or_insert(s.clone()) != s {
                    return None;
                }
                (r.op, b.clone())
            }
            (Value::Expr(b), Value::Expr(x)) if is_variable(x) && b.is_free_of_symbols() => {
                let s = x.key();
                if *var.get_or_insert(s.clone()) != s {
                    return None;
                }
                (r.op.flipped(), b.clone())
            }
            _ => return None,
        };
        let x = bound.real()?;
        match op {
            RelOp::Eq => {
                if rels.len() == 1 {
                    return Some(Value::Set(vec![Value::Expr(bound)]));
                }
                return None;
            }
            RelOp::Lt | RelOp::Le => {
                if x < hi.0 || (x == hi.0 && op == RelOp::Lt) {
                    hi = (x, Some(bound), op == RelOp::Lt);
                }
            }
            RelOp::Gt | RelOp::Ge => {
                if x > lo.0 || (x == lo.0 && op == RelOp::Gt) {
                    lo = (x, Some(bound), op == RelOp::Gt);
                }
            }
            RelOp::Ne => return None,
        }
    }
    if lo.0 > hi.0 {
        return Some(Value::Empty);
    }
    Some(Value::Interval {
        lo: lo.1.unwrap_or_else(|| Expr::Inf.neg()),
        hi: hi.1.unwrap_or(Expr::Inf),
        lo_open: lo.2,
        hi_open: hi.2,
    })
}

/// A symbol, or a call of an undefined function (`f(x)`, which math-verify
/// turns into a symbol before making a set of a relation).
fn is_variable(e: &Expr) -> bool {
    matches!(e, Expr::Sym(_) | Expr::Call(Func::Undefined(_), _))
}

fn compare_sets(gold: &Value, pred: &Value, depth: usize) -> bool {
    let wrap = |v: &Value| {
        if v.is_set_like() {
            v.clone()
        } else {
            Value::Set(vec![v.clone()])
        }
    };
    let (a, b) = (wrap(gold), wrap(pred));
    if let (
        Value::Interval {
            lo: l1,
            hi: h1,
            lo_open: lo1,
            hi_open: ho1,
        },
        Value::Interval {
            lo: l2,
            hi: h2,
            lo_open: lo2,
            hi_open: ho2,
        },
    ) = (&a, &b)
    {
        return lo1 == lo2
            && ho1 == ho2
            && expr_eq(
                &Value::Expr(l1.clone()),
                &Value::Expr(l2.clone()),
                depth + 1,
            )
            && expr_eq(
                &Value::Expr(h1.clone()),
                &Value::Expr(h2.clone()),
                depth + 1,
            );
    }
    if structural_eq(&a, &b) {
        return true;
    }
    if is_sympy_set(&a) && is_sympy_set(&b) {
        if let (Some(x), Some(y)) = (real_set(&a), real_set(&b)) {
            if x == y {
                return true;
            }
        }
    }
    let items = |v: &Value| match v {
        Value::Set(i) | Value::Tuple(i) => Some(i.clone()),
        _ => None,
    };
    if let (Some(_), Some(_)) = (items(&a), items(&b)) {
        return deep_compare(&a, &b, depth);
    }
    if let Value::Interval {
        lo,
        hi,
        lo_open: true,
        hi_open: true,
    } = &a
    {
        if items(&b).is_some_and(|i| i.len() == 2) {
            let t = Value::Tuple(vec![Value::Expr(lo.clone()), Value::Expr(hi.clone())]);
            return deep_compare(&t, &b, depth);
        }
    }
    if let Value::Interval {
        lo,
        hi,
        lo_open: true,
        hi_open: true,
    } = &b
    {
        if items(&a).is_some_and(|i| i.len() == 2) {
            let t = Value::Tuple(vec![Value::Expr(lo.clone()), Value::Expr(hi.clone())]);
            return deep_compare(&a, &t, depth);
        }
    }
    false
}

/// Element-wise comparison of sets and tuples: sets are put in value order,
/// tuples keep theirs (a tuple gold against a set keeps the set as written).
fn deep_compare(gold: &Value, pred: &Value, depth: usize) -> bool {
    let (g, gold_set) = match gold {
        Value::Set(i) => (i.clone(), true),
        Value::Tuple(i) => (i.clone(), false),
        _ => return false,
    };
    let p = match pred {
        Value::Set(i) | Value::Tuple(i) => i.clone(),
        _ => return false,
    };
    if g.len() != p.len() {
        return false;
    }
    // A tuple gold keeps both orders (a set prediction as written).
    let (g, p) = if gold_set {
        (sorted(g), sorted(p))
    } else {
        (g, p)
    };
    if gold_set && g.len() > 1 {
        // sympy's order is only a heuristic for "matching" elements; an
        // unordered matching agrees with it whenever the order is by value.
        return matching(&g, &p, depth);
    }
    g.iter().zip(&p).all(|(a, b)| expr_eq(a, b, depth + 1))
}

/// Whether every gold element matches a different predicted element.
fn matching(g: &[Value], p: &[Value], depth: usize) -> bool {
    if g.len() > 12 {
        return g.iter().zip(p).all(|(a, b)| expr_eq(a, b, depth + 1));
    }
    let mut used = vec![false; p.len()];
    for a in g {
        let Some(k) = (0..p.len()).find(|&k| !used[k] && expr_eq(a, &p[k], depth + 1)) else {
            return false;
        };
        used[k] = true;
    }
    true
}

fn sort_value(v: &Value) -> Option<f64> {
    let v = match v {
        Value::Rel(r) if is_assignment(v) => &r.last()?.rhs,
        v => v,
    };
    match v {
        Value::Expr(e) => e.real(),
        _ => None,
    }
}

fn sorted(mut items: Vec<Value>) -> Vec<Value> {
    items.sort_by(|a, b| match (sort_value(a), sort_value(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.key().cmp(&b.key()),
    });
    items
}

/// A set of reals as sorted, merged pieces `(lo, hi, lo_closed, hi_closed)`,
/// when all bounds are numbers.
fn real_set(v: &Value) -> Option<Vec<(f64, f64, bool, bool)>> {
    let mut pieces: Vec<(f64, f64, bool, bool)> = Vec::new();
    let add = |v: &Value, pieces: &mut Vec<(f64, f64, bool, bool)>| -> Option<()> {
        match v {
            Value::Interval {
                lo,
                hi,
                lo_open,
                hi_open,
            } => {
                let (a, b) = (lo.real()?, hi.real()?);
                if a < b || (a == b && !lo_open && !hi_open) {
                    pieces.push((a, b, !lo_open && a.is_finite(), !hi_open && b.is_finite()));
                }
            }
            Value::Set(items) => {
                for i in items {
                    let x = match i {
                        Value::Expr(e) => e.real()?,
                        _ => return None,
                    };
                    pieces.push((x, x, true, true));
                }
            }
            Value::Reals => pieces.push((f64::NEG_INFINITY, f64::INFINITY, false, false)),
            Value::Empty => {}
            _ => return None,
        }
        Some(())
    };
    match v {
        Value::Union(parts) => {
            for p in parts {
                add(p, &mut pieces)?;
            }
        }
        v => add(v, &mut pieces)?,
    }
    pieces.sort_by(|a, b| {
        a.0.partial_cmp(&b.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.2.cmp(&a.2))
    });
    let mut merged: Vec<(f64, f64, bool, bool)> = Vec::new();
    for p in pieces {
        if let Some(last) = merged.last_mut() {
            let touches = p.0 < last.1 || (p.0 == last.1 && (p.2 || last.3));
            if touches {
                if p.1 > last.1 || (p.1 == last.1 && p.3) {
                    last.1 = p.1;
                    last.3 = p.3;
                }
                continue;
            }
        }
        merged.push(p);
    }
    Some(merged)
}

fn compare_symbols(gold: &Value, pred: &Value) -> bool {
    let (Value::Expr(g), Value::Expr(p)) = (gold, pred) else {
        return false;
    };
    let is_e_sym = |e: &Expr| matches!(e, Expr::Sym(s) if s.eq_ignore_ascii_case("e"));
    if (is_e_sym(g) && *p == Expr::E) || (is_e_sym(p) && *g == Expr::E) {
        return true;
    }
    let concat = |e: &Expr| -> Option<String> {
        let Expr::Mul(v) = e else { return None };
        v.iter()
            .map(|x| match x {
                Expr::Sym(s) => Some(s.clone()),
                Expr::E => Some("e".to_string()),
                _ => None,
            })
            .collect()
    };
    if let (Expr::Sym(s), Some(c)) = (g, concat(p)) {
        return s.to_lowercase() == c.to_lowercase();
    }
    if let (Expr::Sym(s), Some(c)) = (p, concat(g)) {
        return s.to_lowercase() == c.to_lowercase();
    }
    if let (Expr::Sym(a), Expr::Sym(b)) = (g, p) {
        let norm = |s: &str| {
            if s.chars().count() > 1 {
                s.to_lowercase()
            } else {
                s.to_string()
            }
        };
        return norm(a) == norm(b);
    }
    g.key() == p.key()
}

fn round_exact(r: &BigRational) -> BigInt {
    let scaled = r * BigRational::from_integer(BigInt::from(10u64.pow(FLOAT_ROUNDING)));
    scaled.round().to_integer()
}

fn numeric_eq(gold: &Value, pred: &Value) -> bool {
    match (gold, pred) {
        (
            Value::Matrix {
                rows: r1,
                cols: c1,
                items: a,
            },
            Value::Matrix {
                rows: r2,
                cols: c2,
                items: b,
            },
        ) => {
            r1 == r2
                && c1 == c2
                && a.iter().zip(b).all(|(x, y)| {
                    let (x, y) = (Value::Expr(x.clone()), Value::Expr(y.clone()));
                    numeric_eq(&x, &y) || symbolic_eq(&x, &y)
                })
        }
        (Value::Expr(a), Value::Expr(b)) => numeric_expr_eq(a, b),
        _ => false,
    }
}

fn numeric_expr_eq(a: &Expr, b: &Expr) -> bool {
    let (na, nb) = (a.atomic_number(), b.atomic_number());
    if na.is_some() || nb.is_some() {
        if na.is_some_and(|n| n.float) || nb.is_some_and(|n| n.float) {
            // Both rounded to 6 places.
            if let (Some(x), Some(y)) = (exact_cmp(a), exact_cmp(b)) {
                return round_exact(&x) == round_exact(&y);
            }
            let (Some(x), Some(y)) = (a.real(), b.real()) else {
                return false;
            };
            let scale = 10f64.powi(FLOAT_ROUNDING as i32);
            return (x * scale).round() == (y * scale).round();
        }
        if let (Some(x), Some(y)) = (na, nb) {
            if x.is_integer() && y.is_integer() {
                // `10%` equals `10` here, as in math-verify.
                return x.value == y.value;
            }
        }
        return match (exact_cmp(a), exact_cmp(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
    }
    // evalf(a - b) == 0 for numbers; expressions with symbols fall through.
    if a.is_free_of_symbols() && b.is_free_of_symbols() {
        if let (Some(x), Some(y)) = (exact_cmp(a), exact_cmp(b)) {
            return x == y;
        }
        let env = |_: &str| Complex64::new(f64::NAN, 0.0);
        let (x, y) = (a.eval(&env), b.eval(&env));
        if finite(x) && finite(y) {
            return (x - y).norm() <= 1e-13 * x.norm().max(y.norm()).max(1.0);
        }
    }
    false
}

/// The exact value, except for float arithmetic: sympy computes that in
/// floating point (`\\sqrt{2.5^2-0.7^2}/0.2` is not exactly 12 there).
fn exact_cmp(e: &Expr) -> Option<BigRational> {
    if e.has_float() && e.atomic_number().is_none() {
        return None;
    }
    e.exact()
}

fn finite(z: Complex64) -> bool {
    z.re.is_finite() && z.im.is_finite()
}

/// A fixed pseudo-random complex point for a symbol: the plain grader's sampler, keyed by
/// an FNV-1a hash of the name.
fn sample(point: u64, name: &str) -> Complex64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    crate::expr::sample(point, h)
}

/// `simplify(a - b) == 0`: exact where both are rational, else the
/// difference at sample points (all must be ~0).
fn symbolic_eq(gold: &Value, pred: &Value) -> bool {
    match (gold, pred) {
        (Value::Expr(a), Value::Expr(b)) => {
            if let (Some(x), Some(y)) = (exact_cmp(a), exact_cmp(b)) {
                return x == y;
            }
            if contains_inf(a) || contains_inf(b) {
                return false;
            }
            let symbol_free = a.is_free_of_symbols() && b.is_free_of_symbols();
            let tol = match (a.has_float() || b.has_float(), symbol_free) {
                (true, true) => 0.0,
                (true, false) => 1e-12,
                _ => 1e-9,
            };
            let mut finite_points = 0;
            for point in 0..4u64 {
                let env = |name: &str| sample(point, name);
                let (x, y) = (a.eval(&env), b.eval(&env));
                if !finite(x) || !finite(y) {
                    continue;
                }
                finite_points += 1;
                if (x - y).norm() > tol * x.norm().max(y.norm()).max(1.0) {
                    return false;
                }
            }
            finite_points > 0
        }
        _ => false,
    }
}

fn contains_inf(e: &Expr) -> bool {
    match e {
        Expr::Inf => true,
        Expr::Add(v) | Expr::Mul(v) | Expr::Call(_, v) => v.iter().any(contains_inf),
        Expr::Pow(a, b) => contains_inf(a) || contains_inf(b),
        Expr::Pct(x) => contains_inf(x),
        _ => false,
    }
}

#[allow(dead_code)]
fn is_call(e: &Expr, f: &Func) -> bool {
    matches!(e, Expr::Call(g, _) if g == f)
}

#[allow(dead_code)]
fn to_f64(r: &BigRational) -> f64 {
    if r.is_zero() {
        return 0.0;
    }
    let _ = r.abs().to_f64();
    rat_to_f64(r)
}
