//! Datasets in TRL's formats, tokenized into trainer items.
//!
//! One JSON object per line, any of:
//! - SFT, conversational: `{"prompt": [messages], "completion": [messages]}`
//! - SFT, standard: `{"prompt": "text", "completion": "text"}`
//! - SFT, pre-tokenized: `{"input_ids": [..], "completion_mask": [0/1 ..]}`
//! - DPO, conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`
//! - DPO, standard: `{"prompt": "text", "chosen": "text", "rejected": "text"}`
//! - DPO, pre-tokenized: `{"prompt_input_ids": [..], "chosen_input_ids": [..], "rejected_input_ids": [..]}`
//!
//! Tokenization follows TRL (`SFTTrainer`/`DPOTrainer` `tokenize` functions): the prompt is
//! rendered with `add_generation_prompt=True`, the whole conversation without it, and the
//! completion is the rest of the whole conversation after the prompt's tokens. Standard
//! (text) examples tokenize `prompt` and `prompt + completion` the same way and append EOS
//! when the tokenizer did not.
//!
//! A bad line is an error naming file, line and field; the caller decides to skip it.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::trainer::{DpoItem, SftItem};
use crate::model::{ChatMessage, Tokenizer};

/// One parsed and tokenized line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Sft(SftItem),
    Dpo(DpoItem),
}

/// A line that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {field}: {reason}")]
pub struct LineError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub reason: String,
}

/// Content hash of token sequences (the never-repeat key of a dataset example).
pub fn hash_ids(parts: &[&[u32]]) -> u64 {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        for id in *part {
            h.update(id.to_le_bytes());
        }
    }
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Parses and tokenizes one line.
pub fn parse_line(
    text: &str,
    tok: Option<&Tokenizer>,
    vocab: usize,
    file: &str,
    line: usize,
) -> Result<Item, LineError> {
    let err = |field: &str, reason: String| LineError {
        file: file.into(),
        line,
        field: field.into(),
        reason,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| err("<line>", format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| err("<line>", "expected a JSON object".into()))?;
    let ids = |field: &str| -> Result<Vec<u32>, LineError> {
        let arr = obj
            .get(field)
            .and_then(Value::as_array)
            .ok_or_else(|| err(field, "expected an array of token ids".into()))?;
        arr.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&n| (n as usize) < vocab)
                    .map(|n| n as u32)
                    .ok_or_else(|| err(field, format!("{v} is not a token id below {vocab}")))
            })
            .collect()
    };
    if obj.contains_key("prompt_input_ids") {
        let (prompt, chosen, rejected) = (
            ids("prompt_input_ids")?,
            ids("chosen_input_ids")?,
            ids("rejected_input_ids")?,
        );
        let hash = hash_ids(&[&prompt, &chosen, &rejected]);
        return Ok(Item::Dpo(DpoItem {
            prompt,
            chosen,
            rejected,
            hash,
            reference: None,
        }));
    }
    if obj.contains_key("input_ids") {
        let all = ids("input_ids")?;
        let mask = ids("completion_mask")?;
        if mask.len() != all.len() {
            return Err(err(
                "completion_mask",
                format!("{} entries for {} input_ids", mask.len(), all.len()),
            ));
        }
        // TRL's completion mask is a suffix after the prompt; require that shape.
        let start = mask.iter().position(|&m| m != 0).unwrap_or(all.len());
        if mask[start..].contains(&0) {
            return Err(err(
                "completion_mask",
                "must be 0 for the prompt then 1 to the end".into(),
            ));
        }
        let (prompt, completion) = (all[..start].to_vec(), all[start..].to_vec());
        let hash = hash_ids(&[&prompt, &completion]);
        return Ok(Item::Sft(SftItem {
            prompt,
            completion,
            hash,
        }));
    }
    let tok = tok.ok_or_else(|| {
        err(
            "prompt",
            "text examples need a model with a tokenizer".into(),
        )
    })?;
    let prompt = obj
        .get("prompt")
        .ok_or_else(|| err("prompt", "missing".into()))?;
    let tokenized = |field: &str| -> Result<Vec<u32>, LineError> {
        let completion = obj.get(field).ok_or_else(|| err(field, "missing".into()))?;
        completion_ids(tok, prompt, completion).map_err(|reason| err(field, reason))
    };
    let prompt_ids = prompt_ids(tok, prompt).map_err(|reason| err("prompt", reason))?;
    if obj.contains_key("chosen") || obj.contains_key("rejected") {
        let (chosen, rejected) = (tokenized("chosen")?, tokenized("rejected")?);
        let hash = hash_ids(&[&prompt_ids, &chosen, &rejected]);
        return Ok(Item::Dpo(DpoItem {
            prompt: prompt_ids,
            chosen,
            rejected,
            hash,
            reference: None,
        }));
    }
    let completion = tokenized("completion")?;
    let hash = hash_ids(&[&prompt_ids, &completion]);
    Ok(Item::Sft(SftItem {
        prompt: prompt_ids,
        completion,
        hash,
    }))
}

