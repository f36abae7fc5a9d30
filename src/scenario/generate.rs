//! The generator: fresh training scenarios from the template library, never repeating.
//!
//! Each call picks a train template uniformly (optionally of one kind), renders it with
//! a seeded ChaCha8 stream, and keeps the result only if its ledger key (prompt and
//! preferred response, see [`Scenario::ledger_key`]) is neither in the never-repeat
//! ledger nor among the probe scenarios' keys; kept keys enter the ledger before the
//! scenario is returned. Probe templates are never sampled here: `probes()` renders
//! them separately, deterministically, for the monitor.
//!
//! The RNG stream is chosen by the ledger position at construction, so a restart with
//! the same seed continues with new draws instead of re-drawing (and skipping) the
//! whole history; the ledger, not the RNG, is what guarantees no repeats.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::ledger::{Ledger, LedgerError};
use super::template::{Library, Split, Template};
use crate::example::{Kind, Scenario};

/// Why no scenario came out.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The library has no train templates (of the requested kind).
    #[error("no train templates{}", kind.map(|k| format!(" of kind {}", k.as_str())).unwrap_or_default())]
    NoTemplates {
        /// The requested kind, if one was.
        kind: Option<Kind>,
    },
    /// Every draw in a row was a duplicate: the templates are (nearly) exhausted.
    #[error("{attempts} draws in a row were duplicates{}; the template library is exhausted — add slot values or templates", kind.map(|k| format!(" (kind {})", k.as_str())).unwrap_or_default())]
    Exhausted {
        /// The requested kind, if one was.
        kind: Option<Kind>,
        /// How many consecutive duplicates were drawn.
        attempts: u32,
    },
    /// The ledger could not record the new hash.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Generator settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// Seed of the sampling RNG (the stream is the ledger position, see module docs).
    pub seed: u64,
    /// Consecutive duplicate draws before giving up with `Exhausted`.
    pub max_attempts: u32,
    /// Renderings per probe template in `probes()`.
    pub probe_samples: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 0,
            max_attempts: 10_000,
            probe_samples: 4,
        }
    }
}

/// Consecutive duplicates after which a template is retired. A template with 1 % of its
/// renderings still fresh survives this streak with odds 1 − 0.99¹⁰⁰⁰ ≈ 1 − 4·10⁻⁵.
const RETIRE_AFTER: u32 = 1000;

/// Yields fresh train scenarios; see the module docs.
#[derive(Debug)]
pub struct Generator {
    /// All templates, train and probe.
    library: Library,
    /// Indices of train templates per kind (clear, flawed, general) and overall.
    train: [Vec<usize>; 4],
    /// The never-repeat set; every returned scenario's hash is in it.
    ledger: Ledger,
    /// The sampling stream.
    rng: ChaCha8Rng,
    /// Ledger keys of the probe scenarios, refused for training even if a train
    /// template happens to render the same text.
    probe_hashes: HashSet<u64>,
    /// Settings.
    config: GeneratorConfig,
    /// Draws skipped because the ledger (or the probe set) already held them.
    duplicates: u64,
    /// Consecutive duplicate draws per template; a long streak retires the template.
    streaks: Vec<u32>,
    /// Scenarios returned.
    generated: u64,
}

fn kind_slot(kind: Kind) -> usize {
    match kind {
        Kind::ClearDirection => 0,
        Kind::FlawedDirection => 1,
        Kind::General => 2,
    }
}

impl Generator {
    /// A generator over `library`'s train templates, deduplicating against `ledger`.
    pub fn new(
        library: Library,
        ledger: Ledger,
        config: GeneratorConfig,
    ) -> Result<Generator, GenerateError> {
        let mut train: [Vec<usize>; 4] = Default::default();
        for (i, t) in library.templates.iter().enumerate() {
            if t.split == Split::Train {
                train[kind_slot(t.kind)].push(i);
                train[3].push(i);
            }
        }
        if train[3].is_empty() {
            return Err(GenerateError::NoTemplates { kind: None });
        }
        let probe_hashes = probe_scenarios(&library, config.probe_samples)
            .iter()
            .map(|s| s.ledger_key().0)
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(ledger.position());
        let streaks = vec![0; library.templates.len()];
        Ok(Generator {
            streaks,
            library,
            train,
            ledger,
            rng,
            probe_hashes,
            config,
            duplicates: 0,
            generated: 0,
        })
    }

