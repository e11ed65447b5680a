//! LaTeX → plain text, reproducing what `pylatexenc` 2.11's
//! `LatexNodes2Text().latex_to_text` makes of the short math answers PRM800K's
//! grader feeds it (`\frac{a}{b}` → `a/b`, `\sqrt{x}` → `√(x)`, symbols →
//! Unicode, unknown macros dropped, matrices → `[ a; b ]`).
//!
//! Only the macros that occur in math answers are covered; others behave as
//! unknown macros (dropped, their braced arguments kept as plain groups).

/// Converts `latex` to text; `None` where pylatexenc raises (an environment
/// that is never closed), in which case the grader keeps its input.
pub fn latex_to_text(latex: &str) -> Option<String> {
    let chars: Vec<char> = latex.chars().collect();
    let mut p = Parser { s: &chars, i: 0 };
    let nodes = p.nodes(Stop::Eof)?;
    let mut out = String::new();
    render(&nodes, &mut out);
    Some(out)
}

#[derive(Debug)]
enum Node {
    Text(String),
    Group(Vec<Node>),
    /// A macro and its parsed arguments (`None` for an absent optional one).
    Macro(String, Vec<Option<Vec<Node>>>),
    Env(String, Vec<Node>),
    DisplayMath(Vec<Node>),
    /// `\\` inside an environment: a row break.
    RowBreak,
    /// `&`: a column break.
    Amp,
}

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Eof,
    Brace,
    Bracket,
    DisplayMath,
    InlineMath,
    End,
}

struct Parser<'a> {
    s: &'a [char],
    i: usize,
}

/// Argument kinds: `{` mandatory, `[` optional, `*` optional star.
fn arg_spec(name: &str) -> &'static str {
    match name {
        "frac" | "nicefrac" | "braket" | "ketbra" | "texorpdfstring" => "{{",
        "sqrt" | "footnote" | "includegraphics" => "[{",
        "textcolor" | "colorbox" => "[{{",
        "hspace" | "vspace" | "mbox" | "makebox" => "*{",
        "\\" => "*[",
        "section" | "subsection" | "subsubsection" | "chapter" => "*[{",
        _ if one_arg_macro(name) => "{",
        _ => "",
    }
}

