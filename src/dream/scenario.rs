//! The dreaming request: a [`Seed`] sampled from the template library, the chat messages
//! that ask a server for a new scenario from it, and the [`Dreamer`] that ties seed, request,
//! validation (`validate.rs`) and the near-duplicate filter (`neardup.rs`) together for the
//! dreamer actor.
//!
//! A seed is a kind (accept = `clear_direction`, push back = `flawed_direction`, general),
//! a domain, facets drawn from *different* train templates of that domain (a persona: a
//! template's rendered system prompt; a task: a clear template's direction; for push back, a
//! flaw: a flawed template's direction), and one or two rendered train templates of the kind
//! as exemplars of the JSON answer. Mixing facets of different templates is what makes the
//! situation new; the exemplars show the form, and a copy of them is refused. Probe templates
//! are never used: they are held out, and their text is refused in answers.
//!
//! This module does no I/O: the actor sends [`Dreamer::request`]'s messages with the client
//! (`client.rs`, JSON mode) and hands the answer to [`Dreamer::accept`]; the never-repeat
//! ledger (exact repeats) stays the caller's, as for templates.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::neardup::{scenario_text, MinHasher, NearDupFilter};
use super::validate::{validate, Checks, Limits, ProbeGuard, Rejection};
use crate::example::{Kind, Message, Scenario};
use crate::scenario::{Library, Split, Template};

/// The name of a kind in the dreaming prompt and in labels: accept, push_back, general.
pub fn behaviour(kind: Kind) -> &'static str {
    match kind {
        Kind::ClearDirection => "accept",
        Kind::FlawedDirection => "push_back",
        Kind::General => "general",
    }
}

/// The provenance of a dreamed example: `dream:{model}@{server}`.
pub fn provenance(model: &str, server: &str) -> String {
    format!("dream:{model}@{server}")
}

/// What a dream is asked to be about.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    /// The behaviour the preferred reply must show.
    pub kind: Kind,
    /// The domain (code, shell, data, writing, planning, general).
    pub domain: String,
    /// A system prompt of the domain, for the assistant's role.
    pub persona: Option<String>,
    /// A sound direction of the domain, as the sort of task to build on (not for general).
    pub task: Option<String>,
    /// A flawed direction of the domain, as the sort of flaw to embed (push back only).
    pub flaw: Option<String>,
    /// Rendered train templates of the kind, shown as examples of the answer's form.
    pub exemplars: Vec<Scenario>,
}

/// No seed can be drawn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no train templates of kind {} to seed a dream", .kind.as_str())]
pub struct SeedError {
    /// The kind asked for.
    pub kind: Kind,
}

/// The direction text of a rendered scenario, if it has one.
fn direction_text(s: &Scenario) -> Option<&str> {
    let d = s.direction?;
    s.prompt.get(d.message)?.content.get(d.start..d.end)
}

/// A random element of `pool` other than `avoid` when there is one.
fn pick<'a, R: Rng>(
    pool: &[&'a Template],
    avoid: Option<&str>,
    rng: &mut R,
) -> Option<&'a Template> {
    let others: Vec<&Template> = pool
        .iter()
        .copied()
        .filter(|t| Some(t.id.as_str()) != avoid)
        .collect();
    let from = if others.is_empty() { pool } else { &others };
    (!from.is_empty()).then(|| from[rng.random_range(0..from.len())])
}

