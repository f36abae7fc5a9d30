//! `dreamloop generate`: ask a model (e.g. the one being trained) what it now says.

use std::process::ExitCode;

use anyhow::Context;
use dreamloop::model::generate::{chat, Sampling};
use dreamloop::model::{default_device, ChatMessage, Model, Precision};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face model directory, a `.gguf` file (llama architecture), or a preset name.
    #[arg(long)]
    pub model: String,
    /// The user turn.
    #[arg(long)]
    pub prompt: String,
    /// An optional system turn.
    #[arg(long)]
    pub system: Option<String>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `f32` or `bf16`: the dtype the weights live in.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let device = default_device();
    let model = Model::open_as(&args.model, &device, args.dtype)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let tok = model
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer.json")?;
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system,
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: args.prompt,
    });
    let mut stop: Vec<u32> = model.config.eos_token_id.into_iter().collect();
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
        stop.push(id);
    }
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    let out = chat(&model.frozen(), tok, &messages, &stop, &sampling)?;
    println!("{}", out.text);
    Ok(ExitCode::SUCCESS)
}
