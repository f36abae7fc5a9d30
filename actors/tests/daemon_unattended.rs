//! Issue 15's defects that end or corrupt a run meant to go on for weeks, each driven
//! through the real binary: GOOD in `state.json` (#1), persistent errors (#2), slow calls
//! (#3), a failed final checkpoint (#5), `[train]` edits on resume (#6), the policy pause
//! across a restart and a stop of a paused daemon (#7), a pause's rollback lr (#8).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{latest_dir, step, Daemon, Overrides};
use dreamloop_actors::Faults;
use serde_json::Value;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(180);

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("json")
}

/// Replaces `from` by `to` in the daemon's config file (settings the overrides do not
/// reach, such as `call_timeout_seconds`).
fn edit_config(d: &Daemon, from: &str, to: &str) {
    let text = std::fs::read_to_string(d.config()).expect("config");
    assert!(text.contains(from), "{from} is not in the config");
    std::fs::write(d.config(), text.replace(from, to)).expect("config");
}

/// Polls the daemon's log until it contains `needle` (panics after `limit`, or if the
/// daemon exits first).
fn wait_log(d: &mut Daemon, limit: Duration, needle: &str) {
    let deadline = Instant::now() + limit;
    while !d.log().contains(needle) {
        if let Some(code) = d
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
        {
            panic!(
                "daemon exited ({code}) before logging {needle:?}\n{}",
                d.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A policy whose every evaluation after the baseline marks GOOD: no threshold can be
/// breached, and no gain is asked for.
fn always_good() -> String {
    [
        common::noise_proof_rollback().as_str(),
        "good_perplexity_slack = 100.0",
        "good_accuracy_slack = 1.0",
        "min_accuracy_gain = 0.0",
        "min_margin_gain = 0.0",
    ]
    .join("\n")
}

/// A policy that breaches at every evaluation of a model wrecked by lr 0.5 (as in
/// `daemon_rollback.rs`).
fn wrecking(max_rollbacks: u32) -> Overrides {
    Overrides {
        train: "lr = 0.5".into(),
        data: "replay_ratio = 0.0".into(),
        eval: "every_n_steps = 3".into(),
        checkpoint: "every_n_steps = 1000".into(),
        rollback: [
            "patience = 1".to_string(),
            "max_perplexity_increase = 0.0001".into(),
            "max_flawed_accuracy_drop = 0.0".into(),
            "max_clear_accuracy_drop = 0.0".into(),
            "max_general_accuracy_drop = 0.0".into(),
            "min_accuracy_gain = 1.0".into(),
            "min_margin_gain = 1000.0".into(),
            "lr_factor_on_rollback = 0.5".into(),
            "replay_ratio_step = 0.15".into(),
            "max_replay_ratio = 0.4".into(),
            format!("max_rollbacks = {max_rollbacks}"),
        ]
        .join("\n"),
        ..Overrides::default()
    }
}

/// Defect 1: the checkpoint of a step marked GOOD carries the verdict in its `state.json`,
/// so a resume from it rolls back to that step, which retention keeps.
#[test]
fn a_step_marked_good_is_good_in_its_checkpoints_state() {
    let mut d = Daemon::new(&Overrides {
        rollback: always_good(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "4"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let checkpoints = d.state().join("checkpoints");
    let good = std::fs::read_to_string(checkpoints.join("GOOD")).expect("GOOD");
    assert_eq!(good.trim(), "step-00000004", "{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    assert!(latest.ends_with("step-00000004"), "{}", latest.display());
    let run = read_json(&latest.join("state.json"));
    assert_eq!(run["policy"]["good_step"], 4, "{run}");
    assert_eq!(run["policy"]["baseline"]["step"], 4, "{run}");
    assert!(
        checkpoints.join("step-00000004").is_dir(),
        "the GOOD that state.json names exists"
    );
}

/// Defect 2: an error answer that a retry would repeat (here a `logs_dir` that does not
/// exist) stops the daemon at once with exit 78, an alarm and the cause in the log — not a
/// wait for a restart that never comes.
#[test]
fn a_persistent_error_stops_at_once_with_exit_78() {
    let missing = tempfile::tempdir()
        .expect("tmp")
        .path()
        .join("no-such-logs");
    let mut d = Daemon::new(&Overrides {
        data: format!("logs_dir = \"{}\"", missing.display()),
        ..Overrides::default()
    });
    // A stall would be a wait of call_timeout: make that longer than the deadline below.
    edit_config(
        &d,
        "call_timeout_seconds = 120",
        "call_timeout_seconds = 600",
    );
    d.start(&[], &[]);
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(78), "{}", d.log());
    assert!(d.log().contains("no-such-logs"), "{}", d.log());
    let events = d.events();
    let alarm = events
        .iter()
        .find(|e| e["event"] == "alarm")
        .unwrap_or_else(|| panic!("no alarm event: {events:?}"));
    assert_eq!(alarm["name"], "persistent_error", "{alarm}");
    assert_eq!(d.status().expect("status")["state"], "failed");
}

/// Defect 3: an evaluation that outlasts `call_timeout` is waited for, each timeout
/// counted against the trainer's restart budget; the run goes on.
#[test]
fn a_slow_evaluation_is_counted_against_the_budget_not_fatal() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        // Every second of the evaluation is one count: room for a loaded machine.
        supervisor: "max_restarts = 200".into(),
        ..Overrides::default()
    });
    // Shorter than any evaluation of the tiny model, with or without the injected delay.
    edit_config(&d, "call_timeout_seconds = 120", "call_timeout_seconds = 1");
    d.start_in_process(
        &["--max-steps", "2"],
        Faults::default().slow_eval(Duration::from_secs(3)),
    );
    let status = d.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}\n{}", d.log());
    assert_eq!(step(&d.status().expect("status")), 2);
    assert!(d.log().contains("A call is slow"), "{}", d.log());
}

/// Defect 3: once the slow call has spent the budget, the daemon stops as for a crash
/// loop: exit 70 and the alarm.
#[test]
fn an_evaluation_slower_than_the_budget_stops_with_exit_70() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        supervisor: "max_restarts = 2".into(),
        ..Overrides::default()
    });
    edit_config(&d, "call_timeout_seconds = 120", "call_timeout_seconds = 1");
    d.start_in_process(
        &["--max-steps", "2"],
        Faults::default().slow_eval(Duration::from_secs(600)),
    );
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(70), "{}", d.log());
    let events = d.events();
    let alarm = events
        .iter()
        .find(|e| e["event"] == "alarm")
        .unwrap_or_else(|| panic!("no alarm event: {events:?}"));
    assert_eq!(alarm["name"], "restart_budget_spent", "{alarm}");
}

