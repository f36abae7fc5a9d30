//! Fault injection: a trainer thread that panics is restarted (from LATEST) and counted; a
//! spent restart budget stops the daemon cleanly with exit 70 and an alarm event.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{step, trained_hashes, Daemon, Overrides};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_panicking_trainer_is_restarted_and_counted() {
    let mut d = Daemon::new(&Overrides::default());
    d.start(
        &["--max-steps", "7"],
        &[("DREAMLOOP_FAULT_PANIC_AT_STEP", "5")],
    );
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
    let hashes = trained_hashes(&d.trained());
    assert_eq!(
        hashes.iter().collect::<HashSet<_>>().len(),
        hashes.len(),
        "an example was trained twice"
    );
}

#[test]
fn a_spent_budget_stops_with_exit_70_and_an_event() {
    let mut d = Daemon::new(&Overrides {
        supervisor: "max_restarts = 2".into(),
        ..Overrides::default()
    });
    d.start(
        &[],
        &[
            ("DREAMLOOP_FAULT_PANIC_AT_STEP", "3"),
            ("DREAMLOOP_FAULT_PANIC_TIMES", "100"),
        ],
    );
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