fn one_arg_macro(name: &str) -> bool {
    matches!(
        name,
        "text"
            | "textrm"
            | "textit"
            | "textbf"
            | "textsc"
            | "textsl"
            | "texttt"
            | "textsf"
            | "emph"
            | "mathrm"
            | "mathbf"
            | "mathit"
            | "mathsf"
            | "mathbb"
            | "mathtt"
            | "mathcal"
            | "mathscr"
            | "mathfrak"
            | "ensuremath"
            | "overline"
            | "underline"
            | "widehat"
            | "widetilde"
            | "overrightarrow"
            | "overleftarrow"
            | "overbrace"
            | "underbrace"
            | "vec"
            | "dot"
            | "ddot"
            | "hat"
            | "check"
            | "breve"
            | "acute"
            | "grave"
            | "tilde"
            | "bar"
            | "not"
            | "url"
            | "ket"
            | "bra"
            | "'"
            | "`"
            | "\""
            | "^"
            | "~"
            | "="
            | "."
            | "c"
            | "H"
            | "k"
            | "b"
            | "d"
            | "r"
            | "u"
            | "v"
    )
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn starts_with(&self, lit: &str) -> bool {
        lit.chars()
            .enumerate()
            .all(|(k, c)| self.s.get(self.i + k) == Some(&c))
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }

    fn nodes(&mut self, stop: Stop) -> Option<Vec<Node>> {
        let mut closed = false;
        let mut out = Vec::new();
        let mut text = String::new();
        let flush = |text: &mut String, out: &mut Vec<Node>| {
            if !text.is_empty() {
                out.push(Node::Text(std::mem::take(text)));
            }
        };
        while let Some(c) = self.peek() {
            match c {
                '}' if stop == Stop::Brace => {
                    self.i += 1;
                    break;
                }
                // A stray closing brace is dropped (tolerant parsing).
                '}' => self.i += 1,
                ']' if stop == Stop::Bracket => {
                    self.i += 1;
                    break;
                }
                '{' => {
                    flush(&mut text, &mut out);
                    self.i += 1;
                    out.push(Node::Group(self.nodes(Stop::Brace)?));
                }
                '&' => {
                    flush(&mut text, &mut out);
                    self.i += 1;
                    out.push(Node::Amp);
                }
                '~' => {
                    self.i += 1;
                    text.push('\u{a0}');
                }
                '`' if self.starts_with("``") => {
                    self.i += 2;
                    text.push('“');
                }
                '\'' if self.starts_with("''") => {
                    self.i += 2;
                    text.push('”');
                }
                '-' if self.starts_with("---") => {
                    self.i += 3;
                    text.push('—');
                }
                '-' if self.starts_with("--") => {
                    self.i += 2;
                    text.push('–');
                }
                '\\' => {
                    if stop == Stop::DisplayMath && self.starts_with("\\]") {
                        self.i += 2;
                        break;
                    }
                    if stop == Stop::InlineMath && self.starts_with("\\)") {
                        self.i += 2;
                        break;
                    }
                    flush(&mut text, &mut out);
                    if self.starts_with("\\end") && stop == Stop::End {
                        self.macro_name();
                        self.group_word();
                        closed = true;
                        break;
                    }
                    out.push(self.macro_node()?);
                }
                _ => {
                    self.i += 1;
                    text.push(c);
                }
            }
        }
        if stop == Stop::End && !closed {
            // Unterminated environment: pylatexenc gives up.
            return None;
        }
        flush(&mut text, &mut out);
        Some(out)
    }

    /// Reads `\name` (letters) or `\c` (one other character); letter names
    /// swallow the whitespace after them.
    fn macro_name(&mut self) -> String {
        self.i += 1; // the backslash
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
            self.i += 1;
        }
        if self.i == start {
            match self.peek() {
                Some(c) => {
                    self.i += 1;
                    c.to_string()
                }
                None => String::new(),
            }
        } else {
            let name: String = self.s[start..self.i].iter().collect();
            self.skip_ws();
            name
        }
    }

    /// The `{name}` after `\begin` / `\end`.
    fn group_word(&mut self) -> String {
        self.skip_ws();
        if self.peek() != Some('{') {
            return String::new();
        }
        self.i += 1;
        let start = self.i;
        while self.peek().is_some_and(|c| c != '}') {
            self.i += 1;
        }
        let w: String = self.s[start..self.i].iter().collect();
        if self.peek() == Some('}') {
            self.i += 1;
        }
        w
    }

    fn macro_node(&mut self) -> Option<Node> {
        if self.starts_with("\\[") {
            self.i += 2;
            return Some(Node::DisplayMath(self.nodes(Stop::DisplayMath)?));
        }
        if self.starts_with("\\(") {
            self.i += 2;
            return Some(Node::Group(self.nodes(Stop::InlineMath)?));
        }
        let name = self.macro_name();
        if name == "begin" {
            let env = self.group_word();
            if env == "array" {
                // The column specification is an argument, not content.
                self.skip_ws();
                if self.peek() == Some('{') {
                    self.i += 1;
                    self.nodes(Stop::Brace)?;
                }
            }
            let body = self.nodes(Stop::End)?;
            return Some(Node::Env(env, body));
        }
        if name == "end" {
            // A stray `\end{…}` renders as nothing.
            self.group_word();
            return Some(Node::Text(String::new()));
        }
        if name == "\\" {
            // `\\` takes an optional star and an optional `[length]`.
            self.optional_star();
            self.optional_bracket()?;
            return Some(Node::RowBreak);
        }
        let mut args = Vec::new();
        for kind in arg_spec(&name).chars() {
            match kind {
                '*' => {
                    self.optional_star();
                }
                '[' => args.push(self.optional_bracket()?),
                _ => args.push(self.mandatory_arg()?),
            }
        }
        Some(Node::Macro(name, args))
    }

    fn optional_star(&mut self) {
        if self.peek() == Some('*') {
            self.i += 1;
        }
    }

    fn optional_bracket(&mut self) -> Option<Option<Vec<Node>>> {
        let save = self.i;
        self.skip_ws();
        if self.peek() == Some('[') {
            self.i += 1;
            return Some(Some(self.nodes(Stop::Bracket)?));
        }
        self.i = save;
        Some(None)
    }

    /// A braced group, or else the single next token (a character or macro).
    fn mandatory_arg(&mut self) -> Option<Option<Vec<Node>>> {
        self.skip_ws();
        match self.peek() {
            None | Some('}') => Some(None),
            Some('{') => {
                self.i += 1;
                Some(Some(self.nodes(Stop::Brace)?))
            }
            Some('\\') => Some(Some(vec![self.macro_node()?])),
            Some(c) => {
                self.i += 1;
                Some(Some(vec![Node::Text(c.to_string())]))
            }
        }
    }
}

