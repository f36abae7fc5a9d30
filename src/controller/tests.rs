use super::*;

fn metrics(flawed_margin: f64, clear_margin: f64, attention: f64, perplexity: f64) -> EvalMetrics {
    EvalMetrics {
        clear_accuracy: 0.5,
        clear_margin,
        flawed_accuracy: 0.5,
        flawed_margin,
        perplexity,
        attention_on_direction: attention,
        ablation_sensitivity: 0.0,
        general_accuracy: 0.5,
    }
}

fn obs(flawed_margin: f64, outcome: Outcome) -> Observation {
    Observation {
        metrics: metrics(flawed_margin, 0.0, 0.1, 10.0),
        clear_per_token: 0.0,
        flawed_per_token: flawed_margin,
        arithmetic: 0.8,
        code: 0.6,
        outcome,
    }
}

/// SFT at 1e-5 until 3 steps or a flawed margin gain of 0.5 with 2 clean evaluations, then
/// DPO at 5e-7 with β 0.01.
fn controller(stall_evals: u32, targeted: f64) -> Controller {
    let sft = PhaseEntry {
        kind: Phase::Sft,
        lr: Some(1e-5),
        dpo_lr: None,
        beta: None,
        max_lr: Some(1e-4),
        rebase_reference: None,
        until: Some(Advance {
            steps: Some(3),
            flawed_margin_gain: Some(0.5),
            clean_evals: 2,
        }),
    };
    let dpo = PhaseEntry {
        kind: Phase::Dpo,
        lr: Some(5e-7),
        dpo_lr: None,
        beta: Some(0.01),
        max_lr: None,
        rebase_reference: None,
        until: None,
    };
    Controller {
        phases: vec![sft.resolve(2e-5, 0.1), dpo.resolve(2e-5, 0.1)],
        settings: ControllerSection {
            stall_evals,
            stall_margin: 0.05,
            targeted_replay_factor: targeted,
            ..ControllerSection::default()
        },
        guards: Policy::default(),
    }
}

#[test]
fn phases_resolve_absent_settings_from_train() {
    let c = controller(0, 1.0);
    assert_eq!(c.phases[0].lr, 1e-5);
    assert_eq!(c.phases[0].beta, 0.1, "β from [train]");
    assert!(
        !c.phases[0].rebase_reference,
        "an SFT phase has no reference to re-base"
    );
    assert_eq!(c.phases[1].beta, 0.01);
    assert!(c.phases[1].rebase_reference, "DPO re-bases by default");
    assert!(
        (c.phases[1].max_lr - 5e-6).abs() < 1e-18,
        "10 × lr by default"
    );
    let mixed = PhaseEntry {
        kind: Phase::Mixed,
        lr: Some(1e-5),
        dpo_lr: Some(5e-7),
        beta: None,
        max_lr: None,
        rebase_reference: Some(false),
        until: None,
    }
    .resolve(2e-5, 0.1);
    assert!((mixed.dpo_weight - 0.05).abs() < 1e-12, "5e-7 / 1e-5");
    assert!(!mixed.rebase_reference);
}

#[test]
fn the_step_count_advances_the_phase_and_the_last_phase_stays() {
    let c = controller(0, 1.0);
    let mut s = ControllerState {
        // An earlier phase's re-based reference.
        reference_step: Some(1),
        ..ControllerState::default()
    };
    for _ in 0..2 {
        let (n, actions) = c.after_step(&s);
        assert!(actions.is_empty());
        s = n;
    }
    let (s, actions) = c.after_step(&s);
    assert_eq!(
        actions,
        vec![Action::EnterPhase {
            index: 1,
            why: Why::Steps
        }]
    );
    assert_eq!((s.phase_index, s.phase_steps), (1, 0));
    assert_eq!(c.peak_lr(&s), 5e-7);
    assert_eq!(
        s.reference_step, None,
        "the phase entered re-bases on its own entry"
    );
    let mut s = s;
    for _ in 0..100 {
        let (n, actions) = c.after_step(&s);
        assert!(actions.is_empty(), "the last phase never ends");
        s = n;
    }
}

#[test]
fn the_margin_criterion_needs_the_gain_and_clean_evaluations() {
    let c = controller(0, 1.0);
    let s = ControllerState::default();
    let (s, a) = c.after_eval(&s, &obs(-1.0, Outcome::Good));
    assert!(a.is_empty());
    assert_eq!(s.phase_start_flawed_margin, Some(-1.0));
    // +0.6 but a breach: not clean.
    let (s, a) = c.after_eval(&s, &obs(-0.4, Outcome::Breached));
    assert!(a.is_empty());
    // +0.6, one clean evaluation: not yet two.
    let (s, a) = c.after_eval(&s, &obs(-0.4, Outcome::Clean));
    assert!(a.is_empty());
    // +0.4 with two clean: the gain is short.
    let (s, a) = c.after_eval(&s, &obs(-0.6, Outcome::Clean));
    assert!(a.is_empty());
    let (s, a) = c.after_eval(&s, &obs(-0.5, Outcome::Good));
    assert_eq!(
        a,
        vec![Action::EnterPhase {
            index: 1,
            why: Why::Criteria
        }]
    );
    assert_eq!(s.phase_index, 1);
    assert_eq!(
        s.phase_start_flawed_margin,
        Some(-0.5),
        "the new phase starts here"
    );
    assert_eq!(s.clean_evals, 0);
}

