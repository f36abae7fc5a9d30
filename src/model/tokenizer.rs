//! Tokenizer and chat template, with Hugging Face semantics.
//!
//! `tokenizer.json` is read by the `tokenizers` crate (the same Rust code transformers
//! runs). The chat template comes from `chat_template.jinja` (transformers ≥ 5 writes it
//! there) or the `chat_template` field of `tokenizer_config.json` (older checkpoints), and
//! is rendered with minijinja the way transformers' `apply_chat_template` renders it:
//! `trim_blocks` and `lstrip_blocks` on, `messages`, `add_generation_prompt`,
//! `bos_token`/`eos_token` and `raise_exception` in scope, Python string methods available.
//!
//! Encoding keeps byte offsets, so a character span inside one message (the *direction*
//! span) maps to the token positions that cover it: see [`Tokenizer::encode_chat`].

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a tokenizer or template could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("message {index}: its content does not appear verbatim in the rendered chat")]
    ContentNotFound { index: usize },
    #[error("span {start}..{end} is outside message {index} ({len} bytes) or not on a character boundary")]
    BadSpan {
        index: usize,
        start: usize,
        end: usize,
        len: usize,
    },
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Token ids with the byte range of the source text each one covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    /// `(start, end)` byte offsets into the encoded text, one per id.
    pub offsets: Vec<(usize, usize)>,
}

/// A rendered, tokenized conversation that remembers where each message's content landed.
#[derive(Debug, Clone)]
pub struct ChatEncoding {
    /// The template's output.
    pub text: String,
    pub encoding: Encoding,
    /// Byte offset of each message's content inside `text`.
    pub content_starts: Vec<usize>,
}

impl ChatEncoding {
    /// Token positions covering bytes `start..end` of message `index`'s content.
    pub fn span_tokens(
        &self,
        messages: &[ChatMessage],
        index: usize,
        start: usize,
        end: usize,
    ) -> Result<Vec<usize>, TokenizerError> {
        let content = &messages
            .get(index)
            .ok_or(TokenizerError::ContentNotFound { index })?
            .content;
        if start > end
            || end > content.len()
            || !content.is_char_boundary(start)
            || !content.is_char_boundary(end)
        {
            return Err(TokenizerError::BadSpan {
                index,
                start,
                end,
                len: content.len(),
            });
        }
        let base = self.content_starts[index];
        let (lo, hi) = (base + start, base + end);
        Ok(self
            .encoding
            .offsets
            .iter()
            .enumerate()
            .filter(|(_, &(s, e))| s < hi && e > lo)
            .map(|(i, _)| i)
            .collect())
    }
}

/// A Hugging Face tokenizer plus its chat template and special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja source of the chat template, if the checkpoint has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The files this tokenizer was read from, copied verbatim when a model is saved.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Tokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json_path = dir.join("tokenizer.json");
        let json = std::fs::read(&json_path).map_err(|e| TokenizerError::Load {
            path: json_path.clone(),
            reason: e.to_string(),
        })?;
        let mut files = vec![("tokenizer.json".to_string(), json.clone())];
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => {
                files.push(("tokenizer_config.json".into(), bytes.clone()));
                serde_json::from_slice(&bytes).map_err(|e| TokenizerError::Load {
                    path: config_path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read(&jinja_path) {
            Ok(bytes) => {
                files.push(("chat_template.jinja".into(), bytes.clone()));
                Some(String::from_utf8(bytes).map_err(|e| TokenizerError::Load {
                    path: jinja_path.clone(),
                    reason: e.to_string(),
                })?)
            }
            Err(_) => template_from_config(&config),
        };
        let mut tok = Self::from_json_bytes(&json, &json_path)?;
        tok.chat_template = chat_template;
        tok.bos_token = special_token(&config, "bos_token");
        tok.eos_token = special_token(&config, "eos_token");
        tok.files = files;
        Ok(tok)
    }

    /// A tokenizer from `tokenizer.json` bytes alone (no template, no special-token names).
    pub fn from_json_bytes(json: &[u8], origin: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Load {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            files: vec![("tokenizer.json".into(), json.to_vec())],
        })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (e.g. a special token), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes `text`; `add_special_tokens` runs the tokenizer's post-processor (BOS etc.),
    /// as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(Encoding {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Decodes ids to text, skipping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Renders `messages` with the chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoTemplate)?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    /// Renders and tokenizes a conversation (no extra special tokens, as
    /// `apply_chat_template(tokenize=True)` does), recording where each message's content sits.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<ChatEncoding, TokenizerError> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        let mut content_starts = Vec::with_capacity(messages.len());
        let mut cursor = 0;
        for (index, m) in messages.iter().enumerate() {
            let found = text[cursor..]
                .find(&m.content)
                .ok_or(TokenizerError::ContentNotFound { index })?;
            content_starts.push(cursor + found);
            cursor += found + m.content.len();
        }
        let encoding = self.encode(&text, false)?;
        Ok(ChatEncoding {
            text,
            encoding,
            content_starts,
        })
    }
}

/// The `chat_template` field of an older `tokenizer_config.json`: a string, or a list of
/// named templates of which `default` is the chat one.
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

/// A special token named in `tokenizer_config.json`: a string or an `AddedToken` object.
fn special_token(config: &Value, field: &str) -> Option<String> {
    match config.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// Renders a chat template with transformers' environment.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| TokenizerError::Template(e.to_string()))
}
