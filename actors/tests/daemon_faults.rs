//! Fault injection: a trainer thread that panics is restarted (from LATEST) and counted; a
//! spent restart budget stops the daemon cleanly with exit 70 and an alarm event; a disk
//! that fills keeps the previous checkpoint. The faults are parts given to the real `run()`
//! in process (`dreamloop_actors::Faults`); runs without one use the binary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{latest_dir, step, surviving_timeline, trained_hashes, Daemon, Overrides};
use dreamloop_actors::Faults;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_panicking_trainer_is_restarted_and_counted() {
    let mut d = Daemon::new(&Overrides::default());
    d.start_in_process(&["--max-steps", "7"], Faults::default().panic_at_step(5, 1));
    let status = d.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}\n{}", d.log());
    let s = d.status().expect("status");
    assert_eq!(s["restarts"], 1, "{s}");
    assert_eq!(step(&s), 7);
    let restarts: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["event"] == "restart")
        .collect();
    assert_eq!(restarts.len(), 1);
    assert_eq!(restarts[0]["actor"], "trainer");
    assert!(
        restarts[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("died"),
        "{:?}",
        restarts[0]
    );
    // The restarted trainer resumed from LATEST (step 4) and redid step 5 with new examples.
    common::assert_trained_once(&d.trained());
}

#[test]
fn a_spent_budget_stops_with_exit_70_and_an_event() {
    let mut d = Daemon::new(&Overrides {
        supervisor: "max_restarts = 2".into(),
        ..Overrides::default()
    });
    d.start_in_process(&[], Faults::default().panic_at_step(3, 100));
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(70), "{}", d.log());
    let events = d.events();
    assert_eq!(
        events.iter().filter(|e| e["event"] == "restart").count(),
        2,
        "{events:?}"
    );
    let alarm = events
        .iter()
        .find(|e| e["event"] == "alarm")
        .expect("alarm event");
    assert_eq!(alarm["name"], "restart_budget_spent");
    assert_eq!(d.status().expect("status")["state"], "failed");
    assert!(!d.state().join("dreamloop.pid").exists());
}

/// Names of the entries of `<state>/checkpoints` (no `.tmp-*` debris may remain).
fn checkpoint_entries(d: &Daemon) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(d.state().join("checkpoints"))
        .expect("checkpoints dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn disk_full_config(on_write_error: &str) -> Overrides {
    Overrides {
        // No evaluation after the baseline: only the scheduled checkpoints write.
        eval: "every_n_steps = 1000".into(),
        checkpoint: format!("every_n_steps = 2\non_write_error = \"{on_write_error}\""),
        ..Overrides::default()
    }
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_pauses() {
    let mut d = Daemon::new(&disk_full_config("pause"));
    d.start_in_process(&[], Faults::default().disk_full_at_step(4));
    let paused = d.wait_status(LIMIT, "paused after the failed checkpoint", |s| {
        s["paused"] == true
    });
    assert_eq!(step(&paused), 4, "{paused}");
    assert_eq!(paused["latest_step"], 2, "{paused}");
    let failed: Vec<_> = d
        .events()
        .into_iter()
        .filter(|e| e["event"] == "checkpoint_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let error = failed[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("step-00000004") && error.contains("No space left"),
        "{error}"
    );
    // The half-written checkpoint is gone; LATEST still names the intact step 2.
    let entries = checkpoint_entries(&d);
    assert!(
        !entries.iter().any(|n| n.contains("step-00000004")),
        "{entries:?}"
    );
    assert!(latest_dir(&d.state())
        .expect("LATEST")
        .ends_with("step-00000002"));
    // No step while paused; the operator resumes and the next checkpoints land.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(step(&d.status().expect("status")), 4, "a step while paused");
    d.signal(libc::SIGCONT);
    d.wait_status(LIMIT, "a checkpoint after resume", |s| {
        s["latest_step"].as_u64() >= Some(6)
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
}

#[test]
fn a_full_disk_with_on_write_error_continue_trains_on() {
    let mut d = Daemon::new(&disk_full_config("continue"));
    d.start_in_process(
        &["--max-steps", "8"],
        Faults::default().disk_full_at_step(4),
    );
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let s = d.status().expect("status");
    assert_eq!(step(&s), 8);
    assert_eq!(s["latest_step"], 8);
    let events = d.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "checkpoint_failed")
            .count(),
        1,
        "{events:?}"
    );
    let entries = checkpoint_entries(&d);
    assert!(
        !entries.iter().any(|n| n.contains("step-00000004")),
        "{entries:?}"
    );
}

/// A trainer restarted in-process resumes from a verified checkpoint, as a start does:
/// LATEST still names the corrupt step 4 that the start passed over, and before, the
/// restarted trainer loaded it (one flipped byte loads without an error).
#[test]
fn a_restarted_trainer_passes_over_a_corrupt_latest() {
    let mut d = Daemon::new(&disk_full_config("pause"));
    d.start(&["--max-steps", "4"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let weights = latest_dir(&d.state())
        .expect("LATEST")
        .join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, bytes).expect("corrupt");

    // Resumed from step 2; the trainer dies about to take step 3 and is restarted.
    d.start_in_process(&["--max-steps", "6"], Faults::default().panic_at_step(3, 1));
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    assert_eq!(step(&d.status().expect("status")), 6);
    // The restart resumed at 2 again (steps 3 to 6 trained), not at the corrupt 4.
    let steps: Vec<u64> = d
        .trained()
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 3, 4, 5, 6], "{}", d.log());
    assert!(d
        .log()
        .contains("Trainer restart: a checkpoint was passed over."));
}

