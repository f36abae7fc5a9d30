//! `DreamConfig`: the daemon's TOML file, parsed strictly and validated as a whole.
//!
//! The file describes the loop (model, phase, optimizer, data, evaluation, rollback policy,
//! checkpoints, queues, supervision); CLI flags describe the process (`--state-dir`,
//! `--metrics-addr`, `--paused`) and override the file's `state_dir` / `metrics_addr`.
//! Every table uses `deny_unknown_fields`, so a misspelt key is an error that names its line,
//! not a silently ignored setting. [`DreamConfig::validate`] then checks ranges and lists
//! *every* bad field with its TOML path (`train.batch_size`, `rollback.patience`), so one run of
//! `dreamloop validate-config` shows all problems.
//!
//! The commented defaults live in `config/dreamloop.toml`; the reasons for each number are
//! written there, next to the number (vector's and nanoGPT's habit).
//!
//! # Hot reload
//!
//! On SIGHUP the daemon re-reads the file and applies only [`HotSettings`]: the peak learning
//! rate, the replay ratio, the evaluation cadence, the rollback thresholds and the phase. A
//! change to anything else (model, optimizer, batch size, directories) is reported and
//! ignored until a restart, because it would invalidate the checkpointed optimizer state or
//! the data already queued.
//!
//! This module knows nothing about actors or signals; it only reads, checks and converts.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::controller::{Controller, ControllerSection, PhaseEntry, PhaseSettings};
use crate::general::GeneralConfig;
use crate::label::Phase;
use crate::mix::MixConfig;
use crate::model::Precision;
use crate::rollback::Policy;
use crate::train::loss::DpoVariant;
use crate::train::optim::{ApolloConfig, OptimizerConfig};
use crate::train::schedule::LrSchedule;
use crate::train::trainer::TrainerConfig;

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending value (0 when the parser gave no position).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message (names the key).
        message: String,
    },
    /// The file parsed but some values are out of range; every one is listed.
    #[error("{path}: {} invalid setting(s):\n{}", errors.len(), errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<FieldError>,
    },
}

/// One out-of-range setting, named by its TOML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted TOML path (`train.batch_size`).
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// TRL's `max_length` default.
fn default_max_seq_len() -> usize {
    1024
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's flex CPU backend.
    Cpu,
    /// burn's CUDA backend (needs a build with `--features cuda`).
    Cuda,
}

/// `[model]`: which weights to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A preset name (`tiny`, `tiny-hybrid`) or a Hugging Face directory.
    pub spec: String,
    /// `cpu` or `cuda`.
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// DPO reference weights (preset or directory); absent: a frozen copy of `spec`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Read the DPO reference (`reference`, else `spec`: a model directory) from its files
    /// one layer at a time at each DPO step instead of keeping a resident copy: one model's
    /// memory saved for one forward pass over the files per step.
    #[serde(default)]
    pub stream_reference: bool,
    /// Memory of the device the step runs on (`141GB`, `24GiB`), for the start-up plan
    /// (`dreamloop plan`); absent: the host's memory on `cpu`, 141 GB (one H200) on `cuda`.
    #[serde(default)]
    pub device_memory: Option<String>,
    /// `f32` or `bf16`: the dtype the weights (policy and reference) live in on the device.
    #[serde(default)]
    pub dtype: Precision,
}

fn default_backend() -> Backend {
    Backend::Cpu
}

/// Shape of the learning-rate curve after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleShape {
    /// Constant at the peak.
    Constant,
    /// Cosine cycles with restarts (SGDR) down to `floor_ratio · lr`.
    Cosine,
}

/// `[train]`: how one step trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Peak learning rate (hot-reloadable).
    pub lr: f64,
    /// Linear warmup steps from `lr / warmup_steps` to `lr`.
    pub warmup_steps: u64,
    /// `constant` or `cosine` after the warmup.
    pub schedule: ScheduleShape,
    /// Length of one cosine cycle in steps (cosine only).
    #[serde(default = "default_cycle_steps")]
    pub cycle_steps: u64,
    /// Cosine floor as a fraction of `lr` (cosine only).
    #[serde(default)]
    pub floor_ratio: f64,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Global gradient-norm clipping threshold (0: off).
    pub max_grad_norm: f64,
    /// Longest trained sequence in tokens; longer examples are cut (0: no limit).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Keep only each decoder layer's input and recompute the layer during backward: one
    /// layer's activations instead of all of them, for one more forward pass. Absent: on
    /// for `[model] dtype = "bf16"` (the large-model setting), off for f32.
    #[serde(default)]
    pub recompute: Option<bool>,
    /// Target positions per chunk of the LM head's logits, forward and backward (0: all at
    /// once); bounds the `[tokens × vocab]` logits to `[logits_chunk × vocab]`.
    #[serde(default)]
    pub logits_chunk: usize,
    /// With `[model] stream_reference`: DPO pairs whose reference log-probs are computed in
    /// one pass over the reference's files, ahead of their steps, and stored with each queued
    /// pair (0: each step's pairs in their step, one pass per step).
    #[serde(default = "default_reference_block")]
    pub reference_block: usize,
    /// DPO temperature β.
    pub beta: f64,
    /// `sigmoid` (DPO) or `ipo`.
    #[serde(default)]
    pub dpo_variant: DpoVariant,
    /// Parameter-name globs that never train.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// If non-empty, only parameters matching one of these globs train.
    #[serde(default)]
    pub train_only: Vec<String>,
    /// The optimizer and its hyper-parameters: `[train.optimizer.adamw]` or
    /// `[train.optimizer.apollo]` (APOLLO-Mini is `apollo` with rank 1, tensor scaling).
    pub optimizer: OptimizerConfig,
}

fn default_cycle_steps() -> u64 {
    1000
}

fn default_reference_block() -> usize {
    16
}

