//! The daemon's own files in the state directory, besides checkpoints, ledger and events:
//!
//! - `status.json`: what `dreamloop status` prints (step, phase, paused, lr, replay ratio,
//!   last evaluation, last rollback). Replaced atomically (temporary sibling, rename) after
//!   every step and every state change, so it is readable while the daemon runs and after
//!   it stopped or crashed.
//! - `trained.jsonl`: one line per optimizer step with the examples it trained on
//!   (append-only, fsynced). The rollback quarantines the examples of the abandoned steps
//!   from it, also after a restart, and tests read it to check that no example is ever
//!   trained twice. It grows by ~1 KB per example; rotating it is left to the operator.
//! - `state.json` inside each checkpoint: the [`RunState`] the loop resumes with.
//! - `dreamloop.pid`: the running daemon's pid, for `dreamloop pause|resume|checkpoint|stop`.

use std::path::Path;

use anyhow::Context;
use dreamloop::convo::Cursor;
use dreamloop::events::{read_jsonl, JsonlWriter};
use dreamloop::example::Example;
use dreamloop::label::Phase;
use dreamloop::mix::MixerState;
use dreamloop::rollback::{EvalMetrics, PolicyState, RollbackReason, Verdict};
use serde::{Deserialize, Serialize};

/// `status.json`.
pub const STATUS_FILE: &str = "status.json";
/// `trained.jsonl`.
pub const TRAINED_FILE: &str = "trained.jsonl";
/// `dreamloop.pid`.
pub const PID_FILE: &str = "dreamloop.pid";
/// The loop's state inside a checkpoint.
pub const RUN_STATE_FILE: &str = "state.json";

/// What a checkpoint holds besides the trainer's files (weights, optimizer, schedule, seen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The optimizer step.
    pub step: u64,
    /// The mixer's carries (exact long-run class shares across restarts).
    pub mixer: MixerState,
    /// The replay ratio in force.
    pub replay_ratio: f64,
    /// The rollback policy's memory (baseline, streak, lr factor, rollback window).
    pub policy: PolicyState,
    /// The configured peak lr the schedule was last set from (a changed `train.lr` is applied
    /// on resume as a scale of this).
    pub peak_lr: f64,
    /// The phase in force.
    pub phase: Phase,
    /// Evaluation cadence in force.
    pub eval_every_n_steps: u64,
    /// The never-repeat ledger's position at the checkpoint (informational: the ledger
    /// itself is never rolled back).
    pub ledger_position: u64,
    /// The conversation-log cursor at the checkpoint (informational: the live cursor file
    /// may be ahead, and the ledger drops any re-read line).
    pub convo_cursor: Option<Cursor>,
}

/// The last evaluation, as `status.json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastEval {
    /// Step evaluated.
    pub step: u64,
    /// The numbers.
    pub metrics: EvalMetrics,
    /// The policy's verdict.
    pub verdict: Verdict,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// The last rollback, as `status.json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRollback {
    /// Step thrown away.
    pub from: u64,
    /// GOOD step restored.
    pub to: u64,
    /// The guard that failed.
    pub reason: RollbackReason,
    /// Examples quarantined.
    pub quarantined: usize,
    /// The lr of the next step after the rollback.
    pub lr: f64,
    /// The replay ratio after the rollback.
    pub replay_ratio: f64,
    /// The digest of the restored weights in the trainer's memory (`WeightsDigest`: sha256
    /// over every tensor by name, dtype, shape and bytes); equal to the digest of the GOOD
    /// checkpoint's weight files when the restore is bit-exact.
    pub restored_digest: String,
    /// When, RFC 3339 UTC.
    pub ts: String,
}

/// `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `starting`, `running`, `paused`, `stopping`, `stopped` or `failed`.
    pub state: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Optimizer steps taken (the weights' step).
    pub step: u64,
    /// SFT, DPO or mixed.
    pub phase: Phase,
    /// Paused (by an operator or by the policy).
    pub paused: bool,
    /// Paused by the rollback policy (needs an operator's resume).
    pub paused_by_policy: bool,
    /// The lr of the next step.
    pub lr: f64,
    /// The replay ratio in force.
    pub replay_ratio: f64,
    /// The GOOD checkpoint's step.
    pub good_step: Option<u64>,
    /// The LATEST checkpoint's step.
    pub latest_step: Option<u64>,
    /// The last evaluation.
    pub last_eval: Option<LastEval>,
    /// The last rollback.
    pub last_rollback: Option<LastRollback>,
    /// Actor restarts since start-up.
    pub restarts: u32,
    /// Steps skipped (non-finite, repeated) since start-up.
    pub skipped_steps: u64,
    /// Last update, RFC 3339 UTC.
    pub updated: String,
}

/// Writes `bytes` to `path` atomically and durably, mode 0600 (see
/// [`dreamloop::durable::write_atomic`]: the rename is followed by a directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    dreamloop::durable::write_atomic(path, bytes)
}

impl Status {
    /// Replaces `<state_dir>/status.json`.
    pub fn write(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = state_dir.join(STATUS_FILE);
        let json = serde_json::to_vec_pretty(self).expect("status serialises");
        write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads `<state_dir>/status.json`.
    pub fn read(state_dir: &Path) -> anyhow::Result<Status> {
        let path = state_dir.join(STATUS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// One line of `trained.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedStep {
    /// The step these examples were trained in.
    pub step: u64,
    /// The examples.
    pub examples: Vec<Example>,
}

/// `trained.jsonl` plus, in memory, the current timeline's steps after the GOOD checkpoint
/// (what a rollback quarantines).
pub struct TrainedLog {
    writer: JsonlWriter,
    /// Steps of the current timeline newer than GOOD, oldest first.
    since_good: Vec<TrainedStep>,
}

impl TrainedLog {
    /// Opens the log and rebuilds the current timeline after `good` up to `resumed` (the
    /// step the weights were restored at): a step number not above its predecessor starts
    /// a rewound timeline (a crash or a rollback), so older records of those steps drop out.
    pub fn open(state_dir: &Path, good: Option<u64>, resumed: u64) -> anyhow::Result<TrainedLog> {
        let path = state_dir.join(TRAINED_FILE);
        let (records, warnings) = read_jsonl::<TrainedStep>(&path)?;
        for w in warnings {
            tracing::warn!(%w, "trained.jsonl line skipped.");
        }
        let mut timeline: Vec<TrainedStep> = Vec::new();
        for r in records {
            while timeline.last().is_some_and(|last| last.step >= r.step) {
                timeline.pop();
            }
            timeline.push(r);
        }
        let floor = good.unwrap_or(0);
        timeline.retain(|r| r.step > floor && r.step <= resumed);
        Ok(TrainedLog {
            writer: JsonlWriter::open(&path)?,
            since_good: timeline,
        })
    }

    /// Records a trained step.
    pub fn append(&mut self, record: TrainedStep) -> anyhow::Result<()> {
        self.writer.append(&record)?;
        // A restarted trainer redoes steps from its checkpoint: those records replace the
        // abandoned ones in the timeline.
        self.since_good.retain(|r| r.step < record.step);
        self.since_good.push(record);
        Ok(())
    }

    /// A new GOOD at `step`: nothing at or before it can be rolled back any more.
    pub fn mark_good(&mut self, step: u64) {
        self.since_good.retain(|r| r.step > step);
    }

    /// The steps after `to` (removed from the timeline): what a rollback to `to` quarantines.
    pub fn roll_back(&mut self, to: u64) -> Vec<TrainedStep> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.since_good)
            .into_iter()
            .partition(|r| r.step > to);
        self.since_good = kept;
        gone
    }
}
