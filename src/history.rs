//! The run's history on disk: `run.json` (the run's id, made when the state directory is
//! first used) and `evals.jsonl` (one line per evaluation: the verdict, every probe figure
//! and the training settings in force), crash-safe like `events.jsonl` (one fsynced append
//! per record; a torn last line is skipped with a warning on reading).
//!
//! `dreamloop report` reads these; Prometheus keeps only what its retention allows, this
//! keeps the whole run.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::generations::{Generation, GenerationMeasures};
use crate::events::{read_jsonl, rfc3339_utc, EventError, JsonlWriter, LineWarning};
use crate::label::Phase;
use crate::rollback::{EvalMetrics, Verdict};

/// `evals.jsonl` inside the state directory.
pub const EVALS_FILE: &str = "evals.jsonl";
/// `generations.jsonl` inside the state directory: what the model wrote at each evaluation.
pub const GENERATIONS_FILE: &str = "generations.jsonl";
/// `run.json` inside the state directory.
pub const RUN_FILE: &str = "run.json";

/// `run.json`: which run a state directory holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `YYYYMMDDTHHMMSSZ-xxxxxx`: the start time and 6 hex digits of a hash of it and the pid.
    pub run_id: String,
    /// Unix time the run started, seconds.
    pub started_unix: u64,
}

impl RunInfo {
    /// The state directory's run, made (and written durably) on its first use.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<RunInfo> {
        let path = state_dir.join(RUN_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str(&text) {
                Ok(info) => return Ok(info),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "run.json is unreadable; a new run id is made.")
                }
            }
        }
        let now = SystemTime::now();
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let stamp = rfc3339_utc(now);
        // 2026-12-08T03:04:05.678Z → 20261208T030405Z
        let compact: String = stamp[..19]
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let hash = Sha256::digest(format!("{}:{}", since.as_nanos(), std::process::id()));
        let info = RunInfo {
            run_id: format!("{compact}Z-{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2]),
            started_unix: since.as_secs(),
        };
        crate::durable::create_private_dir(state_dir)?;
        let bytes = serde_json::to_vec(&info).map_err(std::io::Error::other)?;
        crate::durable::write_atomic(&path, &bytes)?;
        Ok(info)
    }
}

/// One evaluation, as `evals.jsonl` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalEntry {
    /// When it was recorded, RFC 3339 UTC.
    pub ts: String,
    /// The run.
    pub run_id: String,
    /// Seconds since the run started (wall time, daemon restarts included).
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub wall_seconds: f64,
    /// The step evaluated.
    pub step: u64,
    /// The rollback policy's verdict.
    pub verdict: Verdict,
    /// The policy's metrics.
    pub metrics: EvalMetrics,
    /// Clear- and flawed-direction margins per token (nats): what the controller reads.
    #[serde(deserialize_with = "crate::events::nullable::pair")]
    pub margin_per_token: [f64; 2],
    /// Arithmetic probe accuracy and margin.
    #[serde(deserialize_with = "crate::events::nullable::pair")]
    pub arithmetic: [f64; 2],
    /// Code probe accuracy and margin.
    #[serde(deserialize_with = "crate::events::nullable::pair")]
    pub code: [f64; 2],
    /// Attention on the direction per full-attention layer: `(layer, ratio)`.
    #[serde(deserialize_with = "crate::events::nullable::layers")]
    pub attention_per_layer: Vec<(usize, f64)>,
    /// Seconds the evaluation took.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub eval_seconds: f64,
    /// The lr of the next step.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub lr: f64,
    /// The peak lr the schedule follows (phase lr × stall boost × rollback factor's base).
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub peak_lr: f64,
    /// The rollback policy's lr factor.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub lr_factor: f64,
    /// The controller's stall boost.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub lr_boost: f64,
    /// Share of general replay per batch.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub replay_ratio: f64,
    /// General replay weights in force (arithmetic, code, reasoning, text).
    pub replay_weights: [f64; 4],
    /// SFT, DPO or mixed.
    pub phase: Phase,
    /// The `[[phase]]` index.
    pub phase_index: usize,
    /// Examples trained so far in this run (not rewound by rollbacks).
    pub examples_trained: u64,
    /// The share of the last minute spent in steps.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub duty_cycle: f64,
    /// The generation probes' measures (absent when they are off).
    #[serde(default)]
    pub generation: Option<GenerationMeasures>,
}

/// One evaluation's generations, as `generations.jsonl` keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationsEntry {
    /// When, RFC 3339 UTC.
    pub ts: String,
    /// The run.
    pub run_id: String,
    /// The step evaluated.
    pub step: u64,
    /// The measures.
    pub measures: GenerationMeasures,
    /// Every reply.
    pub generations: Vec<Generation>,
}

/// `evals.jsonl` and `generations.jsonl`, opened for appending.
#[derive(Debug)]
pub struct EvalLog {
    writer: JsonlWriter,
    generations: JsonlWriter,
}

impl EvalLog {
    /// Opens (creating) `<state_dir>/evals.jsonl`.
    pub fn open(state_dir: &Path) -> Result<EvalLog, EventError> {
        Ok(EvalLog {
            writer: JsonlWriter::open(&state_dir.join(EVALS_FILE))?,
            generations: JsonlWriter::open(&state_dir.join(GENERATIONS_FILE))?,
        })
    }

    /// Appends one evaluation's generations (fsynced).
    pub fn append_generations(&mut self, entry: &GenerationsEntry) -> Result<(), EventError> {
        self.generations.append(entry)
    }

    /// Every readable entry of `<state_dir>/generations.jsonl`.
    pub fn read_generations(
        state_dir: &Path,
    ) -> Result<(Vec<GenerationsEntry>, Vec<LineWarning>), EventError> {
        read_jsonl(&state_dir.join(GENERATIONS_FILE))
    }

    /// Appends one entry (fsynced).
    pub fn append(&mut self, entry: &EvalEntry) -> Result<(), EventError> {
        self.writer.append(entry)
    }

    /// Every readable entry of `<state_dir>/evals.jsonl`, with a warning per bad line.
    pub fn read(state_dir: &Path) -> Result<(Vec<EvalEntry>, Vec<LineWarning>), EventError> {
        read_jsonl(&state_dir.join(EVALS_FILE))
    }

    /// The file.
    pub fn path(&self) -> PathBuf {
        self.writer.path().to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON has no NaN: serde_json writes `null`, and an undefined measure must read back.
    #[test]
    fn undefined_measures_survive_the_file() {
        let m = EvalMetrics {
            clear_accuracy: 0.5,
            clear_margin: 0.1,
            flawed_accuracy: 0.5,
            flawed_margin: 0.1,
            perplexity: 9.0,
            attention_on_direction: f64::NAN,
            ablation_sensitivity: 0.0,
            general_accuracy: 0.5,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"attention_on_direction\":null"), "{text}");
        let back: EvalMetrics = serde_json::from_str(&text).unwrap();
        assert!(back.attention_on_direction.is_nan());
        assert_eq!(back.perplexity, 9.0);
        let layers: Vec<(usize, f64)> = crate::events::nullable::layers(
            &mut serde_json::Deserializer::from_str("[[3,null],[7,0.5]]"),
        )
        .unwrap();
        assert!(layers[0].1.is_nan() && layers[1] == (7, 0.5));
    }

    #[test]
    fn the_run_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunInfo::load_or_create(dir.path()).unwrap();
        let b = RunInfo::load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.run_id.len(),
            "20261208T030405Z-abcdef".len(),
            "{}",
            a.run_id
        );
        assert!(a.run_id.as_bytes()[8] == b'T' && a.run_id.contains("Z-"));
    }
}
