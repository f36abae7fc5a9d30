//! A Hugging Face `tokenizer.json` / `tokenizer_config.json` from GGUF tokenizer metadata.
//!
//! Supports `tokenizer.ggml.model = gpt2` (byte-level BPE), which is what llama.cpp writes for
//! GPT-2-style vocabularies (SmolLM2, StarCoder, Qwen, ...). The JSON mirrors what
//! transformers' `GGUFGPTConverter` (`integrations/ggml.py`, built on `GPT2Converter` in
//! `convert_slow_tokenizer.py`) produces: a BPE model over the GGUF tokens and merges, a
//! byte-level pre-tokenizer and decoder, and one added token per control (type 3) or
//! user-defined (type 4) token.
//!
//! The pre-tokenizer is byte-level with the GPT-2 regex, as transformers writes it for every
//! `gpt2` GGUF. `tokenizer.ggml.pre` is checked against the llama.cpp pre-tokenizers whose
//! regex that is (`default`, `gpt2`) or extends with a split of every numeric character on
//! its own (`smollm`, `starcoder`, `refact`, `codeshell`: llama.cpp's extra `\p{N}` regex,
//! the original SmolLM2 `tokenizer.json`'s `Digits(individual_digits)`). That split is
//! deliberately not reproduced: dreamloop's references (token ids, logits) come from
//! transformers, which drops it. For SmolLM2 the two agree on all ASCII text (the
//! vocabulary has only single-digit tokens and no merge involving a digit) but differ on
//! non-ASCII numerals, e.g. after a space (` ½`, ` ٣`), where transformers merges the space.
//! Other pre-tokenizers (llama-bpe, qwen2, ...) use different regexes and are rejected
//! rather than approximated.

use super::{GgufError, GgufFile};
use serde_json::{json, Map, Value};

/// GGUF `tokenizer.ggml.token_type` value of a control token (`<|im_start|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` value of a user-defined added token.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer files of a Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    /// `tokenizer.json`, loadable by the `tokenizers` crate.
    pub tokenizer_json: Value,
    /// `tokenizer_config.json`: special tokens, chat template, length limit.
    pub tokenizer_config: Value,
    /// `tokenizer.chat_template`, also written verbatim as `chat_template.jinja`.
    pub chat_template: Option<String>,
}

/// Builds the tokenizer files from `tokenizer.ggml.*` and `tokenizer.chat_template`.
/// `model_max_length` goes into `tokenizer_config.json` (the model's context length).
pub fn hf_tokenizer(file: &GgufFile<'_>, model_max_length: u64) -> Result<HfTokenizer, GgufError> {
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::Unsupported {
            what: "tokenizer model (tokenizer.ggml.model)",
            value: model.to_owned(),
        });
    }
    let pre = file.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    if !matches!(
        pre,
        "default" | "gpt2" | "smollm" | "starcoder" | "refact" | "codeshell"
    ) {
        return Err(GgufError::Unsupported {
            what: "pre-tokenizer (tokenizer.ggml.pre)",
            value: pre.to_owned(),
        });
    }
    let add_prefix_space = file
        .get_bool_opt("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(false);
    let add_bos = file
        .get_bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = file
        .get_bool_opt("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let token_types = file
        .get_int_array_opt("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(GgufError::BadModel(format!(
            "{} token types for {} tokens",
            token_types.len(),
            tokens.len()
        )));
    }
    let merges = file.get_str_array("tokenizer.ggml.merges")?;

    // As transformers' converter: `{token: id}`, a later duplicate spelling wins.
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert((*token).to_owned(), json!(id));
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, merge)| match merge.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(GgufError::BadModel(format!(
                "tokenizer.ggml.merges[{i}] = {merge:?} is not two space-separated tokens"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let added_tokens: Vec<Value> = token_types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, &ty)| {
            json!({
                "id": id,
                "content": tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    let token_of = |key: &str| -> Result<Option<(u64, &str)>, GgufError> {
        match file.get_u64_opt(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some((id, *t)))
                .ok_or_else(|| {
                    GgufError::BadModel(format!(
                        "{key} = {id} is outside the {} tokens",
                        tokens.len()
                    ))
                }),
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let unk = token_of("tokenizer.ggml.unknown_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;

    let pre_tokenizer = json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": true,
        "use_regex": true,
    });

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(
            if add_bos { bos } else { None },
            if add_eos { eos } else { None },
        ),
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let chat_template = file
        .get_str_opt("tokenizer.chat_template")?
        .map(str::to_owned);
    let mut config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let fields = [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ];
    for (field, token) in fields {
        if let Some((_, text)) = token {
            config[field] = json!(text);
        }
    }
    if let Some(template) = &chat_template {
        config["chat_template"] = json!(template);
    }

    Ok(HfTokenizer {
        tokenizer_json,
        tokenizer_config: config,
        chat_template,
    })
}

/// A `TemplateProcessing` that adds BOS/EOS around each sequence as the GGUF asks
/// (`add_bos_token`, `add_eos_token`), or nothing.
fn post_processor(bos: Option<(u64, &str)>, eos: Option<(u64, &str)>) -> Value {
    let mut special_tokens = Map::new();
    let wrap = |seq: &str, type_id: u32| {
        let mut pieces = Vec::new();
        if let Some((_, text)) = bos {
            pieces.push(json!({ "SpecialToken": { "id": text, "type_id": type_id } }));
        }
        pieces.push(json!({ "Sequence": { "id": seq, "type_id": type_id } }));
        if let Some((_, text)) = eos {
            pieces.push(json!({ "SpecialToken": { "id": text, "type_id": type_id } }));
        }
        pieces
    };
    let single = wrap("A", 0);
    let pair: Vec<Value> = single.iter().cloned().chain(wrap("B", 1)).collect();
    for (id, text) in bos.into_iter().chain(eos) {
        special_tokens.insert(
            text.to_owned(),
            json!({ "id": text, "ids": [id], "tokens": [text] }),
        );
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}