fn render(nodes: &[Node], out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Group(g) => render(g, out),
            Node::Macro(name, args) => render_macro(name, args, out),
            Node::Env(name, body) => render_env(name, body, out),
            Node::DisplayMath(body) => {
                out.push_str("\n    ");
                out.push_str(render_to_string(body).trim());
                out.push('\n');
            }
            Node::RowBreak => out.push('\n'),
            Node::Amp => out.push_str("   "),
        }
    }
}

fn render_to_string(nodes: &[Node]) -> String {
    let mut s = String::new();
    render(nodes, &mut s);
    s
}

fn arg_text(args: &[Option<Vec<Node>>], k: usize) -> String {
    args.get(k)
        .and_then(|a| a.as_deref())
        .map(render_to_string)
        .unwrap_or_default()
}

fn render_macro(name: &str, args: &[Option<Vec<Node>>], out: &mut String) {
    match name {
        "frac" | "nicefrac" => {
            if args.iter().any(Option::is_none) {
                // pylatexenc fails to substitute and prints its template.
                out.push_str("%s/%s");
            } else {
                out.push_str(&arg_text(args, 0));
                out.push('/');
                out.push_str(&arg_text(args, 1));
            }
        }
        "sqrt" => {
            out.push_str("√(");
            out.push_str(&arg_text(args, 1));
            out.push(')');
        }
        "textcolor" | "colorbox" => out.push_str(&arg_text(args, 2)),
        "footnote" => {
            out.push('[');
            out.push_str(&arg_text(args, 1));
            out.push(']');
        }
        "vspace" => out.push('\n'),
        "url" => {
            out.push('<');
            out.push_str(&arg_text(args, 0));
            out.push('>');
        }
        "mathbb" | "mathbf" | "mathit" | "mathsf" | "mathtt" => {
            for c in arg_text(args, 0).chars() {
                out.push(math_style(name, c));
            }
        }
        "not" => {
            let a = arg_text(args, 0);
            match a.as_str() {
                "=" => out.push('≠'),
                "∈" => out.push('∉'),
                _ => {
                    out.push_str(&a);
                    out.push('\u{338}');
                }
            }
        }
        _ if one_arg_macro(name) => {
            out.push_str(&arg_text(args, 0));
            if let Some(mark) = accent(name) {
                out.push(mark);
            }
        }
        _ if !arg_spec(name).is_empty() => {}
        _ => out.push_str(symbol(name)),
    }
}

fn render_env(name: &str, body: &[Node], out: &mut String) {
    match name {
        "pmatrix" | "bmatrix" | "array" | "smallmatrix" | "psmallmatrix" | "bsmallmatrix" => {
            let mut rows: Vec<Vec<String>> = vec![vec![String::new()]];
            for n in body {
                match n {
                    Node::RowBreak => rows.push(vec![String::new()]),
                    Node::Amp => rows.last_mut().expect("a row").push(String::new()),
                    other => {
                        let cell = rows.last_mut().expect("a row").last_mut().expect("a cell");
                        render(std::slice::from_ref(other), cell);
                    }
                }
            }
            // A last row of only whitespace after a final `\\` still counts.
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| r.iter().map(|c| c.trim().to_string()).collect())
                .collect();
            let width = cells
                .iter()
                .flatten()
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0);
            let rows: Vec<String> = cells
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|c| format!("{c:>width$}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            out.push_str("[ ");
            out.push_str(&rows.join("; "));
            out.push_str(" ]");
        }
        "equation" | "equation*" | "align" | "align*" | "gather" | "gather*" | "multline"
        | "multline*" | "eqnarray" | "eqnarray*" => {
            out.push_str("\n    ");
            out.push_str(render_to_string(body).trim());
            out.push('\n');
        }
        _ => render(body, out),
    }
}

