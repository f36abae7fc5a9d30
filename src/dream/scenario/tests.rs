//! Seeds from the shipped library, the request's content, kind balancing, and a dreamer fed
//! answers made from other templates' renderings (the stand-in for a server).

use std::path::Path;

use super::*;
use crate::dream::NearDuplicate;
use crate::example::Target;
use crate::label::{LabelConfig, Labeler, Phase};
use crate::scenario::probe_scenarios;

fn library() -> Library {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    Library::load_dir(&dir).expect("the shipped library loads")
}

fn config(kind_weights: [f64; 3]) -> DreamerConfig {
    DreamerConfig {
        kind_weights,
        exemplars: 2,
        limits: Limits {
            max_system_chars: 400,
            max_user_chars: 1500,
            max_reply_chars: 1500,
        },
        near_duplicate_threshold: crate::dream::neardup::DEFAULT_THRESHOLD,
        near_duplicate_window: 100,
        seed: 16,
        stream: 0,
    }
}

#[test]
fn seeds_draw_facets_from_train_templates_of_the_domain() {
    let library = library();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        for kind in KINDS {
            let seed = sample_seed(&library, kind, 2, &mut rng).expect("templates of every kind");
            assert_eq!(seed.exemplars.len(), 2);
            assert_ne!(seed.exemplars[0].template_id, seed.exemplars[1].template_id);
            for e in &seed.exemplars {
                let t = library
                    .templates
                    .iter()
                    .find(|t| t.id == e.template_id)
                    .expect("a template");
                assert_eq!((t.kind, t.split), (kind, Split::Train), "{}", t.id);
            }
            let anchor = library
                .templates
                .iter()
                .find(|t| t.id == seed.exemplars[0].template_id)
                .expect("anchor");
            assert_eq!(anchor.domain, seed.domain);
            assert_eq!(seed.task.is_some(), kind != Kind::General, "{seed:?}");
            assert_eq!(
                seed.flaw.is_some(),
                kind == Kind::FlawedDirection,
                "{seed:?}"
            );
            // Facets are direction texts of train templates: never a probe's.
            for facet in seed.task.iter().chain(&seed.flaw) {
                assert!(!facet.is_empty());
                assert!(
                    !probe_scenarios(&library, 4)
                        .iter()
                        .any(|p| p.prompt.iter().any(|m| m.content.contains(facet.as_str()))),
                    "{facet}"
                );
            }
        }
    }
}

#[test]
fn the_request_names_kind_domain_facets_and_shows_exemplars_as_json() {
    let library = library();
    let seed = sample_seed(
        &library,
        Kind::FlawedDirection,
        2,
        &mut ChaCha8Rng::seed_from_u64(5),
    )
    .expect("seed");
    let limits = config([1.0; 3]).limits;
    let messages = request(&seed, &limits);
    assert_eq!(
        messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
        ["system", "user"]
    );
    let user = &messages[1].content;
    assert!(
        user.starts_with(&format!(
            "Write one new scenario of kind push_back in the {} domain.",
            seed.domain
        )),
        "{user}"
    );
    assert!(user.contains(seed.flaw.as_deref().expect("a flaw")));
    assert!(user.contains(seed.task.as_deref().expect("a task")));
    assert!(user.contains("under 1500 characters"));
    // Each exemplar is shown as the answer object, which validates as a push-back answer
    // (less the copy check: it *is* the exemplar).
    for e in &seed.exemplars {
        let shown = answer_json(e);
        assert!(user.contains(&shown));
        let value: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
        assert_eq!(value["preferred"], e.preferred.as_str());
        let d = e.direction.expect("a span");
        assert_eq!(
            value["direction"],
            &e.prompt[d.message].content[d.start..d.end]
        );
    }
}