/// `[data]`: where examples come from and how they are mixed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Scenario templates, with `corpus/train` and `corpus/heldout` inside.
    pub scenarios_dir: PathBuf,
    /// Conversation logs (`*.jsonl`), read incrementally; absent: none.
    #[serde(default)]
    pub logs_dir: Option<PathBuf>,
    /// Share of general replay examples per batch (hot-reloadable).
    pub replay_ratio: f64,
    /// Share of clear-direction (accept) examples among the behavioural ones.
    pub accept_share: f64,
    /// Relative weights of the general sources: arithmetic, code, reasoning, corpus text.
    pub general_weights: [f64; 4],
    /// Corpus window length in words, `[min, max]`.
    pub chunk_words: [usize; 2],
    /// Seed of scenario sampling and general replay (streams advance with the ledger).
    pub seed: u64,
}

/// `[eval]`: what the monitor measures and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate the weights every this many optimizer steps (hot-reloadable).
    pub every_n_steps: u64,
    /// Renderings per probe template.
    pub probe_samples: usize,
    /// Arithmetic and code multiple-choice probes.
    pub general_items: usize,
    /// Held-out texts used for perplexity (the first N files; 0: all).
    pub max_heldout_texts: usize,
    /// Bytes kept of each held-out text (cut at a character boundary; 0: whole text).
    pub heldout_max_bytes: usize,
    /// Seed of the general probes (fixed, so evaluations compare like with like).
    pub seed: u64,
    /// Generation probes (`eval::generations`): this many prompts of each kind (clear and
    /// flawed direction, arithmetic, code) answered greedily at each evaluation; 0: off.
    #[serde(default)]
    pub generation_prompts: usize,
    /// Longest generated reply, in tokens.
    #[serde(default = "default_generation_tokens")]
    pub generation_tokens: usize,
}

fn default_generation_tokens() -> usize {
    64
}

/// `[checkpoint]`: how often and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many optimizer steps (evaluations that mark GOOD also save).
    pub every_n_steps: u64,
    /// Newest checkpoints kept besides GOOD and LATEST.
    pub keep_last: usize,
    /// A second root (another disk) receiving every GOOD checkpoint; absent: none.
    #[serde(default)]
    pub mirror_dir: Option<PathBuf>,
    /// What the loop does when writing a checkpoint fails (disk full, I/O error).
    #[serde(default)]
    pub on_write_error: OnWriteError,
}

/// `[checkpoint] on_write_error`: the loop's answer to a failed checkpoint write. Either way
/// the previous checkpoints and the GOOD/LATEST pointers are intact, the failure is an event
/// and `dreamloop_checkpoint_write_failures_total` counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnWriteError {
    /// Pause at the step boundary until the operator resumes (SIGCONT / `dreamloop resume`):
    /// no training runs ahead of the last checkpoint that could be resumed from.
    #[default]
    Pause,
    /// Keep training; the next scheduled checkpoint tries again.
    Continue,
}

/// `[queues]`: every queue is bounded; these are the bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Labeled examples the mixer may hold ahead of the trainer, per class.
    pub examples: usize,
    /// Jobs waiting for the trainer thread (its crossbeam channel).
    pub trainer: usize,
}

/// `[supervisor]`: the restart budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSection {
    /// Restarts of one actor allowed within `window_seconds`; one more stops the daemon.
    pub max_restarts: u32,
    /// The budget window.
    pub window_seconds: u64,
    /// Seconds an actor call may take before it counts as a failure (an eval of a large
    /// model is the longest call).
    pub call_timeout_seconds: u64,
    /// Seconds between two status lines on stderr (a TTY also gets a live line).
    pub status_every_seconds: u64,
    /// `trained.jsonl` is sealed into a numbered segment once it reaches this size, so a
    /// start reads back only the segments it needs (`dreamloop::segmented`).
    #[serde(default = "default_trained_segment_bytes")]
    pub trained_segment_bytes: u64,
}

/// 16 MiB: ~2,000 steps of batch 8 at ~1 KB per example; a start parses at most about that
/// much more than the steps since GOOD.
fn default_trained_segment_bytes() -> u64 {
    16 << 20
}

/// `[dream]`: scenarios written by a model behind an OpenAI-compatible server
/// (`crate::dream`). The table is optional: absent, the daemon does not dream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamSection {
    /// Base URL of the server, `http://host:port`; loopback unless `allow_remote`.
    #[serde(default = "default_dream_server")]
    pub server: String,
    /// The served model's name (sent as `model`; names the dreams' provenance).
    pub model: String,
    /// Sampling temperature of dreams.
    #[serde(default = "default_dream_temperature")]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[serde(default = "default_dream_top_p")]
    pub top_p: f64,
    /// Most tokens one answer may take.
    #[serde(default = "default_dream_max_tokens")]
    pub max_tokens: u32,
    /// The server's sampling seed; absent: the server's own (fresh answers each call).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Longest wait for an answer (headers, then body) once connected.
    #[serde(default = "default_dream_timeout")]
    pub timeout_seconds: u64,
    /// Longest wait for the connection.
    #[serde(default = "default_dream_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// Requests in flight at once (the server's parallel slots bound what helps).
    #[serde(default = "default_dream_concurrency")]
    pub concurrency: usize,
    /// A file holding the API key; at most one of this and `api_key_env`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// An environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Allows a server that is not on loopback. The request carries the prompts (and the API
    /// key) in clear text over http, so leaving the machine must be a written decision.
    #[serde(default)]
    pub allow_remote: bool,
    /// Ask for `response_format: {"type": "json_object"}` (grammar-constrained JSON).
    #[serde(default = "default_true")]
    pub json_mode: bool,
    /// Relative weights of accept, push-back and general dreams among the accepted ones.
    #[serde(default = "default_dream_kind_weights")]
    pub kind_weights: [f64; 3],
    /// Template exemplars shown per request (1 or 2).
    #[serde(default = "default_dream_exemplars")]
    pub exemplars: usize,
    /// Longest system prompt of a dream, in characters.
    #[serde(default = "default_dream_max_system_chars")]
    pub max_system_chars: usize,
    /// Longest user turn of a dream, in characters.
    #[serde(default = "default_dream_max_chars")]
    pub max_user_chars: usize,
    /// Longest preferred or rejected reply of a dream, in characters.
    #[serde(default = "default_dream_max_chars")]
    pub max_reply_chars: usize,
    /// MinHash similarity at or above which a dream is a near duplicate (of a recent dream,
    /// a probe or an exemplar); measured in BENCHMARKS.md.
    #[serde(default = "default_near_duplicate_threshold")]
    pub near_duplicate_threshold: f64,
    /// Recent accepted dreams the near-duplicate filter compares against.
    #[serde(default = "default_near_duplicate_window")]
    pub near_duplicate_window: usize,
    /// Largest share of the scenarios of each batch taken from dreams (0–1); templates fill
    /// the rest, and all of it while the server is slow or down.
    #[serde(default = "default_dream_share")]
    pub share: f64,
}