/// The combining mark an accent macro adds after its argument.
fn accent(name: &str) -> Option<char> {
    Some(match name {
        "vec" => '\u{20d7}',
        "dot" | "." => '\u{307}',
        "ddot" | "\"" => '\u{308}',
        "hat" | "^" => '\u{302}',
        "check" | "v" => '\u{30c}',
        "breve" | "u" => '\u{306}',
        "acute" | "'" => '\u{301}',
        "grave" | "`" => '\u{300}',
        "tilde" | "~" => '\u{303}',
        "bar" | "=" => '\u{305}',
        "c" => '\u{327}',
        "H" => '\u{30b}',
        "k" => '\u{328}',
        "b" => '\u{331}',
        "d" => '\u{323}',
        "r" => '\u{30a}',
        _ => return None,
    })
}

/// Unicode mathematical alphanumerics for `\mathbb`, `\mathbf`, `\mathit`,
/// `\mathsf`, `\mathtt` (letters only, as pylatexenc does, plus the
/// double-struck and monospace digits).
fn math_style(style: &str, c: char) -> char {
    let exception = match (style, c) {
        ("mathbb", 'C') => Some('ℂ'),
        ("mathbb", 'H') => Some('ℍ'),
        ("mathbb", 'N') => Some('ℕ'),
        ("mathbb", 'P') => Some('ℙ'),
        ("mathbb", 'Q') => Some('ℚ'),
        ("mathbb", 'R') => Some('ℝ'),
        ("mathbb", 'Z') => Some('ℤ'),
        ("mathit", 'h') => Some('ℎ'),
        _ => None,
    };
    if let Some(e) = exception {
        return e;
    }
    let (upper, lower, digit) = match style {
        "mathbb" => (0x1d538, 0x1d552, Some(0x1d7d8)),
        "mathbf" => (0x1d400, 0x1d41a, None),
        "mathit" => (0x1d434, 0x1d44e, None),
        "mathsf" => (0x1d5a0, 0x1d5ba, None),
        _ => (0x1d670, 0x1d68a, Some(0x1d7f6)),
    };
    let code = if c.is_ascii_uppercase() {
        upper + (c as u32 - 'A' as u32)
    } else if c.is_ascii_lowercase() {
        lower + (c as u32 - 'a' as u32)
    } else if let (true, Some(d)) = (c.is_ascii_digit(), digit) {
        d + (c as u32 - '0' as u32)
    } else {
        return c;
    };
    char::from_u32(code).unwrap_or(c)
}

