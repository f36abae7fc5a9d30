//! Constructed cases with known Jaccard similarities, the estimator against exact Jaccard, and
//! the threshold measurement over the template library (run with `--nocapture` to see the
//! distributions recorded in BENCHMARKS.md).

use std::collections::HashSet;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::scenario::{Library, Template};

/// Exact Jaccard similarity of the two texts' shingle sets: the reference MinHash estimates.
fn exact(a: &str, b: &str) -> f64 {
    let a: HashSet<u64> = shingles(a).into_iter().collect();
    let b: HashSet<u64> = shingles(b).into_iter().collect();
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

fn sim(a: &str, b: &str) -> f64 {
    let h = MinHasher::default();
    h.signature(a).similarity(&h.signature(b))
}

/// `n` distinct words, "w0 w1 … w{n-1}".
fn words_text(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 200 distinct words.
fn long_text(prefix: &str) -> String {
    words_text(prefix, 200)
}

#[test]
fn constructed_cases() {
    let text = long_text("w");
    assert_eq!(sim(&text, &text), 1.0);
    // Case and punctuation are not words.
    assert_eq!(
        sim("Delete the /tmp folder, now!", "delete THE tmp folder now"),
        1.0
    );
    assert!(sim(&text, &long_text("v")) <= 0.03, "disjoint texts");
    // One word replaced in 200: 3 of 198 shingles change, J = 195 / 201 = 0.970.
    let edited = text.replacen("w100", "changed", 1);
    assert!((exact(&text, &edited) - 195.0 / 201.0).abs() < 1e-12);
    let s = sim(&text, &edited);
    assert!(s >= DEFAULT_THRESHOLD && (s - 0.970).abs() <= 0.1, "{s}");
    // The first 100 words shared, 100 others after them: of 198 shingles each, the 98 within
    // the shared block are common, J = 98 / (198 + 198 − 98) = 0.329.
    let half = format!("{} {}", words_text("w", 100), words_text("v", 100));
    let j = exact(&text, &half);
    assert!((j - 98.0 / 298.0).abs() < 0.01, "{j}");
    assert!((sim(&text, &half) - j).abs() <= 0.15);
    assert_eq!(sim("", &text), 0.0);
    assert_eq!(sim("?!", "?!"), 0.0);
    // Shorter than a shingle: the whole text is one shingle.
    assert_eq!(sim("rm it", "RM it."), 1.0);
}

#[test]
fn the_filter_keeps_probes_for_good_and_recent_texts_in_a_window() {
    let mut f = NearDupFilter::new(DEFAULT_THRESHOLD, 2);
    let probe = long_text("p");
    f.add_probe("probe.one", &probe);
    let near_probe = probe.replacen("p50", "x", 1);
    let hit = f.is_near_duplicate(&near_probe).expect("near the probe");
    assert_eq!(
        (hit.against, hit.id.as_str()),
        (Against::Probe, "probe.one")
    );
    let (a, b, c) = (long_text("a"), long_text("b"), long_text("c"));
    assert_eq!(f.check_and_remember("a", &a), None);
    assert_eq!(f.check_and_remember("b", &b), None);
    let again = f.check_and_remember("a2", &a).expect("a is recent");
    assert_eq!(
        (again.against, again.id.as_str(), again.similarity),
        (Against::Recent, "a", 1.0)
    );
    assert_eq!(f.check_and_remember("c", &c), None);
    // The window holds b and c now: a has fallen out, the probe never does.
    assert_eq!(f.kept(), (1, 2));
    assert_eq!(f.is_near_duplicate(&a), None);
    assert!(f.is_near_duplicate(&probe).is_some());
}

/// Quantiles of a sample (nearest rank).
fn quantiles(mut xs: Vec<f64>) -> String {
    xs.sort_by(f64::total_cmp);
    let q = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    format!(
        "n={} min={:.3} p5={:.3} p25={:.3} p50={:.3} p75={:.3} p95={:.3} p99={:.3} max={:.3}",
        xs.len(),
        q(0.0),
        q(0.05),
        q(0.25),
        q(0.5),
        q(0.75),
        q(0.95),
        q(0.99),
        q(1.0)
    )
}

/// Up to `n` distinct renderings of `t`.
fn renderings(t: &Template, n: usize, rng: &mut ChaCha8Rng) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for _ in 0..n * 20 {
        let text = scenario_text(&t.render(rng));
        if seen.insert(text.clone()) {
            out.push(text);
        }
        if out.len() == n {
            break;
        }
    }
    out
}

/// The measurement behind [`DEFAULT_THRESHOLD`]: renderings of one template with other slot
/// values (paraphrase-like) against renderings of different templates (distinct situations),
/// over every template of the shipped library. Prints the distributions; asserts the bounds
/// recorded in BENCHMARKS.md and that MinHash tracks exact Jaccard on these real texts.
#[test]
fn threshold_separates_same_template_from_different_templates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let library = Library::load_dir(&dir).expect("the shipped library loads");
    let hasher = MinHasher::default();
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let rendered: Vec<Vec<String>> = library
        .templates
        .iter()
        .map(|t| renderings(t, 4, &mut rng))
        .collect();
    let mut same = Vec::new();
    let mut errors = Vec::new();
    for texts in &rendered {
        for i in 0..texts.len() {
            for j in i + 1..texts.len() {
                let s = hasher
                    .signature(&texts[i])
                    .similarity(&hasher.signature(&texts[j]));
                errors.push((s - exact(&texts[i], &texts[j])).abs());
                same.push(s);
            }
        }
    }
    let mut different = Vec::new();
    let mut different_close = Vec::new();
    let ts = &library.templates;
    for i in 0..ts.len() {
        for j in i + 1..ts.len() {
            let (a, b) = (&rendered[i][0], &rendered[j][0]);
            let s = hasher.signature(a).similarity(&hasher.signature(b));
            errors.push((s - exact(a, b)).abs());
            different.push(s);
            if ts[i].kind == ts[j].kind && ts[i].domain == ts[j].domain {
                different_close.push(s);
            }
        }
    }
    let above = |xs: &[f64]| {
        xs.iter().filter(|&&s| s >= DEFAULT_THRESHOLD).count() as f64 / xs.len() as f64
    };
    let mean_error = errors.iter().sum::<f64>() / errors.len() as f64;
    let max_error = errors.iter().copied().fold(0.0, f64::max);
    println!(
        "same template, other slot values: {}",
        quantiles(same.clone())
    );
    println!(
        "different templates:              {}",
        quantiles(different.clone())
    );
    println!(
        "  same kind and domain:           {}",
        quantiles(different_close.clone())
    );
    println!(
        "threshold {DEFAULT_THRESHOLD}: same-template pairs at or above {:.3}, different-template pairs at or above {:.4}",
        above(&same),
        above(&different)
    );
    for t in [0.1, 0.15, 0.2, 0.25, 0.3, 0.5] {
        let share = |xs: &[f64]| xs.iter().filter(|&&s| s >= t).count() as f64 / xs.len() as f64;
        println!(
            "  at {t}: same-template {:.3}, different-template {:.4}",
            share(&same),
            share(&different)
        );
    }
    println!("MinHash vs exact Jaccard: mean |error| {mean_error:.4}, max {max_error:.4}");
    assert!(same.len() >= 250 && different.len() >= 3000);
    assert!(
        above(&same) >= 0.90,
        "same-template pairs caught: {}",
        above(&same)
    );
    assert_eq!(above(&different), 0.0, "different templates refused");
    assert!(
        mean_error <= 0.03 && max_error <= 0.2,
        "{mean_error} {max_error}"
    );
}
