//! A blocking client for OpenAI-compatible chat servers: `POST {server}/v1/chat/completions`,
//! what llama.cpp's `llama-server`, vLLM, SGLang and Ollama serve.
//!
//! One call sends one non-streaming request (`stream: false`) with the configured sampling
//! settings and returns the first choice's message content. Errors are typed and sorted into
//! two classes ([`ErrorClass`]): *transient* (connection refused or reset, a timeout, HTTP 5xx
//! or 429: the server is down, restarting or busy, so back off and try again, see
//! [`Backoff`]) and *persistent* (any other HTTP 4xx, a body that is not a chat completion,
//! no choices, a bad URL or API key: retrying the same request gives the same answer).
//!
//! The HTTP is ureq 3's (no TLS compiled in: the use is a server on loopback or the LAN, and
//! `[dream] server` must be `http://`). Environment proxies (`HTTP_PROXY`) are ignored on
//! purpose: the request may carry an API key, and a loopback server is never behind a proxy.
//! The API key is read once, from a file or an environment variable, and is never logged:
//! [`ApiKey`] and [`ChatClient`] implement `Debug` by hand to redact it, and no error message
//! includes it.
//!
//! This module knows nothing about scenarios or prompts; it moves messages and text. The
//! wire format follows OpenAI's Chat Completions API reference (`model`, `messages`,
//! `temperature`, `top_p`, `max_tokens`, `seed`, `response_format: {"type": "json_object"}`;
//! answer `choices[0].message.content`, `finish_reason`, `usage`), the subset llama-server
//! documents in its README.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::example::Message;

/// Bytes of an error response's body kept in [`ClientError::Status`] (servers explain a 400
/// in the body; a whole HTML error page is not worth keeping).
const ERROR_BODY_BYTES: usize = 300;

/// Sampling settings sent with every request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature (0 = greedy).
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// Most tokens the server may generate for one answer.
    pub max_tokens: u32,
    /// The server's sampling seed; `None` lets the server pick (fresh answers each call).
    pub seed: Option<u64>,
}

/// Where the API key comes from. The source is not secret and may be logged; the key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key (surrounding whitespace is trimmed).
    File(PathBuf),
    /// The name of an environment variable holding the key.
    Env(String),
}

/// An API key, sent as `Authorization: Bearer …`. `Debug` prints `ApiKey(<redacted>)`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// Reads the key from its source; errors name the source, never the key.
    pub fn load(source: &KeySource) -> Result<ApiKey, ClientError> {
        let raw = match source {
            KeySource::File(path) => {
                std::fs::read_to_string(path).map_err(|e| ClientError::Key {
                    reason: format!("cannot read {}: {e}", path.display()),
                })?
            }
            KeySource::Env(name) => std::env::var(name).map_err(|e| ClientError::Key {
                reason: format!("environment variable {name}: {e}"),
            })?,
        };
        let key = raw.trim();
        if key.is_empty() || key.contains(['\r', '\n']) {
            let what = match source {
                KeySource::File(path) => path.display().to_string(),
                KeySource::Env(name) => format!("environment variable {name}"),
            };
            return Err(ClientError::Key {
                reason: format!("{what} must hold one non-empty line"),
            });
        }
        Ok(ApiKey(key.to_string()))
    }
}

/// Everything a [`ChatClient`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// Base URL, `http://host:port` (a trailing `/v1` is accepted and not doubled).
    pub server: String,
    /// The `model` field of each request (llama-server ignores it; vLLM and Ollama route on it).
    pub model: String,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the answer's headers, and again for its body, once connected.
    pub read_timeout: Duration,
    /// Where to read the API key from; `None` sends no `Authorization` header.
    pub api_key: Option<KeySource>,
}

/// The answer's shape: free text, or a JSON object (llama-server, vLLM and Ollama constrain
/// the sampler with a grammar; servers without it ignore the field or answer 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    /// No constraint.
    Text,
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The first choice's message content.
    pub content: String,
    /// Why generation stopped (`stop`, `length`…), when the server said.
    pub finish_reason: Option<String>,
    /// Prompt tokens, when the server reported usage.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens, when the server reported usage.
    pub completion_tokens: Option<u64>,
}

impl Completion {
    /// Whether the server stopped at `max_tokens` (the answer is cut).
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

/// Whether retrying the same request can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Down, restarting or busy: back off and retry.
    Transient,
    /// The request or the server's answer is wrong: retrying repeats it.
    Persistent,
}