/// Draws a seed of `kind` from the library's train templates, with up to `exemplars`
/// exemplars (at least one).
pub fn sample_seed<R: Rng>(
    library: &Library,
    kind: Kind,
    exemplars: usize,
    rng: &mut R,
) -> Result<Seed, SeedError> {
    let train: Vec<&Template> = library.split(Split::Train).collect();
    let of_kind: Vec<&Template> = train.iter().copied().filter(|t| t.kind == kind).collect();
    let anchor = pick(&of_kind, None, rng).ok_or(SeedError { kind })?;
    let domain = anchor.domain.clone();
    let in_domain = |k: Option<Kind>| -> Vec<&Template> {
        train
            .iter()
            .copied()
            .filter(|t| t.domain == domain && k.is_none_or(|k| t.kind == k))
            .collect()
    };
    let persona = pick(&in_domain(None), Some(&anchor.id), rng)
        .map(|t| t.render(rng))
        .and_then(|s| {
            s.prompt
                .iter()
                .find(|m| m.role == "system")
                .map(|m| m.content.clone())
        });
    let facet = |k: Kind, rng: &mut R| {
        pick(&in_domain(Some(k)), Some(&anchor.id), rng)
            .map(|t| t.render(rng))
            .and_then(|s| direction_text(&s).map(str::to_string))
    };
    let (task, flaw) = match kind {
        Kind::General => (None, None),
        Kind::ClearDirection => (facet(Kind::ClearDirection, rng), None),
        Kind::FlawedDirection => (
            facet(Kind::ClearDirection, rng),
            facet(Kind::FlawedDirection, rng),
        ),
    };
    let mut chosen = vec![anchor];
    while chosen.len() < exemplars.max(1) {
        let rest: Vec<&Template> = of_kind
            .iter()
            .copied()
            .filter(|t| chosen.iter().all(|c| c.id != t.id))
            .collect();
        let Some(t) = pick(&rest, None, rng) else {
            break;
        };
        chosen.push(t);
    }
    let exemplars = chosen.iter().map(|t| t.render(rng)).collect();
    Ok(Seed {
        kind,
        domain,
        persona,
        task,
        flaw,
        exemplars,
    })
}

/// The answer form of one scenario, as the exemplars show it.
fn answer_json(s: &Scenario) -> String {
    let system = s
        .prompt
        .iter()
        .find(|m| m.role == "system")
        .map_or("", |m| m.content.as_str());
    let user = s
        .prompt
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    let value = json!({
        "system": system,
        "user": user,
        "direction": direction_text(s).unwrap_or(""),
        "preferred": s.preferred,
        "rejected": s.rejected,
    });
    serde_json::to_string_pretty(&value).expect("a map of strings serializes")
}

/// What each kind asks of the two replies.
fn kind_rules(kind: Kind) -> &'static str {
    match kind {
        Kind::ClearDirection => "Kind accept: the user's direction is sound. The preferred reply does exactly what was asked, nothing more, and shows the result. The rejected reply does not do it: it second-guesses, suggests alternatives or asks questions instead.",
        Kind::FlawedDirection => "Kind push_back: the user's direction has a real flaw (unsafe, wrong or self-defeating) that a competent colleague would catch. The preferred reply names the problem, says why it matters and offers a better way. The rejected reply complies without a word of warning.",
        Kind::General => "Kind general: an ordinary technical or reasoning question with no direction to follow or refuse. The preferred reply is correct and clear; the rejected reply contains a real error. \"direction\" is the empty string.",
    }
}

