//! `spur grade`: extract and grade model responses in a JSONL file.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use spur_math::{ExtractStyle, Grader};

#[derive(clap::Args, Debug)]
pub struct GradeArgs {
    /// JSONL input, one `{"gold": …, "response": …}` object per line (other fields are kept).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the graded JSONL (default: standard output).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// `paper` reproduces the paper's verdicts, failures included; `strict` fixes the obvious failures.
    #[arg(long, default_value = "paper", value_parser = ["paper", "strict"])]
    pub grader: String,
    /// Where the answer is read: last `\boxed{}` with fallbacks (`default`), `<answer>` tags (`r1`), or boxes only (`box_only`).
    #[arg(long, default_value = "default", value_parser = ["default", "r1", "box_only"])]
    pub style: String,
}

pub fn run(args: GradeArgs) -> anyhow::Result<ExitCode> {
    let grader: Grader = args.grader.parse()?;
    let style: ExtractStyle = args.style.parse()?;
    let input = File::open(&args.input)
        .with_context(|| format!("cannot open --input {}", args.input.display()))?;
    let input = BufReader::new(input);
    let summary = match &args.output {
        Some(path) => {
            let out = File::create(path)
                .with_context(|| format!("cannot create --output {}", path.display()))?;
            spur_math::grade_jsonl(input, BufWriter::new(out), grader, style)
        }
        None => spur_math::grade_jsonl(input, std::io::stdout().lock(), grader, style),
    }
    .with_context(|| format!("grading {}", args.input.display()))?;
    let mut err = std::io::stderr().lock();
    for e in &summary.errors {
        writeln!(err, "{}:{}: {}", args.input.display(), e.line, e.message)?;
    }
    writeln!(
        err,
        "graded {} lines ({} correct, grader {}, style {}); {} lines with errors",
        summary.graded,
        summary.correct,
        grader.name(),
        style.name(),
        summary.errors.len()
    )?;
    Ok(if summary.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
