//! The policy's own replies (issue 16, item 3; `actors/src/own_replies.rs`): sampled before
//! the steps `[on_policy]` names, judged for their kind, kept in `on-policy.jsonl`, and in the
//! dpo phase the clearly wrong ones become DPO pairs that go through the durable queue and
//! the never-repeat ledger: trained once, across a SIGKILL and a restart, or still queued;
//! never lost, never repeated. In the sft phase nothing is paired.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{read_lines, step, surviving_timeline, Daemon, Overrides};
use dreamloop::dream::on_policy::{assess, Assessment};
use dreamloop::example::Kind;
use serde_json::Value;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(300);

fn on_policy_table(every: u64) -> String {
    format!("[on_policy]\nevery_n_steps = {every}\nsamples = 2\nmax_new_tokens = 12")
}

/// Every record of `on-policy.jsonl` (all segments).
fn samples(state: &Path) -> Vec<Value> {
    dreamloop::segmented::segments(state, "on-policy")
        .expect("list on-policy.jsonl segments")
        .iter()
        .flat_map(|p| read_lines(p))
        .collect()
}

/// Every record of `trained.jsonl` (all segments), rewind markers included.
fn trained_log(state: &Path) -> Vec<Value> {
    dreamloop::segmented::segments(state, "trained")
        .expect("list trained.jsonl segments")
        .iter()
        .flat_map(|p| read_lines(p))
        .collect()
}

/// The examples of the surviving timeline (what the weights on disk learned, steps lost in
/// a crash left out) that came from the policy's own replies.
fn trained_pairs(state: &Path) -> Vec<Value> {
    surviving_timeline(trained_log(state))
        .iter()
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default())
        .filter(|e| {
            e["provenance"]
                .as_str()
                .is_some_and(|p| p.starts_with("on-policy@"))
        })
        .collect()
}

/// The examples still waiting in the durable queue (queued or handed to the last batch).
fn queued(state: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(state.join("convo-pending.json")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&text).expect("the pending queue is JSON");
    ["queued", "in_flight"]
        .iter()
        .flat_map(|k| v[k].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Each record's judgement is the core's for its kind and reply.
fn check_judgements(records: &[Value], pairing: bool) {
    for r in records {
        let kind = Kind::parse(r["kind"].as_str().expect("kind")).expect("a kind");
        let reply = r["reply"].as_str().expect("reply");
        let (judged, _) = assess(kind, reply).expect("a behaviour kind");
        assert_eq!(r["judged"], judged.label(), "{r}");
        if !pairing || judged != Assessment::Wrong {
            assert_eq!(r["paired"], false, "{r}");
        }
    }
}

#[test]
fn wrong_replies_become_pairs_trained_once_across_a_kill() {
    let mut d = Daemon::new(&Overrides {
        phase: "dpo".into(),
        top: on_policy_table(1),
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 3".into(),
        ..Overrides::default()
    });
    let state = d.state();
    d.start(&[], &[]);
    d.wait_status(LIMIT, "an on-policy pair trained", |s| {
        step(s) >= 4 && !trained_pairs(&state).is_empty()
    });
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let before = trained_pairs(&state).len();

    d.start(&[], &[]);
    let at_restart = samples(&state).len();
    d.wait_status(LIMIT, "more on-policy pairs after the restart", |s| {
        step(s) >= 10 && samples(&state).len() > at_restart && trained_pairs(&state).len() > before
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());

    let records = samples(&state);
    assert!(records.len() >= 10, "{} samples", records.len());
    check_judgements(&records, true);
    // Both kinds are watched.
    for kind in ["clear_direction", "flawed_direction"] {
        assert!(
            records.iter().any(|r| r["kind"] == kind),
            "no {kind} sample"
        );
    }
    // Every trained pair is a recorded wrong reply, its rejected side the reply itself, its
    // chosen side the preferred reply; and every paired reply is trained or still queued.
    let paired: Vec<&Value> = records.iter().filter(|r| r["paired"] == true).collect();
    assert!(!paired.is_empty());
    let trained = trained_pairs(&state);
    let waiting = queued(&state);
    for e in &trained {
        let rejected = &e["target"]["dpo"]["rejected"];
        assert!(
            paired.iter().any(|r| &r["reply"] == rejected),
            "a trained on-policy pair matches no paired reply: {e}"
        );
        assert_ne!(&e["target"]["dpo"]["chosen"], rejected);
    }
    let provenances: HashSet<String> = trained
        .iter()
        .chain(&waiting)
        .filter_map(|e| e["provenance"].as_str().map(str::to_string))
        .collect();
    for r in &paired {
        let prefix = format!("on-policy@{}:{}", r["step"], r["source"].as_str().unwrap());
        assert!(
            provenances.contains(&prefix),
            "the pair of {r} was lost: neither trained nor queued"
        );
    }
    common::assert_trained_once(&surviving_timeline(trained_log(&state)));
}

#[test]
fn the_sft_phase_judges_but_pairs_nothing() {
    let mut d = Daemon::new(&Overrides {
        top: on_policy_table(2),
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    let state = d.state();
    d.start(&["--max-steps", "6"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let records = samples(&state);
    // Steps 2, 4 and 6, one clear and one flawed prompt each (batch 2, accept share 0.5).
    let steps: Vec<u64> = records
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.iter().all(|s| s % 2 == 0) && steps.contains(&2) && steps.contains(&6),
        "{steps:?}"
    );
    check_judgements(&records, false);
    assert!(trained_pairs(&state).is_empty());
}