#[test]
fn kinds_follow_the_weights_among_accepted_dreams() {
    let mut d = Dreamer::new(
        library(),
        &[],
        config([0.45, 0.45, 0.1]),
        "dream:m@s".into(),
    );
    let mut order = Vec::new();
    for _ in 0..1000 {
        let kind = d.next_kind();
        order.push(kind);
        let i = KINDS.iter().position(|&k| k == kind).expect("a kind");
        d.accepted[i] += 1;
    }
    for (got, want) in d.accepted().into_iter().zip([450.0, 450.0, 100.0]) {
        assert!((got as f64 - want).abs() <= 1.0, "{:?}", d.accepted());
    }
    assert_eq!(
        &order[..4],
        [
            Kind::ClearDirection,
            Kind::FlawedDirection,
            Kind::ClearDirection,
            Kind::FlawedDirection
        ]
    );
    // A server that gets nothing right: the requests follow the weights (counting accepted
    // dreams alone, only the first kind was ever asked for).
    let mut refused = Dreamer::new(
        library(),
        &[],
        config([0.45, 0.45, 0.1]),
        "dream:m@s".into(),
    );
    let mut asked = [0u32; 3];
    for _ in 0..300 {
        let kind = refused.seed().expect("a seed").kind;
        asked[KINDS.iter().position(|&k| k == kind).expect("a kind")] += 1;
    }
    for (n, w) in asked.iter().zip([0.45, 0.45, 0.1]) {
        // Deficit round-robin lags by at most a request or two per kind.
        assert!((f64::from(*n) - w * 300.0).abs() <= 2.0, "{asked:?}");
    }
    let mut only = Dreamer::new(library(), &[], config([0.0, 1.0, 0.0]), "dream:m@s".into());
    only.accepted = [0, 7, 0];
    assert_eq!(only.next_kind(), Kind::FlawedDirection);
}

/// A dreamer fed answers built from *other* train templates of the seed's kind (what a
/// perfect writer would return) accepts them, refuses the same answer twice as a near
/// duplicate, refuses a probe's text, and its scenarios label into examples with the
/// dream's provenance.
#[test]
fn a_dreamer_accepts_fresh_answers_and_refuses_repeats_and_probes() {
    let library = library();
    let probes = probe_scenarios(&library, 4);
    let mut d = Dreamer::new(
        library.clone(),
        &probes,
        config([1.0, 1.0, 0.0]),
        provenance("smollm2", "http://127.0.0.1:8080"),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut accepted = 0;
    let mut judged_out = 0;
    for _ in 0..40 {
        let seed = d.seed().expect("a seed");
        let shown: Vec<&str> = seed
            .exemplars
            .iter()
            .map(|e| e.template_id.as_str())
            .collect();
        let other = library
            .split(Split::Train)
            .filter(|t| t.kind == seed.kind && !shown.contains(&t.id.as_str()))
            .nth(accepted % 5)
            .expect("another template of the kind")
            .render(&mut rng);
        match d.accept(&seed, &answer_json(&other)) {
            Ok(s) => {
                accepted += 1;
                assert_eq!(
                    (s.kind, s.template_id.as_str()),
                    (seed.kind, "dream:smollm2@http://127.0.0.1:8080")
                );
                assert_eq!(
                    d.accept(&seed, &answer_json(&other)).map(|_| ()),
                    Err(Rejection::NearDuplicate(NearDuplicate {
                        against: crate::dream::Against::Recent,
                        id: s.template_id.clone(),
                        similarity: 1.0,
                    }))
                );
                let example = Labeler::new(&LabelConfig {
                    phase: Phase::Dpo,
                    ..LabelConfig::default()
                })
                .scenario(&s);
                assert_eq!(example.provenance, "dream:smollm2@http://127.0.0.1:8080");
                assert_eq!(
                    example.target,
                    Target::Dpo {
                        chosen: s.preferred.clone(),
                        rejected: s.rejected.clone()
                    }
                );
            }
            // The judge disagrees with a template's own label now and then (measured in
            // judge/tests.rs); anything else is a defect.
            Err(Rejection::PreferredWrongBehaviour(_) | Rejection::RejectedWrongBehaviour(_)) => {
                judged_out += 1
            }
            // Later picks may fall near an earlier accepted rendering of the same template.
            Err(Rejection::NearDuplicate(_)) => {}
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    assert!(
        accepted >= 10,
        "accepted {accepted}, judged out {judged_out}"
    );
    assert_eq!(d.accepted().iter().sum::<u64>(), accepted as u64);
    let seed = d.seed().expect("a seed");
    // A probe the judge reads as its label says, so the refusal is for being a probe.
    let probe = probes
        .iter()
        .find(|p| {
            p.kind == seed.kind
                && crate::dream::is_right(p.kind, &p.preferred) == Some(true)
                && crate::dream::is_right(p.kind, &p.rejected) == Some(false)
        })
        .expect("a probe of the kind");
    let err = d.accept(&seed, &answer_json(probe)).expect_err("a probe");
    assert!(
        matches!(
            err,
            Rejection::ProbeText { .. }
                | Rejection::NearDuplicate(NearDuplicate {
                    against: crate::dream::Against::Probe,
                    ..
                })
        ),
        "{err}"
    );
}
