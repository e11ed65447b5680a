//! A LaTeX reader for (normalized) answers, producing the [`Value`] model in
//! the shapes latex2sympy2_extended gives math-verify: top-level comma lists
//! are sets, `(a,b)` with `a < b` is an open interval (a tuple otherwise),
//! `\pm` gives a two-element set, `x \in S` an equation, `a < x < b` a chain.
//!
//! `None` where latex2sympy would fail (unknown commands, unbalanced input)
//! and where the input is beyond what this reader handles.

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{Signed, Zero};

use super::value::{Expr, Func, Num, Rel, RelOp, Value};

/// Inputs longer than this are not parsed (bounds the work per answer).
const MAX_LEN: usize = 2_000;
/// Nesting depth limit.
const MAX_DEPTH: usize = 60;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(String),
    /// `\name`, or `\` and one non-letter (`\{`, `\%`, `\\`).
    Cmd(String),
    Ch(char),
}

fn tokenize(s: &str) -> Vec<Tok> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len()
                && chars[i] == '.'
                && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())
            {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c == '\\' {
            i += 1;
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                if i < chars.len() {
                    // `\(`, `\)`, `\[`, `\]` read as brackets.
                    match chars[i] {
                        c @ ('(' | ')' | '[' | ']') => out.push(Tok::Ch(c)),
                        c => out.push(Tok::Cmd(c.to_string())),
                    }
                    i += 1;
                }
            } else {
                let name: String = chars[start..i].iter().collect();
                // `\quadx`, `\cotx`: a spacing command or function name run
                // into letters (TeX reads the letters as one command; latex2sympy
                // splits them).
                let split = if FUNCS.contains(&name.as_str()) {
                    None
                } else {
                    ["qquad", "quad"]
                        .iter()
                        .chain(FUNCS.iter().filter(|f| f.len() >= 3))
                        .filter(|q| name.starts_with(**q) && name.len() > q.len())
                        .max_by_key(|q| q.len())
                };
                match split {
                    Some(q) => {
                        out.push(Tok::Cmd(q.to_string()));
                        for c in name[q.len()..].chars() {
                            out.push(Tok::Ch(c));
                        }
                    }
                    None => out.push(Tok::Cmd(name)),
                }
            }
        } else {
            out.push(Tok::Ch(c));
            i += 1;
        }
    }
    out
}

/// Spacing commands, skipped.
fn is_space(t: &Tok) -> bool {
    matches!(t, Tok::Cmd(c) if matches!(c.as_str(), "," | ";" | ":" | "!" | " " | "quad" | "qquad" | "enspace" | "thinspace" | "medspace" | "displaystyle" | "limits"))
        || matches!(t, Tok::Ch('~'))
}

/// Parses a normalized LaTeX answer.
pub fn parse(s: &str) -> Option<Value> {
    if s.len() > MAX_LEN || s.trim().is_empty() {
        return None;
    }
    // `1,234,567.5`: thousands separators (only when that is the whole answer).
    if let Some(n) = thousands(s.trim()) {
        return Some(Value::Expr(n));
    }
    if let Some(n) = mixed_number(s.trim()) {
        return Some(Value::Expr(n));
    }
    let toks: Vec<Tok> = tokenize(s).into_iter().filter(|t| !is_space(t)).collect();
    let mut p = Parser {
        t: &toks,
        i: 0,
        depth: 0,
        abs: 0,
    };
    let v = p.top()?;
    if p.i != toks.len() {
        return None;
    }
    Some(v)
}

/// `2\frac{2}{5}` (the whole answer) is the mixed number 12/5.
fn mixed_number(s: &str) -> Option<Expr> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (whole, rest) = body.split_once("\\frac")?;
    let whole = whole.trim();
    if whole.is_empty() || !whole.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let rest = rest.trim().strip_prefix('{')?.strip_suffix('}')?;
    let (a, b) = rest.split_once("}{")?;
    if [a, b]
        .iter()
        .any(|x| x.is_empty() || !x.chars().all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    let (w, a, b): (BigInt, BigInt, BigInt) =
        (whole.parse().ok()?, a.parse().ok()?, b.parse().ok()?);
    if b.is_zero() {
        return None;
    }
    let v = BigRational::from_integer(w) + BigRational::new(a, b);
    Some(Expr::Num(Num {
        value: if neg { -v } else { v },
        float: false,
    }))
}