/// Defect 3: SIGTERM during a long evaluation cancels it and stops, instead of waiting for
/// the evaluation (or the call timeout).
#[test]
fn a_stop_during_a_slow_evaluation_cancels_it() {
    let mut d = Daemon::new(&Overrides::default());
    edit_config(
        &d,
        "call_timeout_seconds = 120",
        "call_timeout_seconds = 600",
    );
    d.start_in_process(&[], Faults::default().slow_eval(Duration::from_secs(600)));
    wait_log(&mut d, LIMIT, "Evaluating the weights.");
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}\n{}", d.log());
    assert!(d.log().contains("Evaluation cancelled"), "{}", d.log());
    assert_eq!(d.status().expect("status")["state"], "stopped");
}

/// Defect 5: when the final checkpoint cannot be written the steps since LATEST are lost:
/// the exit status says so (74), not 0.
#[test]
fn a_failed_final_checkpoint_exits_74() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 2\non_write_error = \"pause\"".into(),
        ..Overrides::default()
    });
    d.start_in_process(
        &["--max-steps", "6"],
        Faults::default().disk_full_at_step(6),
    );
    let paused = d.wait_status(LIMIT, "paused after the failed checkpoint", |s| {
        s["paused"] == true
    });
    assert_eq!(step(&paused), 6, "{paused}");
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(74), "{}", d.log());
    let s = d.status().expect("status");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(latest_dir(&d.state())
        .expect("LATEST")
        .ends_with("step-00000004"));
}

