//! On-policy replies: what the policy itself answers to a scenario it has not trained on yet,
//! judged against the behaviour the scenario asks for; a wrong answer becomes the rejected
//! side of a DPO pair whose chosen side is the scenario's preferred reply.
//!
//! The daemon's driver samples, every `[on_policy] every_n_steps` steps, the policy's
//! greedy replies to up to `[on_policy] samples` behaviour examples of the batch it is about
//! to train ([`pick`]: the prompts are fresh to the weights that answer), with the trainer's
//! current weights. [`assess`] reads each reply with the rule judge ([`crate::dream::judge`]),
//! asymmetrically, because the judge is measured to be asymmetric (BENCHMARKS.md,
//! "Near-duplicate threshold and the rule judge"):
//!
//! - a reply judged to show the scenario's behaviour (accept for a clear direction, push back
//!   for a flawed one) is [`Assessment::Right`];
//! - a reply judged to show the opposite is [`Assessment::Wrong`] only when it clearly does:
//!   to a flawed direction, a reply that complies without a single push-back cue ("clearly
//!   complied"); to a clear direction, a push-back with a score of at least 3 (more than one
//!   cue) and no cue of accepting at all (no affirmation, no report of the change, no
//!   deliverable up front). The judge misses about half of the held-out push-backs that
//!   explain a consequence in their own words, and reads 3 in 100 good accepting replies of
//!   the train templates as push-back on a single cue (a drafted decline's unquoted "I can't";
//!   "bugs … until"); such a miss must not become the rejected side of a pair. Anything in
//!   between is [`Assessment::Unsure`];
//! - a reply with no words is unsure (neither behaviour happened, and an empty rejected
//!   side teaches nothing).
//!
//! The share of right answers per kind is the behaviour metric that matters most (exported
//! as `dreamloop_dream_on_policy_replies_total{kind,judged}`). Only wrong answers are paired, and
//! only in the `dpo` and `mixed` phases ([`pair`]): in `sft` the pair would train at the SFT
//! lr, forty times the DPO one.

use serde::{Deserialize, Serialize};

use crate::dream::judge::{judge, Judgement, Verdict};
use crate::example::{Example, Kind, Target};

/// What the judge makes of the policy's reply, for the scenario's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Assessment {
    /// The behaviour the scenario asks for.
    Right,
    /// Clearly the opposite behaviour: paired (in the DPO phases).
    Wrong,
    /// Neither clearly: counted, not paired.
    Unsure,
}

impl Assessment {
    /// Every label, for the metric catalogue.
    pub const LABELS: &'static [&'static str] = &["right", "wrong", "unsure"];

    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Assessment::Right => "right",
            Assessment::Wrong => "wrong",
            Assessment::Unsure => "unsure",
        }
    }
}

/// The assessment of `reply` to a scenario of `kind` (see the module docs) and the judgement
/// behind it; `None` for general scenarios (no behaviour to judge).
pub fn assess(kind: Kind, reply: &str) -> Option<(Assessment, Judgement)> {
    let j = judge(reply);
    let assessment = match (kind, j.verdict) {
        (Kind::General, _) => return None,
        (_, Verdict::Unclear) => Assessment::Unsure,
        (Kind::ClearDirection, Verdict::Accept) => Assessment::Right,
        (Kind::ClearDirection, Verdict::PushBack) if j.accept == 0 && j.push_back >= 3 => {
            Assessment::Wrong
        }
        (Kind::ClearDirection, Verdict::PushBack) => Assessment::Unsure,
        (Kind::FlawedDirection, Verdict::PushBack) => Assessment::Right,
        (Kind::FlawedDirection, Verdict::Accept) if j.push_back == 0 => Assessment::Wrong,
        (Kind::FlawedDirection, Verdict::Accept) => Assessment::Unsure,
    };
    Some((assessment, j))
}

/// Indices of up to `n` behaviour examples of `batch` to sample, alternating clear and
/// flawed directions (so both kinds are watched as closely, whatever the mix), in batch order
/// within a kind; pairs made of earlier replies are not sampled again.
pub fn pick(batch: &[Example], n: usize) -> Vec<usize> {
    let of = |kind: Kind| -> Vec<usize> {
        batch
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == kind)
            .map(|(i, _)| i)
            .collect()
    };
    let (clear, flawed) = (of(Kind::ClearDirection), of(Kind::FlawedDirection));
    let mut out = Vec::with_capacity(n);
    // A pair made of an earlier reply has a prompt the policy has answered and trained on.
    let (clear, flawed): (Vec<usize>, Vec<usize>) = (
        clear.into_iter().filter(|&i| !is_own(&batch[i])).collect(),
        flawed.into_iter().filter(|&i| !is_own(&batch[i])).collect(),
    );
    let (mut a, mut b) = (clear.into_iter(), flawed.into_iter());
    while out.len() < n {
        let (x, y) = (a.next(), b.next());
        if x.is_none() && y.is_none() {
            break;
        }
        out.extend(x);
        if out.len() < n {
            out.extend(y);
        }
    }
    out
}

/// Whether `example` is a pair made of the policy's own reply.
pub fn is_own(example: &Example) -> bool {
    example.provenance.starts_with(PROVENANCE_PREFIX)
}

/// How the provenance of a pair made of the policy's own reply starts.
pub const PROVENANCE_PREFIX: &str = "on-policy@";

/// The reply the example teaches: the SFT completion or the DPO pair's chosen side.
pub fn preferred(example: &Example) -> &str {
    match &example.target {
        Target::Sft { completion } => completion,
        Target::Dpo { chosen, .. } => chosen,
    }
}

/// The provenance of a pair sampled before step `step` from an example of `provenance`.
pub fn provenance(step: u64, provenance: &str) -> String {
    format!("{PROVENANCE_PREFIX}{step}:{provenance}")
}

/// The DPO pair of the policy's wrong `reply` to `example`, sampled before step `step`:
/// chosen = the example's preferred reply, rejected = the policy's. `None` when the reply is
/// the preferred one itself (nothing to prefer).
pub fn pair(example: &Example, reply: &str, step: u64) -> Option<Example> {
    let chosen = preferred(example);
    if reply.trim() == chosen.trim() {
        return None;
    }
    Some(Example {
        kind: example.kind,
        prompt: example.prompt.clone(),
        target: Target::Dpo {
            chosen: chosen.to_string(),
            rejected: reply.to_string(),
        },
        direction: example.direction,
        provenance: provenance(step, &example.provenance),
        reference: None,
    })
}

/// One sampled reply, as `on-policy.jsonl` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The step the reply was sampled before (the weights had taken `step - 1` steps).
    pub step: u64,
    /// The scenario's kind.
    pub kind: Kind,
    /// The example's provenance (its template, dream or log line).
    pub source: String,
    /// The policy's reply.
    pub reply: String,
    /// The judge's verdict on it.
    pub verdict: Verdict,
    /// Push-back and accept scores.
    pub scores: (u32, u32),
    /// Right, wrong or unsure for the kind.
    pub judged: Assessment,
    /// Whether it became a DPO pair that was queued (a pair the ledger already held, e.g. the
    /// same wrong reply to the same prompt, is not queued again).
    pub paired: bool,
}

#[cfg(test)]
mod tests;
