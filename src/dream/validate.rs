//! A dreamed answer → a validated [`Scenario`], or the typed reason it was refused.
//!
//! The server is asked for one JSON object `{system, user, direction, preferred, rejected}`
//! (see `scenario.rs`). [`validate`] checks, in order, and refuses at the first failure with a
//! [`Rejection`] whose [`Rejection::label`] is stable and bounded (a counter's label):
//! 1. it is a JSON object (a code fence or prose around it is tolerated: small models add
//!    them even in JSON mode) with no key twice (a small model repeats keys, and a reader
//!    would keep either value: SmolLM2-135M did in 5 of 20 sampled answers), with string fields
//!    `user`, `direction`, `preferred`, `rejected` (`system` optional), none of them empty
//!    except `direction` for a general scenario;
//! 2. lengths are within [`Limits`];
//! 3. the direction is non-empty (accept / push back) and a substring of the user turn, exactly
//!    (its byte offsets become the [`DirectionSpan`] the attention metric reads);
//! 4. preferred and rejected differ;
//! 5. the kinds are coherent, by the rule judge (`judge.rs`): for push back the preferred reply
//!    must push back and the rejected one comply; for accept the reverse;
//! 6. no probe text: no run of [`PROBE_RUN_WORDS`] words from a held-out probe's user turn or
//!    replies appears in the answer ([`ProbeGuard`]); whole-text similarity to probes is the
//!    near-duplicate filter's job (`neardup.rs`);
//! 7. it is not a copy of the exemplars it was shown (MinHash similarity below the
//!    near-duplicate threshold).
//!
//! Exact and near duplicates of earlier dreams are refused outside this function (the ledger
//! and the filter hold state); their reasons are variants here too, so one counter covers
//! every refusal. This module does not talk to a server and does not deduplicate.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::judge::{judge, Verdict};
use super::neardup::{scenario_text, words, MinHasher, NearDuplicate};
use crate::example::{DirectionSpan, Kind, Message, Scenario};

/// Words in a run that counts as probe text. Eight words in a row are a borrowed sentence,
/// not a shared phrase; the test over the library measures that no train rendering matches.
pub const PROBE_RUN_WORDS: usize = 8;

/// Length bounds of a dreamed scenario, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest system prompt.
    pub max_system_chars: usize,
    /// Longest user turn.
    pub max_user_chars: usize,
    /// Longest preferred or rejected reply.
    pub max_reply_chars: usize,
}

/// Why a dreamed answer was refused. Labels are stable: see [`Rejection::LABELS`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// No JSON object could be read from the answer.
    #[error("the answer is not a JSON object")]
    NotJson,
    /// A key appears more than once in the object.
    #[error("field `{field}` appears more than once")]
    RepeatedField {
        /// The first repeated key (as the answer wrote it, cut to 40 characters).
        field: String,
    },
    /// A required field is absent or not a string.
    #[error("field `{field}` is missing or not a string")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A required field is blank.
    #[error("field `{field}` is empty")]
    EmptyField {
        /// The field.
        field: &'static str,
    },
    /// A field is longer than its limit.
    #[error("field `{field}` has {chars} characters, more than {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        chars: usize,
        /// The limit.
        max: usize,
    },
    /// The direction span is empty for an accept or push-back scenario.
    #[error("no direction span")]
    SpanMissing,
    /// The direction is not a substring of the user turn.
    #[error("the direction is not inside the user turn")]
    SpanNotInUser,
    /// Preferred and rejected are the same text.
    #[error("preferred and rejected are the same")]
    SameReplies,
    /// The preferred reply does not show the scenario's behaviour.
    #[error("the preferred reply was judged {}", .0.label())]
    PreferredWrongBehaviour(Verdict),
    /// The rejected reply shows the scenario's behaviour (it must show the opposite).
    #[error("the rejected reply was judged {}", .0.label())]
    RejectedWrongBehaviour(Verdict),
    /// Text from a held-out probe appears in the answer.
    #[error("text of probe `{probe}` appears in the answer")]
    ProbeText {
        /// The probe's template id.
        probe: String,
    },
    /// The answer is (nearly) one of the exemplars it was shown.
    #[error("a copy of exemplar `{template}` (similarity {similarity:.2})")]
    CopiedExemplar {
        /// The exemplar's template id.
        template: String,
        /// Estimated Jaccard similarity.
        similarity: f64,
    },
    /// Near an earlier dream or a probe (found by the caller's `NearDupFilter`).
    #[error("near duplicate of {} `{}` (similarity {:.2})", .0.against.label(), .0.id, .0.similarity)]
    NearDuplicate(NearDuplicate),
    /// Already in the never-repeat ledger (found by the caller).
    #[error("an exact repeat")]
    ExactDuplicate,
}

