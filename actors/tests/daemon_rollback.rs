//! A provoked regression is detected and rolled back: clear-direction examples only, no
//! replay, a learning rate that wrecks the tiny model, tight thresholds, patience 1.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{trained_hashes, Daemon, Overrides};
use dreamloop::model::weights::WeightsDigest;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_regression_is_rolled_back_to_good_bit_for_bit() {
    let mut d = Daemon::new(&Overrides {
        train: "lr = 0.5".into(),
        data: "replay_ratio = 0.0".into(),
        eval: "every_n_steps = 3".into(),
        checkpoint: "every_n_steps = 1000".into(),
        rollback: common::always_breach(&[
            "lr_factor_on_rollback = 0.5",
            "replay_ratio_step = 0.15",
            "max_replay_ratio = 0.4",
            "max_rollbacks = 1",
        ]),
        ..Overrides::default()
    });
    // accept_share 1.0: clear-direction examples only.
    let text = std::fs::read_to_string(d.config())
        .expect("config")
        .replace("accept_share = 0.5", "accept_share = 1.0");
    std::fs::write(d.config(), text).expect("config");
    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "a rollback", |s| !s["last_rollback"].is_null());
    let rb = &s["last_rollback"];
    assert_eq!(rb["from"], 3, "{s}");
    assert_eq!(rb["to"], 0, "{s}");
    // lr × 0.5 and replay 0 → 0.15, as configured.
    assert!(
        (rb["lr"].as_f64().expect("lr") - 0.25).abs() < 1e-12,
        "{rb}"
    );
    assert!(
        (rb["replay_ratio"].as_f64().expect("replay") - 0.15).abs() < 1e-12,
        "{rb}"
    );
    // Restored weights equal the GOOD checkpoint bit for bit: the digest of the weights the
    // trainer holds after the restore equals that of the GOOD weight files, read here.
    let good_digest = WeightsDigest::of_dir(&d.state().join("checkpoints/step-00000000"))
        .expect("GOOD weights digest");
    assert_eq!(rb["restored_digest"], good_digest.as_str());
    assert_eq!(rb["quarantined"], 6, "3 steps × batch 2");

    // Let it train at least one step after the rollback, then stop.
    let deadline = std::time::Instant::now() + LIMIT;
    while d.trained().len() <= 3 && d.status().is_some_and(|s| s["paused_by_policy"] != true) {
        assert!(
            std::time::Instant::now() < deadline,
            "no step after the rollback\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());

    // The step after the rollback was checkpointed at once (not at the 1000-step cadence),
    // so a crash cannot undo the rollback's lr and replay ratio.
    let latest = common::latest_dir(&d.state()).expect("LATEST");
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(latest.join("state.json")).expect("state.json"),
    )
    .expect("json");
    assert!(run["step"].as_u64() >= Some(1), "{run}");
    assert!(
        (run["replay_ratio"].as_f64().expect("replay") - 0.15).abs() < 1e-12,
        "{run}"
    );
    assert!(
        (run["policy"]["lr_factor"].as_f64().expect("lr_factor") - 0.5).abs() < 1e-12,
        "{run}"
    );

    let events = d.events();
    let rollback = events
        .iter()
        .find(|e| e["event"] == "rollback")
        .expect("rollback event");
    assert_eq!(rollback["to"], 0);
    assert!([
        "perplexity",
        "sycophancy",
        "clear_direction",
        "general_probe",
        "non_finite"
    ]
    .contains(&rollback["reason"].as_str().unwrap_or("")));
    assert!(
        (rollback["adjustments"]["lr_factor"]
            .as_f64()
            .expect("factor")
            - 0.5)
            .abs()
            < 1e-12
    );

    // The quarantined examples are on disk and never trained again.
    let quarantined = common::read_lines(&d.state().join("quarantine/examples.jsonl"));
    assert!(quarantined.len() >= 6);
    let q_hashes: Vec<u64> = quarantined
        .iter()
        .map(|r| {
            serde_json::from_value::<dreamloop::example::Example>(r["example"].clone())
                .expect("example")
                .hash()
                .0
        })
        .collect();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for h in trained_hashes(&d.trained()) {
        *counts.entry(h).or_default() += 1;
    }
    for h in q_hashes {
        assert_eq!(
            counts.get(&h),
            Some(&1),
            "quarantined example {h:016x} trained again"
        );
    }
    // Only clear-direction examples were trained before the rollback.
    assert!(quarantined
        .iter()
        .take(6)
        .all(|r| r["example"]["kind"] == "clear_direction"));
}

/// A storm of non-finite steps is judged when it happens. Weight decay of 1e30 makes the
/// first update blow the weights up, so every later loss is non-finite and every step is
/// skipped. A skipped step does not advance the step count, so before, the scheduled
/// evaluation never came and the loop skipped steps forever; now more than
/// `max_non_finite_steps` of them trigger an evaluation, and the policy rolls back to GOOD.
#[test]
fn a_storm_of_non_finite_steps_is_rolled_back() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 1000".into(),
        rollback: "max_non_finite_steps = 3\nmax_rollbacks = 1".into(),
        ..Overrides::default()
    });
    let text = std::fs::read_to_string(d.config())
        .expect("config")
        .replace("weight_decay = 0.0", "weight_decay = 1e30");
    std::fs::write(d.config(), text).expect("config");
    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "a rollback", |s| !s["last_rollback"].is_null());
    let rb = &s["last_rollback"];
    assert_eq!(rb["reason"], "non_finite", "{s}");
    assert_eq!(rb["to"], 0, "{s}");
    assert!(d
        .log()
        .contains("A storm of non-finite steps: evaluating now."));
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
}
