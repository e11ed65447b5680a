//! The generic `command` stage: a shell command with declared inputs and
//! outputs, like a Snakemake rule. The plan keeps the `run` template as
//! written and the values of the grid variables and parameters it names
//! (`vars`); the template is rendered once, here, with every `${…}` passed
//! through the environment (see `shell.rs`).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use spur_core::node_params::{self, CommandNodeParams, ParamsError};
use spur_plan::{Node, Role, StageKind};

use crate::shell::{self, ScriptError};
use crate::{interrupt, NodeContext, Resource, Stage, StageError};

pub struct CommandStage;

/// The node's parameters; `run` reports an error, the scheduling questions (`resource`,
/// `declared_outputs`) treat unreadable ones as a CPU node with no outputs.
fn params(node: &Node) -> Result<CommandNodeParams, ParamsError> {
    node_params::from_value(StageKind::Command, &node.params)
}

/// Last `n` bytes of a log, for error messages.
fn tail(path: &Path, n: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

impl Stage for CommandStage {
    fn kind(&self) -> StageKind {
        StageKind::Command
    }

    fn version(&self) -> u32 {
        // 2: values arrive through the environment, one word each.
        2
    }

    fn resource(&self, node: &Node) -> Resource {
        match params(node) {
            Ok(p) if p.accelerator => Resource::Accelerator,
            _ => Resource::Cpu,
        }
    }

    fn declared_outputs(&self, node: &Node) -> Vec<String> {
        params(node).map(|p| p.outputs).unwrap_or_default()
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let CommandNodeParams {
            run: template,
            vars,
            inputs: input_names,
            needs,
            ..
        } = params(ctx.node)?;
        let step = ctx.node.step;
        // Paths are absolute, so a command may `cd` before using them.
        let out = std::path::absolute(ctx.out)?;
        let path = |p: &Path| std::path::absolute(p).ok().map(OsString::from);
        let mut lookup = |name: &str| -> Option<OsString> {
            match name {
                "out" => Some(out.clone().into()),
                "step" => Some(step.to_string().into()),
                // Step 1 has no previous step: an empty string, testable with [ -n ].
                "prev" => match ctx.input(Role::Prev) {
                    Some(i) => path(&i.out),
                    None => Some(OsString::new()),
                },
                _ => {
                    if let Some(input) = name.strip_prefix("inputs.") {
                        let i = input_names.iter().position(|n| n == input)?;
                        return ctx.externals.get(i)?.local.as_deref().and_then(path);
                    }
                    if let Some(i) = needs.iter().position(|n| n == name) {
                        return ctx.input(Role::Need(i as u16)).and_then(|d| path(&d.out));
                    }
                    // Grid values and parameters, as the plan resolved them.
                    vars.get(name).map(|v| spur_core::scalar_text(v).into())
                }
            }
        };
        let script = shell::render(&template, &mut lookup).map_err(|e| match e {
            ScriptError::Unknown(name) => {
                StageError::Failed(format!("`${{{name}}}` has no value for this node"))
            }
            ScriptError::Unusable { name, why } => StageError::Failed(format!(
                "`${{{name}}}` cannot be passed to the command: {why}"
            )),
        })?;
        let log = File::create(ctx.log)?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(&script.text)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .envs(script.env)
            .env("SPUR_OUT", &out)
            .env("SPUR_STEP", step.to_string())
            .env("SPUR_NODE", ctx.node.id.hex());
        if !ctx.devices.is_empty() {
            cmd.env("CUDA_VISIBLE_DEVICES", ctx.devices.join(","));
        }
        let status = interrupt::status(&mut cmd)?;
        if !status.success() {
            return Err(StageError::CommandFailed {
                status: status.to_string(),
                log: ctx.log.to_path_buf(),
                tail: tail(ctx.log, 2000),
            });
        }
        // A command may report metrics by writing `${out}/metrics.json`.
        let metrics_path = ctx.out.join("metrics.json");
        let metrics = match std::fs::read(&metrics_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                StageError::Failed(format!("{}: not valid JSON: {e}", metrics_path.display()))
            })?,
            Err(_) => Value::Object(Default::default()),
        };
        Ok(metrics)
    }
}
