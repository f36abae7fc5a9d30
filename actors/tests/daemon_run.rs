//! The whole loop end to end on the tiny model: N steps, checkpoints, a baseline that
//! becomes GOOD, no example trained twice, status.json and `dreamloop status` agree; and on
//! the hybrid Gated-DeltaNet preset: steps, a loadable hybrid checkpoint, a resume; and the
//! memory settings (bf16, per-layer recompute, a chunked head, a streamed DPO reference)
//! through a whole mixed SFT + DPO run and its resume.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{latest_dir, trained_hashes, Daemon, Overrides};

#[test]
fn runs_n_steps_and_stops_cleanly() {
    let mut d = Daemon::new(&Overrides::default());
    d.start(&["--max-steps", "6"], &[]);
    let status = d.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "exit {status}\n{}", d.log());

    let s = d.status().expect("status.json");
    assert_eq!(s["state"], "stopped");
    assert_eq!(s["step"], 6);
    assert_eq!(s["latest_step"], 6);
    // Baseline evaluation at step 0 marks GOOD before any training.
    assert!(s["good_step"].as_u64().is_some(), "{s}");
    assert!(
        !d.state().join("dreamloop.pid").exists(),
        "pid file removed on exit"
    );

    // Six steps of batch 2, every example distinct (hash recomputed from the text).
    let trained = d.trained();
    let steps: Vec<u64> = trained
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    let hashes = trained_hashes(&trained);
    assert_eq!(hashes.len(), 12);
    assert_eq!(
        hashes.iter().collect::<HashSet<_>>().len(),
        12,
        "an example was trained twice"
    );

    // The checkpoint is complete and resumable: weights, optimizer, trainer and loop state.
    let latest = latest_dir(&d.state()).expect("LATEST");
    for file in [
        "MANIFEST.json",
        "model.safetensors",
        "optimizer.bpk",
        "trainer_state.json",
        "seen.bin",
        "state.json",
    ] {
        assert!(
            latest.join(file).exists(),
            "{file} missing in {}",
            latest.display()
        );
    }
    let events = d.events();
    assert!(
        events.iter().any(|e| e["event"] == "mark_good"),
        "{events:?}"
    );

    // `dreamloop status` reads the same file after the daemon stopped.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(["status", "--json", "--state-dir"])
        .arg(d.state())
        .output()
        .expect("status runs");
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(printed["step"], 6);
}

#[test]
fn resumes_from_latest_with_everything() {
    // The checkpoint of step 4 is written after its evaluation, so it carries the policy's
    // breach count: a resume judges step 8 exactly as an uninterrupted run would. On the
    // tiny model one probe flip is a breach, and two in a row a rollback, whose retrained
    // timelines (steps 1..8 again, by design in trained.jsonl) are not what this test is
    // about: thresholds no probe noise reaches.
    let mut d = Daemon::new(&Overrides {
        rollback: common::noise_proof_rollback(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "4"], &[]);
    assert!(
        d.wait_exit(Duration::from_secs(180)).success(),
        "{}",
        d.log()
    );
    let before = std::fs::read(latest_dir(&d.state()).expect("LATEST").join("state.json"))
        .expect("state.json");
    let before: serde_json::Value = serde_json::from_slice(&before).expect("json");
    assert_eq!(before["step"], 4);

    d.start(&["--max-steps", "8"], &[]);
    assert!(
        d.wait_exit(Duration::from_secs(180)).success(),
        "{}",
        d.log()
    );
    let trained = d.trained();
    let steps: Vec<u64> = trained
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "the second run continues at step 5"
    );
    let hashes = trained_hashes(&trained);
    assert_eq!(
        hashes.iter().collect::<HashSet<_>>().len(),
        hashes.len(),
        "an example was trained twice across the restart"
    );
    // The mixer's carries continued (4 batches of 2 at replay 0.25 = 2 general examples
    // so far, exactly: carry arithmetic, not random rounding).
    let general = trained
        .iter()
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["kind"] == "general")
        .count();
    assert_eq!(general, 4, "8 batches × 2 × 0.25 general examples");
}

