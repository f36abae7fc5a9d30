//! Dreaming through a server (issue 16): a scripted OpenAI-compatible server on loopback
//! (`common/dream_server.rs`) writes the dreams. Dreamed scenarios train beside templates
//! with their provenance, obey the never-repeat ledger, and a server that goes away costs
//! nothing but its dreams: steps go on from templates, the failure is an event, and dreaming
//! resumes when the server is back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::dream_server::{DreamServer, Reply};
use common::{read_lines, step, Daemon, Overrides};
use serde_json::Value;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(240);

/// The config's `[dream]` table for `server`.
fn dream_table(server: &str) -> String {
    format!(
        "[dream]\nserver = \"{server}\"\nmodel = \"scripted\"\nshare = 0.5\n\
         timeout_seconds = 5\nconnect_timeout_seconds = 1"
    )
}

/// Provenances of every example trained under `state`, in order.
fn provenances(state: &Path) -> Vec<String> {
    dreamloop::segmented::segments(state, "trained")
        .expect("list trained.jsonl segments")
        .iter()
        .flat_map(|p| read_lines(p))
        .filter(|r| r["rewind"] != true)
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default())
        .map(|e| e["provenance"].as_str().unwrap_or("").to_string())
        .collect()
}

fn dreamed(state: &Path) -> usize {
    provenances(state)
        .iter()
        .filter(|p| p.starts_with("dream:scripted@"))
        .count()
}

fn alarms(state: &Path, name: &str) -> usize {
    read_lines(&state.join("events.jsonl"))
        .iter()
        .filter(|e: &&Value| e["event"] == "alarm" && e["name"] == name)
        .count()
}

#[test]
fn dreams_train_and_a_server_outage_falls_back_to_templates() {
    let mut server = DreamServer::start(|_| Reply::Dream);
    let mut d = Daemon::new(&Overrides {
        top: dream_table(&server.url),
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    let state = d.state();
    d.start(&[], &[]);
    d.wait_status(LIMIT, "dreamed examples trained", |s| {
        step(s) >= 4 && dreamed(&state) > 0
    });
    let templates = provenances(&state)
        .iter()
        .filter(|p| !p.starts_with("dream:"))
        .count();
    assert!(templates > 0, "share 0.5 leaves room for templates");

    // The server goes away: steps go on from templates, the outage is an event.
    server.stop();
    let at_stop = step(&d.status().expect("status"));
    d.wait_status(LIMIT, "steps without the server", |s| {
        step(s) >= at_stop + 6 && alarms(&state, "dream_server_down") == 1
    });
    let before_back = dreamed(&state);

    // Back: dreaming resumes (the back-off is at most a few seconds this early).
    server.restart();
    d.wait_status(LIMIT, "dreams after the server came back", |_| {
        dreamed(&state) > before_back + 2 && alarms(&state, "dream_server_back") == 1
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    common::assert_trained_once(&d.trained());
}

/// Refused answers and HTTP errors are counted, never trained, and never stop the loop.
#[test]
fn garbage_and_errors_are_refused_and_the_loop_goes_on() {
    let server = DreamServer::start(|n| match n % 3 {
        0 => Reply::Garbage,
        1 => Reply::Status(500),
        _ => Reply::Dream,
    });
    let mut d = Daemon::new(&Overrides {
        top: dream_table(&server.url),
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "12"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    assert_eq!(step(&d.status().expect("status")), 12);
    assert!(server.requests.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    // Only valid dreams trained: each carries the scripted provenance and a direction span
    // inside its user turn (validated), none is the garbage text.
    for r in d.trained() {
        for e in r["examples"].as_array().cloned().unwrap_or_default() {
            assert!(
                !e.to_string().contains("I cannot write JSON"),
                "garbage was trained: {e}"
            );
        }
    }
}
