//! `spur grade`: grade a JSONL file of `{"gold": …, "response": …}` lines.

use std::fmt;
use std::io::{BufRead, Write};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::{Error, ExtractStyle, Grader, GraderComparison, Verdict};

/// A problem with one input line; the line was skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GradeSummary {
    /// Lines graded and written.
    pub graded: usize,
    /// The graders' verdicts on those lines (one grader: its accuracy alone).
    pub comparison: GraderComparison,
    /// Lines that could not be graded, in input order.
    pub errors: Vec<LineError>,
}

impl GradeSummary {
    /// Lines `grader` called correct (0 for a grader not run).
    pub fn correct(&self, grader: Grader) -> usize {
        self.comparison
            .by_grader
            .get(grader.name())
            .map_or(0, |g| g.correct)
    }
}

/// A JSON object with its members in input order and their values verbatim.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry::<String, Box<RawValue>>()? {
                    v.push((k, val));
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads JSONL lines `{"gold": …, "response": …}` (`gold` a string or a
/// number) and writes, in the same order, each object with the verdicts
/// added. With one grader that is `"extracted"` and `"correct"`; with
/// several, `"verdicts": {grader: {"extracted", "correct"}, …}` in the order
/// given. Members of those names are replaced. Lines that are not JSON
/// objects or lack a field are reported in the summary and skipped; the
/// others are still graded. I/O failures stop the run.
pub fn grade_jsonl(
    input: impl BufRead,
    mut output: impl Write,
    graders: &[Grader],
    style: ExtractStyle,
) -> crate::Result<GradeSummary> {
    let mut summary = GradeSummary {
        comparison: GraderComparison::new(graders),
        ..GradeSummary::default()
    };
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(Error::Read)?;
        let number = i + 1;
        match grade_line(&line, graders, style) {
            Ok((text, verdicts)) => {
                writeln!(output, "{text}").map_err(Error::Write)?;
                summary.graded += 1;
                summary.comparison.add(number, &verdicts);
            }
            Err(message) => summary.errors.push(LineError {
                line: number,
                message,
            }),
        }
    }
    output.flush().map_err(Error::Write)?;
    Ok(summary)
}

fn grade_line(
    line: &str,
    graders: &[Grader],
    style: ExtractStyle,
) -> Result<(String, Vec<bool>), String> {
    if line.trim().is_empty() {
        return Err("empty line (expected a JSON object)".into());
    }
    let Members(mut members) =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let field = |name: &str| {
        members
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.get())
    };
    let gold = match field("gold").map(serde_json::from_str::<serde_json::Value>) {
        None => return Err("missing field \"gold\"".into()),
        Some(Ok(serde_json::Value::String(s))) => s,
        Some(Ok(serde_json::Value::Number(n))) => n.to_string(),
        Some(_) => return Err("field \"gold\" must be a string or a number".into()),
    };
    let response = match field("response").map(serde_json::from_str::<serde_json::Value>) {
        None => return Err("missing field \"response\"".into()),
        Some(Ok(serde_json::Value::String(s))) => s,
        Some(_) => return Err("field \"response\" must be a string".into()),
    };
    let verdicts: Vec<Verdict> = graders
        .iter()
        .map(|g| g.grade(&response, &gold, style))
        .collect();
    let added: Vec<(&str, String)> = match (graders, verdicts.as_slice()) {
        ([_], [v]) => vec![
            ("extracted", to_json(&v.extracted)?),
            ("correct", to_json(&v.correct)?),
        ],
        _ => {
            // Built by hand so the graders stay in the order given.
            let mut by_grader = String::from("{");
            for (k, (g, v)) in graders.iter().zip(&verdicts).enumerate() {
                if k > 0 {
                    by_grader.push(',');
                }
                by_grader.push_str(&format!("{}:{}", to_json(&g.name())?, to_json(v)?));
            }
            by_grader.push('}');
            vec![("verdicts", by_grader)]
        }
    };
    for (name, value) in added {
        let raw = RawValue::from_string(value).map_err(|e| e.to_string())?;
        match members.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = raw,
            None => members.push((name.to_string(), raw)),
        }
    }
    let mut out = String::with_capacity(line.len() + 64);
    out.push('{');
    for (k, (name, value)) in members.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push_str(&to_json(name)?);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Ok((out, verdicts.iter().map(|v| v.correct).collect()))
}

fn to_json(value: &(impl Serialize + ?Sized)) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_and_reports_bad_lines() {
        let input = concat!(
            "{\"id\":7,\"gold\":\"\\\\frac12\",\"response\":\"so \\\\boxed{0.5}\",\"meta\":{\"b\":1,\"a\":2}}\n",
            "not json\n",
            "{\"gold\":\"1\"}\n",
            "{\"gold\":142.0,\"response\":\"The answer is 142\",\"correct\":null}\n",
        );
        let mut out = Vec::new();
        let s = grade_jsonl(
            input.as_bytes(),
            &mut out,
            &[Grader::Paper],
            ExtractStyle::Default,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"id":7,"gold":"\\frac12","response":"so \\boxed{0.5}","meta":{"b":1,"a":2},"extracted":"0.5","correct":true}"#
        );
        assert_eq!(
            lines[1],
            r#"{"gold":142.0,"response":"The answer is 142","correct":true,"extracted":"142"}"#
        );
        assert_eq!((s.graded, s.correct(Grader::Paper)), (2, 2));
        assert_eq!(
            s.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(s.errors[1].message.contains("response"));
    }

    #[test]
    fn several_graders_write_verdicts_in_the_order_given() {
        // Roots in another order: math_verify compares them as a set, the
        // paper's grader position by position.
        let input = concat!(
            "{\"gold\":\"0.5\",\"response\":\"\\\\boxed{\\\\frac{1}{2}}\"}\n",
            "{\"gold\":\"1,-2\",\"response\":\"\\\\boxed{-2,1}\",\"verdicts\":1}\n",
        );
        let graders = [Grader::MathVerify, Grader::Paper];
        let mut out = Vec::new();
        let s = grade_jsonl(input.as_bytes(), &mut out, &graders, ExtractStyle::Default).unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[1],
            r#"{"gold":"1,-2","response":"\\boxed{-2,1}","verdicts":{"math_verify":{"extracted":"-2,1","correct":true},"paper":{"extracted":"-2,1","correct":false}}}"#
        );
        assert!(!lines[0].contains("\"correct\":false"), "{}", lines[0]);
        assert_eq!(s.comparison.n, 2);
        assert_eq!(s.correct(Grader::MathVerify), 2);
        assert_eq!(s.correct(Grader::Paper), 1);
        assert_eq!(s.correct(Grader::Strict), 0, "not run");
        assert_eq!(s.comparison.disagree_lines, vec![2]);
    }
}
