//! The never-repeat ledger: a persistent set of content hashes.
//!
//! Every example's hash enters the ledger before it is trained on, and the generator
//! rejects anything already in it, so "never repeat" survives restarts and rollbacks.
//! This module only stores hashes; it does not know what they hash, and quarantining
//! rolled-back examples is the checkpointer's business.
//!
//! # On disk
//!
//! ```text
//! <dir>/ledger.log    "DLLEDG01" then 12-byte records: hash u64 LE, check u32 LE
//! <dir>/snapshot.bin  "DLSNAP01", count u64 LE, count × hash u64 LE, SHA-256 of all before
//! ```
//!
//! The log is append-only. Every `snapshot_every` records the whole set is written to
//! `snapshot.bin` (temporary sibling, fsync, rename, directory fsync) and the log is
//! restarted empty the same way. A crash between the two renames leaves hashes in both
//! files, which is harmless for a set. The record check word (a mix of the hash, never
//! zero for a zero-filled record) detects garbage that a crash may leave at the tail.
//!
//! # Fsync policy
//!
//! Each insert is one `write` to the log, so a process crash loses nothing that
//! `insert` returned for. The log is fsynced every `sync_every` inserts, at `sync()`,
//! at every snapshot and on drop. A power loss can therefore lose at most the last
//! `sync_every - 1` inserts; a caller that needs a hard point (before a training step or
//! a checkpoint) calls [`Ledger::sync`]. `sync_every = 1` fsyncs every record.
//!
//! # Recovery
//!
//! A record cut short by a crash (fewer than 12 bytes at the end) or a tail record whose
//! check word is wrong is dropped, the file truncated to the last good record, and the
//! loss reported in [`Recovery`] and as a `tracing` warning. A bad record in the middle
//! of the log is skipped and counted the same way; valid records after it are kept
//! (keeping more hashes only makes the generator more conservative).
//!
//! # Memory
//!
//! The set is a `HashSet<u64>` with an identity hasher (the keys are already SHA-256
//! bits): 8 bytes per bucket plus 1 control byte, at most 8/7 buckets per entry before a
//! resize doubles them, so between ~10 and ~21 bytes per entry. `benches/dataplane.rs`
//! and `tests/ledger_memory.rs` measure it with a counting allocator (bound: 32 bytes).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::example::ExampleHash;

const LOG_MAGIC: &[u8; 8] = b"DLLEDG01";
const SNAPSHOT_MAGIC: &[u8; 8] = b"DLSNAP01";
/// Bytes per log record: hash (8) + check word (4).
pub const RECORD_BYTES: usize = 12;
const LOG_FILE: &str = "ledger.log";
const SNAPSHOT_FILE: &str = "snapshot.bin";

/// Errors opening or writing the ledger; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// An I/O operation on a ledger file failed.
    #[error("ledger {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not start with the ledger's magic bytes: not a ledger, or a
    /// format this build does not read.
    #[error("ledger {path}: not a dreamloop ledger file (bad magic bytes)")]
    BadMagic {
        /// The offending file.
        path: PathBuf,
    },
    /// The snapshot is written atomically, so a checksum failure is real corruption;
    /// continuing would silently forget hashes and break the never-repeat guarantee.
    #[error("ledger {path}: snapshot is corrupt ({reason}); restore it from a backup")]
    CorruptSnapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What failed to check out.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When the ledger fsyncs and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerPolicy {
    /// Fsync the log after this many inserts (1 = every record). At most
    /// `sync_every - 1` inserts can be lost to a power failure.
    pub sync_every: u64,
    /// Write a snapshot and restart the log after this many log records; bounds the
    /// log's size and the start-up replay.
    pub snapshot_every: u64,
}

impl Default for LedgerPolicy {
    fn default() -> Self {
        // 256 inserts is well under a second of generation, and one fsync per 256 keeps
        // the ledger off the generator's critical path.
        LedgerPolicy {
            sync_every: 256,
            snapshot_every: 1 << 20,
        }
    }
}

/// What start-up found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Hashes read from the snapshot.
    pub snapshot_entries: u64,
    /// Valid records read from the log.
    pub log_records: u64,
    /// Bytes of an incomplete or invalid tail that were cut off the log.
    pub truncated_bytes: u64,
    /// Complete records whose check word was wrong (dropped; includes the torn tail).
    pub invalid_records: u64,
}