impl Rejection {
    /// Every label, for the metric catalogue.
    pub const LABELS: &'static [&'static str] = &[
        "not_json",
        "repeated_field",
        "missing_field",
        "empty_field",
        "too_long",
        "span_missing",
        "span_not_in_user",
        "same_replies",
        "preferred_wrong_behaviour",
        "rejected_wrong_behaviour",
        "probe_text",
        "copied_exemplar",
        "near_duplicate",
        "exact_duplicate",
    ];

    /// The counter label of this reason (one of [`Rejection::LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::NotJson => "not_json",
            Rejection::RepeatedField { .. } => "repeated_field",
            Rejection::MissingField { .. } => "missing_field",
            Rejection::EmptyField { .. } => "empty_field",
            Rejection::TooLong { .. } => "too_long",
            Rejection::SpanMissing => "span_missing",
            Rejection::SpanNotInUser => "span_not_in_user",
            Rejection::SameReplies => "same_replies",
            Rejection::PreferredWrongBehaviour(_) => "preferred_wrong_behaviour",
            Rejection::RejectedWrongBehaviour(_) => "rejected_wrong_behaviour",
            Rejection::ProbeText { .. } => "probe_text",
            Rejection::CopiedExemplar { .. } => "copied_exemplar",
            Rejection::NearDuplicate(_) => "near_duplicate",
            Rejection::ExactDuplicate => "exact_duplicate",
        }
    }
}

/// Every [`PROBE_RUN_WORDS`]-word run of the probes' user turns and replies. System prompts
/// are left out: a persona is shared across templates and is not the situation.
#[derive(Debug, Clone, Default)]
pub struct ProbeGuard {
    /// Run (words joined by a space) → the probe's template id.
    runs: HashMap<String, String>,
}

impl ProbeGuard {
    /// A guard over these probe scenarios.
    pub fn new(probes: &[Scenario]) -> ProbeGuard {
        let mut runs = HashMap::new();
        for p in probes {
            let user = p.prompt.iter().rev().find(|m| m.role == "user");
            let texts = user
                .map(|m| m.content.as_str())
                .into_iter()
                .chain([p.preferred.as_str(), p.rejected.as_str()]);
            for text in texts {
                for run in words(text).windows(PROBE_RUN_WORDS) {
                    runs.entry(run.join(" "))
                        .or_insert_with(|| p.template_id.clone());
                }
            }
        }
        ProbeGuard { runs }
    }

    /// The probe whose text `text` borrows, if any.
    pub fn check(&self, text: &str) -> Option<&str> {
        words(text)
            .windows(PROBE_RUN_WORDS)
            .find_map(|run| self.runs.get(&run.join(" ")).map(String::as_str))
    }
}

/// What the answer is checked against.
#[derive(Debug, Clone)]
pub struct Checks<'a> {
    /// The kind asked for.
    pub kind: Kind,
    /// Length bounds.
    pub limits: Limits,
    /// Held-out probe text.
    pub probes: &'a ProbeGuard,
    /// The exemplars shown in the request.
    pub exemplars: &'a [Scenario],
    /// MinHash for the exemplar check.
    pub hasher: &'a MinHasher,
    /// Similarity at or above which the answer is a copy of an exemplar.
    pub copy_threshold: f64,
    /// Provenance of the result (`dream:{model}@{server}`).
    pub provenance: &'a str,
}

/// The JSON object in `answer`: the whole text, else its first `{` to its last `}` (a code
/// fence or a sentence around it).
fn object(answer: &str) -> Option<Fields> {
    let parse = |s: &str| serde_json::from_str::<Fields>(s).ok();
    parse(answer.trim()).or_else(|| {
        let start = answer.find('{')?;
        let end = answer.rfind('}')?;
        (start < end).then(|| parse(&answer[start..=end])).flatten()
    })
}

