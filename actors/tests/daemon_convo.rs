//! Conversation logs through the real daemon: every annotated line is trained exactly once,
//! across a SIGKILL and a restart (issue 15, defect 4: the queue of examples read past but
//! not yet trained was memory-only while the cursor and the ledger had moved on).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Daemon, Overrides};
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

/// How often each log line (by provenance `file:line`) appears in trained.jsonl.
fn trained_lines(d: &Daemon) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in d.trained() {
        for e in record["examples"].as_array().cloned().unwrap_or_default() {
            let e: Example = serde_json::from_value(e).expect("an Example");
            if let Some((source, _turn)) = e.provenance.split_once("#turn=") {
                if source.contains("chat.jsonl") {
                    *counts.entry(source.to_string()).or_insert(0) += 1;
                }
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

#[test]
fn log_examples_read_past_are_trained_after_a_sigkill() {
    const LINES: usize = 12;
    let mut d = Daemon::new(&Overrides::default());
    let logs = d.dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    std::fs::write(logs.join("chat.jsonl"), log_lines(LINES)).expect("write log");
    d.rewrite(&Overrides {
        data: format!("logs_dir = \"{}\"", logs.display()),
        ..Overrides::default()
    });

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

    d.start(&[], &[]);
    let counts = wait_trained(&mut d, LINES, Duration::from_secs(600));
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        d.log()
    );
    let counts_after = trained_lines(&d);
    assert_eq!(counts_after.len(), LINES, "{counts:?}");
    for (line, n) in &counts_after {
        assert_eq!(*n, 1, "{line} trained {n} times: {counts_after:?}");
    }
    use std::os::unix::fs::PermissionsExt;
    for name in ["convo-pending.json", "convo-cursor.json", "status.json"] {
        let mode = std::fs::metadata(d.state().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} is {:o}", mode & 0o777);
    }
}