/// Why a call failed. Messages name the server, never the API key.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection, or it broke (refused, reset, closed early, unparsable HTTP).
    #[error("{server}: connection failed: {reason}")]
    Transport {
        /// The server's base URL.
        server: String,
        /// ureq's description.
        reason: String,
    },
    /// A timeout: connecting, or waiting for the answer.
    #[error("{server}: no {phase} within {seconds} s")]
    Timeout {
        /// The server's base URL.
        server: String,
        /// `connection` or `answer`.
        phase: &'static str,
        /// The timeout that ran out.
        seconds: u64,
    },
    /// The server answered with an HTTP error status.
    #[error("{server}: HTTP {status}: {body}")]
    Status {
        /// The server's base URL.
        server: String,
        /// The status code (4xx or 5xx).
        status: u16,
        /// The start of the response body (the server's explanation).
        body: String,
    },
    /// HTTP 200, but the body is not a chat completion (not JSON, or a field of the wrong type).
    #[error("{server}: the answer is not a chat completion: {reason}")]
    Malformed {
        /// The server's base URL.
        server: String,
        /// The JSON error or the missing field.
        reason: String,
    },
    /// A chat completion without a choice.
    #[error("{server}: the completion has no choices")]
    NoChoices {
        /// The server's base URL.
        server: String,
    },
    /// The request could not be built or sent as configured (bad URL, https without TLS).
    #[error("{server}: {reason}")]
    Request {
        /// The server's base URL.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key could not be read.
    #[error("API key: {reason}")]
    Key {
        /// Which source failed and why (never the key).
        reason: String,
    },
}

impl ClientError {
    /// Transient (retry after a back-off) or persistent; see the module docs.
    pub fn class(&self) -> ErrorClass {
        match self {
            ClientError::Transport { .. } | ClientError::Timeout { .. } => ErrorClass::Transient,
            ClientError::Status { status, .. } if *status == 429 || *status >= 500 => {
                ErrorClass::Transient
            }
            _ => ErrorClass::Persistent,
        }
    }

    /// Shorthand for `class() == Transient`.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// Every [`ClientError::label`], for the metric catalogue.
    pub const LABELS: &'static [&'static str] = &[
        "transport",
        "timeout",
        "http_429",
        "http_5xx",
        "http_4xx",
        "malformed",
        "no_choices",
        "request",
        "api_key",
    ];

    /// A stable, bounded label for an error counter (one of [`ClientError::LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            ClientError::Transport { .. } => "transport",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Status { status: 429, .. } => "http_429",
            ClientError::Status { status, .. } if *status >= 500 => "http_5xx",
            ClientError::Status { .. } => "http_4xx",
            ClientError::Malformed { .. } => "malformed",
            ClientError::NoChoices { .. } => "no_choices",
            ClientError::Request { .. } => "request",
            ClientError::Key { .. } => "api_key",
        }
    }
}

/// Whether `server` (`http://host[:port][/path]`) names this machine: `localhost`, an
/// address in 127.0.0.0/8 or `[::1]`. A host name other than `localhost` is not loopback,
/// whatever it resolves to today. Errors say why the URL is unusable.
pub fn is_loopback(server: &str) -> Result<bool, String> {
    let uri: ureq::http::Uri = server
        .parse()
        .map_err(|e| format!("`{server}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{server}`: https is not supported (the client is built without TLS; \
                 serve on loopback or the LAN over http)"
            ))
        }
        _ => return Err(format!("`{server}` must start with http://")),
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("`{server}` has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()))
}

/// The request body (OpenAI Chat Completions).
#[derive(Serialize)]
struct RawRequest<'a> {
    /// The served model's name.
    model: &'a str,
    /// The conversation, `{role, content}` each.
    messages: &'a [Message],
    /// Sampling temperature.
    temperature: f64,
    /// Nucleus mass.
    top_p: f64,
    /// Generation bound.
    max_tokens: u32,
    /// Sampling seed, when fixed.
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Always false: one JSON answer.
    stream: bool,
    /// `{"type": "json_object"}` in JSON mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
}

/// The parts of a completion this client reads; other fields are ignored.
#[derive(Deserialize)]
struct RawCompletion {
    /// The answers; absent or empty is [`ClientError::NoChoices`].
    #[serde(default)]
    choices: Option<Vec<RawChoice>>,
    /// Token counts, when reported.
    #[serde(default)]
    usage: Option<RawUsage>,
}

/// One choice.
#[derive(Deserialize)]
struct RawChoice {
    /// The assistant message.
    message: Option<RawMessage>,
    /// Why it stopped.
    #[serde(default)]
    finish_reason: Option<String>,
}

/// The assistant message of a choice.
#[derive(Deserialize)]
struct RawMessage {
    /// Its text (null for a pure tool call, which this client never asks for).
    #[serde(default)]
    content: Option<String>,
}

/// Token usage.
#[derive(Deserialize)]
struct RawUsage {
    /// Prompt tokens.
    #[serde(default)]
    prompt_tokens: Option<u64>,
    /// Generated tokens.
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// A connection to one server; cheap to share by reference (ureq's agent pools connections
/// and is `Send + Sync`).
pub struct ChatClient {
    /// ureq's agent, with the timeouts set and no proxy.
    agent: ureq::Agent,
    /// The base URL as configured (errors and provenance name it).
    server: String,
    /// `{server}/v1/chat/completions`.
    url: String,
    /// The `model` field.
    model: String,
    /// Sampling settings.
    sampling: Sampling,
    /// The timeouts, for error messages.
    connect_timeout: Duration,
    /// See `connect_timeout`.
    read_timeout: Duration,
    /// Sent as a bearer token when set.
    api_key: Option<ApiKey>,
}

impl fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatClient")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("sampling", &self.sampling)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("api_key", &self.api_key)
            .finish()
    }
}

