//! The checks of an experiment file beyond its types: versions, sources, definitions and the
//! names they refer to, reward kinds, command cycles and the pipeline. The grid's cells are
//! checked where they are resolved (`grid.rs`).

use std::collections::BTreeSet;
use std::path::Path;

use spur_core::{RewardBase, RewardExpr, RewardKindError};

use crate::schema::ExperimentFile;
use indexmap::IndexMap;

use crate::{
    did_you_mean, grid, one_of, Ctx, Engine, Experiment, GraderName, Source, SpecError,
    TemplateKind, BUILTIN_STAGES,
};

pub(crate) fn validate(
    ctx: &Ctx,
    file: ExperimentFile,
    errors: &mut Vec<SpecError>,
) -> Option<Experiment> {
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
        None => {
            // Without a pipeline, a file with models runs the built-in stages only: commands
            // defined beside them would silently never run.
            if !file.commands.is_empty() {
                let mut stages: Vec<&str> = BUILTIN_STAGES.to_vec();
                stages.extend(file.commands.keys().map(String::as_str));
                errors.push(
                    ctx.err(
                        "commands",
                        true,
                        "these commands are in no pipeline: with models and no `pipeline:`, \
                         only the built-in stages run",
                    )
                    .with_hint(Some(format!(
                        "list the stages to run, e.g. `pipeline: [{}]`",
                        stages.join(", ")
                    ))),
                );
            }
            BUILTIN_STAGES.iter().map(|s| s.to_string()).collect()
        }
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
