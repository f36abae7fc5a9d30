//! The daemon end to end in bf16 (`[model] dtype = "bf16"`) on the hybrid Gated-DeltaNet
//! preset, CPU: training, evaluation, bf16 checkpoints, a resume, and a provoked regression
//! rolled back to GOOD bit for bit.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{latest_dir, trained_hashes, Daemon, Overrides};
use dreamloop::model::weights::WeightsDigest;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(300);

/// A daemon on `tiny-hybrid` whose config asks for bf16.
fn bf16_daemon(overrides: Overrides) -> Daemon {
    let d = Daemon::new(&Overrides {
        model: "tiny-hybrid".into(),
        ..overrides
    });
    let text = std::fs::read_to_string(d.config()).expect("config");
    assert!(text.contains("backend = \"cpu\"\n"), "{text}");
    let text = text.replace(
        "backend = \"cpu\"\n",
        "backend = \"cpu\"\ndtype = \"bf16\"\n",
    );
    std::fs::write(d.config(), text).expect("config");
    d
}

/// Every tensor of a checkpoint's `model.safetensors` is bf16.
fn assert_bf16_checkpoint(dir: &std::path::Path) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(!file.names().is_empty());
    for (name, view) in file.tensors() {
        assert_eq!(
            view.dtype(),
            safetensors::Dtype::BF16,
            "{name} in {}",
            dir.display()
        );
    }
}

#[test]
fn bf16_hybrid_trains_evaluates_checkpoints_and_resumes() {
    let mut d = bf16_daemon(Overrides::default());
    d.start(&["--max-steps", "4"], &[]);
    let status = d.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}\n{}", d.log());
    let latest = latest_dir(&d.state()).expect("LATEST");
    assert_bf16_checkpoint(&latest);
    assert!(latest.join("optimizer.bpk").exists());
    assert!(
        d.events().iter().any(|e| e["event"] == "mark_good"),
        "the baseline evaluation ran\n{}",
        d.log()
    );

    d.start(&["--max-steps", "6"], &[]);
    let status = d.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}\n{}", d.log());
    assert_eq!(d.status().expect("status.json")["step"], 6);
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
    let hashes = trained_hashes(&trained);
    assert_eq!(hashes.iter().collect::<HashSet<_>>().len(), hashes.len());
    assert_bf16_checkpoint(&latest_dir(&d.state()).expect("LATEST"));
}

#[test]
fn bf16_regression_is_rolled_back_to_good_bit_for_bit() {
    let mut d = bf16_daemon(Overrides {
        train: "lr = 0.5".into(),
        data: "replay_ratio = 0.0".into(),
        eval: "every_n_steps = 3".into(),
        checkpoint: "every_n_steps = 1000".into(),
        rollback: common::always_breach(&["max_rollbacks = 1"]),
        ..Overrides::default()
    });
    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "a rollback", |s| !s["last_rollback"].is_null());
    let rb = &s["last_rollback"];
    assert_eq!(rb["from"], 3, "{s}");
    assert_eq!(rb["to"], 0, "{s}");
    // The weights the trainer holds after the restore digest to the GOOD weight files'.
    let good = d.state().join("checkpoints/step-00000000");
    assert_bf16_checkpoint(&good);
    let good_digest = WeightsDigest::of_dir(&good).expect("GOOD weights digest");
    assert_eq!(rb["restored_digest"], good_digest.as_str());
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
}
