//! The daemon's own files in the state directory, besides checkpoints, ledger and events:
//!
//! - `status.json`: what `dreamloop status` prints (step, phase, paused, lr, replay ratio,
//!   last evaluation, last rollback). Replaced atomically (temporary sibling, rename) after
//!   every step and every state change, so it is readable while the daemon runs and after
//!   it stopped or crashed.
//! - `trained.jsonl`: one line per optimizer step with the examples it trained on
//!   (append-only, fsynced). The rollback quarantines the examples of the abandoned steps
//!   from it, also after a restart, and tests read it to check that no example is ever
//!   trained twice. It grows by ~1 KB per example, so it is kept as segments
//!   (`dreamloop::segmented`): sealed into `trained.<n>.jsonl` at `[supervisor]
//!   trained_segment_bytes`, and a start reads back, newest first, only as far as GOOD.
//! - `state.json` inside each checkpoint: the [`RunState`] the loop resumes with.
//! - `dreamloop.pid`: the running daemon's pid, for `dreamloop pause|resume|checkpoint|stop`.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dreamloop::controller::ControllerState;
use dreamloop::convo::Cursor;
use dreamloop::example::Example;
use dreamloop::label::Phase;
use dreamloop::mix::MixerState;
use dreamloop::rollback::{EvalMetrics, PolicyState, RollbackReason, Verdict};
use dreamloop::segmented::{read_newest_first, SegmentedLog};
use serde::{Deserialize, Serialize};

/// `status.json`.
pub const STATUS_FILE: &str = "status.json";
/// `trained.jsonl`: the segment being written; sealed ones are `trained.<n>.jsonl`.
pub const TRAINED_FILE: &str = "trained.jsonl";
/// The segmented log's stem (`dreamloop::segmented`).
pub const TRAINED_STEM: &str = "trained";
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
    /// The experiment controller's memory: phase, lr boost, replay boosts, the re-based
    /// reference's step (absent in checkpoints written before it existed).
    #[serde(default)]
    pub controller: ControllerState,
    /// Examples trained in this run, rolled-back ones included (the history's x axis).
    #[serde(default)]
    pub examples_trained: u64,
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
    /// The `[[phase]]` index in force (0 for a fixed phase).
    #[serde(default)]
    pub phase_index: usize,
    /// The controller's stall boost of the phase's lr (1: none).
    #[serde(default = "one")]
    pub lr_boost: f64,
    /// General replay weights in force (arithmetic, code, reasoning, text).
    #[serde(default)]
    pub replay_weights: [f64; 4],
    /// The run's id (`run.json`).
    #[serde(default)]
    pub run_id: String,
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

