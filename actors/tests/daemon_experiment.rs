//! The experiment controller in the daemon (issue 17; `actors/src/experiment.rs`): a
//! `[[phase]]` schedule SFT → DPO that advances on its own step count, the DPO phase at its
//! own lr and β against a reference re-based on the SFT result (its first step's loss is the
//! hand-computed ln 2 of a policy equal to its reference), a stall that raises lr, a
//! provoked arithmetic breach that raises the arithmetic replay weight; each surviving a
//! SIGKILL or a restart.

mod common;

use std::time::Duration;

use common::{config_text, noise_proof_rollback, step, surviving_timeline, Daemon, Overrides};
use dreamloop_actors::faults::Faults;
use dreamloop_actors::Control;
use serde_json::Value;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(300);

/// SFT at 1e-2 (raised once, to its ceiling 2e-2, when two evaluations are flat) for 4
/// steps, then DPO at 5e-4 with β = 1. The large SFT lr moves the tiny model far from its
/// start, so that a DPO reference left at the start would give a loss far from ln 2.
fn schedule(rebase: bool) -> String {
    format!(
        r#"
[controller]
stall_evals = 2
stall_margin = 1000.0
stall_attention = 1000.0
lr_raise_factor = 2.0

[[phase]]
kind = "sft"
lr = 1e-2
max_lr = 2e-2
until = {{ steps = 4 }}

[[phase]]
kind = "dpo"
lr = 5e-4
max_lr = 5e-4
beta = 1.0
rebase_reference = {rebase}
"#
    )
}

/// A daemon whose config has `schedule` instead of the fixed `phase = "sft"`.
fn scheduled(o: &Overrides, schedule: &str) -> Daemon {
    let d = Daemon::new(o);
    let text = config_text(&d.state(), o).replacen("phase = \"sft\"\n", "", 1);
    // The schedule's tables go before [model], where `top` goes.
    let text = text.replacen("[model]", &format!("{schedule}\n[model]"), 1);
    std::fs::write(d.config(), text).expect("write config");
    d
}

fn overrides() -> Overrides {
    Overrides {
        // Behaviour examples only: a DPO-phase batch is then all pairs, and its loss is
        // the DPO loss alone.
        data: "replay_ratio = 0.0".into(),
        eval: "every_n_steps = 2".into(),
        checkpoint: "every_n_steps = 2".into(),
        rollback: noise_proof_rollback(),
        ..Overrides::default()
    }
}

/// The surviving timeline's record of `step`.
fn trained_step(records: &[Value], n: u64) -> Value {
    records
        .iter()
        .find(|r| step(r) == n && r["rewind"] != true)
        .unwrap_or_else(|| panic!("step {n} not in trained.jsonl"))
        .clone()
}

fn lr_of(r: &Value) -> f64 {
    r["lr"].as_f64().expect("a trained step records its lr")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs()
}

fn is_pair(e: &Value) -> bool {
    e["target"].get("dpo").is_some()
}

/// ln 2: the sigmoid DPO loss −log σ(β·0) of a policy equal to its reference. Tolerance:
/// the policy's and the reference's log-prob sums are the same f32 computation on the same
/// weights; sums of ≤ 100 tokens with |log p| ≤ 10 round within 100 · 10 · 6e-8 = 6e-5 each,
/// and β = 1 passes that to the margin (the loss moves by half of it).
const LN2_TOLERANCE: f64 = 1e-4;

