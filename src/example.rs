//! The data plane's shared vocabulary: messages, scenarios, training examples and their
//! content hashes.
//!
//! Everything that flows from the generator and the conversation-log reader to the mixer
//! and the trainer is one of these types. They are plain data: this module knows nothing
//! about templates, tokenizers or losses.
//!
//! Content hashes are SHA-256 (FIPS 180-4) over a length-prefixed, domain-separated
//! encoding of the text, truncated to 64 bits. They are identical on every platform and
//! across runs, unlike `std::hash::Hasher`, because the never-repeat ledger persists them.
//! 64 bits keep the ledger within its memory bound (see `scenario::ledger`); a collision
//! (about 3 % odds after 10⁹ entries) only makes the generator skip one fresh example,
//! it can never let an example repeat.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What behaviour an example teaches; the mixer balances batches by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The user gave a sound direction: the right answer does what was asked.
    ClearDirection,
    /// The user's direction is flawed: the right answer pushes back and says why.
    FlawedDirection,
    /// General capability (code, reasoning, arithmetic, text) replayed against forgetting.
    General,
}

impl Kind {
    /// The snake_case name used in templates, logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ClearDirection => "clear_direction",
            Kind::FlawedDirection => "flawed_direction",
            Kind::General => "general",
        }
    }

    /// Parses the snake_case name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "clear_direction" => Some(Kind::ClearDirection),
            "flawed_direction" => Some(Kind::FlawedDirection),
            "general" => Some(Kind::General),
            _ => None,
        }
    }
}

/// One chat message, in the roles every chat template knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text, exactly as it will be fed to the chat template.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// Where the user's direction sits in the prompt, so attention on it can be measured
/// after tokenization (token offsets map back to these byte offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionSpan {
    /// Index of the message in the prompt that holds the direction (the final user turn).
    pub message: usize,
    /// Byte offset of the first byte of the direction in that message's content.
    pub start: usize,
    /// Byte offset one past the last byte of the direction.
    pub end: usize,
}

/// What the trainer optimises for one example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Supervised fine-tuning: cross-entropy on the completion tokens only.
    Sft {
        /// The assistant reply to imitate.
        completion: String,
    },
    /// Direct preference optimisation: the chosen reply should beat the rejected one.
    Dpo {
        /// The reply that should win.
        chosen: String,
        /// The reply that should lose.
        rejected: String,
    },
}

/// One training example, ready for the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The behaviour class, for batch balancing and per-kind metrics.
    pub kind: Kind,
    /// System and earlier turns, ending with the user turn the target answers.
    pub prompt: Vec<Message>,
    /// SFT completion or DPO pair.
    pub target: Target,
    /// The direction span inside the prompt, when the source marked one.
    pub direction: Option<DirectionSpan>,
    /// Where it came from: a template id, or `file:line` of a conversation log or corpus.
    pub provenance: String,
    /// A DPO pair's reference log-probs, when they were computed ahead of its step (see
    /// `train::reference`); not part of the content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PairReference>,
}

/// A DPO pair's summed reference log-probs, computed before the policy trains on it
/// (TRL's `precompute_ref_log_probs`, made online).
///
/// `key` says what they were computed for: the reference and the token sequences as the
/// step feeds them (after the chat template and the `max_seq_len` cut). A step whose key
/// differs (another reference, an edited `max_seq_len`) computes the pair afresh. The sums
/// are stored as their bit patterns, so that a pair read back from disk trains exactly as it
/// would have from memory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PairReference {
    /// Summed log-prob of the chosen completion under the reference.
    #[serde(with = "f64_bits")]
    pub chosen: f64,
    /// Summed log-prob of the rejected completion under the reference.
    #[serde(with = "f64_bits")]
    pub rejected: f64,
    /// What they were computed for (see above).
    pub key: u64,
}

impl PartialEq for PairReference {
    fn eq(&self, other: &Self) -> bool {
        self.chosen.to_bits() == other.chosen.to_bits()
            && self.rejected.to_bits() == other.rejected.to_bits()
            && self.key == other.key
    }
}

impl Eq for PairReference {}

/// An `f64` as its IEEE-754 bit pattern (serde_json's default float parsing may be off by
/// one unit in the last place).
mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(x.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// A 64-bit content hash; see the module docs for why 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExampleHash(pub u64);

impl Example {
    /// Content hash of the prompt and target. Kind, direction and provenance are left
    /// out: the same text reached by two routes is the same example and must not repeat.
    pub fn hash(&self) -> ExampleHash {
        let mut h = ContentHasher::new(b"dreamloop.example.v1");
        h.messages(&self.prompt);
        match &self.target {
            Target::Sft { completion } => {
                h.field(b"sft");
                h.field(completion.as_bytes());
            }
            Target::Dpo { chosen, rejected } => {
                h.field(b"dpo");
                h.field(chosen.as_bytes());
                h.field(rejected.as_bytes());
            }
        }
        h.finish()
    }
}

/// One rendered scenario: a prompt plus the response that should win and the one that
/// should lose. The labeler turns it into an SFT example or a DPO pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    /// What the preferred response demonstrates.
    pub kind: Kind,
    /// The template it was rendered from, or `dream:{model}@{server}` for a scenario a model
    /// wrote (`crate::dream`): its provenance.
    pub template_id: String,
    /// Rendered system and earlier turns, ending with the final user turn.
    pub prompt: Vec<Message>,
    /// The marked direction inside the final user turn (required for clear/flawed kinds).
    pub direction: Option<DirectionSpan>,
    /// The response that should win.
    pub preferred: String,
    /// The response that should lose.
    pub rejected: String,
    /// Content hash of the rendered messages and both responses (see [`Scenario::content_hash`]).
    pub hash: ExampleHash,
}