/// The chat messages asking for one new scenario from `seed`.
pub fn request(seed: &Seed, limits: &Limits) -> Vec<Message> {
    let system = "You write training scenarios for an AI assistant. A scenario is one \
        situation: a system prompt, a user message containing one direction (the sentence \
        that tells the assistant what to do), a preferred assistant reply and a rejected one. \
        Answer with a single JSON object and nothing else, with the string fields \"system\", \
        \"user\", \"direction\", \"preferred\" and \"rejected\".";
    let mut user = format!(
        "Write one new scenario of kind {} in the {} domain.\n\n{}\n\n",
        behaviour(seed.kind),
        seed.domain,
        kind_rules(seed.kind)
    );
    let facets: Vec<String> = [
        seed.persona
            .as_ref()
            .map(|p| format!("- the assistant's role: {p}")),
        seed.task
            .as_ref()
            .map(|t| format!("- a task of this sort: {t}")),
        seed.flaw
            .as_ref()
            .map(|f| format!("- a flaw of this sort to embed in the direction: {f}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !facets.is_empty() {
        user.push_str(
            "Build on these facets, changing names, details and wording (do not copy them):\n",
        );
        user.push_str(&facets.join("\n"));
        user.push_str("\n\n");
    }
    if seed.kind != Kind::General {
        user.push_str(
            "\"direction\" must be copied exactly, character for character, from \"user\".\n",
        );
    }
    user.push_str(&format!(
        "Keep \"user\" under {} characters and each reply under {} characters.\n\n\
         Examples of the form (other situations: write a different one):\n",
        limits.max_user_chars, limits.max_reply_chars
    ));
    for e in &seed.exemplars {
        user.push_str(&answer_json(e));
        user.push('\n');
    }
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The dreamer's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DreamerConfig {
    /// Relative weights of accept, push-back and general dreams among the *accepted* ones.
    pub kind_weights: [f64; 3],
    /// Exemplars per request (1 or 2).
    pub exemplars: usize,
    /// Length bounds of an answer.
    pub limits: Limits,
    /// Near-duplicate threshold (also the exemplar-copy threshold).
    pub near_duplicate_threshold: f64,
    /// Recent accepted dreams the near-duplicate filter keeps.
    pub near_duplicate_window: usize,
    /// Seed of the sampling stream.
    pub seed: u64,
    /// Stream of the sampling RNG (the ledger position, as for the template generator, so a
    /// restart does not redraw the same seeds).
    pub stream: u64,
}

/// The kinds in the order of `kind_weights`.
const KINDS: [Kind; 3] = [Kind::ClearDirection, Kind::FlawedDirection, Kind::General];

/// Seeds, requests and validates dreams; keeps the near-duplicate window and the per-kind
/// counts that balance the kinds.
#[derive(Debug)]
pub struct Dreamer {
    /// The template library (train templates seed; probes are guarded against).
    library: Library,
    /// Settings.
    config: DreamerConfig,
    /// `dream:{model}@{server}`.
    provenance: String,
    /// Probe text runs.
    guard: ProbeGuard,
    /// Probes and recent accepted dreams.
    filter: NearDupFilter,
    /// For the exemplar-copy check.
    hasher: MinHasher,
    /// The sampling stream.
    rng: ChaCha8Rng,
    /// Accepted dreams per kind, in `KINDS` order.
    accepted: [u64; 3],
    /// Seeds drawn (requests) per kind, in `KINDS` order.
    asked: [u64; 3],
}

/// A kind is asked for at most this many times its weight's share of the requests (see
/// [`Dreamer::next_kind`]).
pub const MAX_ASKED_FACTOR: f64 = 2.0;

/// What a refused request counts for in the balance of kinds, against 1 for an accepted
/// dream (see [`Dreamer::next_kind`]).
pub const REFUSED_CREDIT: f64 = 0.1;

impl Dreamer {
    /// A dreamer over `library`, guarding `probes` (the monitor's probe scenarios).
    pub fn new(
        library: Library,
        probes: &[Scenario],
        config: DreamerConfig,
        provenance: String,
    ) -> Dreamer {
        let mut filter = NearDupFilter::new(
            config.near_duplicate_threshold,
            config.near_duplicate_window,
        );
        for p in probes {
            filter.add_probe(p.template_id.clone(), &scenario_text(p));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(config.stream);
        Dreamer {
            guard: ProbeGuard::new(probes),
            library,
            config,
            provenance,
            filter,
            hasher: MinHasher::default(),
            rng,
            accepted: [0; 3],
            asked: [0; 3],
        }
    }

    /// The kind furthest below its share of the accepted dreams (deficit round-robin, so
    /// the accepted kinds follow the weights even when one kind is refused more often).
    ///
    /// A refused request counts [`REFUSED_CREDIT`] of an accepted one, and a kind is asked
    /// for at most [`MAX_ASKED_FACTOR`] times its share of the requests: a kind the server
    /// never gets right does not starve the others. (With a weak model every answer may be
    /// refused; counting accepted dreams alone, the first kind was then asked for alone,
    /// forever, and the general kind never.) When nothing is accepted, the requests follow
    /// the weights. Ties go to the kind asked least for its weight.
    pub fn next_kind(&self) -> Kind {
        let weights = &self.config.kind_weights;
        let total: f64 = weights.iter().sum();
        let share = |i: usize| weights[i] / total;
        let credit = |i: usize| {
            self.accepted[i] as f64
                + REFUSED_CREDIT * self.asked[i].saturating_sub(self.accepted[i]) as f64
        };
        let n = (0..3).map(credit).sum::<f64>() + 1.0;
        let deficit = |i: usize| share(i) * n - credit(i);
        let asked_total = self.asked.iter().sum::<u64>() as f64 + 1.0;
        let asked_share = |i: usize| self.asked[i] as f64 / weights[i];
        let positive: Vec<usize> = (0..3).filter(|&i| weights[i] > 0.0).collect();
        let under_cap: Vec<usize> = positive
            .iter()
            .copied()
            .filter(|&i| (self.asked[i] as f64 + 1.0) / asked_total <= MAX_ASKED_FACTOR * share(i))
            .collect();
        let from = if under_cap.is_empty() {
            &positive
        } else {
            &under_cap
        };
        let best = from
            .iter()
            .copied()
            .max_by(|&a, &b| {
                deficit(a)
                    .total_cmp(&deficit(b))
                    .then(asked_share(b).total_cmp(&asked_share(a)))
                    .then(b.cmp(&a))
            })
            .expect("validated: kind_weights has a positive weight");
        KINDS[best]
    }

    /// A seed of the next kind (counted as asked for).
    pub fn seed(&mut self) -> Result<Seed, SeedError> {
        let kind = self.next_kind();
        let seed = sample_seed(&self.library, kind, self.config.exemplars, &mut self.rng)?;
        self.asked[KINDS.iter().position(|&k| k == kind).expect("a kind")] += 1;
        Ok(seed)
    }

    /// The chat messages for `seed`.
    pub fn request(&self, seed: &Seed) -> Vec<Message> {
        request(seed, &self.config.limits)
    }

    /// Validates the server's `answer` to `seed` and checks it against probes and recent
    /// dreams; an accepted dream is remembered and counted for its kind
    /// ([`Dreamer::check`] then [`Dreamer::admit`]).
    pub fn accept(&mut self, seed: &Seed, answer: &str) -> Result<Scenario, Rejection> {
        let scenario = self.check(seed, answer)?;
        self.admit(scenario)
    }

    /// Validates `answer` alone (form, span, behaviour, probe text, exemplar copies), without
    /// the near-duplicate window; nothing is remembered.
    pub fn check(&self, seed: &Seed, answer: &str) -> Result<Scenario, Rejection> {
        let checks = Checks {
            kind: seed.kind,
            limits: self.config.limits,
            probes: &self.guard,
            exemplars: &seed.exemplars,
            hasher: &self.hasher,
            copy_threshold: self.config.near_duplicate_threshold,
            provenance: &self.provenance,
        };
        validate(answer, &checks)
    }

    /// Refuses a checked `scenario` near a probe or a recent dream; otherwise remembers it
    /// and counts it for its kind.
    pub fn admit(&mut self, scenario: Scenario) -> Result<Scenario, Rejection> {
        let text = scenario_text(&scenario);
        if let Some(near) = self.filter.check_and_remember(&scenario.template_id, &text) {
            return Err(Rejection::NearDuplicate(near));
        }
        let i = KINDS
            .iter()
            .position(|&k| k == scenario.kind)
            .expect("KINDS holds every kind");
        self.accepted[i] += 1;
        Ok(scenario)
    }

    /// Feeds an earlier accepted dream back into the near-duplicate window (after a restart).
    pub fn remember(&mut self, s: &Scenario) {
        self.filter
            .remember(s.template_id.clone(), &scenario_text(s));
    }

    /// Accepted dreams per kind: accept, push back, general.
    pub fn accepted(&self) -> [u64; 3] {
        self.accepted
    }

    /// The provenance every dream of this dreamer carries.
    pub fn provenance(&self) -> &str {
        &self.provenance
    }
}

#[cfg(test)]
mod tests;