impl Recovery {
    /// Whether anything was lost and repaired.
    pub fn repaired(&self) -> bool {
        self.truncated_bytes > 0 || self.invalid_records > 0
    }
}

/// Identity hashing for keys that are already uniformly distributed SHA-256 bits.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type HashSetU64 = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

/// The persistent never-repeat set. See the module docs for the format and policies.
#[derive(Debug)]
pub struct Ledger {
    /// The ledger directory; `None` for an in-memory ledger (tests, dataset export).
    dir: Option<PathBuf>,
    /// The open log, positioned at its end.
    log: Option<File>,
    /// Every hash ever inserted.
    set: HashSetU64,
    /// Records in the current log segment, to trigger snapshots.
    log_records: u64,
    /// Inserts written since the last fsync.
    unsynced: u64,
    /// Fsync and snapshot cadence.
    policy: LedgerPolicy,
    /// Fsyncs performed, so the policy can be tested and exported as a metric.
    syncs: u64,
}

/// The check word stored with each record: a 64-bit mix (splitmix64's finalizer) of the
/// hash xor a constant, so an all-zero record does not check out.
fn check_word(hash: u64) -> u32 {
    let mut z = hash ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

fn encode_record(hash: u64) -> [u8; RECORD_BYTES] {
    let mut rec = [0u8; RECORD_BYTES];
    rec[..8].copy_from_slice(&hash.to_le_bytes());
    rec[8..].copy_from_slice(&check_word(hash).to_le_bytes());
    rec
}

fn decode_record(rec: &[u8]) -> Option<u64> {
    let hash = u64::from_le_bytes(rec[..8].try_into().ok()?);
    let check = u32::from_le_bytes(rec[8..RECORD_BYTES].try_into().ok()?);
    (check == check_word(hash)).then_some(hash)
}

impl Ledger {
    /// A ledger that lives only in memory (nothing persists); for dataset export and tests.
    pub fn in_memory() -> Ledger {
        Ledger {
            dir: None,
            log: None,
            set: HashSetU64::default(),
            log_records: 0,
            unsynced: 0,
            policy: LedgerPolicy::default(),
            syncs: 0,
        }
    }

    /// Opens (or creates) the ledger in `dir`, replaying snapshot and log, and repairing
    /// a torn tail. The returned [`Recovery`] says what was found; repairs are also
    /// logged as warnings.
    pub fn open(dir: &Path, policy: LedgerPolicy) -> Result<(Ledger, Recovery), LedgerError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut set = HashSetU64::default();
        let mut recovery = Recovery::default();

        let snapshot_path = dir.join(SNAPSHOT_FILE);
        if snapshot_path.exists() {
            recovery.snapshot_entries = read_snapshot(&snapshot_path, &mut set)?;
        }

        let log_path = dir.join(LOG_FILE);
        if !log_path.exists() {
            write_fresh_log(dir)?;
        }
        let mut log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let good_len = replay_log(&log_path, &mut log, &mut set, &mut recovery)?;
        let len = log.metadata().map_err(io_err(&log_path))?.len();
        if good_len < len {
            log.set_len(good_len).map_err(io_err(&log_path))?;
            log.sync_all().map_err(io_err(&log_path))?;
        }
        log.seek(SeekFrom::End(0)).map_err(io_err(&log_path))?;

        if recovery.repaired() {
            tracing::warn!(
                path = %log_path.display(),
                truncated_bytes = recovery.truncated_bytes,
                invalid_records = recovery.invalid_records,
                "Ledger log had a torn or invalid record (crash during a write); dropped it and truncated the log."
            );
        }
        tracing::info!(
            path = %dir.display(),
            entries = set.len(),
            snapshot_entries = recovery.snapshot_entries,
            log_records = recovery.log_records,
            "Ledger opened."
        );
        let ledger = Ledger {
            dir: Some(dir.to_path_buf()),
            log: Some(log),
            set,
            log_records: recovery.log_records,
            unsynced: 0,
            policy,
            syncs: 0,
        };
        Ok((ledger, recovery))
    }

    /// Whether `hash` was ever inserted. O(1).
    pub fn contains(&self, hash: ExampleHash) -> bool {
        self.set.contains(&hash.0)
    }

    /// Inserts `hash`; returns `false` (and writes nothing) when it was already present.
    pub fn insert(&mut self, hash: ExampleHash) -> Result<bool, LedgerError> {
        if !self.set.insert(hash.0) {
            return Ok(false);
        }
        let Some(log) = self.log.as_mut() else {
            return Ok(true);
        };
        if let Err(source) = log.write_all(&encode_record(hash.0)) {
            // Keep memory and disk in agreement: what is not on disk is not in the set.
            self.set.remove(&hash.0);
            return Err(LedgerError::Io {
                path: self.log_path(),
                source,
            });
        }
        self.log_records += 1;
        self.unsynced += 1;
        if self.unsynced >= self.policy.sync_every.max(1) {
            self.sync()?;
        }
        if self.log_records >= self.policy.snapshot_every.max(1) {
            self.snapshot()?;
        }
        Ok(true)
    }

    /// Number of distinct hashes; monotone, so checkpoints record it as the ledger's
    /// position and a restore can check that the ledger did not go backwards.
    pub fn position(&self) -> u64 {
        self.set.len() as u64
    }

    /// Number of distinct hashes.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the ledger is empty.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Fsyncs performed so far (the fsync policy made visible).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Heap bytes held by the in-memory set, computed from its capacity the way
    /// hashbrown lays it out (one key and one control byte per bucket, plus one group
    /// of trailing control bytes). The counting-allocator measurements confirm it.
    pub fn heap_bytes(&self) -> usize {
        let capacity = self.set.capacity();
        if capacity == 0 {
            return 0;
        }
        let buckets = if capacity < 8 {
            if capacity < 4 {
                4
            } else {
                8
            }
        } else {
            (capacity * 8 / 7).next_power_of_two()
        };
        buckets * (std::mem::size_of::<u64>() + 1) + 16
    }

    /// Makes every insert so far durable (fsync of the log).
    pub fn sync(&mut self) -> Result<(), LedgerError> {
        if let Some(log) = self.log.as_mut() {
            if self.unsynced > 0 {
                let path = self.dir.as_deref().unwrap_or(Path::new("")).join(LOG_FILE);
                log.sync_data().map_err(io_err(&path))?;
                self.syncs += 1;
            }
        }
        self.unsynced = 0;
        Ok(())
    }

    /// Writes the whole set to `snapshot.bin` and restarts the log empty, both
    /// atomically (temporary sibling, fsync, rename, directory fsync).
    pub fn snapshot(&mut self) -> Result<(), LedgerError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        self.sync()?;
        let mut bytes = Vec::with_capacity(16 + self.set.len() * 8 + 32);
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&(self.set.len() as u64).to_le_bytes());
        for hash in &self.set {
            bytes.extend_from_slice(&hash.to_le_bytes());
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        write_atomically(&dir, SNAPSHOT_FILE, &bytes)?;
        // Only now may the log restart: the snapshot already holds its records.
        write_fresh_log(&dir)?;
        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        log.seek(SeekFrom::End(0)).map_err(io_err(&log_path))?;
        self.log = Some(log);
        self.log_records = 0;
        self.syncs += 1;
        tracing::info!(path = %dir.display(), entries = self.set.len(), "Ledger snapshot written.");
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.as_deref().unwrap_or(Path::new("")).join(LOG_FILE)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Err(error) = self.sync() {
            tracing::warn!(%error, "Ledger fsync at close failed.");
        }
    }
}