fn default_dream_share() -> f64 {
    0.5
}

fn default_dream_server() -> String {
    "http://127.0.0.1:8080".into()
}
fn default_dream_temperature() -> f64 {
    0.8
}
fn default_dream_top_p() -> f64 {
    0.95
}
fn default_dream_max_tokens() -> u32 {
    2048
}
fn default_dream_timeout() -> u64 {
    120
}
fn default_dream_connect_timeout() -> u64 {
    5
}
fn default_dream_concurrency() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_dream_kind_weights() -> [f64; 3] {
    [0.45, 0.45, 0.1]
}
fn default_dream_exemplars() -> usize {
    2
}
fn default_dream_max_system_chars() -> usize {
    400
}
fn default_dream_max_chars() -> usize {
    1500
}
fn default_near_duplicate_threshold() -> f64 {
    crate::dream::neardup::DEFAULT_THRESHOLD
}
fn default_near_duplicate_window() -> usize {
    10_000
}

impl DreamSection {
    /// The client's settings.
    pub fn client_settings(&self) -> crate::dream::ClientSettings {
        use crate::dream::KeySource;
        crate::dream::ClientSettings {
            server: self.server.clone(),
            model: self.model.clone(),
            sampling: crate::dream::Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                max_tokens: self.max_tokens,
                seed: self.seed,
            },
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_seconds),
            read_timeout: std::time::Duration::from_secs(self.timeout_seconds),
            api_key: match (&self.api_key_file, &self.api_key_env) {
                (Some(path), _) => Some(KeySource::File(path.clone())),
                (None, Some(name)) => Some(KeySource::Env(name.clone())),
                (None, None) => None,
            },
        }
    }

    /// The dreamer's settings; `seed` and `stream` as for the template generator.
    pub fn dreamer_config(&self, seed: u64, stream: u64) -> crate::dream::DreamerConfig {
        crate::dream::DreamerConfig {
            kind_weights: self.kind_weights,
            exemplars: self.exemplars,
            limits: crate::dream::Limits {
                max_system_chars: self.max_system_chars,
                max_user_chars: self.max_user_chars,
                max_reply_chars: self.max_reply_chars,
            },
            near_duplicate_threshold: self.near_duplicate_threshold,
            near_duplicate_window: self.near_duplicate_window,
            seed,
            stream,
        }
    }

    /// Every problem of the table, as `(field, reason)` with `dream.` paths.
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match crate::dream::is_loopback(&self.server) {
            Err(reason) => out.push(("dream.server", reason)),
            Ok(false) if !self.allow_remote => out.push((
                "dream.server",
                format!(
                    "`{}` is not a loopback address; prompts (and the API key) travel in clear text over http. Use 127.0.0.1 or [::1], or set `dream.allow_remote = true`",
                    self.server
                ),
            )),
            Ok(_) => {}
        }
        if self.model.trim().is_empty() {
            out.push(("dream.model", "must name the served model".into()));
        }
        if !(0.0..=1.0).contains(&self.share) {
            out.push(("dream.share", format!("{} is not in 0–1", self.share)));
        }
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            out.push((
                "dream.temperature",
                format!("must be in [0, 2], got {}", self.temperature),
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            out.push((
                "dream.top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        for (field, value) in [
            ("dream.max_tokens", u64::from(self.max_tokens)),
            ("dream.timeout_seconds", self.timeout_seconds),
            (
                "dream.connect_timeout_seconds",
                self.connect_timeout_seconds,
            ),
            ("dream.max_system_chars", self.max_system_chars as u64),
            ("dream.max_user_chars", self.max_user_chars as u64),
            ("dream.max_reply_chars", self.max_reply_chars as u64),
        ] {
            if value == 0 {
                out.push((field, "must be at least 1".into()));
            }
        }
        if !(1..=64).contains(&self.concurrency) {
            out.push((
                "dream.concurrency",
                format!("must be in 1..=64, got {}", self.concurrency),
            ));
        }
        match (&self.api_key_file, &self.api_key_env) {
            (Some(_), Some(_)) => out.push((
                "dream.api_key_file",
                "set one of api_key_file and api_key_env, not both".into(),
            )),
            (_, Some(name)) if name.trim().is_empty() => out.push((
                "dream.api_key_env",
                "must name an environment variable".into(),
            )),
            _ => {}
        }
        let w = &self.kind_weights;
        if w.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || w.iter().sum::<f64>() <= 0.0 {
            out.push((
                "dream.kind_weights",
                format!("must be three finite weights ≥ 0 (accept, push_back, general) with a positive sum, got {w:?}"),
            ));
        }
        if !(1..=2).contains(&self.exemplars) {
            out.push((
                "dream.exemplars",
                format!("must be 1 or 2, got {}", self.exemplars),
            ));
        }
        let t = self.near_duplicate_threshold;
        if !(t.is_finite() && t > 0.0 && t <= 1.0) {
            out.push((
                "dream.near_duplicate_threshold",
                format!("must be in (0, 1], got {t}"),
            ));
        }
        out
    }
}

/// `phase`: one phase for the whole run, or a schedule of `[[phase]]` tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PhaseSpec {
    /// `phase = "sft"`: one phase, switched by hand (a hot setting).
    Fixed(Phase),
    /// `[[phase]]` tables, run in order (cold: a change needs a restart).
    Schedule(Vec<PhaseEntry>),
}

impl PhaseSpec {
    /// The phase whose steps need the most memory (a DPO pair is two sequences through
    /// the policy and the reference), for the memory plan.
    pub fn heaviest(&self) -> Phase {
        match self {
            PhaseSpec::Fixed(p) => *p,
            PhaseSpec::Schedule(entries) => {
                let has = |k: Phase| entries.iter().any(|e| e.kind == k);
                if has(Phase::Dpo) {
                    Phase::Dpo
                } else if has(Phase::Mixed) {
                    Phase::Mixed
                } else {
                    Phase::Sft
                }
            }
        }
    }

