//! `spur loss --input FILE.json`: the GRPO objective and its gradient for given log-probs, so a
//! researcher can check spur against another implementation. The input format is in
//! docs/grpo.md; the computation is the trainer's own (spur_rl::loss_from_json).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct LossArgs {
    /// JSON file with `config` and `groups` (see docs/grpo.md); `-` reads standard input.
    #[arg(long)]
    pub input: PathBuf,
}

pub fn run(args: LossArgs) -> anyhow::Result<ExitCode> {
    let from_stdin = args.input.as_os_str() == "-";
    let name = if from_stdin {
        "standard input".to_string()
    } else {
        args.input.display().to_string()
    };
    let text = if from_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the loss input from standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.input).with_context(|| format!("reading {name}"))?
    };
    let input: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{name} is not valid JSON"))?;
    let output = spur_rl::loss_from_json(&input).with_context(|| name.clone())?;
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(ExitCode::SUCCESS)
}