impl Scenario {
    /// The content hash the `hash` field must hold: rendered prompt plus both responses.
    pub fn content_hash(prompt: &[Message], preferred: &str, rejected: &str) -> ExampleHash {
        let mut h = ContentHasher::new(b"dreamloop.scenario.v1");
        h.messages(prompt);
        h.field(preferred.as_bytes());
        h.field(rejected.as_bytes());
        h.finish()
    }

    /// The key the never-repeat ledger records for this scenario: the rendered prompt
    /// and the preferred response, without the rejected one. Two scenarios that differ
    /// only in their rejected response would label to the same SFT example, so they
    /// count as one; a fresh key makes both its SFT example and its DPO pair fresh.
    pub fn ledger_key(&self) -> ExampleHash {
        let mut h = ContentHasher::new(b"dreamloop.scenario-key.v1");
        h.messages(&self.prompt);
        h.field(self.preferred.as_bytes());
        h.finish()
    }
}

/// SHA-256 over length-prefixed fields, so `("ab","c")` and `("a","bc")` differ and the
/// domain tag keeps scenario and example hashes apart.
struct ContentHasher(Sha256);

impl ContentHasher {
    fn new(domain: &[u8]) -> ContentHasher {
        let mut h = ContentHasher(Sha256::new());
        h.field(domain);
        h
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn messages(&mut self, messages: &[Message]) {
        self.field(&(messages.len() as u64).to_le_bytes());
        for m in messages {
            self.field(m.role.as_bytes());
            self.field(m.content.as_bytes());
        }
    }

    fn finish(self) -> ExampleHash {
        let digest = self.0.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        ExampleHash(u64::from_le_bytes(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sft(prompt: &str, completion: &str) -> Example {
        Example {
            kind: Kind::General,
            prompt: vec![Message::new("user", prompt)],
            target: Target::Sft {
                completion: completion.into(),
            },
            direction: None,
            provenance: "test".into(),
            reference: None,
        }
    }

    #[test]
    fn hash_is_the_documented_sha256_prefix() {
        // Reference computed independently with Python's hashlib over the same encoding:
        // fields are (u64 LE length, bytes): "dreamloop.example.v1", count=1 as 8 LE bytes,
        // "user", "hi", "sft", "hello"; the hash is the first 8 digest bytes read LE.
        assert_eq!(sft("hi", "hello").hash(), ExampleHash(PYTHON_REFERENCE));
    }

    /// `hashlib.sha256(encoding).digest()[:8]` read little-endian, from Python 3.
    const PYTHON_REFERENCE: u64 = 0x6cfb_adc1_2150_249b;

    #[test]
    fn provenance_and_kind_do_not_change_the_hash_but_text_does() {
        let a = sft("hi", "hello");
        let mut b = a.clone();
        b.provenance = "elsewhere".into();
        b.kind = Kind::ClearDirection;
        assert_eq!(a.hash(), b.hash());
        assert_ne!(sft("hi", "hello").hash(), sft("hih", "ello").hash());
        let dpo = Example {
            target: Target::Dpo {
                chosen: "hello".into(),
                rejected: String::new(),
            },
            ..a.clone()
        };
        assert_ne!(a.hash(), dpo.hash());
    }

    /// Stored reference log-probs come back from JSON bit for bit (a decimal rendering read
    /// back by serde_json's default parser may land one ulp off), and are not part of the
    /// content hash.
    #[test]
    fn a_pair_reference_round_trips_exactly_and_leaves_the_hash_alone() {
        let mut e = sft("hi", "hello");
        let before = e.hash();
        // 0.1 + 0.2 and a value near the end of f64's decimal precision.
        let reference = PairReference {
            chosen: -(0.1 + 0.2),
            rejected: -123.456_789_012_345_68,
            key: u64::MAX - 7,
        };
        e.reference = Some(reference);
        assert_eq!(e.hash(), before);
        let json = serde_json::to_string(&e).unwrap();
        let back: Example = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.reference.unwrap().chosen.to_bits(),
            (-(0.1f64 + 0.2)).to_bits()
        );
        assert_eq!(back, e);
        // An example without one is written as before (no field).
        assert!(!serde_json::to_string(&sft("hi", "hello"))
            .unwrap()
            .contains("reference"));
    }

    #[test]
    fn kind_serializes_snake_case() {
        let json = serde_json::to_string(&Kind::FlawedDirection).expect("serializes");
        assert_eq!(json, "\"flawed_direction\"");
        assert_eq!(Kind::parse("clear_direction"), Some(Kind::ClearDirection));
        assert_eq!(Kind::parse("Clear"), None);
    }
}
