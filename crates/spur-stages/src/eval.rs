//! The `eval` stage: a benchmark at one step (MATH-500 greedy pass@1,
//! AIME/AMC avg@k). Every response is graded by all of spur's graders in one
//! pass; `eval.grader` picks the one behind the headline `accuracy`, and the
//! metrics say how often the others disagree with it.

use std::io::Write;

use serde_json::{json, Value};
use spur_core::node_params::EvalNodeParams;
use spur_lm::{GenerationRequest, PromptTemplate, SamplingParams};
use spur_math::{EvalRecord, ExtractStyle, Grader, GraderComparison};
use spur_plan::StageKind;

use crate::data;
use crate::model::{self, failed};
use crate::{NodeContext, Resource, Stage, StageError};

pub const RECORDS_FILE: &str = "eval.jsonl";

pub struct EvalStage;

impl Stage for EvalStage {
    fn kind(&self) -> StageKind {
        StageKind::Eval
    }

    fn version(&self) -> u32 {
        // Samples through spur-lm's decode path: numerics changes are spur_lm::NUMERICS_VERSION.
        // 2: all graders' verdicts per response, `eval.grader` picks the headline.
        crate::numerics_stage_version(2, spur_lm::NUMERICS_VERSION)
    }

    fn resource(&self, _node: &spur_plan::Node) -> Resource {
        Resource::Accelerator
    }

    fn declared_outputs(&self, _node: &spur_plan::Node) -> Vec<String> {
        vec![RECORDS_FILE.into()]
    }

    fn run(&self, ctx: &mut NodeContext<'_>) -> Result<Value, StageError> {
        let params: EvalNodeParams = ctx.params()?;
        let e = &params.eval;
        let (n, seed) = (e.samples as usize, e.seed);
        let sampling = SamplingParams {
            temperature: e.temperature,
            top_p: e.top_p,
            top_k: 0,
            max_new_tokens: e.max_tokens as usize,
            stop_strings: Vec::new(),
            seed: 0,
        };
        let engine_name = params
            .model
            .engine
            .ok_or_else(|| failed("an eval node's model names its `engine`"))?;
        let headline = Grader::from(e.grader);
        // The headline grader first: its verdict is the record's `correct`.
        let graders: Vec<Grader> = std::iter::once(headline)
            .chain(Grader::ALL.into_iter().filter(|g| *g != headline))
            .collect();
        let problems = data::load(&model::dataset_path(ctx)?, &params.dataset)?;
        let template = model::template(&params.model)?;
        let style = if template == PromptTemplate::R1 {
            ExtractStyle::R1
        } else {
            ExtractStyle::Default
        };
        let out = ctx.out.to_path_buf();
        let (engine, tokenizer) = model::engine(ctx, engine_name, params.model.precision)?;
        let mut requests = Vec::with_capacity(problems.len());
        let mut prompt_hashes = Vec::with_capacity(problems.len());
        for (i, p) in problems.iter().enumerate() {
            let prompt = template.render(&tokenizer, &p.problem).map_err(failed)?;
            prompt_hashes.push(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                prompt.as_bytes(),
            )));
            requests.push(GenerationRequest {
                prompt_ids: tokenizer.encode(&prompt).map_err(failed)?,
                n,
                params: SamplingParams {
                    stop_strings: template.stop_strings(),
                    seed: spur_math::sample_seed(seed, &[i as u64]),
                    ..sampling.clone()
                },
            });
        }
        let completions = engine.generate(&requests).map_err(failed)?;
        let mut records = Vec::with_capacity(completions.len());
        let mut file = std::io::BufWriter::new(std::fs::File::create(out.join(RECORDS_FILE))?);
        let (mut boxed, mut tokens) = (0usize, 0usize);
        let mut comparison = GraderComparison::new(&graders);
        for (line, c) in completions.iter().enumerate() {
            let p = &problems[c.prompt_index];
            let mut verdicts: Vec<_> = graders
                .iter()
                .map(|g| g.grade(&c.text, &p.answer, style))
                .collect();
            let correct: Vec<bool> = verdicts.iter().map(|v| v.correct).collect();
            comparison.add(line + 1, &correct);
            let by_grader: serde_json::Map<String, Value> = graders
                .iter()
                .zip(&verdicts)
                .map(|(g, v)| (g.name().to_string(), json!(v)))
                .collect();
            let verdict = verdicts.swap_remove(0);
            boxed +=
                usize::from(!spur_math::extract_answer(&c.text, ExtractStyle::BoxOnly).is_empty());
            tokens += c.token_ids.len();
            let record = EvalRecord {
                problem: p.id.clone().unwrap_or_else(|| p.index.to_string()),
                subject: p.subject.clone(),
                level: p.level.clone(),
                response: c.text.clone(),
                extracted: verdict.extracted,
                correct: verdict.correct,
            };
            let line = json!({
                "prompt_sha256": prompt_hashes[c.prompt_index],
                "sample": c.sample_index,
                "gold": p.answer,
                "finish_reason": c.finish_reason,
                "record": record,
                "verdicts": by_grader,
            });
            serde_json::to_writer(&mut file, &line).map_err(failed)?;
            file.write_all(b"\n")?;
            records.push(record);
        }
        file.flush()?;
        let total = completions.len().max(1) as f64;
        let summary = spur_math::eval_metrics(&records);
        let mut metrics = serde_json::to_value(&summary).map_err(failed)?;
        metrics["accuracy"] = json!(summary.overall.accuracy);
        metrics["grader"] = json!(headline.name());
        metrics["graders"] = serde_json::to_value(&comparison).map_err(failed)?;
        metrics["boxed_rate"] = json!(boxed as f64 / total);
        metrics["mean_length"] = json!(tokens as f64 / total);
        if n > 1 {
            metrics["multi_sample"] =
                serde_json::to_value(spur_math::multi_sample_metrics(&records)).map_err(failed)?;
        }
        Ok(metrics)
    }
}
