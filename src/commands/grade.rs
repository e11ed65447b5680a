//! `spur grade`: extract and grade model responses in a JSONL file, with one
//! grader, or with several side by side (`--compare`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use spur_math::{ExtractStyle, GradeSummary, Grader};

#[derive(clap::Args, Debug)]
pub struct GradeArgs {
    /// JSONL input, one `{"gold": …, "response": …}` object per line (other fields are kept).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the graded JSONL (default: standard output, except with --compare, which
    /// writes it only here).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// `paper` reproduces the paper's verdicts, failures included; `strict` fixes the obvious
    /// failures; `math_verify` is HuggingFace Math-Verify 0.9's semantics.
    #[arg(long, default_value = "paper", value_parser = ["paper", "strict", "math_verify"])]
    pub grader: String,
    /// Grade with several graders at once, e.g. `paper,strict,math_verify`, and print where they
    /// disagree; `--output` then gets `"verdicts"` per line.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "grader")]
    pub compare: Option<Vec<String>>,
    /// With --compare: print the summary as one JSON object instead of a table.
    #[arg(long, requires = "compare")]
    pub json: bool,
    /// Where the answer is read: last `\boxed{}` with fallbacks (`default`), `<answer>` tags (`r1`), or boxes only (`box_only`).
    #[arg(long, default_value = "default", value_parser = ["default", "r1", "box_only"])]
    pub style: String,
}

pub fn run(args: GradeArgs) -> anyhow::Result<ExitCode> {
    let style: ExtractStyle = args.style.parse()?;
    let graders = match &args.compare {
        Some(names) => compared_graders(names)?,
        None => vec![args.grader.parse()?],
    };
    let input = File::open(&args.input)
        .with_context(|| format!("cannot open --input {}", args.input.display()))?;
    let input = BufReader::new(input);
    let summary = match (&args.output, &args.compare) {
        (Some(path), _) => {
            let out = File::create(path)
                .with_context(|| format!("cannot create --output {}", path.display()))?;
            spur_math::grade_jsonl(input, BufWriter::new(out), &graders, style)
        }
        (None, Some(_)) => spur_math::grade_jsonl(input, std::io::sink(), &graders, style),
        (None, None) => spur_math::grade_jsonl(input, std::io::stdout().lock(), &graders, style),
    }
    .with_context(|| format!("grading {}", args.input.display()))?;
    let mut err = std::io::stderr().lock();
    for e in &summary.errors {
        writeln!(err, "{}:{}: {}", args.input.display(), e.line, e.message)?;
    }
    if args.compare.is_some() {
        let mut out = std::io::stdout().lock();
        if args.json {
            let json = comparison_json(&args, &summary, style);
            writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
        } else {
            write!(
                out,
                "{}",
                comparison_table(&args, &summary, &graders, style)
            )?;
        }
    } else {
        writeln!(
            err,
            "graded {} lines ({} correct, grader {}, style {}); {} lines with errors",
            summary.graded,
            summary.correct(graders[0]),
            graders[0].name(),
            style.name(),
            summary.errors.len()
        )?;
    }
    Ok(if summary.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The graders of `--compare`, checked: known names, each once, at least two.
fn compared_graders(names: &[String]) -> anyhow::Result<Vec<Grader>> {
    let mut graders: Vec<Grader> = Vec::with_capacity(names.len());
    for name in names {
        let grader: Grader = name
            .trim()
            .parse()
            .with_context(|| format!("--compare {}", names.join(",")))?;
        if graders.contains(&grader) {
            bail!(
                "--compare names `{}` twice; name each grader once",
                grader.name()
            );
        }
        graders.push(grader);
    }
    if graders.len() < 2 {
        bail!(
            "--compare needs at least two graders, e.g. `--compare paper,strict,math_verify` \
             (use --grader for one)"
        );
    }
    Ok(graders)
}

fn comparison_json(
    args: &GradeArgs,
    summary: &GradeSummary,
    style: ExtractStyle,
) -> serde_json::Value {
    serde_json::json!({
        "input": args.input.display().to_string(),
        "style": style.name(),
        "graded": summary.graded,
        "comparison": summary.comparison,
        "errors": summary.errors,
    })
}

fn comparison_table(
    args: &GradeArgs,
    summary: &GradeSummary,
    graders: &[Grader],
    style: ExtractStyle,
) -> String {
    let c = &summary.comparison;
    let mut out = format!(
        "{}: {} responses graded (style {}), {} lines with errors\n\n",
        args.input.display(),
        summary.graded,
        style.name(),
        summary.errors.len()
    );
    let width = graders
        .iter()
        .map(|g| g.name().len())
        .fold("grader".len(), usize::max);
    out.push_str(&format!(
        "{:width$}  {:>8}  {:>8}\n",
        "grader", "correct", "accuracy"
    ));
    for g in graders {
        let group = &c.by_grader[g.name()];
        out.push_str(&format!(
            "{:width$}  {:>8}  {:>7.2}%\n",
            g.name(),
            group.correct,
            100.0 * group.accuracy
        ));
    }
    let pair_width = c
        .pairs
        .iter()
        .map(|p| p.a.len() + p.b.len() + 4)
        .fold("pair (a vs b)".len(), usize::max);
    out.push_str(&format!(
        "\n{:pair_width$}  {:>6}  {:>6}\n",
        "pair (a vs b)", "a only", "b only"
    ));
    for p in &c.pairs {
        out.push_str(&format!(
            "{:pair_width$}  {:>6}  {:>6}\n",
            format!("{} vs {}", p.a, p.b),
            p.a_only,
            p.b_only
        ));
    }
    out.push_str(&format!(
        "\n{} of {} responses get differing verdicts",
        c.disagree, c.n
    ));
    if c.disagree_lines.is_empty() {
        out.push('\n');
    } else {
        let lines: Vec<String> = c.disagree_lines.iter().map(usize::to_string).collect();
        let first = if c.disagree > c.disagree_lines.len() {
            format!("first {} ", c.disagree_lines.len())
        } else {
            String::new()
        };
        out.push_str(&format!("; {first}lines: {}\n", lines.join(", ")));
    }
    out
}
