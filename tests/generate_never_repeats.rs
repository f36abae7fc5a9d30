//! The generator's never-repeat guarantee: 100,000 training scenarios with no repeated
//! hash, and after a restart (same seed, same ledger) none of them comes back. Run on
//! the test templates and on the bundled library in `scenarios/`. Also: probe templates
//! never reach training output.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use dreamloop::example::{ExampleHash, Kind};
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::scenario::{Generator, GeneratorConfig, Ledger, LedgerPolicy, Library, Split};

fn fixture_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/templates")
}

fn generator(library: &Library, ledger_dir: &Path, seed: u64) -> Generator {
    let (ledger, recovery) =
        Ledger::open(ledger_dir, LedgerPolicy::default()).expect("ledger opens");
    assert!(!recovery.repaired(), "{recovery:?}");
    let config = GeneratorConfig {
        seed,
        ..GeneratorConfig::default()
    };
    Generator::new(library.clone(), ledger, config).expect("library has train templates")
}

/// Generates `n` scenarios, checking each is new to `seen` and not a probe; also
/// labels each both as an SFT example and as a DPO pair and checks those are new too
/// (so examples never repeat whatever the phase).
fn generate_fresh(
    g: &mut Generator,
    n: usize,
    seen: &mut HashSet<ExampleHash>,
    probe_ids: &HashSet<String>,
) {
    let label = |phase| {
        Labeler::new(&LabelConfig {
            phase,
            ..LabelConfig::default()
        })
    };
    let (sft, dpo) = (label(Phase::Sft), label(Phase::Dpo));
    for i in 0..n {
        let s = g.next().expect("fresh scenario");
        assert!(
            seen.insert(s.hash),
            "scenario {i} repeats hash {:?} ({})",
            s.hash,
            s.template_id
        );
        assert!(
            seen.insert(s.ledger_key()),
            "scenario {i} repeats its prompt and preferred response"
        );
        assert!(
            !probe_ids.contains(&s.template_id),
            "probe template {} sampled for training",
            s.template_id
        );
        assert!(
            seen.insert(sft.scenario(&s).hash()),
            "SFT example {i} repeats"
        );
        assert!(
            seen.insert(dpo.scenario(&s).hash()),
            "DPO example {i} repeats"
        );
    }
}

fn never_repeats(library: &Library, n: usize, after_restart: usize) {
    let probe_ids: HashSet<String> = library.split(Split::Probe).map(|t| t.id.clone()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = HashSet::new();
    let duplicates_first = {
        let mut g = generator(library, dir.path(), 7);
        generate_fresh(&mut g, n, &mut seen, &probe_ids);
        assert_eq!(g.generated(), n as u64);
        assert_eq!(g.position(), n as u64);
        g.duplicates_skipped()
    };
    // Restart: a new generator with the same seed over the reopened ledger.
    let mut g = generator(library, dir.path(), 7);
    assert_eq!(g.position(), n as u64, "the ledger kept every hash");
    generate_fresh(&mut g, after_restart, &mut seen, &probe_ids);
    assert_eq!(g.position(), (n + after_restart) as u64);
    println!(
        "{} templates: {n} + {after_restart} scenarios, {duplicates_first} + {} duplicates skipped",
        library.templates.len(),
        g.duplicates_skipped()
    );
}

#[test]
fn test_templates_never_repeat_across_a_restart() {
    let library = Library::load_dir(&fixture_templates()).expect("fixtures parse");
    never_repeats(&library, 100_000, 20_000);
}

#[test]
fn restart_with_another_seed_also_never_repeats() {
    let library = Library::load_dir(&fixture_templates()).expect("fixtures parse");
    let probe_ids = HashSet::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seen = HashSet::new();
    for seed in [1, 2, 3, 1] {
        let mut g = generator(&library, dir.path(), seed);
        generate_fresh(&mut g, 5_000, &mut seen, &probe_ids);
    }
}

#[test]
fn bundled_library_never_repeats() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let library = match Library::load_dir(&dir) {
        Ok(library) => library,
        Err(e) => panic!("the bundled library has errors:\n{e}"),
    };
    if library.templates.is_empty() {
        println!(
            "note: {} holds no templates yet; nothing to check",
            dir.display()
        );
        return;
    }
    let train = |kind| {
        library
            .split(Split::Train)
            .filter(|t| t.kind == kind)
            .count()
    };
    assert!(
        train(Kind::ClearDirection) >= 30,
        "{} clear_direction train templates",
        train(Kind::ClearDirection)
    );
    assert!(
        train(Kind::FlawedDirection) >= 30,
        "{} flawed_direction train templates",
        train(Kind::FlawedDirection)
    );
    assert!(library.templates.len() >= 60);
    never_repeats(&library, 100_000, 10_000);
}

#[test]
fn probes_are_deterministic_and_never_trained_on() {
    let mut sources: Vec<(PathBuf, String)> = std::fs::read_dir(fixture_templates())
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .map(|p| {
            let src = std::fs::read_to_string(&p).expect("read");
            (p, src)
        })
        .collect();
    // A train template with exactly the text of a probe template: every rendering of it
    // is a probe scenario, so the generator must never return one.
    let twin = std::fs::read_to_string(fixture_templates().join("probes.toml"))
        .expect("read")
        .replace("test.probe.clear", "test.twin.clear")
        .replace("test.probe.flawed", "test.twin.flawed")
        .replace("split = \"probe\"", "split = \"train\"");
    sources.push((PathBuf::from("twin.toml"), twin));
    let library = Library::from_sources(sources.iter().map(|(p, s)| (p.as_path(), s.as_str())))
        .expect("parses");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = generator(&library, dir.path(), 11);
    let probes = g.probes();
    // 2 probe templates × 4 samples; each has exactly 4 combinations.
    assert_eq!(probes.len(), 8);
    assert!(probes
        .iter()
        .all(|p| p.template_id.starts_with("test.probe.")));
    assert_eq!(
        probes,
        generator(&library, tempfile::tempdir().expect("tempdir").path(), 99).probes()
    );
    let probe_hashes: HashSet<ExampleHash> = probes.iter().map(|p| p.hash).collect();

    for i in 0..30_000 {
        let s = match i % 3 {
            0 => g.next(),
            1 => g.next_of(Kind::ClearDirection),
            _ => g.next_of(Kind::FlawedDirection),
        }
        .expect("fresh scenario");
        assert!(
            !probe_hashes.contains(&s.hash),
            "probe scenario {:?} in training output",
            s.template_id
        );
        assert!(
            !s.template_id.starts_with("test.probe."),
            "{}",
            s.template_id
        );
        assert!(
            !s.template_id.starts_with("test.twin."),
            "a probe-identical rendering was trained: {}",
            s.template_id
        );
    }
    assert!(g.duplicates_skipped() > 0);
}
