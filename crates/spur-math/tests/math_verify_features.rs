//! The `math_verify` grader, feature by feature: every case written as a
//! literal (70 of them) gives the same verdict as
//! the Python library (math-verify 0.9.0); each feature has cases
//! that must be false.

use spur_math::{ExtractStyle, Grader};

/// `verify(parse("$" + gold + "$"), parse(response))`.
fn mv(response: &str, gold: &str) -> bool {
    Grader::MathVerify
        .grade(response, gold, ExtractStyle::Default)
        .correct
}

fn boxed(answer: &str, gold: &str) -> bool {
    mv(&format!("The answer is $\\boxed{{{answer}}}$."), gold)
}

#[test]
fn plain_numbers_and_fractions() {
    assert!(boxed("42", "42"));
    assert!(boxed("025", "25"));
    assert!(boxed(r"\dfrac{2}{4}", r"\frac{1}{2}"));
    assert!(boxed(r"\cfrac{1}{3}", "1/3"));
    assert!(!boxed("43", "42"));
    assert!(!boxed(r"\frac{1}{3}", r"\frac{1}{2}"));
}

#[test]
fn sets_and_unordered_lists() {
    assert!(boxed("-2, 1", "1,-2"));
    assert!(boxed("3, 5, 7", "3,7,5"));
    assert!(boxed(r"\{1, 2\}", "2, 1"));
    assert!(boxed(r"3 + 2\sqrt{2}, 3 - 2\sqrt{2}", r"3 \pm 2 \sqrt{2}"));
    assert!(mv(r"So $\boxed{1}$ and $\boxed{2}$.", "1,2"));
    assert!(!boxed("1, 2", "1,-2"));
    assert!(!boxed("1, 2, 3", "1,2"));
    assert!(!boxed(r"3 + 2\sqrt{2}", r"3 \pm 2 \sqrt{2}"));
}

#[test]
fn tuples_keep_their_order() {
    assert!(boxed("(3, -1)", "(3,-1)"));
    assert!(!boxed("(-1, 3)", "(3,-1)"));
    // Labelled answers.
    assert!(boxed("(3, 2)", "(p,q)=(3,2)"));
    assert!(!boxed("(2, 3)", "(p,q)=(3,2)"));
}

#[test]
fn intervals_and_inequalities() {
    assert!(boxed("[-2, 7]", r"x \in [-2,7]"));
    assert!(boxed(r"(-\infty, 3)", "x < 3"));
    assert!(boxed(r"(-2, 5]", r"-2 < x \le 5"));
    assert!(boxed(r"[1,2) \cup (3,4]", r"[1,2)\cup(3,4]"));
    assert!(!boxed("[-2, 7)", r"x \in [-2,7]"));
    assert!(!boxed(r"(-\infty, 3]", "x < 3"));
    assert!(!boxed("(0,9)", "[0,9)"));
}

#[test]
fn equations() {
    assert!(boxed("x = 3", "3"));
    assert!(boxed("3", "x = 3"));
    assert!(boxed("y = 2x + 1", "y=2x+1"));
    assert!(boxed("2x - y + 1 = 0", "y = 2x + 1"));
    assert!(boxed("f(x) = 2x + 1", "2x+1"));
    assert!(!boxed("x = 4", "3"));
    assert!(!boxed("y = 2x - 1", "y=2x+1"));
}

#[test]
fn matrices() {
    let gold = r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}";
    assert!(boxed(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", gold));
    assert!(boxed(r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}", gold));
    assert!(mv(
        r"$\begin{pmatrix}1 & 0 \\ 1 & 2\end{pmatrix} + \begin{pmatrix}0 & 2 \\ 2 & 2\end{pmatrix}$",
        gold
    ));
    assert!(!boxed(
        r"\begin{pmatrix} 1 & 2 \\ 4 & 3 \end{pmatrix}",
        gold
    ));
    assert!(!boxed(r"\begin{pmatrix} 1 & 2 & 3 & 4 \end{pmatrix}", gold));
}

#[test]
fn percentages() {
    assert!(mv("28 percent", r"28\%"));
    assert!(mv("28 pct", r"28\%"));
    assert!(mv(r"$\boxed{28 percentage}$", r"28\%"));
    assert!(mv("$28$ %", r"28\%"));
    assert!(mv("28", r"28\%"));
    assert!(boxed(r"10\%", "0.1"));
    // A float percentage is a fraction (the paper's grader strips `%`).
    assert!(!mv(r"\( \boxed{10.0} \)%.", "10"));
    assert!(!mv("28", "0.28"));
    assert!(!mv("28/100", "28"));
}

#[test]
fn decimal_commas_and_thousands() {
    assert!(mv("1000,99", "1000.99"));
    assert!(mv("Soucis : 2,74 $ a..", "2.74"));
    assert!(mv("7,425,000", "7425000"));
    assert!(mv("1 000", "1000"));
    assert!(boxed("1,000", "1000"));
    assert!(!mv("1000,98", "1000.99"));
    assert!(!boxed("1, 000", "1000"));
}

#[test]
fn numeric_tolerance() {
    assert!(boxed("0.333333", r"\frac{1}{3}"));
    assert!(boxed("1.414214", r"\sqrt{2}"));
    assert!(boxed("142", "142.0"));
    assert!(!boxed("0.33", r"\frac{1}{3}"));
    assert!(!boxed("1.41", r"\sqrt{2}"));
}

#[test]
fn symbolic_equality() {
    assert!(boxed(r"\frac{9a + 11}{20}", r"\frac{11+9a}{20}"));
    assert!(boxed(r"2\sqrt{2}", r"\sqrt{8}"));
    assert!(boxed("(a + 5)(b + 2)", "ab + 2a + 5b + 10"));
    assert!(!boxed(r"\frac{9a + 11}{21}", r"\frac{11+9a}{20}"));
    assert!(!boxed("(a + 5)(b + 3)", "ab + 2a + 5b + 10"));
}

#[test]
fn units_text_and_mixed_numbers() {
    assert!(boxed("15", r"15\mbox{ cm}^2"));
    assert!(boxed(r"\text{east}", r"\text{east}"));
    assert!(boxed("E", r"\text{(E)}"));
    assert!(boxed(r"2\frac{2}{5}", "12/5"));
    assert!(!boxed(r"2\frac{2}{5}", r"1\frac{4}{5}"));
    assert!(!boxed(r"\text{west}", r"\text{east}"));
}

#[test]
fn extraction_priorities() {
    // The last box wins over earlier numbers; "final answer is" anchors.
    assert!(mv(r"First 3, then $\boxed{5}$.", "5"));
    assert!(mv("The final answer is $7$. I hope it is correct.", "7"));
    assert!(!mv(
        r"First $\boxed{3}$ and much later, after a long detour with no separator, $\boxed{5}$",
        "3"
    ));
    assert!(!mv("no answer here", "3"));
}

#[test]
fn bounded_work() {
    // Huge powers and factorials are not expanded; the call returns.
    assert!(!boxed("2^{100000000}", "3"));
    assert!(!boxed("100000!", "3"));
    let long = "x+".repeat(5000);
    assert!(!boxed(&long, "3"));
}
