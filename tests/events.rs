//! `events.jsonl`: typed events survive a round trip, the line format is the documented one,
//! and a torn last line (a crash mid-write) is skipped, then sealed off by the next writer.

use std::fs::{self, OpenOptions};
use std::io::Write;

use dreamloop::events::{Event, EventLog, EventRecord, EVENTS_FILE};
use dreamloop::rollback::{Adjustments, EvalMetrics, PauseReason, RollbackReason};

fn metrics(perplexity: f64) -> EvalMetrics {
    EvalMetrics {
        clear_accuracy: 0.9,
        clear_margin: 1.5,
        flawed_accuracy: 0.6,
        flawed_margin: -0.25,
        perplexity,
        attention_on_direction: 0.125,
        ablation_sensitivity: 2.0,
        general_accuracy: 0.5,
    }
}

fn sample_events() -> Vec<(u64, Event)> {
    vec![
        (
            420,
            Event::MarkGood {
                metrics: metrics(10.0),
            },
        ),
        (
            500,
            Event::Rollback {
                from: 500,
                to: 420,
                reason: RollbackReason::Perplexity,
                metrics: metrics(11.0),
                baseline: Some(metrics(10.0)),
                adjustments: Adjustments {
                    lr_factor: 0.5,
                    replay_ratio: 0.4,
                },
            },
        ),
        (
            520,
            Event::PauseByPolicy {
                reason: PauseReason::TooManyRollbacks {
                    rollbacks: 4,
                    window_evals: 20,
                },
                rolled_back_to: Some(420),
            },
        ),
        (
            0,
            Event::Restart {
                actor: "trainer".into(),
                attempt: 1,
                reason: "panicked".into(),
            },
        ),
        (
            600,
            Event::PhaseChange {
                from: "sft".into(),
                to: "dpo".into(),
                index: None,
                reason: None,
                lr: None,
                reference_step: None,
            },
        ),
        (
            610,
            Event::Alarm {
                name: "mirror_failed".into(),
                message: "no space".into(),
            },
        ),
        (
            620,
            Event::CheckpointFailed {
                error: "cannot write /x: disk full".into(),
            },
        ),
    ]
}

#[test]
fn events_round_trip_in_the_documented_line_format() {
    let state = tempfile::tempdir().unwrap();
    let mut log = EventLog::open(state.path()).unwrap();
    let written: Vec<EventRecord> = sample_events()
        .into_iter()
        .map(|(step, event)| log.record(step, event).unwrap())
        .collect();
    let (read, warnings) = EventLog::read(state.path()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(read, written);

    let text = fs::read_to_string(state.path().join(EVENTS_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7);
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "\"mark_good\"",
            "\"rollback\"",
            "\"pause_by_policy\"",
            "\"restart\"",
            "\"phase_change\"",
            "\"alarm\"",
            "\"checkpoint_failed\""
        ]
    );
    let rollback: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(rollback["step"], 500);
    assert_eq!(rollback["from"], 500);
    assert_eq!(rollback["to"], 420);
    assert_eq!(rollback["reason"], "perplexity");
    assert_eq!(rollback["metrics"]["perplexity"], 11.0);
    assert_eq!(rollback["adjustments"]["replay_ratio"], 0.4);
    let ts = rollback["ts"].as_str().unwrap();
    assert_eq!(ts.len(), "2025-11-24T00:06:00.123Z".len(), "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    let pause: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(pause["reason"]["kind"], "too_many_rollbacks");
}

#[test]
fn a_torn_last_line_is_skipped_then_sealed_by_the_next_writer() {
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join(EVENTS_FILE);
    let mut log = EventLog::open(state.path()).unwrap();
    for (step, event) in sample_events().into_iter().take(3) {
        log.record(step, event).unwrap();
    }
    drop(log);
    // A crash halfway through the fourth line.
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(br#"{"ts":"2025-11-24T00:06:00.123Z","step":7,"event":"al"#)
        .unwrap();
    drop(file);

    let (read, warnings) = EventLog::read(state.path()).unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(warnings.len(), 1);
    assert_eq!((warnings[0].line, warnings[0].torn), (4, true));

    // The next writer starts a fresh line; the torn one stays a bad line in the middle.
    let mut log = EventLog::open(state.path()).unwrap();
    let appended = log
        .record(
            9,
            Event::Alarm {
                name: "after_crash".into(),
                message: "still logging".into(),
            },
        )
        .unwrap();
    let (read, warnings) = EventLog::read(state.path()).unwrap();
    assert_eq!(read.len(), 4);
    assert_eq!(read[3], appended);
    assert_eq!(warnings.len(), 1);
    assert_eq!((warnings[0].line, warnings[0].torn), (4, false));
}

#[test]
fn a_missing_log_reads_as_empty() {
    let state = tempfile::tempdir().unwrap();
    let (read, warnings) = EventLog::read(state.path()).unwrap();
    assert!(read.is_empty() && warnings.is_empty());
}
