//! `events.jsonl`: the append-only record of what the loop decided and why.
//!
//! One JSON object per line (JSON Lines), each an [`EventRecord`]: a UTC timestamp, the
//! optimizer step the event refers to, and a typed [`Event`] whose `"event"` field names its
//! kind (`"rollback"`, `"mark_good"`, `"pause_by_policy"`, `"restart"`, `"phase_change"`,
//! `"alarm"`, `"checkpoint_failed"`). The file lives at `<state_dir>/events.jsonl`
//! (DESIGN.md §6); the quarantine of rolled-back examples uses the same line format through
//! the generic [`JsonlWriter`] / [`read_jsonl`].
//!
//! # Durability policy
//!
//! Every append is one `write_all` of a complete line (serialised in memory first, newline
//! included) on a file opened with `O_APPEND`, followed by `fsync` (`sync_data`). Events are
//! rare (evaluations, rollbacks, restarts), so an fsync each costs nothing measurable, and an
//! event that was reported as written survives a power cut. A crash in the middle of a write
//! can still leave a torn last line; the reader skips it with a warning, and
//! [`JsonlWriter::open`] first terminates such a line with `\n` so the next record starts on
//! a line of its own instead of being glued to the torn one.
//!
//! This module knows nothing about the actors that emit events; it only defines the record
//! types and the file discipline.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::controller::Why;
use crate::rollback::{Adjustments, EvalMetrics, PauseReason, RollbackReason};

/// File name of the event log inside the state directory.
pub const EVENTS_FILE: &str = "events.jsonl";

/// Errors of the JSONL files (event log, quarantine). Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// An I/O operation on the log failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done ("open", "append to", "read", ...).
        op: &'static str,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A record could not be serialised (a non-string map key, for instance).
    #[error("cannot serialise a record for {path}: {source}")]
    Serialize {
        /// The log file the record was meant for.
        path: PathBuf,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When the event was recorded, RFC 3339 UTC with milliseconds (`2025-11-24T00:06:00.123Z`):
    /// sortable as text and readable without tools.
    pub ts: String,
    /// The optimizer step the event refers to (for a rollback: the step rolled back *from*).
    pub step: u64,
    /// What happened; its kind is serialised as the `"event"` field of the same object.
    #[serde(flatten)]
    pub event: Event,
}

impl EventRecord {
    /// A record of `event` at `step`, stamped with the current time.
    pub fn now(step: u64, event: Event) -> Self {
        Self {
            ts: rfc3339_utc(SystemTime::now()),
            step,
            event,
        }
    }
}

/// What happened. Internally tagged: `{"event": "rollback", "from": …, …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The monitor restored the GOOD checkpoint.
    Rollback {
        /// Step whose evaluation triggered the rollback (the weights thrown away).
        from: u64,
        /// Step of the GOOD checkpoint restored.
        to: u64,
        /// Which guard failed; also the bounded label of the rollback metric.
        reason: RollbackReason,
        /// The evaluation that triggered the rollback, for the post-mortem.
        metrics: EvalMetrics,
        /// The baseline it was compared with (measured at the GOOD checkpoint).
        baseline: Option<EvalMetrics>,
        /// Learning-rate factor and replay ratio in force after the rollback.
        adjustments: Adjustments,
    },
    /// A checkpoint became the rollback target.
    MarkGood {
        /// Its evaluation, the new baseline.
        metrics: EvalMetrics,
    },
    /// The rollback policy stopped training for an operator (DESIGN.md §5: no thrashing).
    PauseByPolicy {
        /// Why.
        reason: PauseReason,
        /// The GOOD step restored before pausing, if any.
        rolled_back_to: Option<u64>,
    },
    /// The supervisor restarted an actor, or the daemon itself started again.
    Restart {
        /// Which actor (or `"daemon"`).
        actor: String,
        /// Restarts of this actor in the current budget window, this one included.
        attempt: u32,
        /// The failure that caused it, as text.
        reason: String,
    },
    /// The training phase changed (for instance SFT → DPO): by hand (a reload), or by the
    /// experiment controller's schedule.
    PhaseChange {
        /// Phase left.
        from: String,
        /// Phase entered.
        to: String,
        /// The `[[phase]]` index entered (absent: a reload of a fixed phase).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<usize>,
        /// Why the controller ended the previous phase.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Why>,
        /// The peak lr of the phase entered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lr: Option<f64>,
        /// The step whose weights became the DPO reference, if the phase re-based it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference_step: Option<u64>,
    },
    /// The experiment controller raised the learning rate (the signals were flat).
    LrRaised {
        /// Peak lr before.
        from: f64,
        /// Peak lr after.
        to: f64,
        /// Why.
        reason: Why,
    },
    /// The experiment controller re-weighted a general replay source (targeted replay).
    ReplayWeight {
        /// The source (`arithmetic`, `code`, `reasoning`, `text`).
        source: String,
        /// Its multiplier on the configured weight now (1: restored).
        boost: f64,
        /// Why.
        reason: Why,
    },
    /// Something an operator should look at that did not stop the loop.
    Alarm {
        /// A short stable name (`"mirror_failed"`, `"disk_low"`), usable in alert rules.
        name: String,
        /// Human-readable details.
        message: String,
    },
    /// Saving a checkpoint failed; the previous checkpoints and pointers are intact.
    CheckpointFailed {
        /// The error, as text (it names the path).
        error: String,
    },
}