fn thousands(s: &str) -> Option<Expr> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (body, None),
    };
    let groups: Vec<&str> = int.split(',').collect();
    if groups.len() < 2
        || groups[0].is_empty()
        || groups[0].len() > 3
        || !groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()))
        || groups[1..].iter().any(|g| g.len() != 3)
    {
        return None;
    }
    if let Some(f) = frac {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let digits = groups.concat();
    let text = match frac {
        Some(f) => format!("{digits}.{f}"),
        None => digits,
    };
    let n = number(&text)?;
    Some(if s.starts_with('-') { n.neg() } else { n })
}

/// A number literal: integer, or float when written with a point.
pub fn number(text: &str) -> Option<Expr> {
    let (value, float) = match text.split_once('.') {
        Some((a, b)) => {
            let a = if a.is_empty() { "0" } else { a };
            let den = BigInt::from(10u32).pow(b.len() as u32);
            let num: BigInt = format!("{a}{b}").parse().ok()?;
            (BigRational::new(num, den), true)
        }
        None => (BigRational::from_integer(text.parse().ok()?), false),
    };
    Some(Expr::Num(Num { value, float }))
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
    depth: usize,
    /// Open `|` bars.
    abs: usize,
}

fn is_cmd(t: Option<&Tok>, names: &[&str]) -> bool {
    matches!(t, Some(Tok::Cmd(c)) if names.contains(&c.as_str()))
}