/// The text of an argument-less macro; unknown macros give "".
fn symbol(name: &str) -> &'static str {
    match name {
        "," | ";" | ":" | " " => " ",
        "quad" => "  ",
        "qquad" => "    ",
        "&" => "&",
        "$" => "$",
        "{" => "{",
        "}" => "}",
        "%" => "%",
        "#" => "#",
        "_" => "_",
        "backslash" | "textbackslash" => "\\",
        "pm" | "textpm" => "±",
        "mp" | "textmp" => "∓",
        "cdot" => "·",
        "times" => "×",
        "div" => "÷",
        "ast" => "∗",
        "star" => "⋆",
        "circ" => "∘",
        "bullet" => "∙",
        "infty" => "∞",
        "in" => "∈",
        "notin" => "∉",
        "ni" => "∋",
        "cup" => "∪",
        "cap" => "∩",
        "setminus" | "smallsetminus" => "∖",
        "subset" => "⊂",
        "supset" => "⊃",
        "subseteq" => "⊆",
        "supseteq" => "⊇",
        "emptyset" | "varnothing" => "∅",
        "le" | "leq" => "≤",
        "ge" | "geq" => "≥",
        "leqslant" => "⩽",
        "geqslant" => "⩾",
        "neq" => "≠",
        "approx" => "≈",
        "sim" => "∼",
        "simeq" => "≃",
        "equiv" => "≡",
        "cong" => "≅",
        "propto" => "∝",
        "ll" => "≪",
        "gg" => "≫",
        "perp" => "⊥",
        "parallel" => "∥",
        "angle" => "∠",
        "partial" => "∂",
        "nabla" => "∇",
        "forall" => "∀",
        "exists" => "∃",
        "wedge" => "∧",
        "vee" => "∨",
        "to" | "rightarrow" => "→",
        "leftarrow" => "←",
        "Rightarrow" => "⇒",
        "uparrow" => "↑",
        "downarrow" => "↓",
        "longrightarrow" => "⟶",
        "sum" => "∑",
        "prod" => "∏",
        "int" => "∫",
        "oint" => "∮",
        "ldots" | "dots" | "dotsc" | "dotsb" | "dotsm" | "dotsi" | "dotso" => "…",
        "cdots" => "⋯",
        "vdots" => "⋮",
        "ddots" => "⋱",
        "langle" => "⟨",
        "rangle" => "⟩",
        "lvert" | "rvert" | "vert" | "mid" => "|",
        "lVert" | "rVert" | "Vert" => "‖",
        "prime" => "'",
        "dag" | "dagger" => "†",
        "hbar" => "ħ",
        "ell" => "ℓ",
        "aleph" => "ℵ",
        "textdegree" => "°",
        "textdollar" => "$",
        "cos" | "sin" | "tan" | "arccos" | "arcsin" | "arctan" | "cosh" | "sinh" | "tanh"
        | "ln" | "log" | "exp" | "max" | "min" | "sup" | "inf" | "lim" | "det" | "gcd" | "deg"
        | "dim" | "arg" | "ker" | "hom" | "lg" => static_name(name),
        "alpha" => "α",
        "beta" => "β",
        "gamma" => "γ",
        "Gamma" => "Γ",
        "delta" => "δ",
        "Delta" => "Δ",
        "epsilon" => "ϵ",
        "varepsilon" => "ε",
        "zeta" => "ζ",
        "eta" => "η",
        "theta" => "θ",
        "Theta" => "Θ",
        "vartheta" => "ϑ",
        "iota" => "ι",
        "kappa" => "κ",
        "lambda" => "λ",
        "Lambda" => "Λ",
        "mu" => "μ",
        "nu" => "ν",
        "xi" => "ξ",
        "Xi" => "Ξ",
        "pi" => "π",
        "Pi" => "Π",
        "varpi" => "ϖ",
        "rho" => "ρ",
        "varrho" => "ϱ",
        "sigma" => "σ",
        "Sigma" => "Σ",
        "varsigma" => "ς",
        "tau" => "τ",
        "upsilon" => "υ",
        "Upsilon" => "Υ",
        "phi" => "ϕ",
        "Phi" => "Φ",
        "varphi" => "φ",
        "chi" => "χ",
        "psi" => "ψ",
        "Psi" => "Ψ",
        "omega" => "ω",
        "Omega" => "Ω",
        _ => "",
    }
}

fn static_name(name: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "cos", "sin", "tan", "arccos", "arcsin", "arctan", "cosh", "sinh", "tanh", "ln", "log",
        "exp", "max", "min", "sup", "inf", "lim", "det", "gcd", "deg", "dim", "arg", "ker", "hom",
        "lg",
    ];
    NAMES.iter().find(|n| **n == name).copied().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::latex_to_text as t;

    fn l(s: &str) -> String {
        t(s).expect("parses")
    }

    #[test]
    fn like_pylatexenc() {
        assert_eq!(l(r"\left( 3, \frac{\pi}{2} \right)"), "( 3, π/2 )");
        assert_eq!(l(r"11\sqrt2"), "11√(2)");
        assert_eq!(l(r"\frac{11+9a}{20}"), "11+9a/20");
        assert_eq!(l(r"0\le\lambda\le4\lambda\ne1"), "0≤λ≤4λ1");
        assert_eq!(l(r"\sin x \sec x"), "sinx x");
        assert_eq!(l(r"864 \mbox{ }^2"), "864 ^2");
        assert_eq!(l(r"\unknown{} x"), " x");
        assert_eq!(
            l(r"\begin{pmatrix} 1 & 22 \\ 333 & 4 \end{pmatrix}"),
            "[   1  22; 333   4 ]"
        );
        assert_eq!(l(r"\begin{pmatrix} 1 \\ 2 \\ \end{pmatrix}"), "[ 1; 2;   ]");
        assert_eq!(l(r"\mathbb R"), "ℝ");
        assert_eq!(l(r"\frac\pi2"), "π/2");
        assert_eq!(l(r"{1,-2"), "1,-2");
        assert_eq!(l(r"1}+2"), "1+2");
        assert_eq!(l(r"a\, b"), "a  b");
        assert_eq!(l(r"\[x\] y"), "\n    x\n y");
        assert_eq!(t(r"\begin{pmatrix}"), None);
    }
}