fn messages(v: &Value) -> Result<Vec<ChatMessage>, String> {
    serde_json::from_value(v.clone())
        .map_err(|e| format!("expected [{{\"role\",\"content\"}}]: {e}"))
}

fn prompt_ids(tok: &Tokenizer, prompt: &Value) -> Result<Vec<u32>, String> {
    match prompt {
        Value::String(s) => Ok(tok.encode(s, true).map_err(|e| e.to_string())?.ids),
        Value::Array(_) => {
            let m = messages(prompt)?;
            Ok(tok
                .encode_chat(&m, true)
                .map_err(|e| e.to_string())?
                .encoding
                .ids)
        }
        _ => Err("expected a string or a list of messages".into()),
    }
}

/// Completion tokens: the whole example's tokens after the prompt's.
fn completion_ids(tok: &Tokenizer, prompt: &Value, completion: &Value) -> Result<Vec<u32>, String> {
    let prompt_ids = prompt_ids(tok, prompt)?;
    let full = match (prompt, completion) {
        (Value::String(p), Value::String(c)) => {
            let mut ids = tok
                .encode(&format!("{p}{c}"), true)
                .map_err(|e| e.to_string())?
                .ids;
            if let Some(eos) = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            ids
        }
        (Value::Array(_), Value::Array(_)) => {
            let mut all = messages(prompt)?;
            all.extend(messages(completion)?);
            tok.encode_chat(&all, false)
                .map_err(|e| e.to_string())?
                .encoding
                .ids
        }
        _ => return Err("prompt and completion must both be text or both be message lists".into()),
    };
    if !full.starts_with(&prompt_ids) {
        return Err("the prompt's tokens are not a prefix of the whole example's (tokenizer merges across the boundary)".into());
    }
    let rest = full[prompt_ids.len()..].to_vec();
    if rest.is_empty() {
        return Err("empty completion".into());
    }
    Ok(rest)
}

/// A data-plane [`Example`](crate::example::Example) (text) as a trainer item: the prompt
/// rendered with the chat template (generation prompt on), each completion as the tokens
/// of the whole conversation after the prompt's — the same rule as TRL's conversational
/// format. The item's hash is the example's content hash.
pub fn tokenize_example(
    tok: &Tokenizer,
    example: &crate::example::Example,
) -> Result<Item, String> {
    use crate::example::Target;
    let messages: Vec<ChatMessage> = example
        .prompt
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let prompt = serde_json::to_value(&messages).expect("messages serialise");
    let turn = |text: &str| serde_json::json!([{ "role": "assistant", "content": text }]);
    let prompt_ids = prompt_ids(tok, &prompt)?;
    let hash = example.hash().0;
    Ok(match &example.target {
        Target::Sft { completion } => Item::Sft(SftItem {
            completion: completion_ids(tok, &prompt, &turn(completion))?,
            prompt: prompt_ids,
            hash,
        }),
        Target::Dpo { chosen, rejected } => Item::Dpo(DpoItem {
            chosen: completion_ids(tok, &prompt, &turn(chosen))?,
            rejected: completion_ids(tok, &prompt, &turn(rejected))?,
            prompt: prompt_ids,
            hash,
            reference: example.reference,
        }),
    })
}
