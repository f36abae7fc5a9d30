//! A near-duplicate filter: MinHash over word shingles, against a bounded window of recently
//! accepted scenarios and, permanently, every probe.
//!
//! The never-repeat ledger catches exact repeats; a dreaming model also writes paraphrases
//! of what it wrote before, or of the exemplars it was shown, and could write a probe's
//! situation back. Two texts are compared as *sets of word 3-shingles* (lower-cased runs of
//! letters and digits, three in a row): their Jaccard similarity |A ∩ B| / |A ∪ B| is
//! estimated by MinHash (Broder, "On the resemblance and containment of documents", 1997):
//! 128 hash functions `hᵢ(x) = (aᵢ·x + bᵢ) mod (2⁶¹ − 1)` over a 64-bit SHA-256 prefix of each
//! shingle; the share of positions where two signatures' minima agree estimates the Jaccard
//! similarity with standard error √(J(1−J)/128) ≤ 0.044. The `aᵢ, bᵢ` come from a ChaCha8
//! stream with a fixed seed, so signatures are identical on every platform and run (std's
//! `RandomState` is seeded per process and would not be).
//!
//! The threshold is measured, not guessed: renderings of the same template with other slot
//! values (the nearest thing to a paraphrase the library has) against renderings of different
//! templates; BENCHMARKS.md, "Near-duplicate threshold", has the distributions and the test
//! that prints them. Comparison is brute force (one signature against each kept one: 10⁴
//! kept × 128 = 1.3·10⁶ integer compares, about a millisecond), which a dream's seconds of
//! generation dwarf; LSH banding would only pay off at millions of kept signatures.
//!
//! This module does not know what a scenario means; [`scenario_text`] says which text of a
//! scenario is compared. It does not persist the window: after a restart it starts empty
//! (the ledger still refuses exact repeats) unless the caller re-feeds recent scenarios.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::example::Scenario;

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 3;
/// Hash functions per signature.
pub const NUM_HASHES: usize = 128;
/// The similarity at or above which a text is a near duplicate. Measured over the shipped
/// library (BENCHMARKS.md): different templates reach at most 0.078, renderings of one
/// template with other slot values 0.102–0.977 (5th percentile 0.266). 0.2 refuses 98.4 % of
/// the same-template pairs and sits more than 4 standard errors of the estimator
/// (√(0.08·0.92/128) ≈ 0.024) above the most similar pair of different templates.
pub const DEFAULT_THRESHOLD: f64 = 0.2;
/// Seed of the hash family. Changing it changes every signature (none is stored).
const SEED: u64 = 0x6472_6561_6d6c_6f6f; // "dreamloo"
/// The Mersenne prime 2⁶¹ − 1, the modulus of the hash family.
const PRIME: u64 = (1 << 61) - 1;

/// Lower-cased runs of letters and digits: "Don't rm -rf /tmp!" → don, t, rm, rf, tmp.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The 64-bit values of `text`'s shingles (a text shorter than a shingle is one shingle).
fn shingles(text: &str) -> Vec<u64> {
    let words = words(text);
    if words.is_empty() {
        return Vec::new();
    }
    let width = SHINGLE_WORDS.min(words.len());
    words
        .windows(width)
        .map(|w| {
            let mut h = Sha256::new();
            h.update(b"dreamloop.shingle.v1");
            for word in w {
                h.update((word.len() as u64).to_le_bytes());
                h.update(word.as_bytes());
            }
            let digest = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            u64::from_le_bytes(first)
        })
        .collect()
}

/// A text's MinHash signature; empty for a text without a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(Vec<u64>);

impl Signature {
    /// Estimated Jaccard similarity of the two shingle sets, in [0, 1]; 0 when either text
    /// had no word.
    pub fn similarity(&self, other: &Signature) -> f64 {
        if self.0.is_empty() || other.0.is_empty() {
            return 0.0;
        }
        let agree = self.0.iter().zip(&other.0).filter(|(a, b)| a == b).count();
        agree as f64 / self.0.len() as f64
    }
}

/// The hash family; one per filter (construction draws 256 numbers).
#[derive(Debug, Clone)]
pub struct MinHasher {
    /// Multipliers `aᵢ` in [1, p).
    a: Vec<u64>,
    /// Offsets `bᵢ` in [0, p).
    b: Vec<u64>,
}

impl Default for MinHasher {
    fn default() -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(SEED);
        let a = (0..NUM_HASHES)
            .map(|_| rng.random_range(1..PRIME))
            .collect();
        let b = (0..NUM_HASHES)
            .map(|_| rng.random_range(0..PRIME))
            .collect();
        MinHasher { a, b }
    }
}

