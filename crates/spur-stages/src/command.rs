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
use spur_plan::{Node, Role, StageKind};

use crate::shell::{self, ScriptError};
use crate::{interrupt, NodeContext, Resource, Stage, StageError};

pub struct CommandStage;

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
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
        if node.params.get("accelerator").and_then(Value::as_bool) == Some(true) {
            Resource::Accelerator
        } else {
            Resource::Cpu
        }
    }

    fn declared_outputs(&self, node: &Node) -> Vec<String> {
        strings(&node.params, "outputs")
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params = &ctx.node.params;
        let template = crate::param::Params::new(StageKind::Command, params).str("run")?;
        let vars = params.get("vars").and_then(Value::as_object);
        let input_names = strings(params, "inputs");
        let needs = strings(params, "needs");
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
                    vars?.get(name).map(|v| spur_core::scalar_text(v).into())
                }
            }
        };
        let script = shell::render(template, &mut lookup).map_err(|e| match e {
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