fn one() -> f64 {
    1.0
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
    /// A marker, not a step: the timeline went back to `step` (a rollback, a trainer
    /// restarted from an earlier checkpoint, a start after a crash), so the records after it
    /// are no longer on the current timeline even before the next step is recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rewind: bool,
    /// The step's loss (absent on markers and skipped steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The lr the step was taken at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

/// `trained.jsonl` (and its sealed segments). Nothing of the timeline is held in memory: a
/// rollback, or a trainer restarted from an earlier checkpoint, reads the steps it abandons
/// back from the files, newest first and only as far as it goes back (the full text of every
/// step since GOOD used to stay in memory, without bound while GOOD did not move).
pub struct TrainedLog {
    writer: SegmentedLog,
    /// The state directory the segments are in.
    dir: PathBuf,
    /// Steps of the current timeline after the one resumed from (a crash since the last
    /// checkpoint), found at open: trained, but never in the surviving weights.
    abandoned: Vec<TrainedStep>,
}

impl TrainedLog {
    /// Opens the log and finds the steps a crash abandoned: those of the current timeline
    /// after `resumed` (the step the weights were restored at).
    pub fn open(state_dir: &Path, resumed: u64, segment_bytes: u64) -> anyhow::Result<TrainedLog> {
        let abandoned = timeline_between(state_dir, resumed, u64::MAX)?;
        Ok(TrainedLog {
            writer: SegmentedLog::open(state_dir, TRAINED_STEM, segment_bytes)?,
            dir: state_dir.to_path_buf(),
            abandoned,
        })
    }

    /// The steps a crash abandoned (see `abandoned`), once: their examples were trained only
    /// in weights that were lost, so they go back to the queue.
    pub fn take_abandoned(&mut self) -> Vec<TrainedStep> {
        std::mem::take(&mut self.abandoned)
    }

    /// Records a trained step (a step not above the last starts a new timeline: a rollback
    /// or a restart redoes steps).
    pub fn append(&mut self, record: TrainedStep) -> anyhow::Result<()> {
        self.writer.append(&record)?;
        Ok(())
    }

    /// Records that the timeline went back to `to` (see [`TrainedStep::rewind`]): once the
    /// steps after it are quarantined or queued again, a crash before the next step must not
    /// hand them back once more.
    pub fn rewind(&mut self, to: u64) -> anyhow::Result<()> {
        self.writer.append(&TrainedStep {
            step: to,
            examples: Vec::new(),
            rewind: true,
            loss: None,
            lr: None,
        })?;
        Ok(())
    }

    /// The current timeline's steps after `to` up to `current` (the loop's step), read back
    /// from the files: what a rollback to `to` quarantines, and what a trainer restarted from
    /// checkpoint `to` abandoned. The next step recorded (`to + 1`) ends them.
    pub fn roll_back(&mut self, to: u64, current: u64) -> anyhow::Result<Vec<TrainedStep>> {
        timeline_between(&self.dir, to, current)
    }
}

/// The current timeline's records with `after < step ≤ upto`, oldest first, reading the
/// segments newest first and no further back than needed.
///
/// A step number not above its predecessor starts a rewound timeline (a crash or a rollback),
/// so a record belongs to the current timeline exactly when every later record has a higher
/// step. Read backwards that is "lower than every step seen so far", and once the lowest step
/// seen is `after + 1` no older record can be on the timeline after `after`.
fn timeline_between(dir: &Path, after: u64, upto: u64) -> anyhow::Result<Vec<TrainedStep>> {
    let mut lowest = u64::MAX;
    let mut out: Vec<TrainedStep> = Vec::new();
    let warnings = read_newest_first(dir, TRAINED_STEM, |r: TrainedStep| {
        if r.rewind {
            // Older records after `r.step` are off the timeline; `r.step` itself is not.
            lowest = lowest.min(r.step + 1);
        } else if r.step < lowest {
            lowest = r.step;
            if r.step > after && r.step <= upto {
                out.push(r);
            }
        }
        if lowest <= after + 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    for w in warnings {
        tracing::warn!(%w, "trained.jsonl line skipped.");
    }
    out.reverse();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dreamloop::example::{Kind, Target};

    /// Step `step`'s record, its one example tagged `tag` (which timeline wrote it).
    fn record(step: u64, tag: &str) -> TrainedStep {
        TrainedStep {
            step,
            examples: vec![Example {
                kind: Kind::General,
                prompt: Vec::new(),
                target: Target::Sft {
                    completion: format!("{tag}{step}"),
                },
                direction: None,
                provenance: String::new(),
                reference: None,
            }],
            rewind: false,
            loss: None,
            lr: None,
        }
    }

    fn tags(steps: &[TrainedStep]) -> Vec<String> {
        steps
            .iter()
            .map(|r| match &r.examples[0].target {
                Target::Sft { completion } => completion.clone(),
                Target::Dpo { .. } => unreachable!("only SFT records are written here"),
            })
            .collect()
    }

    /// Every record in its own segment (a 1-byte bound seals before each append): steps
    /// 1–6, a crash resumed from step 4's checkpoint (5 and 6 again, then 7), a restart, a
    /// rollback to GOOD 5, step 6 once more. Each reopen and each rollback sees the timeline
    /// the whole history defines, read back from the files.
    #[test]
    fn the_timeline_survives_restarts_across_rotations() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = TrainedLog::open(dir.path(), 0, 1).expect("open");
        for step in 1..=6 {
            log.append(record(step, "a")).expect("append");
        }
        drop(log);
        // The crash: weights of step 4 come back; 5 and 6 are redone.
        let mut log = TrainedLog::open(dir.path(), 4, 1).expect("reopen");
        // What 5 and 6 were trained on died with their weights: handed back once.
        assert_eq!(tags(&log.take_abandoned()), ["a5", "a6"]);
        assert!(log.take_abandoned().is_empty());
        // A rollback before any new step goes back over the resumed timeline only, not
        // over the abandoned tail (handed back already).
        assert_eq!(tags(&log.roll_back(2, 4).expect("read")), ["a3", "a4"]);
        for step in 5..=7 {
            log.append(record(step, "b")).expect("append");
        }
        drop(log);
        let mut log = TrainedLog::open(dir.path(), 7, 1).expect("reopen");
        // The redone 5 and 6 replaced the abandoned ones: nothing is handed back twice.
        assert!(log.take_abandoned().is_empty());
        assert_eq!(
            tags(&log.roll_back(2, 7).expect("read")),
            ["a3", "a4", "b5", "b6", "b7"]
        );
        assert_eq!(tags(&log.roll_back(5, 7).expect("read")), ["b6", "b7"]);
        log.append(record(6, "c")).expect("append");
        drop(log);
        let mut log = TrainedLog::open(dir.path(), 6, 1).expect("reopen");
        assert_eq!(tags(&log.roll_back(5, 6).expect("read")), ["c6"]);
        // Abandoned timelines stay on disk: 6 + 3 + 1 records, one segment each.
        let segments = dreamloop::segmented::segments(dir.path(), TRAINED_STEM).expect("list");
        assert_eq!(segments.len(), 10);
    }

    /// A rewind marker ends the steps after it at once: a crash right after a rollback (or
    /// after queueing a crash's steps again) hands nothing back a second time.
    #[test]
    fn a_rewind_marker_ends_the_steps_after_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = TrainedLog::open(dir.path(), 0, 1).expect("open");
        for step in 1..=5 {
            log.append(record(step, "a")).expect("append");
        }
        assert_eq!(
            tags(&log.roll_back(2, 5).expect("read")),
            ["a3", "a4", "a5"]
        );
        log.rewind(2).expect("rewind");
        drop(log);
        let mut log = TrainedLog::open(dir.path(), 2, 1).expect("reopen");
        assert!(log.take_abandoned().is_empty());
        assert_eq!(tags(&log.roll_back(0, 2).expect("read")), ["a1", "a2"]);
        log.append(record(3, "b")).expect("append");
        assert_eq!(
            tags(&log.roll_back(0, 3).expect("read")),
            ["a1", "a2", "b3"]
        );
    }

    /// A start reads back only to the step resumed from, and a rollback only to GOOD: the
    /// segments before are not opened (here the oldest is replaced by a directory, which
    /// fails any read).
    #[test]
    fn reads_stop_at_the_step_they_go_back_to() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = TrainedLog::open(dir.path(), 0, 1).expect("open");
        for step in 1..=8 {
            log.append(record(step, "a")).expect("append");
        }
        drop(log);
        let oldest = dir.path().join("trained.00000001.jsonl");
        std::fs::remove_file(&oldest).expect("remove");
        std::fs::create_dir(&oldest).expect("mkdir");
        let mut log = TrainedLog::open(dir.path(), 8, 1).expect("reopen");
        assert!(log.take_abandoned().is_empty());
        assert_eq!(tags(&log.roll_back(6, 8).expect("read")), ["a7", "a8"]);
        assert!(log.roll_back(0, 8).is_err());
    }
}