#[test]
fn sft_then_dpo_on_a_rebased_reference_with_a_stall_raise_across_a_kill() {
    let o = overrides();
    let mut d = scheduled(&o, &schedule(true));
    let state = d.state();
    d.start(&["--max-steps", "6"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());

    let events = d.events();
    let changes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "phase_change")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let change = changes[0];
    assert_eq!(
        (
            &change["step"],
            &change["from"],
            &change["to"],
            &change["index"]
        ),
        (
            &Value::from(4),
            &Value::from("sft"),
            &Value::from("dpo"),
            &Value::from(1)
        )
    );
    assert_eq!(change["reason"], "steps");
    assert_eq!(change["reference_step"], 4);
    let raises: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "lr_raised")
        .collect();
    assert_eq!(
        raises.len(),
        1,
        "one raise: the second would pass max_lr: {raises:?}"
    );
    assert_eq!(raises[0]["step"], 2);
    assert!(
        close(raises[0]["to"].as_f64().unwrap(), 2e-2),
        "{}",
        raises[0]
    );
    let pinned: Value = serde_json::from_str(
        &std::fs::read_to_string(state.join("reference/PINNED.json")).expect("a pinned reference"),
    )
    .unwrap();
    assert_eq!(pinned["step"], 4);

    let records = surviving_timeline(d.trained_log());
    // SFT at its lr, raised after the flat evaluation of step 2; DPO at its own.
    for (n, lr) in [
        (1, 1e-2),
        (2, 1e-2),
        (3, 2e-2),
        (4, 2e-2),
        (5, 5e-4),
        (6, 5e-4),
    ] {
        let r = trained_step(&records, n);
        assert!(close(lr_of(&r), lr), "step {n}: lr {} ≠ {lr}", lr_of(&r));
        let pairs = r["examples"].as_array().unwrap().iter().all(is_pair);
        assert_eq!(pairs, n > 4, "step {n}: DPO pairs only from step 5: {r}");
    }
    // The first DPO step: the policy is its re-based reference.
    let first = trained_step(&records, 5)["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < LN2_TOLERANCE,
        "first DPO step's loss {first} ≠ ln 2"
    );

    // On in the DPO phase, killed, resumed: the phase, its lr and the reference stay.
    d.start(&[], &[]);
    d.wait_status(LIMIT, "step 9, past the checkpoint of step 8", |s| {
        step(s) >= 9
    });
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    d.start(&["--max-steps", "12"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let log = d.log();
    assert!(
        log.matches("The DPO reference is the re-based one.")
            .count()
            >= 2,
        "each restart reads the pinned reference:\n{log}"
    );
    let changes = d
        .events()
        .iter()
        .filter(|e| e["event"] == "phase_change")
        .count();
    assert_eq!(changes, 1, "the phase is not entered again after a restart");
    let status = d.status().unwrap();
    assert_eq!(
        (&status["phase"], &status["phase_index"]),
        (&Value::from("dpo"), &Value::from(1))
    );
    let records = surviving_timeline(d.trained_log());
    for n in 7..=12 {
        let r = trained_step(&records, n);
        assert!(
            close(lr_of(&r), 5e-4),
            "step {n} after the restarts: lr {}",
            lr_of(&r)
        );
        assert!(r["examples"].as_array().unwrap().iter().all(is_pair), "{r}");
    }
    common::assert_trained_once(&records);

    // evals.jsonl: every evaluation, one run id across the restarts, the phase and boost.
    let evals = common::read_lines(&state.join("evals.jsonl"));
    assert!(evals.len() >= 7, "{} evaluations", evals.len());
    let run_id = &evals[0]["run_id"];
    assert!(evals.iter().all(|e| &e["run_id"] == run_id));
    let at = |n: u64| evals.iter().find(|e| step(e) == n).expect("evaluated");
    assert_eq!(at(2)["lr_boost"], 2.0);
    assert_eq!(at(2)["phase_index"], 0);
    assert_eq!(at(6)["phase_index"], 1);
    assert_eq!(at(6)["phase"], "dpo");
    assert_eq!(status["run_id"], *run_id);
}

/// The check above is sensitive: the same run with the reference left at the starting
/// weights gives a first DPO loss far from ln 2.
#[test]
fn without_the_rebase_the_first_dpo_loss_is_not_ln2() {
    let mut d = scheduled(&overrides(), &schedule(false));
    d.start(&["--max-steps", "5"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let records = surviving_timeline(d.trained_log());
    let first = trained_step(&records, 5)["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() > 100.0 * LN2_TOLERANCE,
        "first DPO loss {first}: the SFT steps did not move the policy from its start"
    );
    assert!(!d.state().join("reference").exists());
}

/// An arithmetic probe that breaches its guard (evaluations 1 and 2, provoked) triples the
/// arithmetic replay weight; a restart keeps it; the recovered probe restores it.
#[test]
fn an_arithmetic_breach_raises_its_replay_weight_until_it_recovers() {
    let o = Overrides {
        top: "[controller]\ntargeted_replay_factor = 3.0".into(),
        eval: "every_n_steps = 2".into(),
        checkpoint: "every_n_steps = 2".into(),
        // Breaches are seen (the default 5-point general guard) but never roll back.
        rollback: "patience = 100\nmax_perplexity_increase = 100.0\n\
                   max_flawed_accuracy_drop = 1.0\nmax_clear_accuracy_drop = 1.0"
            .into(),
        ..Overrides::default()
    };
    let mut d = Daemon::new(&o);
    let state = d.state();
    let faults = Faults::default().arithmetic_drop(1, 3, 2.0);
    d.start_in_process(&["--max-steps", "5"], faults.clone());
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let weights = |e: &Value| e["replay_weights"][0].as_f64().unwrap();
    let evals = common::read_lines(&state.join("evals.jsonl"));
    assert_eq!(evals.len(), 3, "steps 0, 2, 4");
    assert_eq!(weights(&evals[0]), 0.25);
    assert_eq!(weights(&evals[1]), 0.75, "breached at step 2: ×3");
    assert_eq!(weights(&evals[2]), 0.75, "still breached: unchanged");
    assert_eq!(evals[1]["replay_weights"][1], 0.25, "code is not touched");

    // A restart resumes the boost from the checkpoint (shown before any step).
    d.start_in_process(&["--paused", "--max-steps", "8"], faults);
    let status = d.wait_status(LIMIT, "paused at the restart", |s| s["state"] == "paused");
    assert_eq!(status["replay_weights"][0], 0.75, "{status}");
    d.control(Control::Resume);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let evals = common::read_lines(&state.join("evals.jsonl"));
    let at6 = evals
        .iter()
        .find(|e| step(e) == 6)
        .expect("step 6 evaluated");
    assert_eq!(weights(at6), 0.25, "recovered at step 6: restored");
    let reasons: Vec<(String, f64)> = d
        .events()
        .iter()
        .filter(|e| e["event"] == "replay_weight")
        .map(|e| {
            (
                e["reason"].as_str().unwrap().to_string(),
                e["boost"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("probe_breach".into(), 3.0),
            ("probe_recovered".into(), 1.0)
        ]
    );
}

/// The generation probes: at each evaluation the model's greedy replies to a fixed prompt
/// set (one of each kind here) are kept in `generations.jsonl` with the step, judged and
/// checked, and their measures go to `evals.jsonl`.
#[test]
fn generations_are_recorded_at_each_evaluation() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 2\ngeneration_prompts = 1\ngeneration_tokens = 12".into(),
        rollback: noise_proof_rollback(),
        ..Overrides::default()
    });
    let state = d.state();
    d.start(&["--max-steps", "2"], &[]);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    let entries = common::read_lines(&state.join("generations.jsonl"));
    let steps: Vec<u64> = entries.iter().map(step).collect();
    assert_eq!(steps, vec![0, 2]);
    for e in &entries {
        let kinds: Vec<&str> = e["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            vec!["clear_direction", "flawed_direction", "arithmetic", "code"],
            "{e}"
        );
        for g in e["generations"].as_array().unwrap() {
            let behaviour = g["kind"].as_str().unwrap().ends_with("direction");
            assert_eq!(g["judged"].is_string(), behaviour, "{g}");
            assert_eq!(g["correct"].is_boolean(), !behaviour, "{g}");
        }
        let m = &e["measures"];
        for share in [
            "push_back_flawed",
            "push_back_clear",
            "hedging",
            "arithmetic_exact",
            "code_pass",
        ] {
            let v = m[share].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{share} = {v}");
        }
    }
    let evals = common::read_lines(&state.join("evals.jsonl"));
    assert_eq!(evals[1]["generation"], entries[1]["measures"]);
}