/// Reads the snapshot into `set`; returns the number of entries.
fn read_snapshot(path: &Path, set: &mut HashSetU64) -> Result<u64, LedgerError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let corrupt = |reason: &str| LedgerError::CorruptSnapshot {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 16 + 32 {
        return Err(corrupt("shorter than its header"));
    }
    if &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(LedgerError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8-byte slice"));
    let hashes = &body[16..];
    if hashes.len() as u64 != count.saturating_mul(8) {
        return Err(corrupt("entry count does not match its length"));
    }
    set.reserve(count as usize);
    for chunk in hashes.chunks_exact(8) {
        set.insert(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")));
    }
    Ok(count)
}

/// Replays the log into `set`; returns the byte length of the valid prefix.
fn replay_log(
    path: &Path,
    log: &mut File,
    set: &mut HashSetU64,
    recovery: &mut Recovery,
) -> Result<u64, LedgerError> {
    let mut bytes = Vec::new();
    log.read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() < LOG_MAGIC.len() {
        // A crash while the fresh log's header was being written: start it over.
        recovery.truncated_bytes += bytes.len() as u64;
        log.set_len(0).map_err(io_err(path))?;
        log.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        log.write_all(LOG_MAGIC).map_err(io_err(path))?;
        return Ok(LOG_MAGIC.len() as u64);
    }
    if &bytes[..8] != LOG_MAGIC {
        return Err(LedgerError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let records = &bytes[8..];
    let whole = records.len() / RECORD_BYTES;
    // The valid prefix ends after the last record that checks out; anything after it is
    // the torn tail of an interrupted write.
    let mut good_end = 0;
    for (i, rec) in records.chunks_exact(RECORD_BYTES).enumerate() {
        match decode_record(rec) {
            Some(hash) => {
                set.insert(hash);
                recovery.log_records += 1;
                good_end = i + 1;
            }
            None => recovery.invalid_records += 1,
        }
    }
    // Invalid records after the last good one are part of the tail, not the middle.
    let tail_invalid = (whole - good_end) as u64;
    let middle_invalid = recovery.invalid_records - tail_invalid;
    if middle_invalid > 0 {
        tracing::warn!(
            path = %path.display(),
            invalid_records = middle_invalid,
            "Ledger log has invalid records before its tail (disk corruption?); they are skipped."
        );
    }
    let good_len = (8 + good_end * RECORD_BYTES) as u64;
    recovery.truncated_bytes += bytes.len() as u64 - good_len;
    Ok(good_len)
}

/// Creates an empty log (header only), atomically replacing any previous one.
fn write_fresh_log(dir: &Path) -> Result<(), LedgerError> {
    write_atomically(dir, LOG_FILE, LOG_MAGIC)
}

/// Writes `bytes` to `dir/name` via a temporary sibling: write, fsync, rename, fsync dir.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LedgerError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> ExampleHash {
        // Spread the test keys like real SHA-256 output.
        ExampleHash(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678)
    }

    fn policy(sync_every: u64, snapshot_every: u64) -> LedgerPolicy {
        LedgerPolicy {
            sync_every,
            snapshot_every,
        }
    }

    #[test]
    fn insert_contains_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut ledger, recovery) = Ledger::open(dir.path(), policy(4, 1000)).expect("open");
            assert_eq!(recovery, Recovery::default());
            for i in 0..10 {
                assert!(ledger.insert(h(i)).expect("insert"));
            }
            assert!(!ledger.insert(h(3)).expect("insert duplicate"));
            assert_eq!(ledger.position(), 10);
        }
        let (ledger, recovery) = Ledger::open(dir.path(), policy(4, 1000)).expect("reopen");
        assert_eq!(recovery.log_records, 10);
        assert!(!recovery.repaired());
        assert!((0..10).all(|i| ledger.contains(h(i))));
        assert!(!ledger.contains(h(10)));
        // Header plus 10 records, no duplicate written.
        let len = fs::metadata(dir.path().join(LOG_FILE)).expect("meta").len();
        assert_eq!(len, 8 + 10 * 12);
    }

    #[test]
    fn fsync_policy_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut ledger, _) = Ledger::open(dir.path(), policy(4, 1000)).expect("open");
        for i in 0..10 {
            ledger.insert(h(i)).expect("insert");
        }
        // Fsyncs after inserts 4 and 8; two records are pending.
        assert_eq!(ledger.syncs(), 2);
        ledger.sync().expect("sync");
        assert_eq!(ledger.syncs(), 3);
        // Nothing pending: no extra fsync.
        ledger.sync().expect("sync");
        assert_eq!(ledger.syncs(), 3);
        // A duplicate writes nothing and so needs no fsync.
        ledger.insert(h(0)).expect("dup");
        ledger.sync().expect("sync");
        assert_eq!(ledger.syncs(), 3);

        let dir = tempfile::tempdir().expect("tempdir");
        let (mut every, _) = Ledger::open(dir.path(), policy(1, 1000)).expect("open");
        for i in 0..5 {
            every.insert(h(i)).expect("insert");
        }
        assert_eq!(every.syncs(), 5);
    }

    #[test]
    fn writes_reach_the_file_before_any_fsync() {
        // A process crash (no drop, no fsync) loses nothing insert() returned for.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut ledger, _) = Ledger::open(dir.path(), policy(1000, 1000)).expect("open");
        for i in 0..7 {
            ledger.insert(h(i)).expect("insert");
        }
        assert_eq!(ledger.syncs(), 0);
        std::mem::forget(ledger);
        let (reopened, recovery) = Ledger::open(dir.path(), policy(1000, 1000)).expect("reopen");
        assert_eq!(recovery.log_records, 7);
        assert_eq!(reopened.len(), 7);
    }

    #[test]
    fn snapshot_restarts_the_log_and_reopen_merges() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut ledger, _) = Ledger::open(dir.path(), policy(1000, 8)).expect("open");
            for i in 0..20 {
                ledger.insert(h(i)).expect("insert");
            }
        }
        // Snapshots at 8 and 16 records; 4 records in the current log.
        let log_len = fs::metadata(dir.path().join(LOG_FILE)).expect("meta").len();
        assert_eq!(log_len, 8 + 4 * 12);
        let snap_len = fs::metadata(dir.path().join(SNAPSHOT_FILE))
            .expect("meta")
            .len();
        assert_eq!(snap_len, 16 + 16 * 8 + 32);
        let (ledger, recovery) = Ledger::open(dir.path(), policy(1000, 8)).expect("reopen");
        assert_eq!(recovery.snapshot_entries, 16);
        assert_eq!(recovery.log_records, 4);
        assert_eq!(ledger.position(), 20);
        assert!((0..20).all(|i| ledger.contains(h(i))));
    }

    #[test]
    fn corrupt_snapshot_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut ledger, _) = Ledger::open(dir.path(), policy(1000, 4)).expect("open");
            for i in 0..4 {
                ledger.insert(h(i)).expect("insert");
            }
        }
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[20] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        let err = Ledger::open(dir.path(), LedgerPolicy::default()).expect_err("corrupt");
        assert!(matches!(err, LedgerError::CorruptSnapshot { .. }), "{err}");
        assert!(err.to_string().contains("snapshot.bin"), "{err}");
    }

    #[test]
    fn zero_filled_tail_is_dropped() {
        // A crash after the file grew but before the data landed leaves zeros.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut ledger, _) = Ledger::open(dir.path(), policy(1, 1000)).expect("open");
            for i in 0..3 {
                ledger.insert(h(i)).expect("insert");
            }
        }
        let path = dir.path().join(LOG_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&[0u8; 24]).expect("zeros");
        drop(file);
        let (ledger, recovery) = Ledger::open(dir.path(), LedgerPolicy::default()).expect("open");
        assert_eq!(recovery.invalid_records, 2);
        assert_eq!(recovery.truncated_bytes, 24);
        assert_eq!(ledger.len(), 3);
        assert_eq!(fs::metadata(&path).expect("meta").len(), 8 + 36);
    }

    #[test]
    fn foreign_file_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(LOG_FILE), b"hello world, not a ledger").expect("write");
        let err = Ledger::open(dir.path(), LedgerPolicy::default()).expect_err("bad magic");
        assert!(matches!(err, LedgerError::BadMagic { .. }));
    }

    #[test]
    fn heap_bytes_stays_under_the_bound() {
        let mut ledger = Ledger::in_memory();
        for i in 0..100_000 {
            ledger.insert(h(i)).expect("insert");
        }
        let per_entry = ledger.heap_bytes() as f64 / ledger.len() as f64;
        // 100,000 entries → 131,072 buckets × 9 bytes ≈ 11.8 bytes per entry.
        assert!((11.0..12.5).contains(&per_entry), "{per_entry}");
    }
}