    /// The next fresh train scenario of any kind.
    // Not `Iterator::next`: a generator can fail (ledger I/O, exhaustion) and an
    // iterator would have to swallow or panic on that.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Scenario, GenerateError> {
        self.draw(None)
    }

    /// The next fresh train scenario of `kind`.
    pub fn next_of(&mut self, kind: Kind) -> Result<Scenario, GenerateError> {
        self.draw(Some(kind))
    }

    fn draw(&mut self, kind: Option<Kind>) -> Result<Scenario, GenerateError> {
        let pool = kind.map_or(3, kind_slot);
        if self
            .library
            .split(Split::Train)
            .all(|t| kind.is_some_and(|k| t.kind != k))
        {
            return Err(GenerateError::NoTemplates { kind });
        }
        for _ in 0..self.config.max_attempts {
            let candidates = &self.train[pool];
            if candidates.is_empty() {
                break;
            }
            let index = candidates[self.rng.random_range(0..candidates.len())];
            let scenario = self.library.templates[index].render(&mut self.rng);
            let key = scenario.ledger_key();
            if self.probe_hashes.contains(&key.0) || !self.ledger.insert(key)? {
                self.duplicates += 1;
                self.streaks[index] += 1;
                if self.streaks[index] >= RETIRE_AFTER {
                    self.retire(index);
                }
                continue;
            }
            self.streaks[index] = 0;
            self.generated += 1;
            return Ok(scenario);
        }
        Err(GenerateError::Exhausted {
            kind,
            attempts: self.config.max_attempts,
        })
    }

    /// Stops sampling a template whose renderings are (nearly) all in the ledger, so
    /// its draws stop wasting time; it stays retired for this generator's lifetime.
    fn retire(&mut self, index: usize) {
        for pool in &mut self.train {
            pool.retain(|&i| i != index);
        }
        let t = &self.library.templates[index];
        tracing::info!(template = %t.id, source = %t.source, streak = RETIRE_AFTER, "Template exhausted: every recent rendering was a duplicate; no longer sampled.");
    }

    /// The probe scenarios (held out; never trained on). Deterministic: the same library
    /// gives the same probes in the same order, independent of seed and ledger.
    pub fn probes(&self) -> Vec<Scenario> {
        probe_scenarios(&self.library, self.config.probe_samples)
    }

    /// Draws skipped as duplicates so far (for the `…_duplicates_total` metric).
    pub fn duplicates_skipped(&self) -> u64 {
        self.duplicates
    }

    /// Scenarios returned so far.
    pub fn generated(&self) -> u64 {
        self.generated
    }

    /// The ledger position, for checkpoints.
    pub fn position(&self) -> u64 {
        self.ledger.position()
    }

    /// The ledger (for `sync()` before a step, or metrics).
    pub fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    /// The ledger, read-only.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The template library.
    pub fn library(&self) -> &Library {
        &self.library
    }
}

/// Renders `samples` distinct scenarios per probe template, each template with its own
/// RNG seeded from its id, so adding a template does not change the others' probes.
pub fn probe_scenarios(library: &Library, samples: usize) -> Vec<Scenario> {
    let mut out = Vec::new();
    for t in library.split(Split::Probe) {
        out.extend(render_distinct(t, samples));
    }
    out
}

fn render_distinct(t: &Template, samples: usize) -> Vec<Scenario> {
    let digest = Sha256::digest(t.id.as_bytes());
    let seed: [u8; 32] = digest.into();
    let mut rng = ChaCha8Rng::from_seed(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    // A template with fewer combinations than `samples` yields what it has.
    for _ in 0..samples.saturating_mul(20) {
        if out.len() == samples {
            break;
        }
        let s = t.render(&mut rng);
        if seen.insert(s.hash) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const TINY: &str = r#"
[[template]]
id = "tiny.clear"
kind = "clear_direction"
user = "[[Use {{n}} spaces.]]"
preferred = "Using {{n}} spaces."
rejected = "Tabs are better."
[template.slots]
n = ["2", "4", "8"]

[[template]]
id = "tiny.probe"
kind = "flawed_direction"
split = "probe"
user = "[[Delete {{p}}.]]"
preferred = "Not {{p}}: no backup."
rejected = "Deleted."
[template.slots]
p = ["/", "/etc"]
"#;

    fn tiny() -> Generator {
        let library = Library::from_sources([(Path::new("tiny.toml"), TINY)]).expect("parses");
        Generator::new(library, Ledger::in_memory(), GeneratorConfig::default())
            .expect("has train templates")
    }

    #[test]
    fn exhaustion_is_an_error_after_every_rendering() {
        let mut g = tiny();
        let mut got: Vec<String> = (0..3)
            .map(|_| g.next().expect("fresh").prompt[0].content.clone())
            .collect();
        got.sort();
        assert_eq!(got, ["Use 2 spaces.", "Use 4 spaces.", "Use 8 spaces."]);
        let err = g.next().expect_err("exhausted");
        assert!(
            matches!(err, GenerateError::Exhausted { kind: None, .. }),
            "{err}"
        );
        assert!(g.duplicates_skipped() >= u64::from(RETIRE_AFTER));
        assert_eq!(g.generated(), 3);
        assert_eq!(g.position(), 3);
    }

    #[test]
    fn kinds_without_train_templates_are_reported() {
        let mut g = tiny();
        let err = g
            .next_of(Kind::FlawedDirection)
            .expect_err("only a probe is flawed");
        assert_eq!(
            err.to_string(),
            "no train templates of kind flawed_direction"
        );
        assert_eq!(g.probes().len(), 2);
        assert!(g.probes().iter().all(|p| p.template_id == "tiny.probe"));
    }
}
