use super::*;
use crate::eval::generations::{Generation, GenerationMeasures};
use crate::label::Phase;
use crate::rollback::{Adjustments, EvalMetrics, RollbackReason, Verdict};

fn entry(i: u64, flawed: f64) -> EvalEntry {
    EvalEntry {
        ts: format!("2026-12-08T03:00:0{i}.000Z"),
        run_id: "r".into(),
        wall_seconds: i as f64 * 60.0,
        step: i * 10,
        verdict: Verdict::Keep { breach: None },
        metrics: EvalMetrics {
            clear_accuracy: 0.5,
            clear_margin: 0.1,
            flawed_accuracy: flawed,
            flawed_margin: -0.2,
            perplexity: 12.0,
            attention_on_direction: f64::NAN,
            ablation_sensitivity: 0.0,
            general_accuracy: 0.5,
        },
        margin_per_token: [0.01, -0.02],
        arithmetic: [0.5, 0.1],
        code: [0.25, 0.0],
        attention_per_layer: vec![(3, 0.1)],
        eval_seconds: 1.0,
        lr: 1e-5,
        peak_lr: 1e-5,
        lr_factor: 1.0,
        lr_boost: 1.0,
        replay_ratio: 0.25,
        replay_weights: [0.25, 0.25, 0.2, 0.3],
        phase: Phase::Sft,
        phase_index: 0,
        examples_trained: i * 80,
        duty_cycle: 0.97,
        generation: None,
    }
}

#[test]
fn the_page_has_every_chart_the_marks_and_escaped_generations() {
    let evals = vec![entry(0, 0.25), entry(1, 0.5), entry(2, 0.75)];
    let events = vec![
        EventRecord {
            ts: "2026-12-08T03:00:00.500Z".into(),
            step: 10,
            event: Event::Rollback {
                from: 10,
                to: 0,
                reason: RollbackReason::Sycophancy,
                metrics: evals[1].metrics,
                baseline: None,
                adjustments: Adjustments {
                    lr_factor: 0.5,
                    replay_ratio: 0.4,
                },
            },
        },
        EventRecord {
            ts: "2026-12-08T03:00:01.500Z".into(),
            step: 15,
            event: Event::PhaseChange {
                from: "sft".into(),
                to: "dpo".into(),
                index: Some(1),
                reason: None,
                lr: Some(5e-7),
                reference_step: Some(15),
            },
        },
    ];
    let reply = |text: &str| Generation {
        id: "t1".into(),
        kind: GenKind::FlawedDirection,
        reply: text.into(),
        judged: Some("accept".into()),
        correct: None,
    };
    let measures = GenerationMeasures {
        mean_words: 3.0,
        push_back_flawed: 0.0,
        push_back_clear: 0.0,
        hedging: 0.0,
        distinct_1: 1.0,
        distinct_2: 1.0,
        arithmetic_exact: f64::NAN,
        code_pass: f64::NAN,
    };
    let gens = vec![
        GenerationsEntry {
            ts: evals[0].ts.clone(),
            run_id: "r".into(),
            step: 0,
            measures,
            generations: vec![reply("<b>sure</b> & done")],
        },
        GenerationsEntry {
            ts: evals[2].ts.clone(),
            run_id: "r".into(),
            step: 20,
            measures,
            generations: vec![reply("I would not do that.")],
        },
    ];
    let run = RunInfo {
        run_id: "20261208T030000Z-abcdef".into(),
        started_unix: 0,
    };
    let html = render("state", Some(&run), &evals, &gens, &events);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches(r#"<svg class="chart""#).count(), 8);
    assert!(!html.contains("<script"), "no script");
    assert!(
        !html.contains("http://") || html.matches("http://").count() == 8,
        "only the SVG namespace"
    );
    assert!(
        html.contains("&lt;b&gt;sure&lt;/b&gt; &amp; done"),
        "replies are escaped"
    );
    assert!(html.contains("I would not do that."));
    // The rollback falls at evaluation 1, the phase change at evaluation 2.
    assert!(html.contains("rollback → 0 (sycophancy)"));
    assert!(html.contains("→ dpo"));
    assert!(html.contains("20261208T030000Z-abcdef"));
    // Attention is undefined for this model: that chart's mean line is absent, its layer
    // line drawn; generation measures exist only where recorded: "no data".
    assert!(
        html.contains("no data"),
        "the generation chart of a run without them"
    );
}

#[test]
fn ticks_are_short() {
    assert_eq!(tick(0.25), "0.25");
    assert_eq!(tick(1e-5), "1.0e-5");
    assert_eq!(tick(324.9), "325");
    assert_eq!(tick(0.0), "0");
}
