//! The pending queue: conversation-log examples that were read past (the cursor moved on)
//! but not yet trained, kept on disk so a restart trains them instead of losing them.
//!
//! A log line is read once: the cursor moves past it and its hash enters the never-repeat
//! ledger. Between those two and the training step the example only exists here, so the
//! queue is rewritten (atomically, [`crate::durable::write_atomic`]) *before* the cursor
//! is saved and before the hashes are admitted to the ledger. Examples handed to a batch
//! stay in the file as `in_flight` until the next hand-out (the loop trains one batch at
//! a time, so by then that batch was trained or abandoned); after a crash the caller
//! re-queues the in-flight ones that `trained.jsonl` does not show as trained.
//!
//! The rules that make a crash at any point lose nothing and repeat nothing:
//! - an example is queued only if neither the ledger nor this queue holds its hash;
//! - the queue is durable before the cursor moves and before the ledger learns the hash;
//! - at start-up every queued hash is (re)admitted to the ledger, which is idempotent.
//!
//! It knows nothing about logs, labeling or the ledger; the labeler actor wires them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::example::{Example, Kind, PairReference, Target};

/// Errors reading or writing the queue file.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    /// Reading or replacing the file failed.
    #[error("pending log examples {path}: {source}")]
    Io {
        /// The queue file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file exists but is not the expected JSON.
    #[error("pending log examples {path} is corrupt: {source}")]
    Corrupt {
        /// The queue file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    /// Waiting for a batch, oldest first.
    queued: VecDeque<Example>,
    /// Handed to the latest batch; trained or abandoned by the next hand-out.
    in_flight: Vec<Example>,
}

/// The durable queue (see the module docs).
#[derive(Debug)]
pub struct PendingQueue {
    /// `<state_dir>/convo-pending.json`.
    path: PathBuf,
    /// What the file holds.
    state: OnDisk,
    /// Hashes of `state.queued`, for the "not already queued" rule.
    hashes: HashSet<u64>,
}

impl PendingQueue {
    /// Opens the queue at `path` (empty when the file does not exist). In-flight examples
    /// of a previous process are returned separately, for the caller to re-queue the ones
    /// that were not trained ([`PendingQueue::requeue`]).
    pub fn open(path: &Path) -> Result<(PendingQueue, Vec<Example>), PendingError> {
        let state: OnDisk = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| PendingError::Corrupt {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => OnDisk::default(),
            Err(source) => {
                return Err(PendingError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let OnDisk { queued, in_flight } = state;
        let hashes = queued.iter().map(|e| e.hash().0).collect();
        Ok((
            PendingQueue {
                path: path.to_path_buf(),
                state: OnDisk {
                    queued,
                    in_flight: Vec::new(),
                },
                hashes,
            },
            in_flight,
        ))
    }

    /// Queued examples (not counting in-flight ones).
    pub fn len(&self) -> usize {
        self.state.queued.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.state.queued.is_empty()
    }

    /// Hashes of the queued examples.
    pub fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.hashes.iter().copied()
    }

    /// Whether an example with this hash is queued.
    pub fn contains(&self, hash: u64) -> bool {
        self.hashes.contains(&hash)
    }

    /// Queues `examples` whose hash is not queued yet (in memory; [`PendingQueue::save`]
    /// makes it durable). Answers how many were queued.
    pub fn requeue(&mut self, examples: Vec<Example>) -> usize {
        let mut n = 0;
        for e in examples {
            if self.hashes.insert(e.hash().0) {
                self.state.queued.push_back(e);
                n += 1;
            }
        }
        n
    }

    /// Up to `n` queued DPO pairs that have no reference log-probs yet, oldest first
    /// (copies: the queue keeps them until [`PendingQueue::set_references`]).
    pub fn lacking_reference(&self, n: usize) -> Vec<Example> {
        self.state
            .queued
            .iter()
            .filter(|e| matches!(e.target, Target::Dpo { .. }) && e.reference.is_none())
            .take(n)
            .cloned()
            .collect()
    }

    /// Stores reference log-probs with the queued pairs they were computed for, by hash (in
    /// memory; [`PendingQueue::save`] makes it durable).
    pub fn set_references(&mut self, references: &HashMap<u64, PairReference>) {
        for e in &mut self.state.queued {
            if let Some(r) = references.get(&e.hash().0) {
                e.reference = Some(*r);
            }
        }
    }

    /// Removes queued examples by hash (ones the ledger turned down after all).
    pub fn remove(&mut self, gone: &HashSet<u64>) {
        self.state.queued.retain(|e| !gone.contains(&e.hash().0));
        self.hashes.retain(|h| !gone.contains(h));
    }

    /// Takes up to `n` queued examples of each `(kind, n)`, oldest first, and records them
    /// as the in-flight batch (replacing the previous one). Call [`PendingQueue::save`]
    /// before handing them on.
    pub fn take(&mut self, wanted: &[(Kind, usize)]) -> Vec<Vec<Example>> {
        let mut out: Vec<Vec<Example>> = wanted.iter().map(|_| Vec::new()).collect();
        let mut rest = VecDeque::with_capacity(self.state.queued.len());
        while let Some(e) = self.state.queued.pop_front() {
            let slot = wanted
                .iter()
                .zip(&out)
                .position(|(&(kind, n), got)| kind == e.kind && got.len() < n);
            match slot {
                Some(i) => out[i].push(e),
                None => rest.push_back(e),
            }
        }
        self.state.queued = rest;
        self.hashes = self.state.queued.iter().map(|e| e.hash().0).collect();
        self.state.in_flight = out.iter().flatten().cloned().collect();
        out
    }

    /// Writes the queue and the in-flight batch durably.
    pub fn save(&self) -> Result<(), PendingError> {
        let json = serde_json::to_vec(&self.state).map_err(|source| PendingError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        crate::durable::write_atomic(&self.path, &json).map_err(|source| PendingError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::Message;

    fn example(kind: Kind, text: &str) -> Example {
        Example {
            kind,
            prompt: vec![Message {
                role: "user".into(),
                content: text.into(),
            }],
            target: Target::Sft {
                completion: "ok".into(),
            },
            direction: None,
            provenance: format!("log.jsonl:{text}"),
            reference: None,
        }
    }

    #[test]
    fn survives_a_reopen_with_the_in_flight_batch_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("convo-pending.json");
        let (mut q, flying) = PendingQueue::open(&path).unwrap();
        assert!(flying.is_empty());
        let a = example(Kind::ClearDirection, "a");
        let b = example(Kind::FlawedDirection, "b");
        let c = example(Kind::ClearDirection, "c");
        assert_eq!(
            q.requeue(vec![a.clone(), b.clone(), a.clone(), c.clone()]),
            3
        );
        let taken = q.take(&[(Kind::ClearDirection, 1), (Kind::FlawedDirection, 0)]);
        assert_eq!(taken, vec![vec![a.clone()], vec![]]);
        q.save().unwrap();
        let (q2, flying) = PendingQueue::open(&path).unwrap();
        assert_eq!(flying, vec![a]);
        assert_eq!(q2.len(), 2);
        assert!(q2.contains(b.hash().0) && q2.contains(c.hash().0));
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("convo-pending.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = PendingQueue::open(&path).unwrap_err().to_string();
        assert!(err.contains("convo-pending.json"), "{err}");
    }
}
