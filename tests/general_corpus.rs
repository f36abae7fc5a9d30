//! General replay: corpus chunks come only from `corpus/train/`, never from the held-out
//! texts, which are readable separately for the monitor; the replay stream mixes all
//! sources and is reproducible from its seed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use dreamloop::example::{Kind, Target};
use dreamloop::general::{load_heldout, Corpus, GeneralConfig, GeneralReplay};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn completion(target: &Target) -> &str {
    match target {
        Target::Sft { completion } => completion,
        Target::Dpo { .. } => panic!("general examples are SFT"),
    }
}

#[test]
fn chunks_come_from_train_text_only() {
    let corpus = Corpus::load_train(&fixture_root()).expect("corpus");
    assert_eq!(corpus.len(), 2);
    let train: Vec<String> = ["bread.txt", "lighthouses.txt"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(fixture_root().join("corpus/train").join(f)).expect("read")
        })
        .collect();
    let heldout = load_heldout(&fixture_root()).expect("heldout");
    assert_eq!(heldout.len(), 1);
    assert!(heldout[0].text.starts_with("Glaciers form"));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut distinct = HashSet::new();
    for _ in 0..500 {
        let e = corpus.chunk(&mut rng, 12, 40).expect("non-empty corpus");
        let head = e.prompt[0]
            .content
            .split_once("\n\n")
            .expect("instruction, blank line, text")
            .1;
        let tail = completion(&e.target);
        let doc = train
            .iter()
            .find(|t| t.contains(head))
            .expect("head is train text");
        assert!(
            doc.contains(tail),
            "tail {tail:?} is from the same document"
        );
        assert!(!heldout[0].text.contains(tail) && !tail.contains("Glaciers"));
        assert!(
            e.provenance.contains("corpus/train/") && e.provenance.contains(".txt:"),
            "{}",
            e.provenance
        );
        distinct.insert(e.hash());
    }
    // Random windows rarely coincide.
    assert!(distinct.len() > 450, "{}", distinct.len());
}

#[test]
fn replay_mixes_sources_reproducibly() {
    let corpus = Corpus::load_train(&fixture_root()).expect("corpus");
    let mut a = GeneralReplay::new(corpus.clone(), 42, GeneralConfig::default());
    let mut b = GeneralReplay::new(corpus, 42, GeneralConfig::default());
    let mut sources = HashSet::new();
    for _ in 0..400 {
        let e = a.next_example();
        assert_eq!(e, b.next_example());
        assert_eq!(e.kind, Kind::General);
        let source = if e.provenance.contains(".txt:") {
            "corpus"
        } else {
            e.provenance.as_str()
        };
        sources.insert(source.to_string());
    }
    let mut sources: Vec<String> = sources.into_iter().collect();
    sources.sort();
    assert_eq!(
        sources,
        [
            "corpus",
            "general:arithmetic",
            "general:code",
            "general:reasoning"
        ]
    );
}

#[test]
fn missing_corpus_falls_back_to_procedural_items() {
    let corpus = Corpus::load_train(Path::new("/nonexistent")).expect("missing dir is empty");
    assert!(corpus.is_empty());
    let mut replay = GeneralReplay::new(corpus, 1, GeneralConfig::default());
    for _ in 0..100 {
        assert!(replay.next_example().provenance.starts_with("general:"));
    }
}

#[test]
fn bundled_heldout_is_not_in_the_train_corpus() {
    let scenarios = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let heldout = load_heldout(&scenarios).expect("readable");
    let train = Corpus::load_train(&scenarios).expect("readable");
    if heldout.is_empty() || train.is_empty() {
        println!("note: no bundled corpus under {} yet", scenarios.display());
        return;
    }
    let train_texts: Vec<String> = std::fs::read_dir(scenarios.join("corpus/train"))
        .expect("train dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "txt"))
        .map(|e| std::fs::read_to_string(e.path()).expect("read"))
        .collect();
    for h in &heldout {
        // No held-out paragraph appears verbatim in the training text.
        for para in h.text.split("\n\n").map(str::trim).filter(|p| p.len() > 80) {
            assert!(
                !train_texts.iter().any(|t| t.contains(para)),
                "{} paragraph is in the train corpus",
                h.path.display()
            );
        }
    }
}