    /// The phase a fresh run starts in.
    pub fn first(&self) -> Phase {
        match self {
            PhaseSpec::Fixed(p) => *p,
            PhaseSpec::Schedule(entries) => entries.first().map_or(Phase::Sft, |e| e.kind),
        }
    }
}

impl<'de> Deserialize<'de> for PhaseSpec {
    /// A string or an array of tables, each with its own error (serde's untagged enums only
    /// say that no variant matched).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Spec;
        impl<'de> serde::de::Visitor<'de> for Spec {
            type Value = PhaseSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"sft\", \"dpo\" or \"mixed\", or [[phase]] tables")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PhaseSpec, E> {
                use serde::de::IntoDeserializer;
                Phase::deserialize(s.into_deserializer()).map(PhaseSpec::Fixed)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<PhaseSpec, A::Error> {
                Vec::<PhaseEntry>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(PhaseSpec::Schedule)
            }
        }
        d.deserialize_any(Spec)
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamConfig {
    /// Where checkpoints, ledger, events and status live (`--state-dir` overrides).
    pub state_dir: PathBuf,
    /// The Prometheus listener (`--metrics-addr` overrides); loopback by default.
    pub metrics_addr: String,
    /// Allows a `metrics_addr` that is not loopback. /metrics has no authentication, so
    /// serving it beyond this machine must be a written decision, not a typo.
    #[serde(default)]
    pub metrics_public: bool,
    /// `phase = "sft" | "dpo" | "mixed"` (hot-reloadable), or a schedule of `[[phase]]`
    /// tables that the experiment controller advances on its own ([`crate::controller`]).
    pub phase: PhaseSpec,
    /// `[controller]`: when lr rises and replay is targeted.
    #[serde(default)]
    pub controller: ControllerSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[eval]`.
    pub eval: EvalSection,
    /// `[rollback]`: the policy's thresholds and adjustments (hot-reloadable).
    #[serde(default)]
    pub rollback: Policy,
    /// `[checkpoint]`.
    pub checkpoint: CheckpointSection,
    /// `[queues]`.
    pub queues: QueueSection,
    /// `[supervisor]`.
    pub supervisor: SupervisorSection,
    /// `[dream]`; absent: no dreaming.
    #[serde(default)]
    pub dream: Option<DreamSection>,
    /// `[on_policy]`: the policy's own replies, judged and paired; off by default.
    #[serde(default)]
    pub on_policy: OnPolicySection,
}

/// `[on_policy]`: every `every_n_steps` steps, the policy's greedy replies to up to `samples`
/// behaviour prompts of the batch about to be trained are judged (`dream::on_policy`); in the
/// `dpo` and `mixed` phases a wrong one becomes a DPO pair against the preferred reply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnPolicySection {
    /// Sample before every this many steps; 0 turns sampling off.
    #[serde(default)]
    pub every_n_steps: u64,
    /// Replies per sampling (alternating clear and flawed directions).
    #[serde(default = "default_on_policy_samples")]
    pub samples: usize,
    /// Longest reply, in tokens.
    #[serde(default = "default_on_policy_max_new_tokens")]
    pub max_new_tokens: usize,
}

fn default_on_policy_samples() -> usize {
    2
}

fn default_on_policy_max_new_tokens() -> usize {
    96
}

impl Default for OnPolicySection {
    fn default() -> Self {
        OnPolicySection {
            every_n_steps: 0,
            samples: default_on_policy_samples(),
            max_new_tokens: default_on_policy_max_new_tokens(),
        }
    }
}

/// The settings a SIGHUP applies without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct HotSettings {
    /// Peak learning rate (the rollback multiplier still applies on top).
    pub lr: f64,
    /// Replay ratio (the policy may raise it again after a rollback).
    pub replay_ratio: f64,
    /// Evaluation cadence in steps.
    pub eval_every_n_steps: u64,
    /// The rollback policy.
    pub rollback: Policy,
    /// SFT, DPO or mixed; `None` with a `[[phase]]` schedule (the controller's to change).
    pub phase: Option<Phase>,
}

impl DreamConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<DreamConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        config.validate().map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })?;
        Ok(config)
    }

    /// Parses TOML text (`path` only names it in errors). Not validated.
    pub fn parse(text: &str, path: &Path) -> Result<DreamConfig, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let (line, column) = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    (line, column)
                })
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })
    }

    /// Checks every range; returns all problems, each named by its TOML path.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.to_string(),
                reason,
            })
        };
        if self.state_dir.as_os_str().is_empty() {
            bad("state_dir", "must not be empty".into());
        }
        match self.metrics_addr.parse::<std::net::SocketAddr>() {
            Err(_) => bad(
                "metrics_addr",
                format!(
                    "`{}` is not an address:port such as 127.0.0.1:9464",
                    self.metrics_addr
                ),
            ),
            Ok(addr) if !addr.ip().is_loopback() && !self.metrics_public => bad(
                "metrics_addr",
                format!(
                    "`{}` is not a loopback address and /metrics has no authentication; \
                     use 127.0.0.1 or [::1], or set `metrics_public = true` to serve it \
                     beyond this machine",
                    self.metrics_addr
                ),
            ),
            Ok(_) => {}
        }
        if let Some(text) = &self.model.device_memory {
            if let Err(e) = crate::plan::parse_bytes(text) {
                bad("model.device_memory", e.to_string());
            }
        }
        if self.model.spec.trim().is_empty() {
            bad(
                "model.spec",
                "must name a preset (tiny, tiny-hybrid) or a model directory".into(),
            );
        }
        if self.model.stream_reference {
            let source = self.model.reference.as_deref().unwrap_or(&self.model.spec);
            if !std::path::Path::new(source).join("config.json").is_file() {
                bad(
                    "model.stream_reference",
                    format!(
                        "`{source}` is not a model directory with config.json; a streamed \
                         reference is read from safetensors files (or set it to false)"
                    ),
                );
            }
        }
        let t = &self.train;
        if !(t.lr.is_finite() && t.lr > 0.0 && t.lr < 1.0) {
            bad("train.lr", format!("must be in (0, 1), got {}", t.lr));
        }
        if t.schedule == ScheduleShape::Cosine && t.cycle_steps == 0 {
            bad(
                "train.cycle_steps",
                "must be at least 1 for a cosine schedule".into(),
            );
        }
        if !(0.0..=1.0).contains(&t.floor_ratio) {
            bad(
                "train.floor_ratio",
                format!("must be in [0, 1], got {}", t.floor_ratio),
            );
        }
        if t.batch_size == 0 {
            bad("train.batch_size", "must be at least 1".into());
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            bad(
                "train.max_grad_norm",
                format!("must be ≥ 0 (0 disables clipping), got {}", t.max_grad_norm),
            );
        }
        if !(t.beta.is_finite() && t.beta > 0.0) {
            bad("train.beta", format!("must be > 0, got {}", t.beta));
        }
        if let Err(e) = t.optimizer.validate() {
            let section = format!("train.optimizer.{}", t.optimizer.algorithm());
            match e {
                crate::train::optim::OptimError::InvalidConfig { field, reason } => {
                    bad(&format!("{section}.{field}"), reason)
                }
                other => bad(&section, other.to_string()),
            }
        }
        let d = &self.data;
        for (field, value) in [
            ("data.replay_ratio", d.replay_ratio),
            ("data.accept_share", d.accept_share),
        ] {
            if !(0.0..=1.0).contains(&value) {
                bad(field, format!("must be a ratio in [0, 1], got {value}"));
            }
        }
        if d.general_weights
            .iter()
            .any(|w| !(w.is_finite() && *w >= 0.0))
            || d.general_weights.iter().sum::<f64>() <= 0.0
        {
            bad(
                "data.general_weights",
                format!(
                    "must be four finite weights ≥ 0 with a positive sum, got {:?}",
                    d.general_weights
                ),
            );
        }
        if d.chunk_words[0] == 0 || d.chunk_words[0] > d.chunk_words[1] {
            bad(
                "data.chunk_words",
                format!(
                    "must be [min, max] with 1 ≤ min ≤ max, got {:?}",
                    d.chunk_words
                ),
            );
        }
        if self.eval.every_n_steps == 0 {
            bad("eval.every_n_steps", "must be at least 1".into());
        }
        if self.eval.probe_samples == 0 {
            bad("eval.probe_samples", "must be at least 1".into());
        }
        if let Err(policy_errors) = self.rollback.validate() {
            for e in policy_errors {
                bad(
                    &format!("rollback.{}", e.field),
                    format!("{} (got {})", e.expected, e.value),
                );
            }
        }
        if self.checkpoint.every_n_steps == 0 {
            bad("checkpoint.every_n_steps", "must be at least 1".into());
        }
        if self.checkpoint.keep_last == 0 {
            bad("checkpoint.keep_last", "must be at least 1".into());
        }
        if self.queues.examples < t.batch_size {
            bad(
                "queues.examples",
                format!(
                    "must hold at least one batch (train.batch_size = {}), got {}",
                    t.batch_size, self.queues.examples
                ),
            );
        }
        if self.queues.trainer == 0 {
            bad("queues.trainer", "must be at least 1".into());
        }
        let s = &self.supervisor;
        if s.window_seconds == 0 {
            bad("supervisor.window_seconds", "must be at least 1".into());
        }
        if s.call_timeout_seconds == 0 {
            bad(
                "supervisor.call_timeout_seconds",
                "must be at least 1".into(),
            );
        }
        if s.status_every_seconds == 0 {
            bad(
                "supervisor.status_every_seconds",
                "must be at least 1".into(),
            );
        }
        if s.trained_segment_bytes == 0 {
            bad(
                "supervisor.trained_segment_bytes",
                "must be at least 1".into(),
            );
        }
        if let Some(dream) = &self.dream {
            for (field, reason) in dream.problems() {
                bad(field, reason);
            }
        }
        if self.eval.generation_prompts > 0 && !(1..=4096).contains(&self.eval.generation_tokens) {
            bad(
                "eval.generation_tokens",
                format!("{} is outside 1..=4096", self.eval.generation_tokens),
            );
        }
        let o = &self.on_policy;
        if o.every_n_steps > 0 && o.samples == 0 {
            bad(
                "on_policy.samples",
                "must be at least 1 when on_policy.every_n_steps is set".into(),
            );
        }
        if o.every_n_steps > 0 && !(1..=4096).contains(&o.max_new_tokens) {
            bad(
                "on_policy.max_new_tokens",
                format!("{} is outside 1..=4096", o.max_new_tokens),
            );
        }
        if let PhaseSpec::Schedule(entries) = &self.phase {
            if entries.is_empty() {
                bad(
                    "phase",
                    "a schedule needs at least one [[phase]] table".into(),
                );
            }
            for (i, e) in entries.iter().enumerate() {
                let at = |field: &str| format!("phase[{i}].{field}");
                let last = i + 1 == entries.len();
                for (field, value) in [("lr", e.lr), ("dpo_lr", e.dpo_lr), ("beta", e.beta)] {
                    if let Some(v) = value {
                        if !(v.is_finite() && v > 0.0) {
                            bad(&at(field), format!("{v} must be a positive number"));
                        }
                    }
                }
                if e.dpo_lr.is_some() && e.kind != Phase::Mixed {
                    bad(
                        &at("dpo_lr"),
                        "only a mixed phase has a separate DPO lr".into(),
                    );
                }
                let lr = e.lr.unwrap_or(self.train.lr);
                if let Some(max) = e.max_lr {
                    if !(max.is_finite() && max >= lr) {
                        bad(
                            &at("max_lr"),
                            format!("{max} must be at least the phase's lr {lr}"),
                        );
                    }
                }
                if e.rebase_reference.is_some() && e.kind == Phase::Sft {
                    bad(
                        &at("rebase_reference"),
                        "an sft phase has no DPO reference".into(),
                    );
                }
                match (&e.until, last) {
                    (Some(_), true) => bad(
                        &at("until"),
                        "the last phase runs for ever; it has nowhere to advance to".into(),
                    ),
                    (None, false) => bad(
                        &at("until"),
                        "every phase but the last needs `until = { steps = N }` or \
                         `until = { flawed_margin_gain = X, clean_evals = N }`"
                            .into(),
                    ),
                    (Some(u), false) => {
                        if u.steps.is_none() && u.flawed_margin_gain.is_none() {
                            bad(
                                &at("until"),
                                "set `steps`, `flawed_margin_gain` or both".into(),
                            );
                        }
                        if u.steps == Some(0) {
                            bad(&at("until.steps"), "must be at least 1".into());
                        }
                        if u.flawed_margin_gain.is_some_and(|g| !g.is_finite()) {
                            bad(&at("until.flawed_margin_gain"), "must be a number".into());
                        }
                        if u.clean_evals == 0 {
                            bad(&at("until.clean_evals"), "must be at least 1".into());
                        }
                    }
                    (None, true) => {}
                }
            }
        }
        let c = &self.controller;
        if !(c.stall_margin.is_finite() && c.stall_margin >= 0.0) {
            bad(
                "controller.stall_margin",
                format!("{} must be ≥ 0", c.stall_margin),
            );
        }
        if !(c.stall_attention.is_finite() && c.stall_attention >= 0.0) {
            bad(
                "controller.stall_attention",
                format!("{} must be ≥ 0", c.stall_attention),
            );
        }
        if !(c.lr_raise_factor.is_finite() && c.lr_raise_factor > 1.0) {
            bad(
                "controller.lr_raise_factor",
                format!("{} must be above 1", c.lr_raise_factor),
            );
        }
        if !(c.targeted_replay_factor.is_finite() && c.targeted_replay_factor >= 1.0) {
            bad(
                "controller.targeted_replay_factor",
                format!("{} must be at least 1 (1: off)", c.targeted_replay_factor),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The learning-rate schedule the file describes (multiplier 1).
    pub fn schedule(&self) -> LrSchedule {
        let t = &self.train;
        match t.schedule {
            ScheduleShape::Constant => LrSchedule::warmup_constant(t.lr, t.warmup_steps),
            ScheduleShape::Cosine => {
                LrSchedule::warmup_cosine(t.lr, t.warmup_steps, t.cycle_steps, t.floor_ratio)
            }
        }
    }

    /// Whether layers are recomputed: `[train] recompute`, by default on in bf16.
    pub fn recompute(&self) -> bool {
        self.train
            .recompute
            .unwrap_or(self.model.dtype == crate::model::Precision::Bf16)
    }

    /// The experiment controller: the phases resolved against `[train]`, `[controller]`,
    /// and the rollback guards. A fixed `phase` is a one-phase schedule that never ends.
    pub fn controller(&self) -> Controller {
        let phases = match &self.phase {
            PhaseSpec::Fixed(kind) => vec![PhaseSettings {
                kind: *kind,
                lr: self.train.lr,
                dpo_weight: 1.0,
                beta: self.train.beta,
                max_lr: 10.0 * self.train.lr,
                rebase_reference: false,
                until: None,
            }],
            PhaseSpec::Schedule(entries) => entries
                .iter()
                .map(|e| e.resolve(self.train.lr, self.train.beta))
                .collect(),
        };
        Controller {
            phases,
            settings: self.controller,
            guards: self.rollback.clone(),
        }
    }

    /// The trainer's settings; `pad_id` comes from the model. The lr and β are the first
    /// phase's.
    pub fn trainer_config(&self, pad_id: u32) -> TrainerConfig {
        let t = &self.train;
        let first = *self.controller().phase(0);
        let mut schedule = self.schedule();
        schedule.scale(first.lr / t.lr);
        TrainerConfig {
            optimizer: t.optimizer.clone(),
            schedule,
            max_grad_norm: t.max_grad_norm,
            beta: first.beta,
            dpo_weight: first.dpo_weight,
            dpo_variant: t.dpo_variant,
            freeze: t.freeze.clone(),
            train_only: t.train_only.clone(),
            pad_id,
            max_seq_len: t.max_seq_len,
            recompute: self.recompute(),
            logits_chunk: t.logits_chunk,
        }
    }

    /// The mixer's settings.
    pub fn mix_config(&self) -> MixConfig {
        MixConfig {
            batch_size: self.train.batch_size,
            replay_ratio: self.data.replay_ratio,
            accept_share: self.data.accept_share,
        }
    }

    /// The general-replay settings.
    pub fn general_config(&self) -> GeneralConfig {
        GeneralConfig {
            weights: self.data.general_weights,
            chunk_words: (self.data.chunk_words[0], self.data.chunk_words[1]),
        }
    }

    /// The hot-reloadable subset.
    pub fn hot(&self) -> HotSettings {
        HotSettings {
            lr: self.train.lr,
            replay_ratio: self.data.replay_ratio,
            eval_every_n_steps: self.eval.every_n_steps,
            rollback: self.rollback.clone(),
            phase: match self.phase {
                PhaseSpec::Fixed(p) => Some(p),
                PhaseSpec::Schedule(_) => None,
            },
        }
    }

    /// The warning to log when /metrics is served beyond loopback (allowed by
    /// `metrics_public = true`); `None` for a loopback or unparsable address.
    pub fn public_metrics_warning(&self) -> Option<String> {
        let addr = self.metrics_addr.parse::<std::net::SocketAddr>().ok()?;
        (!addr.ip().is_loopback()).then(|| {
            format!(
                "metrics_addr {addr} is not loopback (metrics_public = true): /metrics is \
                 served without authentication to anyone who can reach it"
            )
        })
    }

    /// TOML paths of settings that differ from `other` but need a restart to apply.
    pub fn cold_differences(&self, other: &DreamConfig) -> Vec<&'static str> {
        let mut a = self.clone();
        let b = other;
        let mut out = Vec::new();
        // Neutralise the hot settings, then compare section by section.
        // With a schedule the phases set the lr: `train.lr` (their default) and the phases
        // themselves need a restart.
        if let (PhaseSpec::Fixed(_), PhaseSpec::Fixed(_)) = (&a.phase, &b.phase) {
            a.train.lr = b.train.lr;
            a.phase = b.phase.clone();
        }
        a.data.replay_ratio = b.data.replay_ratio;
        a.eval.every_n_steps = b.eval.every_n_steps;
        a.rollback = b.rollback.clone();
        for (name, differs) in [
            ("state_dir", a.state_dir != b.state_dir),
            ("metrics_addr", a.metrics_addr != b.metrics_addr),
            ("metrics_public", a.metrics_public != b.metrics_public),
            ("phase", a.phase != b.phase),
            ("controller", a.controller != b.controller),
            ("model", a.model != b.model),
            ("train", a.train != b.train),
            ("data", a.data != b.data),
            ("eval", a.eval != b.eval),
            ("checkpoint", a.checkpoint != b.checkpoint),
            ("queues", a.queues != b.queues),
            ("supervisor", a.supervisor != b.supervisor),
            ("dream", a.dream != b.dream),
            ("on_policy", a.on_policy != b.on_policy),
        ] {
            if differs {
                out.push(name);
            }
        }
        out
    }

    /// A small configuration for tests and the first run: the tiny preset on CPU, batch 2,
    /// frequent evaluations and checkpoints, a handful of probes.
    pub fn tiny(scenarios_dir: &Path, state_dir: &Path) -> DreamConfig {
        DreamConfig {
            state_dir: state_dir.to_path_buf(),
            metrics_addr: "127.0.0.1:0".into(),
            metrics_public: false,
            phase: PhaseSpec::Fixed(Phase::Sft),
            controller: ControllerSection::default(),
            model: ModelSection {
                spec: "tiny".into(),
                backend: Backend::Cpu,
                reference: None,
                stream_reference: false,
                device_memory: None,
                dtype: Precision::F32,
            },
            train: TrainSection {
                lr: 2e-5,
                warmup_steps: 0,
                schedule: ScheduleShape::Constant,
                cycle_steps: 1000,
                floor_ratio: 0.0,
                batch_size: 2,
                max_grad_norm: 1.0,
                max_seq_len: 1024,
                recompute: None,
                logits_chunk: 0,
                reference_block: default_reference_block(),
                beta: 0.01,
                dpo_variant: DpoVariant::Sigmoid,
                freeze: Vec::new(),
                train_only: Vec::new(),
                optimizer: OptimizerConfig::Apollo(ApolloConfig::mini()),
            },
            data: DataSection {
                scenarios_dir: scenarios_dir.to_path_buf(),
                logs_dir: None,
                replay_ratio: 0.25,
                accept_share: 0.5,
                general_weights: [0.25, 0.25, 0.2, 0.3],
                chunk_words: [16, 48],
                seed: 0,
            },
            eval: EvalSection {
                every_n_steps: 5,
                probe_samples: 1,
                general_items: 4,
                max_heldout_texts: 1,
                heldout_max_bytes: 2048,
                seed: 0,
                generation_prompts: 0,
                generation_tokens: default_generation_tokens(),
            },
            rollback: Policy::default(),
            checkpoint: CheckpointSection {
                every_n_steps: 5,
                keep_last: 2,
                mirror_dir: None,
                on_write_error: OnWriteError::Pause,
            },
            queues: QueueSection {
                examples: 8,
                trainer: 1,
            },
            supervisor: SupervisorSection {
                max_restarts: 3,
                window_seconds: 600,
                call_timeout_seconds: 600,
                status_every_seconds: 30,
                trained_segment_bytes: default_trained_segment_bytes(),
            },
            dream: None,
            on_policy: OnPolicySection::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Every file in `config/` parses and validates.
    #[test]
    fn every_bundled_config_is_valid() {
        let mut seen = 0;
        let mut entries: Vec<_> = std::fs::read_dir(dir().join("config"))
            .expect("config/ exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        entries.sort();
        for path in entries {
            DreamConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
        assert!(seen >= 1, "config/ holds no .toml file");
    }

    /// The SmolLM2 config is valid and keeps the operator's SFT rate and the memory bound.
    #[test]
    fn smollm2_cpu_config_is_valid() {
        let c = DreamConfig::load(&dir().join("config/smollm2-cpu.toml")).expect("valid");
        assert!(c.model.spec.ends_with(".gguf"));
        assert_eq!(c.train.lr, 1e-5);
        assert_eq!(c.train.max_seq_len, 512);
        assert_eq!(c.data.replay_ratio, 0.25);
    }

    /// The defaults file carries the numbers DESIGN.md §4 and the task prescribe.
    #[test]
    fn defaults_follow_the_recipes() {
        let c = DreamConfig::load(&dir().join("config/dreamloop.toml")).expect("valid");
        assert_eq!(c.model.spec, "tiny");
        assert_eq!(c.model.backend, Backend::Cpu);
        assert!((1e-5..=2e-5).contains(&c.train.lr), "SFT lr {}", c.train.lr);
        assert_eq!(c.train.beta, 0.01);
        assert_eq!(c.data.replay_ratio, 0.25);
        assert_eq!(c.rollback.lr_factor_on_rollback, 0.5);
        assert_eq!(c.rollback.max_replay_ratio, 0.40);
        assert!(c.metrics_addr.starts_with("127.0.0.1:"));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text =
            "state_dir = \"s\"\nmetrics_addr = \"127.0.0.1:1\"\nphase = \"sft\"\nbogus = 1\n";
        match DreamConfig::parse(text, Path::new("x.toml")) {
            Err(ConfigError::Parse { line, message, .. }) => {
                assert_eq!(line, 4, "{message}");
                assert!(message.contains("bogus"), "{message}");
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn recompute_defaults_on_for_bf16_only() {
        let mut c = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        assert!(!c.recompute());
        c.model.dtype = crate::model::Precision::Bf16;
        assert!(c.recompute());
        assert!(c.trainer_config(0).recompute);
        c.train.recompute = Some(false);
        assert!(!c.recompute());
    }

    #[test]
    fn validate_lists_every_bad_field() {
        let mut c = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        c.train.batch_size = 0;
        c.data.replay_ratio = 1.5;
        c.rollback.patience = 0;
        c.eval.every_n_steps = 0;
        c.metrics_addr = "nowhere".into();
        // A preset has no files to stream the reference from.
        c.model.stream_reference = true;
        let errors = c.validate().expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "metrics_addr",
            "model.stream_reference",
            "train.batch_size",
            "data.replay_ratio",
            "eval.every_n_steps",
            "rollback.patience",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing from {fields:?}"
            );
        }
    }

    /// `[[phase]]` tables parse next to the other tables, resolve against `[train]`, and a
    /// bad schedule names each bad field; a schedule is a cold setting.
    #[test]
    fn a_phase_schedule_parses_validates_and_is_cold() {
        let tiny = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        let text = toml::to_string(&tiny)
            .unwrap()
            .replace("phase = \"sft\"\n", "")
            + r#"
[[phase]]
kind = "sft"
lr = 1e-5
until = { steps = 40 }

[[phase]]
kind = "dpo"
lr = 5e-7
beta = 0.01
"#;
        let c = DreamConfig::parse(&text, Path::new("x.toml")).expect("parses");
        c.validate().expect("valid");
        let controller = c.controller();
        assert_eq!(controller.phases.len(), 2);
        assert_eq!(controller.phases[1].beta, 0.01);
        assert!(controller.phases[1].rebase_reference);
        assert_eq!(c.phase.first(), Phase::Sft);
        assert_eq!(c.phase.heaviest(), Phase::Dpo);
        assert_eq!(
            c.hot().phase,
            None,
            "the schedule is the controller's, not a reload's"
        );
        assert_eq!(
            c.trainer_config(0).schedule.lr_at(1_000),
            1e-5,
            "the first phase's lr"
        );
        assert_eq!(tiny.cold_differences(&c), vec!["phase"]);

        let bad = text.replace("until = { steps = 40 }", "") + "until = { steps = 0 }\n";
        let errors = DreamConfig::parse(&bad, Path::new("x.toml"))
            .unwrap()
            .validate()
            .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["phase[0].until", "phase[1].until"],
            "{errors:?}"
        );
        let typo = text.replace("beta = 0.01", "betta = 0.01");
        let e = DreamConfig::parse(&typo, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("betta"), "{e}");
    }

    #[test]
    fn tiny_is_valid_and_hot_differences_are_not_cold() {
        let a = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        a.validate().expect("tiny is valid");
        let mut b = a.clone();
        b.train.lr = 1e-4;
        b.data.replay_ratio = 0.4;
        b.phase = PhaseSpec::Fixed(Phase::Dpo);
        b.rollback.patience = 5;
        b.eval.every_n_steps = 7;
        assert!(a.cold_differences(&b).is_empty());
        b.train.batch_size = 4;
        assert_eq!(a.cold_differences(&b), vec!["train"]);
    }

    /// The commented `[dream]` block of the defaults file, uncommented, is valid and says
    /// what the code's defaults are (so the documentation cannot drift from them).
    #[test]
    fn the_documented_dream_table_matches_the_defaults() {
        let text = std::fs::read_to_string(dir().join("config/dreamloop.toml")).expect("read");
        let start = text
            .find("\n# [dream]\n")
            .expect("a commented [dream] table");
        let block: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with("api_key"))
            .map(|l| format!("{l}\n"))
            .collect();
        let section: DreamConfigDreamOnly = toml::from_str(&block).expect("the block parses");
        let d = section.dream;
        let defaults: DreamSection =
            toml::from_str("model = \"SmolLM2-135M-Instruct\"").expect("defaults");
        assert_eq!(d, defaults);
        assert_eq!(d.server, "http://127.0.0.1:8080");
        assert!(!d.allow_remote);
        assert_eq!(
            d.near_duplicate_threshold,
            crate::dream::neardup::DEFAULT_THRESHOLD
        );
        let mut c = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        c.dream = Some(d);
        c.validate().expect("valid");
    }

    /// Only the `[dream]` table of a file.
    #[derive(Deserialize)]
    struct DreamConfigDreamOnly {
        dream: DreamSection,
    }

    #[test]
    fn dream_validation_names_each_field() {
        let mut c = DreamConfig::tiny(Path::new("scenarios"), Path::new("state"));
        let ok: DreamSection = toml::from_str("model = \"m\"").expect("defaults");
        c.dream = Some(DreamSection {
            server: "http://192.168.1.20:8080".into(),
            temperature: -1.0,
            top_p: 0.0,
            concurrency: 0,
            api_key_file: Some("k".into()),
            api_key_env: Some("K".into()),
            kind_weights: [0.0; 3],
            exemplars: 3,
            near_duplicate_threshold: 1.5,
            timeout_seconds: 0,
            ..ok.clone()
        });
        let errors = c.validate().expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "dream.server",
                "dream.temperature",
                "dream.top_p",
                "dream.timeout_seconds",
                "dream.concurrency",
                "dream.api_key_file",
                "dream.kind_weights",
                "dream.exemplars",
                "dream.near_duplicate_threshold",
            ]
        );
        assert!(errors[0].reason.contains("allow_remote"), "{}", errors[0]);
        // The same LAN server, allowed in writing.
        c.dream = Some(DreamSection {
            server: "http://192.168.1.20:8080".into(),
            allow_remote: true,
            ..ok.clone()
        });
        c.validate().expect("allowed");
        for bad in ["https://127.0.0.1:8443", "127.0.0.1:8080"] {
            c.dream = Some(DreamSection {
                server: bad.into(),
                allow_remote: true,
                ..ok.clone()
            });
            let errors = c.validate().expect_err(bad);
            assert_eq!(errors[0].field, "dream.server", "{bad}");
        }
    }

    #[test]
    fn an_unknown_dream_key_is_a_parse_error() {
        let text = std::fs::read_to_string(dir().join("config/dreamloop.toml")).expect("read");
        let text = format!("{text}\n[dream]\nmodel = \"m\"\nserver_url = \"x\"\n");
        match DreamConfig::parse(&text, Path::new("x.toml")) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("server_url"), "{message}")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
        let without = DreamConfig::load(&dir().join("config/dreamloop.toml")).expect("valid");
        assert_eq!(without.dream, None);
    }
}
