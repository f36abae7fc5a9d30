//! The labeler: scenarios and conversation logs → training examples.
//!
//! - A scenario becomes an SFT example (prompt → preferred) or a DPO pair (preferred
//!   chosen over rejected) according to the [`Phase`]; `mixed` decides per scenario by
//!   the lowest bit of its content hash, so it is deterministic and half-and-half.
//! - In a log, an assistant turn followed by a user *correction* (a configurable
//!   pattern such as "no, just …") and then another assistant turn gives a pair:
//!   prompt = the conversation up to the first reply, rejected = the first reply,
//!   chosen = the reply after the correction.
//! - A reviewer's annotation on a log line (`"preferred"`/`"rejected"`) gives a pair
//!   whose prompt is the line's messages up to and including the last user turn.
//! - An assistant turn marked `"label": "good"` gives an SFT example.
//!
//! Pairs follow the phase too (`sft` keeps only the chosen reply). Log examples are
//! `clear_direction` unless the line has a `"kind"`: a correction is the user restating
//! a direction that the first reply did not follow. The formats are documented in
//! `scenarios/README.md`. This module does not deduplicate; the ledger does.

use serde::{Deserialize, Serialize};

use crate::convo::{Conversation, LogMessage};
use crate::example::{Example, Kind, Message, Scenario, Target};

/// Which kind of training target to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Supervised fine-tuning on the preferred reply.
    Sft,
    /// Preference pairs.
    Dpo,
    /// Half of each, decided per example by its hash.
    Mixed,
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Phase, String> {
        match s {
            "sft" => Ok(Phase::Sft),
            "dpo" => Ok(Phase::Dpo),
            "mixed" => Ok(Phase::Mixed),
            other => Err(format!(
                "unknown phase `{other}`: expected sft, dpo or mixed"
            )),
        }
    }
}

/// The phrases that open a user correction (case-insensitive, at the start of the
/// message or of one of its sentences).
pub const DEFAULT_CORRECTION_PATTERNS: &[&str] = &[
    "no, just",
    "no just",
    "no, i said",
    "i said",
    "i asked you to",
    "i asked for",
    "i only asked",
    "stop suggesting",
    "don't suggest",
    "do not suggest",
    "just do",
    "just tell me",
    "just give me",
    "just answer",
    "stop second-guessing",
    "stop second guessing",
    "that's not what i asked",
    "that is not what i asked",
    "i didn't ask",
    "i did not ask",
];

/// Labeler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelConfig {
    /// SFT, DPO or mixed.
    pub phase: Phase,
    /// Correction openers; see [`DEFAULT_CORRECTION_PATTERNS`].
    pub correction_patterns: Vec<String>,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            phase: Phase::Mixed,
            correction_patterns: DEFAULT_CORRECTION_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Bytes of examples one conversation line may yield (prompts and targets together). Far
/// above any real exchange; it bounds the memory and time one hostile or pathological line
/// costs (signals past it are skipped and reported).
pub const MAX_CONVERSATION_EXAMPLE_BYTES: usize = 16 << 20;

/// What labeling one conversation produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labeled {
    /// The examples, in conversation order.
    pub examples: Vec<Example>,
    /// Signals that could not be used, as `file:line: reason`.
    pub skipped: Vec<String>,
}

/// Turns scenarios and logs into examples; see the module docs.
#[derive(Debug, Clone)]
pub struct Labeler {
    /// SFT, DPO or mixed.
    phase: Phase,
    /// Lower-cased correction openers.
    patterns: Vec<String>,
}