impl MinHasher {
    /// The signature of `text`.
    pub fn signature(&self, text: &str) -> Signature {
        let shingles = shingles(text);
        if shingles.is_empty() {
            return Signature(Vec::new());
        }
        let mins = self
            .a
            .iter()
            .zip(&self.b)
            .map(|(&a, &b)| {
                shingles
                    .iter()
                    .map(|&x| {
                        let x = u128::from(x % PRIME);
                        ((u128::from(a) * x + u128::from(b)) % u128::from(PRIME)) as u64
                    })
                    .min()
                    .expect("shingles is not empty")
            })
            .collect();
        Signature(mins)
    }
}

/// What a near duplicate is near to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// A held-out probe: the text must never be trained on.
    Probe,
    /// A recently accepted scenario.
    Recent,
}

impl Against {
    /// `probe` or `recent`, for messages and labels.
    pub fn label(self) -> &'static str {
        match self {
            Against::Probe => "probe",
            Against::Recent => "recent",
        }
    }
}

/// The closest kept text at or above the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct NearDuplicate {
    /// Probe or recent scenario.
    pub against: Against,
    /// The id it was kept under (a probe's template id, a scenario's provenance).
    pub id: String,
    /// Estimated Jaccard similarity.
    pub similarity: f64,
}

/// The filter; see the module docs.
#[derive(Debug, Clone)]
pub struct NearDupFilter {
    /// The hash family.
    hasher: MinHasher,
    /// Similarity at or above which a text is refused.
    threshold: f64,
    /// Most recent scenarios kept.
    window: usize,
    /// Probe signatures, kept for the filter's lifetime.
    probes: Vec<(String, Signature)>,
    /// Accepted scenarios, oldest first, at most `window`.
    recent: VecDeque<(String, Signature)>,
}

impl NearDupFilter {
    /// A filter refusing similarity ≥ `threshold` against probes and the last `window`
    /// accepted texts.
    pub fn new(threshold: f64, window: usize) -> NearDupFilter {
        NearDupFilter {
            hasher: MinHasher::default(),
            threshold,
            window,
            probes: Vec::new(),
            recent: VecDeque::new(),
        }
    }

    /// Keeps a probe text for good.
    pub fn add_probe(&mut self, id: impl Into<String>, text: &str) {
        let signature = self.hasher.signature(text);
        self.probes.push((id.into(), signature));
    }

    /// The most similar kept text at or above the threshold, probes first: a text near a
    /// probe is reported as such even when a recent scenario is nearer.
    pub fn is_near_duplicate(&self, text: &str) -> Option<NearDuplicate> {
        let signature = self.hasher.signature(text);
        let best = |kept: &mut dyn Iterator<Item = &(String, Signature)>, against| {
            kept.map(|(id, s)| (id, signature.similarity(s)))
                .filter(|(_, sim)| *sim >= self.threshold)
                .max_by(|x, y| x.1.total_cmp(&y.1))
                .map(|(id, similarity)| NearDuplicate {
                    against,
                    id: id.clone(),
                    similarity,
                })
        };
        best(&mut self.probes.iter(), Against::Probe)
            .or_else(|| best(&mut self.recent.iter(), Against::Recent))
    }

    /// Remembers an accepted text; the oldest falls out past the window.
    pub fn remember(&mut self, id: impl Into<String>, text: &str) {
        if self.window == 0 {
            return;
        }
        let signature = self.hasher.signature(text);
        self.recent.push_back((id.into(), signature));
        while self.recent.len() > self.window {
            self.recent.pop_front();
        }
    }

    /// Checks `text`; remembers it when it is not a near duplicate.
    pub fn check_and_remember(&mut self, id: &str, text: &str) -> Option<NearDuplicate> {
        let found = self.is_near_duplicate(text);
        if found.is_none() {
            self.remember(id, text);
        }
        found
    }

    /// Probes and recent texts kept.
    pub fn kept(&self) -> (usize, usize) {
        (self.probes.len(), self.recent.len())
    }

    /// The threshold in force.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }
}

/// The text of a scenario that near-duplicate checks compare: every prompt message and the
/// preferred response (what the ledger key covers; the rejected response is left out for the
/// same reason, see [`Scenario::ledger_key`]).
pub fn scenario_text(s: &Scenario) -> String {
    let mut text = String::new();
    for m in &s.prompt {
        text.push_str(&m.content);
        text.push('\n');
    }
    text.push_str(&s.preferred);
    text
}

#[cfg(test)]
mod tests;
