//! Crash harness: SIGKILL the daemon at random moments 20 times (checkpoints every step, so
//! many kills land inside a checkpoint write). Every restart must resume from the last
//! complete checkpoint, and the surviving timeline (what the weights on disk were trained on)
//! never has an example twice. An example of a step lost with a kill was trained only into
//! weights that are gone, so it is queued again and may appear once more in `trained.jsonl`.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{surviving_timeline, trained_hashes, Daemon, Overrides};

/// The checkpoint a correct restart resumes from: LATEST if complete, else the newest
/// complete one.
fn expected_resume(state: &Path) -> u64 {
    let dir = state.join("checkpoints");
    let complete = |name: &str| dir.join(name).join("MANIFEST.json").exists();
    if let Ok(latest) = std::fs::read_to_string(dir.join("LATEST")) {
        if complete(latest.trim()) {
            return latest.trim()[5..].parse().expect("step number");
        }
    }
    let mut steps: Vec<u64> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with("step-") && complete(n))
                .filter_map(|n| n[5..].parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps.last().copied().unwrap_or(0)
}

#[test]
fn twenty_sigkills_never_repeat_an_example_nor_load_a_torn_checkpoint() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 1".into(),
        ..Overrides::default()
    });
    // A fixed LCG: the kill moments differ from kill to kill but the test is reproducible.
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rng >> 33
    };
    let mut torn_writes = 0;
    for round in 0..20 {
        let lines_before = d.trained().len();
        // Debris of a checkpoint write the kill interrupted (removed by the next start-up).
        let debris = std::fs::read_dir(d.state().join("checkpoints"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false);
        torn_writes += usize::from(debris);
        let resume = expected_resume(&d.state());
        d.start(&[], &[]);
        // Wait until this run has trained 1–3 steps, then kill 0–60 ms later.
        let wanted = lines_before + 1 + (next() % 3) as usize;
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while d.trained().len() < wanted {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no progress\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(next() % 60));
        d.signal(libc::SIGKILL);
        d.wait_exit(Duration::from_secs(10));
        // The first step this run trained continues the checkpoint it must have resumed from.
        let first_new = d.trained()[lines_before]["step"].as_u64().expect("step");
        assert_eq!(
            first_new,
            resume + 1,
            "round {round}: resumed from the wrong checkpoint\n{}",
            d.log()
        );
    }
    // A last clean run: it resumes, trains, stops.
    let resume = expected_resume(&d.state());
    let lines_before = d.trained().len();
    d.start(&["--max-steps", &(resume + 2).to_string()], &[]);
    assert!(
        d.wait_exit(Duration::from_secs(180)).success(),
        "{}",
        d.log()
    );
    assert_eq!(d.trained()[lines_before]["step"].as_u64(), Some(resume + 1));
    let hashes = trained_hashes(&surviving_timeline(d.trained_log()));
    let unique: HashSet<_> = hashes.iter().collect();
    assert_eq!(
        unique.len(),
        hashes.len(),
        "an example was trained twice in the surviving timeline"
    );
    assert!(
        hashes.len() >= 40,
        "the crash run trained too little to mean anything"
    );
    eprintln!("{torn_writes} of 20 kills interrupted a checkpoint write");
}
