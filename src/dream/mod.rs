//! Dreaming: scenarios written by a model behind an OpenAI-compatible server, checked before
//! they may train.
//!
//! - `client`: the blocking chat-completions client, typed transient/persistent errors,
//!   back-off;
//! - `scenario`: the seed drawn from the template library, the request, and the [`Dreamer`]
//!   that balances kinds and ties the checks together;
//! - `validate`: the answer → a [`Scenario`](crate::example::Scenario), or a counted
//!   [`Rejection`];
//! - `neardup`: MinHash near-duplicate filter against recent dreams and every probe;
//! - `judge`: the rule judge of push back versus accept, used for kind coherence and for the
//!   policy's own replies;
//! - `on_policy`: the policy's own replies, assessed for their kind, and the DPO pairs of the
//!   wrong ones.
//!
//! Like the rest of the core this is synchronous and free of actors: the dreamer actor calls
//! [`ChatClient::complete`] on its own thread and passes the result through [`Dreamer`]. A
//! dreamed scenario carries `dream:{model}@{server}` as its `template_id`, so the labeler turns
//! it into the same SFT example or DPO pair as a template's, with that provenance; it obeys the
//! never-repeat ledger like any other.

pub mod client;
pub mod judge;
pub mod neardup;
pub mod on_policy;
pub mod scenario;
pub mod validate;

pub use client::{
    is_loopback, ApiKey, Backoff, ChatClient, ClientError, ClientSettings, Completion, ErrorClass,
    KeySource, ResponseFormat, Sampling,
};
pub use judge::{is_right, judge, Judgement, Verdict};
pub use neardup::{scenario_text, Against, NearDupFilter, NearDuplicate};
pub use scenario::{behaviour, provenance, sample_seed, Dreamer, DreamerConfig, Seed, SeedError};
pub use validate::{validate, Checks, Limits, ProbeGuard, Rejection};
