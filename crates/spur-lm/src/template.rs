//! Prompt templates: the model's own chat template, the paper's two, or a template string.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// System prompt of the Qwen2.5-Math chat format used by the paper.
pub const QWEN_MATH_SYSTEM: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// The R1-style prompt the paper uses for models without a chat template (`{}` = problem).
pub const R1_PROMPT: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n\n<|user|>\n{}\n<|assistant|>\n<think>";

/// Stop string of the R1 template.
pub const R1_STOP: &str = "</answer>";

/// How a problem becomes a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptTemplate {
    /// The model's own chat template with one user message (and its default system prompt,
    /// unless `system` is given).
    Chat { system: Option<String> },
    /// The Qwen2.5-Math chat format with the system prompt [`QWEN_MATH_SYSTEM`].
    QwenMath,
    /// The R1 `<think>/<answer>` prompt [`R1_PROMPT`], stopped at [`R1_STOP`].
    R1,
    /// The problem text as it is.
    Raw,
    /// A Jinja template string; it sees `problem`, `messages`, `bos_token`, `eos_token` and
    /// `add_generation_prompt`.
    Jinja(String),
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl PromptTemplate {
    /// `chat`, `qwen-math`, `r1`, `raw`, or else a Jinja template string.
    pub fn parse(s: &str) -> Self {
        match s {
            "chat" => PromptTemplate::Chat { system: None },
            "qwen-math" => PromptTemplate::QwenMath,
            "r1" => PromptTemplate::R1,
            "raw" => PromptTemplate::Raw,
            other => PromptTemplate::Jinja(other.to_string()),
        }
    }

    /// Strings that end a generation under this template.
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            PromptTemplate::R1 => vec![R1_STOP.to_string()],
            _ => Vec::new(),
        }
    }

    /// The prompt text for `problem`. Its hash identifies the prompt.
    pub fn render(&self, tokenizer: &Tokenizer, problem: &str) -> Result<String> {
        match self {
            PromptTemplate::R1 => Ok(R1_PROMPT.replacen("{}", problem, 1)),
            PromptTemplate::Raw => Ok(problem.to_string()),
            PromptTemplate::QwenMath => Ok(format!(
                "<|im_start|>system\n{QWEN_MATH_SYSTEM}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
            )),
            PromptTemplate::Chat { system } => {
                let template = tokenizer.chat_template().ok_or_else(|| {
                    Error::Template(
                        "the model has no chat template; use the r1 or raw template, or a template string"
                            .into(),
                    )
                })?;
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(Message {
                        role: "system",
                        content: system,
                    });
                }
                messages.push(Message {
                    role: "user",
                    content: problem,
                });
                render_jinja(template, tokenizer, &messages, problem)
            }
            PromptTemplate::Jinja(template) => {
                let messages = [Message {
                    role: "user",
                    content: problem,
                }];
                render_jinja(template, tokenizer, &messages, problem)
            }
        }
    }
}

/// Renders a chat template the way Hugging Face does (Jinja with trim_blocks and
/// lstrip_blocks, Python string methods, `raise_exception`).
fn render_jinja(
    template: &str,
    tokenizer: &Tokenizer,
    messages: &[Message],
    problem: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    // Templates that print today's date (Llama 3.x) get a fixed one, so that the rendered
    // prompt, and with it its hash, does not change from day to day.
    env.add_function("strftime_now", |_format: String| "26 Jul 2024".to_string());
    let ctx = minijinja::context! {
        messages => messages,
        problem => problem,
        add_generation_prompt => true,
        bos_token => tokenizer.bos_token().unwrap_or(""),
        eos_token => tokenizer.eos_token().unwrap_or(""),
        date_string => "26 Jul 2024",
    };
    env.render_str(template, ctx)
        .map_err(|e| Error::Template(format!("{e:#}")))
}