/// Defect 6: the operator's `[train]` fixes after an out-of-memory apply to the resumed
/// trainer (and are logged), so the next checkpoint carries them.
#[test]
fn train_settings_edited_before_a_resume_are_applied_and_logged() {
    let mut d = Daemon::new(&Overrides::default());
    d.start(&["--max-steps", "4"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let before = read_json(
        &latest_dir(&d.state())
            .expect("LATEST")
            .join("trainer_state.json"),
    );
    assert_eq!(before["config"]["max_grad_norm"], 1.0, "{before}");

    d.rewrite(&Overrides {
        train: "max_seq_len = 16\nlogits_chunk = 8".into(),
        ..Overrides::default()
    });
    edit_config(&d, "max_grad_norm = 1.0", "max_grad_norm = 0.5");
    d.start(&["--max-steps", "6"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    assert!(latest.ends_with("step-00000006"), "{}", latest.display());
    let after = read_json(&latest.join("trainer_state.json"));
    assert_eq!(after["config"]["max_grad_norm"], 0.5, "{after}");
    assert_eq!(after["config"]["max_seq_len"], 16, "{after}");
    assert_eq!(after["config"]["logits_chunk"], 8, "{after}");
    let log = d.log();
    for field in [
        "train.max_grad_norm",
        "train.max_seq_len",
        "train.logits_chunk",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("changed since the checkpoint; applied") && l.contains(field)),
            "{field} not logged as applied\n{log}"
        );
    }
}

/// Defect 6: a `[train]` edit that the checkpoint's state cannot follow (the optimizer) is
/// refused by name with exit 78, instead of being ignored in silence.
#[test]
fn a_train_setting_bound_to_the_checkpoint_is_refused_by_name() {
    let mut d = Daemon::new(&Overrides::default());
    d.start(&["--max-steps", "2"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let trained = d.trained().len();

    edit_config(
        &d,
        "[train.optimizer.adamw]\nweight_decay = 0.0",
        "[train.optimizer.apollo]\nrank = 1",
    );
    d.start(&["--max-steps", "4"], &[]);
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(78), "{}", d.log());
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot change on resume") && l.contains("train.optimizer")),
        "{log}"
    );
    assert_eq!(
        d.trained().len(),
        trained,
        "no step under the refused settings"
    );
}

/// Defect 7: a pause ordered by the rollback policy holds across a restart: the restarted
/// daemon stays paused (and says so) until an operator resumes it.
#[test]
fn a_policy_pause_holds_across_a_restart() {
    let mut d = Daemon::new(&wrecking(0));
    let accept_all_clear = std::fs::read_to_string(d.config())
        .expect("config")
        .replace("accept_share = 0.5", "accept_share = 1.0");
    std::fs::write(d.config(), accept_all_clear).expect("config");
    d.start(&[], &[]);
    d.wait_status(LIMIT, "the policy's pause", |s| {
        s["paused_by_policy"] == true
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let trained = d.trained().len();

    d.start(&[], &[]);
    let pid = d.pid();
    let s = d.wait_status(LIMIT, "the restarted daemon's status", |s| {
        s["pid"] == pid && s["state"] != "starting"
    });
    assert_eq!(s["paused"], true, "{s}");
    assert_eq!(s["paused_by_policy"], true, "{s}");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    assert_eq!(
        d.trained().len(),
        trained,
        "a step after the policy's pause"
    );
}

/// Defect 7: a stop of a paused daemon sends SIGTERM then SIGCONT (as GNU timeout does):
/// the shutdown is honoured first and no step is taken. Several rounds, because the order
/// in which the two arrive at the loop was a race.
#[test]
fn stopping_a_paused_daemon_takes_no_step() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    for round in 0..5 {
        d.start(&["--paused"], &[]);
        let pid = d.pid();
        d.wait_status(LIMIT, "paused", |s| s["pid"] == pid && s["paused"] == true);
        d.signal(libc::SIGTERM);
        d.signal(libc::SIGCONT);
        assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
        assert_eq!(d.trained().len(), 0, "round {round}: a step after the stop");
    }
}

/// Defect 8: the rollback before a policy pause restores GOOD at the policy's lr factor,
/// not at the lr GOOD was saved with.
#[test]
fn a_pauses_rollback_keeps_the_policys_lr_factor() {
    let mut d = Daemon::new(&wrecking(1));
    let accept_all_clear = std::fs::read_to_string(d.config())
        .expect("config")
        .replace("accept_share = 0.5", "accept_share = 1.0");
    std::fs::write(d.config(), accept_all_clear).expect("config");
    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "the policy's pause", |s| {
        s["paused_by_policy"] == true
    });
    let events = d.events();
    let rollbacks = events.iter().filter(|e| e["event"] == "rollback").count();
    assert_eq!(rollbacks, 1, "{events:?}");
    // lr 0.5 × 0.5 after the rollback; the pause's rollback restores GOOD (step 0) at it.
    assert!((s["lr"].as_f64().expect("lr") - 0.25).abs() < 1e-12, "{s}");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    let run = read_json(&latest.join("state.json"));
    assert!(
        (run["policy"]["lr_factor"].as_f64().expect("lr_factor") - 0.5).abs() < 1e-12,
        "{run}"
    );
    let trainer = read_json(&latest.join("trainer_state.json"));
    assert!(
        (trainer["schedule"]["multiplier"]
            .as_f64()
            .expect("multiplier")
            - 0.5)
            .abs()
            < 1e-12,
        "{trainer}"
    );
}