impl ChatClient {
    /// A client for `settings` (reads the API key now; checks the URL is `http://`).
    pub fn new(settings: ClientSettings) -> Result<ChatClient, ClientError> {
        let server = settings.server.trim_end_matches('/').to_string();
        is_loopback(&server).map_err(|reason| ClientError::Request {
            server: server.clone(),
            reason,
        })?;
        let api_key = settings.api_key.as_ref().map(ApiKey::load).transpose()?;
        let url = if server.ends_with("/v1") {
            format!("{server}/chat/completions")
        } else {
            format!("{server}/v1/chat/completions")
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_resolve(Some(settings.connect_timeout))
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_send_request(Some(settings.connect_timeout))
            .timeout_send_body(Some(settings.connect_timeout))
            .timeout_recv_response(Some(settings.read_timeout))
            .timeout_recv_body(Some(settings.read_timeout))
            .build()
            .into();
        Ok(ChatClient {
            agent,
            server,
            url,
            model: settings.model,
            sampling: settings.sampling,
            connect_timeout: settings.connect_timeout,
            read_timeout: settings.read_timeout,
            api_key,
        })
    }

    /// The base URL (for provenance).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The model name (for provenance).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Sends `messages` and returns the first choice. Blocks for at most the connect timeout
    /// plus twice the read timeout.
    pub fn complete(
        &self,
        messages: &[Message],
        format: ResponseFormat,
    ) -> Result<Completion, ClientError> {
        let body = RawRequest {
            model: &self.model,
            messages,
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            max_tokens: self.sampling.max_tokens,
            seed: self.sampling.seed,
            stream: false,
            response_format: (format == ResponseFormat::JsonObject)
                .then(|| serde_json::json!({ "type": "json_object" })),
        };
        let body = serde_json::to_string(&body).expect("the request is plain strings and numbers");
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(ApiKey(key)) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body).map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| self.transport_error(e))?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Status {
                server: self.server.clone(),
                status,
                body: excerpt(&text),
            });
        }
        self.parse(&text)
    }

    /// The completion in `text`, or why it is not one.
    fn parse(&self, text: &str) -> Result<Completion, ClientError> {
        let malformed = |reason: String| ClientError::Malformed {
            server: self.server.clone(),
            reason,
        };
        let raw: RawCompletion = serde_json::from_str(text)
            .map_err(|e| malformed(format!("{e} in `{}`", excerpt(text))))?;
        let Some(choice) = raw.choices.and_then(|c| c.into_iter().next()) else {
            return Err(ClientError::NoChoices {
                server: self.server.clone(),
            });
        };
        let content = choice
            .message
            .and_then(|m| m.content)
            .ok_or_else(|| malformed("choices[0].message.content is missing".into()))?;
        Ok(Completion {
            content,
            finish_reason: choice.finish_reason,
            prompt_tokens: raw.usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: raw.usage.as_ref().and_then(|u| u.completion_tokens),
        })
    }

    /// Sorts ureq's error into the typed ones.
    fn transport_error(&self, e: ureq::Error) -> ClientError {
        let server = self.server.clone();
        let timeout = |phase, limit: Duration| ClientError::Timeout {
            server: server.clone(),
            phase,
            seconds: limit.as_secs(),
        };
        match e {
            ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => {
                timeout("connection", self.connect_timeout)
            }
            ureq::Error::Timeout(_) => timeout("answer", self.read_timeout),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                timeout("answer", self.read_timeout)
            }
            ureq::Error::BadUri(_)
            | ureq::Error::Http(_)
            | ureq::Error::RequireHttpsOnly(_)
            | ureq::Error::TlsRequired
            | ureq::Error::Tls(_)
            | ureq::Error::BodyExceedsLimit(_) => ClientError::Request {
                server,
                reason: e.to_string(),
            },
            other => ClientError::Transport {
                server,
                reason: other.to_string(),
            },
        }
    }
}

/// The first [`ERROR_BODY_BYTES`] of `text`, cut at a character boundary.
fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.len() <= ERROR_BODY_BYTES {
        return text.to_string();
    }
    let mut end = ERROR_BODY_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Exponential back-off for transient errors: `base · 2ⁿ` after the n-th failure in a row
/// (n from 0), capped at `max`; a success resets it. Deterministic (no jitter): there is one
/// client per server per daemon, so there is no herd to spread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    base: Duration,
    /// The longest delay.
    max: Duration,
    /// Failures in a row so far.
    failures: u32,
}

impl Backoff {
    /// A back-off starting at `base`, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn fail(&mut self) -> Duration {
        let factor = 1u32 << self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Records a success: the next failure waits `base` again.
    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far (a gauge for the dashboard).
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests;
