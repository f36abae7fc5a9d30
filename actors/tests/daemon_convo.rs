//! Conversation logs through the real daemon: every annotated line is trained exactly once,
//! across a SIGKILL and a restart (issue 15, defect 4: the queue of examples read past but
//! not yet trained was memory-only while the cursor and the ledger had moved on).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{surviving_timeline, Daemon, Overrides};
use dreamloop::example::Example;

/// `n` OpenAI-chat lines, each one SFT example (an assistant turn marked good).
fn log_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"messages":[{{"role":"user","content":"Please list item {i} of the inventory."}},{{"role":"assistant","content":"Item {i} is a lamp.","label":"good"}}]}}"#
            ) + "\n"
        })
        .collect()
}

/// How often each log line (by provenance `file:line`) is accounted for: trained in
/// trained.jsonl's surviving timeline, or quarantined by a rollback. Steps a crash abandoned
/// were trained into weights that are gone, so they do not count.
fn trained_lines(d: &Daemon) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let trained = surviving_timeline(d.trained_log())
        .into_iter()
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default());
    for e in trained.chain(d.quarantined()) {
        let e: Example = serde_json::from_value(e).expect("an Example");
        if let Some((source, _turn)) = e.provenance.split_once("#turn=") {
            if source.contains("chat.jsonl") {
                *counts.entry(source.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn wait_trained(d: &mut Daemon, at_least: usize, limit: Duration) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + limit;
    loop {
        let counts = trained_lines(d);
        if counts.len() >= at_least {
            return counts;
        }
        if let Some(code) = d
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
        {
            panic!(
                "daemon exited ({code}) with {counts:?} trained\n{}",
                d.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "only {} log lines trained: {counts:?}\n{}",
            counts.len(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A SIGKILL long after the last checkpoint: the steps since were trained into weights that
/// died with the process, so their log lines are queued again at the restart and trained in
/// the surviving timeline, once (before, they stayed in the ledger and were never trained).
#[test]
fn log_lines_of_steps_lost_in_a_crash_are_trained_again() {
    const LINES: usize = 16;
    let mut d = daemon_with_log(
        LINES,
        Overrides {
            // Only the step-0 baseline is checkpointed before the kill.
            checkpoint: "every_n_steps = 1000".into(),
            eval: "every_n_steps = 1000".into(),
            ..Overrides::default()
        },
    );
    d.start(&[], &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let lost = loop {
        let all: usize = d.trained().iter().map(|r| tagged_lines(r).len()).sum();
        if all >= 4 {
            break all;
        }
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    assert_eq!(
        d.status().and_then(|s| s["latest_step"].as_u64()),
        Some(0),
        "the kill came after a checkpoint other than the baseline"
    );

    restart_and_train_every_line(&mut d, LINES, &format!("{lost} trained before the kill"));
    assert!(d
        .log()
        .contains("Examples of steps lost with the weights are queued again."));
}

/// Starts `d` again, waits until every one of `lines` log lines is accounted for, stops it
/// cleanly, and checks that each is accounted for exactly once.
fn restart_and_train_every_line(d: &mut Daemon, lines: usize, context: &str) {
    d.start(&[], &[]);
    wait_trained(d, lines, Duration::from_secs(600));
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        d.log()
    );
    let counts = trained_lines(d);
    assert_eq!(counts.len(), lines, "{context}: {counts:?}");
    for (line, n) in &counts {
        assert_eq!(*n, 1, "{line} trained {n} times: {counts:?}");
    }
}

/// A daemon whose `logs_dir` holds `chat.jsonl` with `lines` lines, configured by `o`.
fn daemon_with_log(lines: usize, o: Overrides) -> Daemon {
    let d = Daemon::new(&Overrides::default());
    let logs = d.dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    std::fs::write(logs.join("chat.jsonl"), log_lines(lines)).expect("write log");
    d.rewrite(&Overrides {
        data: format!("logs_dir = \"{}\"", logs.display()),
        ..o
    });
    d
}

/// The log lines (`chat.jsonl:N`) of one trained.jsonl record.
fn tagged_lines(record: &serde_json::Value) -> Vec<String> {
    record["examples"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let e: Example = serde_json::from_value(e).ok()?;
            let (source, _) = e.provenance.split_once("#turn=")?;
            source.contains("chat.jsonl").then(|| source.to_string())
        })
        .collect()
}

#[test]
fn log_examples_read_past_are_trained_after_a_sigkill() {
    const LINES: usize = 12;
    let mut d = daemon_with_log(LINES, Overrides::default());

    // One poll reads (and admits) all twelve lines; kill once a few are trained and a
    // checkpoint has saved the cursor past all of them.
    d.start(&[], &[]);
    wait_trained(&mut d, 2, Duration::from_secs(300));
    d.wait_status(Duration::from_secs(300), "a checkpoint", |s| {
        s["latest_step"].as_u64().is_some()
    });
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let before = trained_lines(&d);
    assert!(
        before.len() < LINES,
        "the kill came too late to test anything: {before:?}"
    );

    restart_and_train_every_line(&mut d, LINES, "");
    use std::os::unix::fs::PermissionsExt;
    for name in ["convo-pending.json", "convo-cursor.json", "status.json"] {
        let mode = std::fs::metadata(d.state().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} is {:o}", mode & 0o777);
    }
}