impl Labeler {
    /// A labeler with the given settings.
    pub fn new(config: &LabelConfig) -> Labeler {
        Labeler {
            phase: config.phase,
            patterns: config
                .correction_patterns
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    /// The phase in force.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Changes the phase (the daemon moves from SFT to DPO as training proceeds).
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// A scenario as an SFT example or a DPO pair, per the phase.
    pub fn scenario(&self, s: &Scenario) -> Example {
        let dpo = match self.phase {
            Phase::Sft => false,
            Phase::Dpo => true,
            Phase::Mixed => s.hash.0 & 1 == 1,
        };
        let target = if dpo {
            Target::Dpo {
                chosen: s.preferred.clone(),
                rejected: s.rejected.clone(),
            }
        } else {
            Target::Sft {
                completion: s.preferred.clone(),
            }
        };
        Example {
            kind: s.kind,
            prompt: s.prompt.clone(),
            target,
            direction: s.direction,
            provenance: s.template_id.clone(),
            reference: None,
        }
    }

    /// Whether a user message opens with one of the correction patterns.
    pub fn is_correction(&self, text: &str) -> bool {
        let lower = text.to_lowercase();
        let found = sentence_starts(&lower).any(|start| {
            let rest = lower[start..].trim_start_matches(|c: char| !c.is_alphanumeric());
            self.patterns.iter().any(|p| rest.starts_with(p.as_str()))
        });
        found
    }

    /// Every example one logged conversation yields.
    pub fn conversation(&self, c: &Conversation) -> Labeled {
        let mut out = Labeled::default();
        let kind = c.kind.unwrap_or(Kind::ClearDirection);
        let m = &c.messages;
        // Each example repeats the conversation before its turn, so a line's examples grow
        // with the square of its turns (3,000 labelled pairs were ~1 GB). `before[i]` is the
        // size of the prompt before turn `i`; labeling stops once the budget is spent.
        let mut before = Vec::with_capacity(m.len() + 1);
        before.push(0usize);
        for msg in m {
            let last = *before.last().expect("starts with 0");
            before.push(last + msg.role.len() + msg.content.len());
        }
        let mut spent = 0usize;
        // Adds the bytes of turn `turn`'s examples; past the budget, reports the rest of the
        // line as skipped and answers true.
        let mut over_budget = |turn: usize, cost: usize, out: &mut Labeled| -> bool {
            spent += cost;
            let over = spent > MAX_CONVERSATION_EXAMPLE_BYTES;
            if over {
                out.skipped.push(format!(
                    "{}: turns from {turn} on not labeled: this line's examples reached \
                     {MAX_CONVERSATION_EXAMPLE_BYTES} bytes (each repeats the conversation before it)",
                    c.source
                ));
            }
            over
        };

        for i in 0..m.len() {
            if m[i].role != "assistant" {
                continue;
            }
            let good = m[i].label.as_deref() == Some("good");
            let corrected = i + 2 < m.len()
                && m[i + 1].role == "user"
                && m[i + 2].role == "assistant"
                && self.is_correction(&m[i + 1].content);
            if good || corrected {
                let cost = if good {
                    before[i] + m[i].content.len()
                } else {
                    0
                } + if corrected {
                    before[i] + m[i].content.len() + m[i + 2].content.len()
                } else {
                    0
                };
                if over_budget(i, cost, &mut out) {
                    return out;
                }
            }
            if good {
                match prompt_before(m, i) {
                    Some(prompt) => out.examples.push(Example {
                        kind,
                        prompt,
                        target: Target::Sft {
                            completion: m[i].content.clone(),
                        },
                        direction: None,
                        reference: None,
                        provenance: format!("{}#turn={i}", c.source),
                    }),
                    None => out.skipped.push(format!(
                        "{}: turn {i} is marked good but no user turn precedes it",
                        c.source
                    )),
                }
            }
            if corrected {
                match prompt_before(m, i) {
                    Some(prompt) => out.examples.push(self.pair(
                        kind,
                        prompt,
                        &m[i + 2].content,
                        &m[i].content,
                        format!("{}#turn={i}", c.source),
                    )),
                    None => out.skipped.push(format!(
                        "{}: correction at turn {} has no user turn before the reply",
                        c.source,
                        i + 1
                    )),
                }
            }
        }

        if let (Some(preferred), Some(rejected)) = (&c.preferred, &c.rejected) {
            let cost = before[m.len()] + preferred.len() + rejected.len();
            if over_budget(m.len(), cost, &mut out) {
                return out;
            }
            // The annotation answers the last user turn; a reply logged after it (the
            // one the reviewer judged) is not part of the prompt.
            match m.iter().rposition(|msg| msg.role == "user") {
                Some(last_user) => {
                    let prompt = m[..=last_user].iter().map(to_message).collect();
                    out.examples.push(self.pair(
                        kind,
                        prompt,
                        preferred,
                        rejected,
                        c.source.clone(),
                    ));
                }
                None => out.skipped.push(format!(
                    "{}: annotation ignored: the line has no user turn",
                    c.source
                )),
            }
        }
        out
    }

    fn pair(
        &self,
        kind: Kind,
        prompt: Vec<Message>,
        chosen: &str,
        rejected: &str,
        provenance: String,
    ) -> Example {
        let mut example = Example {
            kind,
            prompt,
            target: Target::Dpo {
                chosen: chosen.to_string(),
                rejected: rejected.to_string(),
            },
            direction: None,
            provenance,
            reference: None,
        };
        let sft = match self.phase {
            Phase::Sft => true,
            Phase::Dpo => false,
            Phase::Mixed => example.hash().0 & 1 == 0,
        };
        if sft {
            example.target = Target::Sft {
                completion: chosen.to_string(),
            };
        }
        example
    }
}

/// The conversation before turn `i`, if it ends with a user turn.
fn prompt_before(m: &[LogMessage], i: usize) -> Option<Vec<Message>> {
    let before = &m[..i];
    before
        .last()
        .is_some_and(|last| last.role == "user")
        .then(|| before.iter().map(to_message).collect())
}

fn to_message(m: &LogMessage) -> Message {
    Message::new(&m.role, m.content.clone())
}

/// Byte offsets where sentences start: 0 and after `.`, `!`, `?` or a newline.
fn sentence_starts(s: &str) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(
        s.char_indices()
            .filter(|(_, c)| matches!(c, '.' | '!' | '?' | '\n'))
            .map(|(i, c)| i + c.len_utf8()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::{DirectionSpan, ExampleHash};

    fn labeler(phase: Phase) -> Labeler {
        Labeler::new(&LabelConfig {
            phase,
            ..LabelConfig::default()
        })
    }

    fn scenario(hash: u64) -> Scenario {
        Scenario {
            kind: Kind::FlawedDirection,
            template_id: "t.one".into(),
            prompt: vec![Message::new("user", "Delete prod.")],
            direction: Some(DirectionSpan {
                message: 0,
                start: 0,
                end: 12,
            }),
            preferred: "I'd rather not: there is no backup.".into(),
            rejected: "Deleted.".into(),
            hash: ExampleHash(hash),
        }
    }

    #[test]
    fn scenario_per_phase() {
        let sft = labeler(Phase::Sft).scenario(&scenario(3));
        assert_eq!(
            sft.target,
            Target::Sft {
                completion: "I'd rather not: there is no backup.".into()
            }
        );
        assert_eq!(
            (sft.kind, sft.provenance.as_str()),
            (Kind::FlawedDirection, "t.one")
        );
        assert_eq!(sft.direction, scenario(3).direction);
        let dpo = labeler(Phase::Dpo).scenario(&scenario(2));
        assert_eq!(
            dpo.target,
            Target::Dpo {
                chosen: "I'd rather not: there is no backup.".into(),
                rejected: "Deleted.".into()
            }
        );
        assert!(matches!(
            labeler(Phase::Mixed).scenario(&scenario(2)).target,
            Target::Sft { .. }
        ));
        assert!(matches!(
            labeler(Phase::Mixed).scenario(&scenario(3)).target,
            Target::Dpo { .. }
        ));
    }

    #[test]
    fn correction_patterns_match_at_sentence_starts_only() {
        let l = labeler(Phase::Dpo);
        assert!(l.is_correction("No, just rename it."));
        assert!(l.is_correction("  \"I said\" tabs."));
        assert!(l.is_correction("Thanks. Stop suggesting a rewrite!"));
        assert!(l.is_correction("STOP SUGGESTING things"));
        assert!(!l.is_correction("Is there anything I said wrong?"));
        assert!(!l.is_correction("Looks good, thanks."));
        assert!("Phase".parse::<Phase>().is_err());
        assert_eq!("mixed".parse::<Phase>(), Ok(Phase::Mixed));
    }
}