/// serde_json writes a NaN or infinite `f64` as `null` (JSON has no such numbers); these
/// read it back as NaN, so a record holding an undefined measure (no attention layers, no
/// probe of a kind) stays readable. Use with `#[serde(deserialize_with = "…")]`.
pub mod nullable {
    use serde::{Deserialize, Deserializer};

    /// A number, or NaN for `null`.
    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    /// Two numbers, each NaN for `null`.
    pub fn pair<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
        let [a, b] = <[Option<f64>; 2]>::deserialize(d)?;
        Ok([a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)])
    }

    /// `(layer, value)` pairs, a `null` value read as NaN.
    pub fn layers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, f64)>, D::Error> {
        Ok(Vec::<(usize, Option<f64>)>::deserialize(d)?
            .into_iter()
            .map(|(l, v)| (l, v.unwrap_or(f64::NAN)))
            .collect())
    }
}

/// A problem met while reading a JSONL file; the rest of the file is still read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineWarning {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// Whether this is the last line without a terminating newline, i.e. a write torn by a crash.
    pub torn: bool,
    /// The parse error, as text.
    pub reason: String,
}

impl std::fmt::Display for LineWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.torn {
            "torn last line"
        } else {
            "bad line"
        };
        write!(
            f,
            "{}:{}: {what} skipped: {}",
            self.path.display(),
            self.line,
            self.reason
        )
    }
}

/// An append-only JSONL file, one fsynced `write_all` per record (see the module docs).
#[derive(Debug)]
pub struct JsonlWriter {
    /// Opened with `append`, so every write lands at the end even if another handle wrote.
    file: File,
    /// For error messages.
    path: PathBuf,
}

impl JsonlWriter {
    /// Opens (creating it and its parent directory if needed) the JSONL file at `path`. If the
    /// file ends in a torn line, a newline is appended first so that line stays isolated.
    pub fn open(path: &Path) -> Result<Self, EventError> {
        let io_err = |op, source| EventError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err("create the directory of", e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let len = file.metadata().map_err(|e| io_err("stat", e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(|e| io_err("read", e))?;
            if last[0] != b'\n' {
                tracing::warn!(path = %path.display(), "JSONL file ends in a torn line; sealing it.");
                file.write_all(b"\n")
                    .and_then(|_| file.sync_data())
                    .map_err(|e| io_err("append to", e))?;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record as one line: a single `write_all` of the whole line, then fsync.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), EventError> {
        let mut line = serde_json::to_vec(record).map_err(|source| EventError::Serialize {
            path: self.path.clone(),
            source,
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|source| EventError::Io {
                op: "append to",
                path: self.path.clone(),
                source,
            })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The event log `<state_dir>/events.jsonl`.
#[derive(Debug)]
pub struct EventLog {
    /// The underlying append-only file.
    writer: JsonlWriter,
}

impl EventLog {
    /// Opens (or creates) `<state_dir>/events.jsonl`.
    pub fn open(state_dir: &Path) -> Result<Self, EventError> {
        Ok(Self {
            writer: JsonlWriter::open(&state_dir.join(EVENTS_FILE))?,
        })
    }

    /// Records `event` at `step` with the current time; returns the record written.
    pub fn record(&mut self, step: u64, event: Event) -> Result<EventRecord, EventError> {
        let record = EventRecord::now(step, event);
        self.writer.append(&record)?;
        Ok(record)
    }

    /// Appends an already stamped record.
    pub fn append(&mut self, record: &EventRecord) -> Result<(), EventError> {
        self.writer.append(record)
    }

    /// Reads every event of `<state_dir>/events.jsonl` (see [`read_jsonl`]).
    pub fn read(state_dir: &Path) -> Result<(Vec<EventRecord>, Vec<LineWarning>), EventError> {
        read_jsonl(&state_dir.join(EVENTS_FILE))
    }
}

/// Reads a JSONL file written by [`JsonlWriter`]. Lines that do not parse (a torn last line
/// after a crash, or a line sealed by [`JsonlWriter::open`]) are skipped with a warning;
/// every other line is still returned. A missing file reads as empty.
pub fn read_jsonl<T: DeserializeOwned>(
    path: &Path,
) -> Result<(Vec<T>, Vec<LineWarning>), EventError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(source) => {
            return Err(EventError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let ends_clean = bytes.last().is_none_or(|&b| b == b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // `split` yields one empty piece after a final newline; it is not a line.
    let count = if ends_clean {
        lines.len().saturating_sub(1)
    } else {
        lines.len()
    };
    let mut records = Vec::with_capacity(count);
    let mut warnings = Vec::new();
    for (index, line) in lines.iter().take(count).enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(record) => records.push(record),
            Err(e) => {
                let warning = LineWarning {
                    path: path.to_path_buf(),
                    line: index + 1,
                    torn: !ends_clean && index + 1 == count,
                    reason: e.to_string(),
                };
                tracing::warn!(warning = %warning, "Skipping an unreadable JSONL line.");
                warnings.push(warning);
            }
        }
    }
    Ok((records, warnings))
}

/// Formats `time` as RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
/// Times before 1970 are clamped to the epoch (the clock of a machine that trains is not).
pub fn rfc3339_utc(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
/// Howard Hinnant's `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>),
/// restricted to non-negative day counts.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reference values from GNU `date -u -d @<secs>`.
    #[test]
    fn timestamps_match_gnu_date() {
        let at = |secs: u64, ms: u64| {
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_700_000_000, 250), "2023-11-14T22:13:20.250Z");
        // 2024-02-29 (a leap day) and the turn of a century that is a leap year.
        assert_eq!(at(1_709_208_000, 0), "2024-02-29T12:00:00.000Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }
}
