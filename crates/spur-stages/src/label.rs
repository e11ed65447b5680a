//! The `label` stage: majority-vote labels, as the paper made them — the
//! model samples answers per problem at T=1 from the raw problem text (no
//! chat template), and the label is the most common non-empty answer.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spur_core::node_params::{LabelNodeParams, LabelTemplate};
use spur_lm::{Engine, GenerationRequest, PromptTemplate, SamplingParams};
use spur_math::{ExtractStyle, Grader};
use spur_plan::StageKind;

use crate::data;
use crate::model::{self, failed};
use crate::{NodeContext, Resource, Stage, StageError};

pub const LABELS_FILE: &str = "labels.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Label {
    pub index: usize,
    /// Empty when no sample had an extractable answer.
    pub label: String,
    pub votes: usize,
    pub label_correct: bool,
}

/// The template labels are sampled under (the paper's bare problem text).
pub(crate) fn template(template: LabelTemplate) -> PromptTemplate {
    match template {
        LabelTemplate::Raw => PromptTemplate::Raw,
    }
}

pub struct LabelStage;

impl Stage for LabelStage {
    fn kind(&self) -> StageKind {
        StageKind::Label
    }

    fn version(&self) -> u32 {
        // Samples through spur-lm's decode path: numerics changes are spur_lm::NUMERICS_VERSION.
        crate::numerics_stage_version(1, spur_lm::NUMERICS_VERSION)
    }

    fn resource(&self, _node: &spur_plan::Node) -> Resource {
        Resource::Accelerator
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![LABELS_FILE.into()]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params: LabelNodeParams = ctx.params()?;
        let problems = data::load(&model::dataset_path(ctx)?, &params.dataset)?;
        let (n, seed) = (params.samples as usize, params.seed);
        let template = template(params.template);
        let sampling = SamplingParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: 0,
            max_new_tokens: params.max_tokens as usize,
            stop_strings: Vec::new(),
            seed: 0,
        };
        let out = ctx.out.to_path_buf();
        let policy = model::ensure_policy(ctx, params.model.precision, None)?;
        let engine = spur_lm::CandleEngine::new(policy.model.clone(), policy.tokenizer.clone());
        let mut requests = Vec::with_capacity(problems.len());
        for (i, p) in problems.iter().enumerate() {
            let prompt = template
                .render(&policy.tokenizer, &p.problem)
                .map_err(failed)?;
            requests.push(GenerationRequest {
                prompt_ids: policy.tokenizer.encode(&prompt).map_err(failed)?,
                n,
                params: SamplingParams {
                    seed: spur_math::sample_seed(seed, &[i as u64]),
                    ..sampling.clone()
                },
            });
        }
        let completions = engine.generate(&requests).map_err(failed)?;
        let mut answers = vec![Vec::new(); problems.len()];
        for c in completions {
            answers[c.prompt_index].push(Grader::Paper.extract(&c.text, ExtractStyle::Default));
        }
        let labels: Vec<Label> = problems
            .iter()
            .zip(&answers)
            .map(|(p, a)| {
                let label = spur_math::majority_label(a).unwrap_or_default();
                Label {
                    index: p.index,
                    votes: a.iter().filter(|x| **x == label).count(),
                    label_correct: !label.is_empty()
                        && Grader::Paper.is_equivalent(&label, &p.answer),
                    label,
                }
            })
            .collect();
        let correct = labels.iter().filter(|l| l.label_correct).count();
        let empty = labels.iter().filter(|l| l.label.is_empty()).count();
        model::write_json(&out.join(LABELS_FILE), &labels)?;
        Ok(json!({
            "problems": labels.len(),
            "label_accuracy": correct as f64 / labels.len() as f64,
            "no_label": empty,
        }))
    }
}