const FUNCS: &[&str] = &[
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "ln", "log", "exp", "lg",
];

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.t.get(self.i)
    }
    fn peek_ch(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Ch(c))
    }
    fn eat_ch(&mut self, c: char) -> bool {
        if self.peek_ch(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn eat_cmd(&mut self, names: &[&str]) -> bool {
        if is_cmd(self.peek(), names) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// A comma / semicolon list at top level is a set.
    /// `p=5,q=2;p=7,q=2`: `;` separates tuples of comma-separated items.
    fn top(&mut self) -> Option<Value> {
        let mut groups = vec![self.comma_items()?];
        while self.eat_ch(';') {
            groups.push(self.comma_items()?);
        }
        if groups.len() == 1 {
            let items = groups.pop()?;
            if items.len() == 1 {
                return items.into_iter().next();
            }
            return Some(make_set(items));
        }
        let items = groups
            .into_iter()
            .map(|g| {
                if g.len() == 1 {
                    g.into_iter().next()
                } else {
                    Some(Value::Tuple(g))
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some(make_set(items))
    }

    fn comma_items(&mut self) -> Option<Vec<Value>> {
        let mut items = vec![self.relation()?];
        while self.eat_ch(',') {
            items.push(self.relation()?);
        }
        Some(items)
    }

    /// Items separated by `,` or `;` up to (not including) a closing token.
    fn list(&mut self, _closers: &[char]) -> Option<Vec<Value>> {
        let mut items = vec![self.relation()?];
        while self.eat_ch(',') || self.eat_ch(';') {
            items.push(self.relation()?);
        }
        Some(items)
    }

    fn rel_op(&mut self) -> Option<Option<RelOp>> {
        let op = match self.peek() {
            Some(Tok::Ch('=')) => RelOp::Eq,
            Some(Tok::Ch('!')) if self.t.get(self.i + 1) == Some(&Tok::Ch('=')) => {
                self.i += 1;
                RelOp::Ne
            }
            Some(Tok::Ch('<')) => {
                if self.t.get(self.i + 1) == Some(&Tok::Ch('=')) {
                    self.i += 1;
                    RelOp::Le
                } else {
                    RelOp::Lt
                }
            }
            Some(Tok::Ch('>')) => {
                if self.t.get(self.i + 1) == Some(&Tok::Ch('=')) {
                    self.i += 1;
                    RelOp::Ge
                } else {
                    RelOp::Gt
                }
            }
            Some(Tok::Cmd(c)) => match c.as_str() {
                "le" | "leq" | "leqslant" => RelOp::Le,
                "ge" | "geq" | "geqslant" => RelOp::Ge,
                "lt" => RelOp::Lt,
                "gt" => RelOp::Gt,
                "ne" | "neq" => RelOp::Ne,
                "in" => RelOp::Eq,
                _ => return Some(None),
            },
            _ => return Some(None),
        };
        self.i += 1;
        Some(Some(op))
    }

    fn relation(&mut self) -> Option<Value> {
        self.enter()?;
        // `x \approx 2` reads as its right side.
        let first = self.set_expr()?;
        if matches!(first, Value::Expr(Expr::Sym(_))) && self.eat_cmd(&["approx"]) {
            // `x \approx 2` is 2.
            let v = self.relation();
            self.depth -= 1;
            return v;
        }
        let mut operands = vec![first];
        let mut ops = Vec::new();
        loop {
            if self.eat_cmd(&["approx"]) {
                // `a \approx b`: the approximation is dropped.
                self.set_expr()?;
                while self.rel_op()?.is_some() {
                    self.set_expr()?;
                }
                break;
            }
            let Some(op) = self.rel_op()? else { break };
            ops.push(op);
            operands.push(self.set_expr()?);
        }
        self.depth -= 1;
        if ops.is_empty() {
            return operands.pop();
        }
        let rels = ops
            .iter()
            .enumerate()
            .map(|(k, op)| {
                let (mut lhs, mut rhs) = (operands[k].clone(), operands[k + 1].clone());
                // `(p,q)=(3,2)`: both sides are tuples.
                if *op == RelOp::Eq {
                    if matches!(rhs, Value::Tuple(_)) {
                        lhs = interval_as_tuple(lhs);
                    }
                    if matches!(lhs, Value::Tuple(_)) {
                        rhs = interval_as_tuple(rhs);
                    }
                }
                Rel { op: *op, lhs, rhs }
            })
            .collect();
        Some(Value::Rel(rels))
    }

    fn set_expr(&mut self) -> Option<Value> {
        let first = self.sum()?;
        if !is_cmd(self.peek(), &["cup"]) {
            return Some(first);
        }
        let mut parts = vec![first];
        while self.eat_cmd(&["cup"]) {
            parts.push(self.sum()?);
        }
        Some(Value::Union(parts))
    }

    /// Sums and differences; `\pm` / `\mp` give several alternatives.
    fn sum(&mut self) -> Option<Value> {
        self.enter()?;
        let mut alts: Vec<Expr>;
        let mut single: Option<Value> = None;
        // Leading sign (`\pm 2`, `-x`).
        let lead = if self.eat_cmd(&["pm"]) {
            Some(0)
        } else if self.eat_cmd(&["mp"]) {
            Some(1)
        } else {
            None
        };
        let first = self.term()?;
        match lead {
            Some(k) => {
                let e = first.into_expr()?;
                alts = if k == 0 {
                    vec![e.clone().neg(), e]
                } else {
                    vec![e.clone(), e.neg()]
                };
            }
            None => {
                if let Value::Expr(e) = first {
                    alts = vec![e];
                } else {
                    alts = Vec::new();
                    single = Some(first);
                }
            }
        }
        loop {
            let op = match self.peek() {
                Some(Tok::Ch('+')) => 0,
                Some(Tok::Ch('-')) => 1,
                Some(Tok::Cmd(c)) if c == "pm" => 2,
                Some(Tok::Cmd(c)) if c == "mp" => 3,
                _ => break,
            };
            if let Some(v) = single.take() {
                // Sums of matrices; no other arithmetic on sets, intervals.
                self.i += 1;
                let rhs = self.term()?;
                single = Some(matrix_add(v, rhs, op == 1)?);
                continue;
            }
            self.i += 1;
            let rhs = self.term()?.into_expr()?;
            if op >= 2 && alts.len() >= 4 {
                return None;
            }
            alts = alts
                .into_iter()
                .flat_map(|a| match op {
                    0 => vec![Expr::Add(vec![a, rhs.clone()])],
                    1 => vec![Expr::sub(a, rhs.clone())],
                    _ => vec![
                        Expr::Add(vec![a.clone(), rhs.clone()]),
                        Expr::sub(a, rhs.clone()),
                    ],
                })
                .collect();
        }
        self.depth -= 1;
        if let Some(v) = single {
            return Some(v);
        }
        if alts.len() == 1 {
            return alts.pop().map(Value::Expr);
        }
        Some(make_set(alts.into_iter().map(Value::Expr).collect()))
    }

    /// Products and quotients, explicit or implicit.
    fn term(&mut self) -> Option<Value> {
        let first = self.unary()?;
        let mut factors: Vec<Expr> = Vec::new();
        // Whether the term is "number, then \frac" (a mixed number).
        let mixed_candidate = matches!(first, Value::Expr(Expr::Num(_)))
            && is_cmd(self.peek(), &["frac", "dfrac", "tfrac"]);
        let mut single = Some(first);
        loop {
            enum Op {
                Mul,
                Div,
                Implicit,
            }
            let op = match self.peek() {
                Some(Tok::Ch('*')) => Op::Mul,
                Some(Tok::Ch('/')) | Some(Tok::Ch(':')) => Op::Div,
                Some(Tok::Cmd(c)) if c == "cdot" || c == "times" || c == "ast" => Op::Mul,
                Some(Tok::Cmd(c)) if c == "div" => Op::Div,
                _ if self.starts_primary() => Op::Implicit,
                _ => break,
            };
            if !matches!(op, Op::Implicit) {
                self.i += 1;
            }
            if let Some(Value::Matrix { .. }) = single {
                // Matrix products (and a matrix times a number).
                if matches!(op, Op::Div) {
                    return None;
                }
                let rhs = match op {
                    Op::Implicit => self.postfix()?,
                    _ => self.unary()?,
                };
                single = Some(matrix_mul(single.take()?, rhs)?);
                continue;
            }
            if let Some(v) = single.take() {
                factors.push(v.into_expr()?);
            }
            let rhs = match op {
                Op::Implicit => self.postfix()?,
                _ => self.unary()?,
            }
            .into_expr()?;
            match op {
                Op::Div => {
                    let lhs = Expr::Mul(std::mem::take(&mut factors));
                    factors.push(Expr::div(lhs, rhs));
                }
                _ => factors.push(rhs),
            }
        }
        if let Some(v) = single {
            return Some(v);
        }
        // `4\frac{5}{8}`: an integer and a fraction of integers, alone in a
        // product, are a mixed number.
        if let ([Expr::Num(w), Expr::Num(f)], true) = (factors.as_slice(), mixed_candidate) {
            if w.is_integer() && !f.float {
                let v = if w.value.is_negative() {
                    &w.value - &f.value
                } else {
                    &w.value + &f.value
                };
                return Some(Value::Expr(Expr::Num(Num {
                    value: v,
                    float: false,
                })));
            }
        }
        Some(Value::Expr(if factors.len() == 1 {
            factors.pop()?
        } else {
            Expr::Mul(factors)
        }))
    }

    fn starts_primary(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_)) => true,
            Some(Tok::Ch(c)) => {
                c.is_alphabetic()
                    || *c == '('
                    || *c == '['
                    || (*c == '|' && self.abs == 0)
                    || *c == '{'
            }
            Some(Tok::Cmd(c)) => !matches!(
                c.as_str(),
                "cdot"
                    | "times"
                    | "div"
                    | "pm"
                    | "mp"
                    | "cup"
                    | "le"
                    | "leq"
                    | "ge"
                    | "geq"
                    | "lt"
                    | "gt"
                    | "ne"
                    | "neq"
                    | "in"
                    | "approx"
                    | "leqslant"
                    | "geqslant"
                    | "}"
                    | "\\"
                    | "%"
                    | "right"
                    | "end"
                    | "rfloor"
                    | "rceil"
                    | "ast"
                    | "cap"
                    | "circ"
                    | "degree"
            ),
            _ => false,
        }
    }

    fn unary(&mut self) -> Option<Value> {
        if self.eat_ch('-') {
            self.enter()?;
            let v = self.unary()?;
            self.depth -= 1;
            return match v {
                Value::Expr(e) => Some(Value::Expr(e.neg())),
                Value::Reals | Value::Empty => None,
                _ => None,
            };
        }
        if self.eat_ch('+') {
            return self.unary();
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Option<Value> {
        self.enter()?;
        let mut v = self.primary()?;
        loop {
            if self.eat_ch('^') {
                // Degrees are dropped (`90^\circ` is 90).
                if self.eat_cmd(&["circ"]) {
                    continue;
                }
                if self.peek_ch('{')
                    && is_cmd(self.t.get(self.i + 1), &["circ"])
                    && self.t.get(self.i + 2) == Some(&Tok::Ch('}'))
                {
                    self.i += 3;
                    continue;
                }
                let exp = self.script()?;
                v = Value::Expr(Expr::pow(v.into_expr()?, exp));
            } else if self.peek_ch('!') && self.t.get(self.i + 1) != Some(&Tok::Ch('=')) {
                self.i += 1;
                v = Value::Expr(Expr::Call(Func::Factorial, vec![v.into_expr()?]));
            } else if self.eat_cmd(&["%"]) || self.eat_ch('%') {
                v = Value::Expr(Expr::Pct(Box::new(v.into_expr()?)));
            } else if self.eat_cmd(&["circ", "degree"]) {
                continue;
            } else if self.peek_ch('_') {
                // A subscript on a number (a base, `2516_8`) is dropped.
                self.i += 1;
                self.script_raw()?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(v)
    }

    /// A super/subscript: a braced group, or one token.
    fn script(&mut self) -> Option<Expr> {
        if self.peek_ch('{') {
            self.i += 1;
            let v = self.relation()?;
            if !self.eat_ch('}') {
                return None;
            }
            return v.into_expr();
        }
        if self.eat_ch('-') {
            return Some(self.script()?.neg());
        }
        match self.peek()? {
            Tok::Num(n) => {
                self.i += 1;
                number(n)
            }
            Tok::Ch(c) if c.is_alphabetic() => {
                self.i += 1;
                Some(letter(*c))
            }
            Tok::Cmd(_) => self.primary()?.into_expr(),
            _ => None,
        }
    }

    /// The raw text of a subscript (for symbol names).
    fn script_raw(&mut self) -> Option<String> {
        let start = self.i;
        if self.peek_ch('{') {
            let mut depth = 0;
            while let Some(t) = self.peek() {
                self.i += 1;
                match t {
                    Tok::Ch('{') => depth += 1,
                    Tok::Ch('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if depth != 0 {
                return None;
            }
        } else {
            self.peek()?;
            self.i += 1;
        }
        Some(self.t[start..self.i].iter().map(tok_text).collect())
    }

    /// A `{...}` group's expression.
    fn group(&mut self) -> Option<Value> {
        if !self.eat_ch('{') {
            return None;
        }
        let v = self.top()?;
        if !self.eat_ch('}') {
            return None;
        }
        Some(v)
    }

    fn group_expr(&mut self) -> Option<Expr> {
        if self.peek_ch('{') {
            return self.group()?.into_expr();
        }
        // `\frac12`-style single tokens.
        match self.peek()? {
            Tok::Num(n) => {
                self.i += 1;
                number(n)
            }
            Tok::Ch(c) if c.is_alphabetic() => {
                self.i += 1;
                Some(letter(*c))
            }
            _ => self.primary()?.into_expr(),
        }
    }

    fn primary(&mut self) -> Option<Value> {
        let tok = self.peek()?.clone();
        self.i += 1;
        match tok {
            Tok::Num(n) => Some(Value::Expr(number(&n)?)),
            Tok::Ch(c) if c.is_alphabetic() => self.symbol(c),
            Tok::Ch('(') => self.bracketed('('),
            Tok::Ch('[') => self.bracketed('['),
            Tok::Ch('{') => {
                self.i -= 1;
                self.group()
            }
            Tok::Ch('|') => {
                self.abs += 1;
                let v = self.sum()?.into_expr()?;
                self.abs -= 1;
                if !self.eat_ch('|') {
                    return None;
                }
                Some(Value::Expr(Expr::Call(Func::Abs, vec![v])))
            }
            Tok::Cmd(c) => self.command(&c),
            _ => None,
        }
    }

    /// Symbols are lower case (latex2sympy2 reads `A` as `a`); only a
    /// lower-case `e` is Euler's number.
    fn symbol(&mut self, c: char) -> Option<Value> {
        let mut name: String = c.to_lowercase().collect();
        // `a_1`, `x_{10}`; primes.
        if self.peek_ch('_') {
            self.i += 1;
            name.push('_');
            let sub = self.script_raw()?.to_lowercase();
            let inner = sub.strip_prefix('{').and_then(|x| x.strip_suffix('}'));
            match inner {
                Some(x) if x.chars().count() == 1 => name.push_str(x),
                _ => name.push_str(&sub),
            }
        }
        while self.eat_ch('\'') {
            name.push('\'');
        }
        if name.len() == 1 && matches!(name.as_str(), "f" | "g" | "h") && self.peek_ch('(') {
            self.i += 1;
            let mut args = vec![self.relation()?.into_expr()?];
            while self.eat_ch(',') {
                args.push(self.relation()?.into_expr()?);
            }
            if !self.eat_ch(')') {
                return None;
            }
            return Some(Value::Expr(Expr::Call(Func::Undefined(name), args)));
        }
        if name == "e" && c == 'e' {
            return Some(Value::Expr(Expr::E));
        }
        Some(Value::Expr(Expr::Sym(name)))
    }

    /// `( ... )`, `[ ... ]`, `( ... ]`, `[ ... )`: group, interval or tuple.
    fn bracketed(&mut self, open: char) -> Option<Value> {
        self.enter()?;
        let saved_abs = self.abs;
        self.abs = 0;
        let items = self.list(&[])?;
        self.abs = saved_abs;
        let close = match self.peek()? {
            Tok::Ch(')') => ')',
            Tok::Ch(']') => ']',
            _ => return None,
        };
        self.i += 1;
        self.depth -= 1;
        let matching = (open == '(' && close == ')') || (open == '[' && close == ']');
        if items.len() == 1 {
            return if matching {
                items.into_iter().next()
            } else {
                None
            };
        }
        if items.len() == 2 {
            let lo = items[0].clone().into_expr();
            let hi = items[1].clone().into_expr();
            if let (Some(lo), Some(hi)) = (lo, hi) {
                let ordered = match (lo.real(), hi.real()) {
                    (Some(a), Some(b)) => a < b,
                    _ => {
                        !(lo.is_free_of_symbols() && hi.is_free_of_symbols())
                            || lo == Expr::Inf.clone().neg()
                            || hi == Expr::Inf
                    }
                };
                let infinite = |e: &Expr| *e == Expr::Inf || *e == Expr::Inf.neg();
                if ordered || infinite(&lo) || infinite(&hi) {
                    return Some(Value::Interval {
                        lo_open: open == '(' || infinite(&lo),
                        hi_open: close == ')' || infinite(&hi),
                        lo,
                        hi,
                    });
                }
            }
        }
        matching.then_some(Value::Tuple(items))
    }

    fn command(&mut self, c: &str) -> Option<Value> {
        let e = |x: Expr| Some(Value::Expr(x));
        match c {
            "frac" | "dfrac" | "tfrac" | "cfrac" => {
                let a = self.group_expr()?;
                let b = self.group_expr()?;
                if let (Expr::Num(x), Expr::Num(y)) = (&a, &b) {
                    if !x.float && !y.float {
                        if y.value.is_zero() {
                            return None;
                        }
                        return e(Expr::Num(Num {
                            value: &x.value / &y.value,
                            float: false,
                        }));
                    }
                }
                e(Expr::div(a, b))
            }
            "binom" | "dbinom" | "tbinom" | "choose" => {
                let n = self.group_expr()?;
                let k = self.group_expr()?;
                let call = Expr::Call(Func::Binom, vec![n, k]);
                match call.exact() {
                    Some(v) => e(Expr::Num(Num {
                        value: v,
                        float: false,
                    })),
                    None => e(call),
                }
            }
            "sqrt" => {
                let index = if self.eat_ch('[') {
                    let v = self.sum()?.into_expr()?;
                    if !self.eat_ch(']') {
                        return None;
                    }
                    Some(v)
                } else {
                    None
                };
                let x = self.group_expr()?;
                let exp = match index {
                    Some(n) => Expr::div(Expr::int(1), n),
                    None => Expr::Num(Num {
                        value: BigRational::new(1.into(), 2.into()),
                        float: false,
                    }),
                };
                e(Expr::pow(x, exp))
            }
            "pi" => e(Expr::Pi),
            "infty" => e(Expr::Inf),
            "emptyset" | "varnothing" => Some(Value::Empty),
            "mathbb" => {
                let start = self.i;
                let name = self.script_raw()?;
                let _ = start;
                if name.contains('R') {
                    Some(Value::Reals)
                } else {
                    None
                }
            }
            "{" => {
                if self.eat_cmd(&["}"]) {
                    return Some(Value::Empty);
                }
                let items = self.list(&[])?;
                if !self.eat_cmd(&["}"]) {
                    return None;
                }
                Some(make_set(items))
            }
            "text" | "mbox" | "textrm" | "operatorname" | "mathrm" => {
                let raw = self.script_raw()?;
                let inner = raw.trim_start_matches('{').trim_end_matches('}');
                if let Some(v) = parse(inner).filter(|v| matches!(v, Value::Expr(Expr::Num(_)))) {
                    return Some(v);
                }
                let name: String = inner
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .flat_map(char::to_lowercase)
                    .collect();
                if name.is_empty() {
                    return None;
                }
                e(Expr::Sym(name))
            }
            "overline" | "bar" | "vec" | "hat" | "overrightarrow" | "widehat" => {
                let raw = self.script_raw()?;
                e(Expr::Sym(format!("{c}{}", raw.to_lowercase())))
            }
            "lfloor" | "lceil" => {
                let v = self.sum()?.into_expr()?;
                if !self.eat_cmd(&[if c == "lfloor" { "rfloor" } else { "rceil" }]) {
                    return None;
                }
                e(Expr::Call(
                    if c == "lfloor" {
                        Func::Floor
                    } else {
                        Func::Ceil
                    },
                    vec![v],
                ))
            }
            "begin" => self.matrix(),
            "alpha" | "beta" | "gamma" | "delta" | "theta" | "lambda" | "mu" | "phi" | "omega"
            | "sigma" | "tau" | "epsilon" | "rho" | "psi" | "eta" | "xi" | "zeta" | "nu"
            | "kappa" | "chi" | "varphi" | "vartheta" | "varepsilon" | "Delta" | "Omega"
            | "Gamma" | "Theta" | "Lambda" | "Phi" | "Psi" | "Sigma" => e(Expr::Sym(c.to_string())),
            f if FUNCS.contains(&f) => self.function(f),
            _ => None,
        }
    }

    fn function(&mut self, name: &str) -> Option<Value> {
        let mut base = None;
        if name == "log" && self.eat_ch('_') {
            base = Some(self.group_expr()?);
        }
        let mut power = None;
        if self.eat_ch('^') {
            power = Some(self.script()?);
        }
        let arg = if self.peek_ch('(') {
            self.postfix_arg()?
        } else if self.peek_ch('{') {
            self.group()?.into_expr()?
        } else {
            // `\sin 2x`: the implicit product that follows.
            let mut factors = vec![self.postfix()?.into_expr()?];
            while matches!(self.peek(), Some(Tok::Num(_)) | Some(Tok::Ch('a'..='z' | 'A'..='Z')))
                || matches!(self.peek(), Some(Tok::Cmd(c)) if c == "pi")
            {
                factors.push(self.postfix()?.into_expr()?);
            }
            if factors.len() == 1 {
                factors.pop()?
            } else {
                Expr::Mul(factors)
            }
        };
        let inverse = power.as_ref().is_some_and(|p| *p == Expr::int(-1));
        let f = match (name, inverse) {
            ("sin", false) => Func::Sin,
            ("cos", false) => Func::Cos,
            ("tan", false) => Func::Tan,
            ("sin", true) | ("arcsin", _) => Func::Asin,
            ("cos", true) | ("arccos", _) => Func::Acos,
            ("tan", true) | ("arctan", _) => Func::Atan,
            ("cot", _) => Func::Cot,
            ("sec", _) => Func::Sec,
            ("csc", _) => Func::Csc,
            ("sinh", _) => Func::Sinh,
            ("cosh", _) => Func::Cosh,
            ("tanh", _) => Func::Tanh,
            ("exp", _) => Func::Exp,
            ("ln", _) => Func::Log,
            ("log" | "lg", _) => Func::Log,
            _ => return None,
        };
        let call = match f {
            Func::Log => {
                let b = match (name, base) {
                    ("ln", _) => Expr::E,
                    (_, Some(b)) => b,
                    _ => Expr::int(10),
                };
                Expr::Call(Func::Log, vec![arg, b])
            }
            f => Expr::Call(f, vec![arg]),
        };
        Some(Value::Expr(match power {
            Some(p) if !inverse || !matches!(name, "sin" | "cos" | "tan") => Expr::pow(call, p),
            _ => call,
        }))
    }

    fn postfix_arg(&mut self) -> Option<Expr> {
        self.eat_ch('(');
        let v = self.sum()?.into_expr()?;
        if !self.eat_ch(')') {
            return None;
        }
        Some(v)
    }

    /// `\begin{pmatrix} a & b \\ c & d \end{pmatrix}` (after `\begin`).
    fn matrix(&mut self) -> Option<Value> {
        let env = self.script_raw()?;
        let env = env
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_string();
        if !matches!(
            env.as_str(),
            "pmatrix" | "bmatrix" | "matrix" | "Bmatrix" | "smallmatrix" | "array"
        ) {
            return None;
        }
        if env == "array" && self.peek_ch('{') {
            self.script_raw()?;
        }
        let mut rows: Vec<Vec<Expr>> = vec![Vec::new()];
        loop {
            if is_cmd(self.peek(), &["end"]) {
                self.i += 1;
                self.script_raw()?;
                break;
            }
            let cell = self.sum()?.into_expr()?;
            rows.last_mut()?.push(cell);
            if self.eat_ch('&') {
                continue;
            }
            if self.eat_cmd(&["\\"]) {
                if is_cmd(self.peek(), &["end"]) {
                    continue;
                }
                rows.push(Vec::new());
                continue;
            }
            if !is_cmd(self.peek(), &["end"]) {
                return None;
            }
        }
        let cols = rows.first()?.len();
        if cols == 0 || rows.iter().any(|r| r.len() != cols) {
            return None;
        }
        Some(Value::Matrix {
            rows: rows.len(),
            cols,
            items: rows.into_iter().flatten().collect(),
        })
    }
}

/// `A + B` / `A - B` for matrices of the same shape.
fn matrix_add(a: Value, b: Value, minus: bool) -> Option<Value> {
    let (
        Value::Matrix {
            rows,
            cols,
            items: x,
        },
        Value::Matrix {
            rows: r2,
            cols: c2,
            items: y,
        },
    ) = (a, b)
    else {
        return None;
    };
    if rows != r2 || cols != c2 {
        return None;
    }
    let items = x
        .into_iter()
        .zip(y)
        .map(|(p, q)| {
            if minus {
                Expr::sub(p, q)
            } else {
                Expr::Add(vec![p, q])
            }
        })
        .collect();
    Some(Value::Matrix { rows, cols, items })
}

/// `A B` for matrices, or `A k` for a matrix and a number.
fn matrix_mul(a: Value, b: Value) -> Option<Value> {
    let Value::Matrix {
        rows,
        cols,
        items: x,
    } = a
    else {
        return None;
    };
    match b {
        Value::Expr(k) => Some(Value::Matrix {
            rows,
            cols,
            items: x
                .into_iter()
                .map(|p| Expr::Mul(vec![p, k.clone()]))
                .collect(),
        }),
        Value::Matrix {
            rows: r2,
            cols: c2,
            items: y,
        } => {
            if cols != r2 || rows * c2 > 100 {
                return None;
            }
            let mut items = Vec::with_capacity(rows * c2);
            for i in 0..rows {
                for j in 0..c2 {
                    let terms = (0..cols)
                        .map(|k| Expr::Mul(vec![x[i * cols + k].clone(), y[k * c2 + j].clone()]))
                        .collect();
                    items.push(Expr::Add(terms));
                }
            }
            Some(Value::Matrix {
                rows,
                cols: c2,
                items,
            })
        }
        _ => None,
    }
}

fn interval_as_tuple(v: Value) -> Value {
    match v {
        Value::Interval {
            lo,
            hi,
            lo_open: true,
            hi_open: true,
        } => Value::Tuple(vec![Value::Expr(lo), Value::Expr(hi)]),
        v => v,
    }
}

fn letter(c: char) -> Expr {
    if c == 'e' {
        Expr::E
    } else {
        Expr::Sym(c.to_lowercase().collect())
    }
}

fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Num(n) => n.clone(),
        Tok::Cmd(c) => format!("\\{c}"),
        Tok::Ch(c) => c.to_string(),
    }
}

/// A finite set: nested sets from `\pm` are flattened, duplicates dropped.
pub fn make_set(items: Vec<Value>) -> Value {
    let mut out: Vec<Value> = Vec::new();
    for v in items {
        match v {
            Value::Set(inner) => {
                for x in inner {
                    if !out.iter().any(|y| y.key() == x.key()) {
                        out.push(x);
                    }
                }
            }
            x => {
                if !out.iter().any(|y| y.key() == x.key()) {
                    out.push(x);
                }
            }
        }
    }
    Value::Set(out)
}

impl Value {
    pub fn into_expr(self) -> Option<Expr> {
        match self {
            Value::Expr(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether an expression is negative infinity (for interval bounds).
#[allow(dead_code)]
fn is_neg_inf(e: &Expr) -> bool {
    matches!(e, Expr::Mul(v) if v.len() == 2 && v[1] == Expr::Inf && v[0].exact().is_some_and(|x| x.is_negative()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        parse(s).map(|v| v.key()).unwrap_or_else(|| "FAIL".into())
    }

    #[test]
    fn shapes() {
        assert_eq!(p("1,2"), "{1,2}");
        assert_eq!(p("(1,2)"), "(1,2)");
        assert_eq!(p("(3,2)"), "(3,2)");
        assert_eq!(p("[1,2)"), "[1,2)");
        assert_eq!(p(r"\frac{4}{2}"), "2");
        assert_eq!(p("1,000"), "1000");
        assert_eq!(p(r"\pm 2"), "{-2,2}");
        assert_eq!(p(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"), "M2x2[1,2,3,4]");
        assert!(matches!(parse("x=3"), Some(Value::Rel(_))));
        assert!(matches!(parse("-2<x<3"), Some(Value::Rel(r)) if r.len() == 2));
        assert_eq!(p(r"\unknowncommand"), "FAIL");
    }
}
