//! `trained.jsonl` is rotated into segments and a start reads back only what it needs: a
//! daemon that stopped after two steps, each sealed into its own segment, restarts, trains
//! on, and a rollback to GOOD (step 0) quarantines the examples of all four steps since GOOD,
//! the two before the restart read back from sealed segments included.

mod common;

use std::time::Duration;

use common::{Daemon, Overrides};

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_rollback_after_a_restart_across_rotations_quarantines_every_step_since_good() {
    let mut d = Daemon::new(&Overrides {
        train: "lr = 0.5".into(),
        data: "replay_ratio = 0.0".into(),
        eval: "every_n_steps = 4".into(),
        checkpoint: "every_n_steps = 1000".into(),
        // Breaches at the first evaluation after the baseline (as daemon_rollback.rs).
        rollback: common::always_breach(&[]),
        // 1 byte: every record is sealed into its own segment by the next append.
        supervisor: "trained_segment_bytes = 1".into(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "2"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let sealed = |d: &Daemon| {
        dreamloop::segmented::segments(&d.state(), "trained")
            .expect("segments")
            .iter()
            .filter(|p| !p.ends_with("trained.jsonl"))
            .count()
    };
    assert_eq!(d.trained().len(), 2);
    assert_eq!(
        sealed(&d),
        1,
        "step 1's record sealed when step 2 was appended"
    );

    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "a rollback", |s| !s["last_rollback"].is_null());
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let rb = &s["last_rollback"];
    assert_eq!(
        (rb["from"].as_u64(), rb["to"].as_u64()),
        (Some(4), Some(0)),
        "{s}"
    );
    assert_eq!(
        rb["quarantined"], 8,
        "4 steps × batch 2, steps 1 and 2 from sealed segments"
    );
    assert!(sealed(&d) >= 3, "steps 1–3 sealed");
    let steps: Vec<u64> = d
        .trained()
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(&steps[..4], [1, 2, 3, 4], "{steps:?}");
    common::assert_trained_once(&d.trained());
}