#[test]
fn a_stall_raises_lr_up_to_the_ceiling_and_breaches_reset_the_window() {
    let c = controller(3, 1.0);
    let mut s = ControllerState {
        // Far above: the phase's margin criterion is never met here.
        phase_start_flawed_margin: Some(100.0),
        ..ControllerState::default()
    };
    // Flat: margins per token within 0.05, attention within 0.002.
    for (m, outcome) in [(0.01, Outcome::Clean), (0.02, Outcome::Clean)] {
        let (n, a) = c.after_eval(&s, &obs(m, outcome));
        assert!(a.is_empty());
        s = n;
    }
    // A breach empties the window: two more flat ones are not yet three.
    let (n, _) = c.after_eval(&s, &obs(0.01, Outcome::Breached));
    s = n;
    assert!(s.window.is_empty());
    for m in [0.0, 0.01] {
        let (n, a) = c.after_eval(&s, &obs(m, Outcome::Clean));
        assert!(a.is_empty());
        s = n;
    }
    let (n, a) = c.after_eval(&s, &obs(0.02, Outcome::Clean));
    assert_eq!(
        a,
        vec![Action::SetLrBoost {
            from: 1.0,
            to: 2.0,
            why: Why::Stall
        }]
    );
    s = n;
    assert!((c.peak_lr(&s) - 2e-5).abs() < 1e-18);
    // Moving signals are not a stall.
    for m in [0.2, 0.4, 0.6] {
        let (n, a) = c.after_eval(&s, &obs(m, Outcome::Clean));
        assert!(a.is_empty(), "margin {m} is moving");
        s = n;
    }
    // Raises stop at max_lr = 1e-4: boosts 4, 8, then 10 (capped), then none.
    let mut boosts = Vec::new();
    for _ in 0..12 {
        let (n, a) = c.after_eval(&s, &obs(0.6, Outcome::Clean));
        for action in a {
            if let Action::SetLrBoost { to, .. } = action {
                boosts.push(to);
            }
        }
        s = n;
    }
    assert_eq!(boosts, vec![4.0, 8.0, 10.0]);
}

#[test]
fn undefined_attention_does_not_block_a_stall() {
    let c = controller(2, 1.0);
    let mut s = ControllerState::default();
    let mut o = obs(0.0, Outcome::Clean);
    o.metrics.attention_on_direction = f64::NAN;
    let (n, _) = c.after_eval(&s, &o);
    s = n;
    let (_, a) = c.after_eval(&s, &o);
    assert_eq!(a.len(), 1, "flat margin, no attention layers: a stall");
}

#[test]
fn an_arithmetic_breach_boosts_its_replay_source_until_trained_weights_recover() {
    let c = controller(0, 3.0);
    let s = ControllerState::default();
    let (s, _) = c.after_eval(&s, &obs(0.0, Outcome::Good));
    assert_eq!(s.probe_baseline.map(|b| b.arithmetic), Some(0.8));
    let mut bad = obs(0.0, Outcome::Breached);
    bad.arithmetic = 0.7; // −10 points > 5
    let (s, a) = c.after_eval(&s, &bad);
    assert_eq!(
        a,
        vec![Action::SetReplayBoost {
            source: 0,
            boost: 3.0,
            why: Why::ProbeBreach
        }]
    );
    assert_eq!(
        c.replay_weights([0.25, 0.25, 0.2, 0.3], &s),
        [0.75, 0.25, 0.2, 0.3]
    );
    // Still breached: no second action.
    let (s, a) = c.after_eval(&s, &bad);
    assert!(a.is_empty());
    // The rollback's re-measurement of GOOD weights is not a recovery of trained ones.
    let (s, a) = c.after_eval(&s, &obs(0.0, Outcome::Remeasured));
    assert!(a.is_empty());
    assert_eq!(s.replay_boost[0], 3.0);
    let (s, a) = c.after_eval(&s, &obs(0.0, Outcome::Clean));
    assert_eq!(
        a,
        vec![Action::SetReplayBoost {
            source: 0,
            boost: 1.0,
            why: Why::ProbeRecovered
        }]
    );
    assert_eq!(s.replay_boost, [1.0; 4]);
    // Perplexity up 5 % (> 3 %) boosts the text source.
    let mut ppl = obs(0.0, Outcome::Clean);
    ppl.metrics.perplexity = 10.5;
    let (_, a) = c.after_eval(&s, &ppl);
    assert_eq!(
        a,
        vec![Action::SetReplayBoost {
            source: 3,
            boost: 3.0,
            why: Why::ProbeBreach
        }]
    );
}

#[test]
fn state_round_trips_through_json() {
    let s = ControllerState {
        phase_index: 1,
        window: vec![(0.1, 0.2)],
        replay_boost: [3.0, 1.0, 1.0, 1.0],
        reference_step: Some(4),
        ..ControllerState::default()
    };
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<ControllerState>(&text).unwrap(), s);
}