#[test]
fn validate_config_lists_every_error_with_exit_78() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    let mut text = common::config_text(&dir.path().join("state"), &Overrides::default());
    text = text
        .replace("batch_size = 2", "batch_size = 0")
        .replace("replay_ratio = 0.25", "replay_ratio = 3.0");
    std::fs::write(&bad, text).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .arg("validate-config")
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.batch_size") && err.contains("data.replay_ratio"),
        "{err}"
    );

    let good = common::repo().join("config/dreamloop.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .arg("validate-config")
        .arg(&good)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `backend = "cuda"` that this process cannot run (a CPU-only build, as CI's; or a CUDA
/// build without the NVIDIA driver) is a configuration error named by its field, found by
/// `validate-config` and by `run` before anything starts — not a trainer thread that panics
/// inside cudarc and an "actor panicked during startup".
#[test]
fn an_unrunnable_backend_is_refused_before_start_with_exit_78() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let file = dir.path().join("cuda.toml");
    let text = common::config_text(&state, &Overrides::default())
        .replace("backend = \"cpu\"", "backend = \"cuda\"");
    std::fs::write(&file, text).expect("write");
    let check = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains("model.backend"), "{err}");
        assert!(
            err.contains("--features cuda") || err.contains("NVIDIA driver"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    let dreamloop = || std::process::Command::new(env!("CARGO_BIN_EXE_dreamloop"));
    check(
        dreamloop()
            .arg("validate-config")
            .arg(&file)
            .output()
            .expect("runs"),
    );
    check(
        dreamloop()
            .args(["run", "--config"])
            .arg(&file)
            .output()
            .expect("runs"),
    );
    assert!(!state.exists(), "nothing is written for a refused config");
}

#[test]
fn control_commands_report_a_stale_pid_file() {
    let dir = tempfile::tempdir().expect("tmp");
    // A pid that cannot exist (above pid_max).
    std::fs::write(dir.path().join("dreamloop.pid"), "2147483000\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(["pause", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale pid file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The loop on `tiny-hybrid` (qwen3_5 shape: three GDN layers, one gated-attention layer):
/// trains, evaluates, checkpoints a directory that loads back as the same hybrid model, and
/// resumes from it.
#[test]
fn hybrid_model_runs_checkpoints_and_resumes() {
    let mut d = Daemon::new(&Overrides {
        model: "tiny-hybrid".into(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "4"], &[]);
    let status = d.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "exit {status}\n{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    let saved = dreamloop::model::Model::load(&latest, &dreamloop::model::cpu()).unwrap();
    assert_eq!(saved.config.family, dreamloop::model::Family::Qwen35);
    assert_eq!(
        saved
            .lm
            .model
            .layers
            .iter()
            .filter(|l| l.linear_attn.is_some())
            .count(),
        3
    );
    assert!(d.events().iter().any(|e| e["event"] == "mark_good"));

    d.start(&["--max-steps", "6"], &[]);
    let status = d.wait_exit(Duration::from_secs(180));
    assert!(status.success(), "exit {status}\n{}", d.log());
    assert_eq!(d.status().expect("status.json")["step"], 6);
    let steps: Vec<u64> = d
        .trained()
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4, 5, 6],
        "resumed at 5, nothing retrained"
    );
}

#[test]
fn memory_settings_train_checkpoint_and_resume_a_mixed_run() {
    // A model directory (a streamed reference is read from files): the hybrid preset saved.
    let model_dir = tempfile::tempdir().unwrap();
    dreamloop::model::Model::preset("tiny-hybrid", 0, &dreamloop::model::cpu())
        .unwrap()
        .save(model_dir.path())
        .unwrap();
    let mut d = Daemon::new(&Overrides {
        model: model_dir.path().display().to_string(),
        // The 27B's settings: bf16 weights (recompute on by default), a streamed reference.
        model_extra: "stream_reference = true\ndtype = \"bf16\"".into(),
        phase: "mixed".into(),
        train: "logits_chunk = 16".into(),
        ..Overrides::default()
    });
    d.start(&["--max-steps", "4"], &[]);
    let status = d.wait_exit(Duration::from_secs(240));
    assert!(status.success(), "exit {status}\n{}", d.log());
    d.start(&["--max-steps", "6"], &[]);
    let status = d.wait_exit(Duration::from_secs(240));
    assert!(status.success(), "exit {status}\n{}", d.log());
    let trained = d.trained();
    let steps: Vec<u64> = trained
        .iter()
        .map(|r| r["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4, 5, 6],
        "resumed at 5, nothing retrained"
    );
    let pairs = trained
        .iter()
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["target"].get("dpo").is_some())
        .count();
    assert!(
        pairs > 0,
        "a mixed run trains DPO pairs against the streamed reference"
    );
    // Every pair's reference log-probs were computed ahead of its step, in blocks: a pass
    // covers the pairs of several steps (scenarios drawn ahead), and no step read the files.
    let log = d.log();
    let passes = log.matches("Reference log-probs computed ahead").count();
    let dpo_steps = trained
        .iter()
        .filter(|r| {
            r["examples"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["target"].get("dpo").is_some()))
        })
        .count();
    assert!(
        passes > 0 && passes < dpo_steps,
        "{passes} passes for {dpo_steps} steps with pairs\n{log}"
    );
    assert!(!log.contains("computed in the step"), "{log}");
    let saved = dreamloop::model::Model::load(
        &latest_dir(&d.state()).expect("LATEST"),
        &dreamloop::model::cpu(),
    )
    .unwrap();
    assert!(
        saved
            .dtypes
            .values()
            .all(|t| *t == dreamloop::model::DiskDtype::Bf16),
        "the run trained and saved bf16 weights"
    );
    assert!(d.events().iter().any(|e| e["event"] == "mark_good"));
}