#[test]
fn a_corrupted_latest_is_detected_and_the_run_resumes_from_the_one_before() {
    let mut d = Daemon::new(&disk_full_config("pause"));
    d.start(&["--max-steps", "4"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    assert!(latest.ends_with("step-00000004"));
    // One flipped byte in the middle of the weights: sizes still match, only sha256 differs.
    let weights = latest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, bytes).expect("corrupt");

    d.start(&["--max-steps", "6"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("step-00000004") && log.contains("sha256"),
        "the corrupt checkpoint is not reported:\n{log}"
    );
    // Resumed from step 2: steps 3 and 4 were redone and 5, 6 taken. trained.jsonl keeps the
    // abandoned 3, 4 as history; their examples were trained only into weights that are gone,
    // so they were queued again: the surviving timeline has no example twice.
    let s = d.status().expect("status");
    assert_eq!(step(&s), 6, "{s}");
    let trained = d.trained();
    let steps: Vec<u64> = trained
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 3, 4, 5, 6]);
    common::assert_trained_once(&surviving_timeline(d.trained_log()));
}

#[test]
fn a_good_checkpoint_that_cannot_be_written_is_not_marked_good() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 4".into(),
        checkpoint: "every_n_steps = 2\non_write_error = \"continue\"".into(),
        ..Overrides::default()
    });
    d.start_in_process(
        &["--max-steps", "6"],
        Faults::default().disk_full_at_step(0),
    );
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    // The baseline at step 0 could not be saved, so it was not marked GOOD (and the loop did
    // not stop); the evaluation at step 4 measured the baseline again and marked step 4.
    let s = d.status().expect("status");
    assert_eq!(step(&s), 6, "{s}");
    assert_eq!(s["good_step"], 4, "{s}");
    let good = std::fs::read_to_string(d.state().join("checkpoints/GOOD")).expect("GOOD");
    assert_eq!(good.trim(), "step-00000004");
    assert!(d.events().iter().any(|e| e["event"] == "checkpoint_failed"));
}

/// A step skipped as non-finite trains nothing: its examples are quarantined (they may be
/// what made it fail), not dropped and not trained again; the next batch takes the step.
#[test]
fn a_non_finite_steps_examples_are_quarantined() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    d.start_in_process(
        &["--max-steps", "4"],
        Faults::default().non_finite_at_step(3, 1),
    );
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let s = d.status().expect("status");
    assert_eq!(step(&s), 4, "{s}");
    assert_eq!(s["skipped_steps"], 1, "{s}");
    let records = common::read_lines(&d.state().join("quarantine/examples.jsonl"));
    // Batch size 2 (common::config_text).
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!(r["step"], 3, "{r}");
        assert_eq!(r["rolled_back_from"], 3, "{r}");
        assert_eq!(r["rolled_back_to"], 2, "{r}");
    }
    let steps: Vec<u64> = d
        .trained()
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let trained: HashSet<u64> = trained_hashes(&d.trained()).into_iter().collect();
    let quarantined = trained_hashes(&[serde_json::json!({ "examples": d.quarantined() })]);
    assert_eq!(quarantined.len(), 2);
    assert!(
        quarantined.iter().all(|h| !trained.contains(h)),
        "a quarantined example was trained"
    );
}