/// A JSON object's fields, or the first key it repeats (`serde_json::Value` keeps the last
/// value of a repeated key without a word).
enum Fields {
    Distinct(Map<String, Value>),
    Repeated(String),
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Fields, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Fields, A::Error> {
                let mut map = Map::new();
                let mut repeated = None;
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if repeated.is_none() && map.contains_key(&key) {
                        repeated = Some(key.chars().take(40).collect());
                    }
                    map.insert(key, value);
                }
                Ok(match repeated {
                    Some(key) => Fields::Repeated(key),
                    None => Fields::Distinct(map),
                })
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// Validates a dreamed answer; see the module docs for the order of the checks.
pub fn validate(answer: &str, checks: &Checks<'_>) -> Result<Scenario, Rejection> {
    let map = match object(answer).ok_or(Rejection::NotJson)? {
        Fields::Distinct(map) => map,
        Fields::Repeated(field) => return Err(Rejection::RepeatedField { field }),
    };
    let field = |name: &'static str, required: bool| -> Result<String, Rejection> {
        match map.get(name) {
            Some(Value::String(s)) => Ok(s.trim().to_string()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            _ => Err(Rejection::MissingField { field: name }),
        }
    };
    let behaviour = checks.kind != Kind::General;
    let system = field("system", false)?;
    let user = field("user", true)?;
    let direction = field("direction", behaviour)?;
    let preferred = field("preferred", true)?;
    let rejected = field("rejected", true)?;
    for (name, text) in [
        ("user", &user),
        ("preferred", &preferred),
        ("rejected", &rejected),
    ] {
        if text.is_empty() {
            return Err(Rejection::EmptyField { field: name });
        }
    }
    let l = checks.limits;
    for (name, text, max) in [
        ("system", &system, l.max_system_chars),
        ("user", &user, l.max_user_chars),
        ("preferred", &preferred, l.max_reply_chars),
        ("rejected", &rejected, l.max_reply_chars),
    ] {
        let chars = text.chars().count();
        if chars > max {
            return Err(Rejection::TooLong {
                field: name,
                chars,
                max,
            });
        }
    }
    let mut prompt = Vec::new();
    if !system.is_empty() {
        prompt.push(Message::new("system", system));
    }
    let span = if direction.is_empty() {
        if behaviour {
            return Err(Rejection::SpanMissing);
        }
        None
    } else {
        let start = user.find(&direction).ok_or(Rejection::SpanNotInUser)?;
        Some(DirectionSpan {
            message: prompt.len(),
            start,
            end: start + direction.len(),
        })
    };
    prompt.push(Message::new("user", user));
    if preferred == rejected {
        return Err(Rejection::SameReplies);
    }
    let (want_preferred, want_rejected) = match checks.kind {
        Kind::ClearDirection => (Verdict::Accept, Verdict::PushBack),
        Kind::FlawedDirection => (Verdict::PushBack, Verdict::Accept),
        Kind::General => (Verdict::Unclear, Verdict::Unclear),
    };
    if behaviour {
        let p = judge(&preferred).verdict;
        if p != want_preferred {
            return Err(Rejection::PreferredWrongBehaviour(p));
        }
        let r = judge(&rejected).verdict;
        if r != want_rejected {
            return Err(Rejection::RejectedWrongBehaviour(r));
        }
    }
    let hash = Scenario::content_hash(&prompt, &preferred, &rejected);
    let scenario = Scenario {
        kind: checks.kind,
        template_id: checks.provenance.to_string(),
        prompt,
        direction: span,
        preferred,
        rejected,
        hash,
    };
    let text = scenario_text(&scenario);
    if let Some(probe) = checks
        .probes
        .check(&format!("{text}\n{}", scenario.rejected))
    {
        return Err(Rejection::ProbeText {
            probe: probe.to_string(),
        });
    }
    let signature = checks.hasher.signature(&text);
    for e in checks.exemplars {
        let similarity = signature.similarity(&checks.hasher.signature(&scenario_text(e)));
        if similarity >= checks.copy_threshold {
            return Err(Rejection::CopiedExemplar {
                template: e.template_id.clone(),
                similarity,
            });
        }
    }
    Ok(scenario)
}

#[cfg(test)]
mod tests;
