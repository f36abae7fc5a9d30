//! Checkpoint directories on disk: atomic write, manifest, GOOD/LATEST pointers, retention,
//! an optional mirror, and the quarantine of rolled-back examples (DESIGN.md §6).
//!
//! ```text
//! <state_dir>/checkpoints/
//!   step-00000420/   model.safetensors, config.json, tokenizer files, optimizer.bpk,
//!                    state.json, MANIFEST.json (sha256 + size of every other file)
//!   GOOD  LATEST     pointer files holding a directory name ("step-00000420\n")
//! <state_dir>/quarantine/examples.jsonl
//! ```
//!
//! # Write protocol (the Orbax commit-marker pattern)
//!
//! 1. Every file is written into a temporary sibling `.tmp-step-…`, hashed while it is
//!    written (a weights file of hundreds of MB is streamed, never held twice), and fsynced.
//! 2. `MANIFEST.json` (format version, step, creation time, sha256 and size of each file) is
//!    written **last** and fsynced, then the temporary directory itself is fsynced.
//! 3. The directory is renamed to `step-…` and the parent directory fsynced. A `step-…`
//!    directory therefore always holds a manifest; a crash before the rename leaves only a
//!    `.tmp-*` directory, which the next [`CheckpointStore::open`] removes with a warning.
//! 4. `LATEST` is replaced the same way: `.tmp-LATEST` written + fsynced, renamed over
//!    `LATEST`, directory fsynced. A reader sees the old pointer or the new one, never a mix.
//!
//! A failure in steps 1–3 removes the temporary directory and returns the error: the
//! previous checkpoints and both pointers are untouched. A failure while replacing `LATEST`
//! returns the error with `LATEST` still naming the previous checkpoint (the new complete
//! directory stays, unreferenced). Once the `LATEST` rename is done the save is committed;
//! later trouble (directory fsync, retention) comes back as [`Warning`]s.
//!
//! # Reading
//!
//! [`CheckpointStore::load`] re-hashes every file against the manifest before returning, so
//! a flipped byte is an error ([`CheckpointError::Corrupt`]), not a silently broken model.
//! [`CheckpointStore::resume_point`] tries `LATEST`, then every other checkpoint newest
//! first, and reports each one it skips. Listing and `open` only check the manifest and file
//! sizes (cheap); hashing is left to `load`, `mark_good` and `rollback_to`.
//! [`load_read_only`] is for readers in another process (`dreamloop eval`): it verifies the
//! same way but creates and removes nothing, since a `.tmp-*` directory it finds may be a
//! running daemon's save in flight rather than debris.
//!
//! # Retention and mirror
//!
//! After each save and each `mark_good`, the newest `keep_last` complete checkpoints are
//! kept, plus the GOOD target and the LATEST target; every other `step-*` directory
//! (including broken ones) is deleted. `rollback_to(step)` deletes the checkpoints newer than
//! `step`: they belong to the abandoned timeline and their step numbers will be reused.
//! With a mirror directory, every checkpoint marked GOOD is copied to
//! `<mirror>/checkpoints/step-…` with the same protocol (and its GOOD and LATEST pointers
//! set), so `CheckpointStore::open(<mirror>)` can resume from it; the mirror keeps the newest
//! `keep_last` GOODs. A mirror failure is a [`Warning`], never an error.
//!
//! The store knows nothing about what the files contain (burn records, safetensors,
//! tokenizer JSON): a writer either hands [`CheckpointStore::save`] named byte sources, or
//! fills a [`PendingCheckpoint`] from [`CheckpointStore::begin`] through the
//! [`FileSink`] interface (the trainer streams its weights tensor by tensor into it, and
//! hard-links unchanged weight files), and [`CheckpointStore::commit`] finishes it.
//! Filesystem mutations go through [`FaultHook`] so tests can inject errors and crashes.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{read_jsonl, rfc3339_utc, EventError, JsonlWriter, LineWarning};
use crate::sink::{FileSink, Produce};

/// Folder of the checkpoints inside the state directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Folder of the quarantine inside the state directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// File of quarantined examples inside [`QUARANTINE_DIR`].
pub const QUARANTINE_FILE: &str = "examples.jsonl";
/// The manifest; its presence means the directory is complete.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// Pointer to the rollback target.
pub const GOOD_POINTER: &str = "GOOD";
/// Pointer to the newest checkpoint to resume from.
pub const LATEST_POINTER: &str = "LATEST";
/// Version written in (and the newest accepted from) `MANIFEST.json`.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of everything in flight; leftovers are crash debris.
const TMP_PREFIX: &str = ".tmp-";
/// After [`TMP_PREFIX`]: a complete checkpoint moved aside while a new one of the same step
/// is renamed into place.
const REPLACED_PREFIX: &str = "replaced-";
/// After [`TMP_PREFIX`]: a checkpoint being deleted.
const DELETING_PREFIX: &str = "deleting-";
/// I/O chunk: large enough for sequential disk speed, small enough to stay in cache.
const CHUNK: usize = 1 << 20;

/// The directory name of `step`: `step-00000420` (zero-padded to 8 digits, wider if needed).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a directory name written by [`step_dir_name`].
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoint directory that `<state_dir>/checkpoints/LATEST` names, if the pointer
/// parses and the directory exists. Unverified: [`CheckpointStore::resume_point`] checks
/// manifests; this is the fallback when the store cannot be asked.
pub fn latest_named(state_dir: &Path) -> Option<PathBuf> {
    let dir = state_dir.join(CHECKPOINTS_DIR);
    let step = read_pointer(&dir, LATEST_POINTER).ok()??;
    let path = dir.join(step_dir_name(step));
    path.is_dir().then_some(path)
}

/// Errors of the checkpoint store. Every variant names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A filesystem operation failed (disk full, permissions, an injected fault, ...).
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done ("create", "write", "fsync", "rename to", ...).
        op: &'static str,
        /// The path operated on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file does not match its manifest entry (size or sha256), or is missing.
    #[error("checkpoint file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A checkpoint directory has no manifest (never completed).
    #[error("checkpoint {path} is incomplete: it has no {MANIFEST_FILE}")]
    Incomplete {
        /// The directory.
        path: PathBuf,
    },
    /// The manifest does not parse or does not describe this directory.
    #[error("manifest {path} is invalid: {reason}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No checkpoint directory for the step.
    #[error("no checkpoint for step {step} in {dir}")]
    NotFound {
        /// The step asked for.
        step: u64,
        /// The checkpoints directory searched.
        dir: PathBuf,
    },
    /// A file name given to `save` cannot be stored.
    #[error("checkpoint file name {name:?} is not allowed: {reason}")]
    InvalidFileName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The retention policy is unusable.
    #[error("retention policy for {path}: keep_last must be at least 1")]
    InvalidRetention {
        /// The checkpoints directory.
        path: PathBuf,
    },
    /// Writing the quarantine failed.
    #[error(transparent)]
    Quarantine(#[from] EventError),
    /// A pointer file (`GOOD`, `LATEST`) is absent: nothing has been saved or marked yet.
    #[error("no {pointer} checkpoint yet: {path} does not exist")]
    NoPointer {
        /// The pointer file.
        path: PathBuf,
        /// Which pointer.
        pointer: &'static str,
    },
    /// A pointer file cannot be read or does not hold a checkpoint directory name.
    #[error("pointer {path} is unusable: {reason}")]
    BadPointer {
        /// The pointer file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Something the store got past without failing; each is also logged with `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// Debris of an interrupted write was deleted.
    RemovedTemporary {
        /// What was deleted.
        path: PathBuf,
    },
    /// A complete checkpoint moved aside by an interrupted replacement was moved back.
    Restored {
        /// Where it is again.
        path: PathBuf,
    },
    /// A pointer file is unreadable or names a missing/broken checkpoint; it is ignored.
    BadPointer {
        /// The pointer file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A checkpoint was not used (incomplete, bad manifest, corrupt file).
    Skipped {
        /// The checkpoint directory.
        path: PathBuf,
        /// The error that disqualified it.
        reason: String,
    },
    /// Deleting an old or abandoned checkpoint failed (it will be retried next time).
    RemoveFailed {
        /// The directory.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// An fsync after a committed rename failed: the change is visible but may not survive
    /// a power cut (the previous state would then be found, which is also consistent).
    SyncFailed {
        /// The directory.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// Copying a GOOD checkpoint to the mirror failed.
    MirrorFailed {
        /// The mirror directory.
        path: PathBuf,
        /// The error.
        reason: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RemovedTemporary { path } => {
                write!(
                    f,
                    "removed leftover of an interrupted write {}",
                    path.display()
                )
            }
            Self::Restored { path } => {
                write!(
                    f,
                    "restored {} after an interrupted replacement",
                    path.display()
                )
            }
            Self::BadPointer { path, reason } => {
                write!(f, "ignoring pointer {}: {reason}", path.display())
            }
            Self::Skipped { path, reason } => {
                write!(f, "ignoring checkpoint {}: {reason}", path.display())
            }
            Self::RemoveFailed { path, reason } => {
                write!(f, "could not delete {}: {reason}", path.display())
            }
            Self::SyncFailed { path, reason } => {
                write!(f, "could not fsync {}: {reason}", path.display())
            }
            Self::MirrorFailed { path, reason } => {
                write!(f, "could not mirror to {}: {reason}", path.display())
            }
        }
    }
}

/// Logs `warning` and hands it back, so each warning is logged exactly where it arises.
fn warn(warning: Warning) -> Warning {
    tracing::warn!(warning = %warning, "Checkpoint store problem; continuing.");
    warning
}

/// One filesystem mutation, as announced to a [`FaultHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsOp {
    /// Creating a directory.
    CreateDir,
    /// Creating (truncating) a file.
    CreateFile,
    /// One write to a file (at most 1 MiB: writes are buffered in chunks).
    Write,
    /// fsync of a file.
    SyncFile,
    /// fsync of a directory.
    SyncDir,
    /// A rename (the path is the destination).
    Rename,
    /// Deleting a directory tree.
    RemoveDir,
    /// A hard link (the path is the new name).
    Link,
}

/// Called before every filesystem mutation the store makes. Returning an error makes that
/// operation fail with it; panicking simulates a crash at that point (the store holds no
/// cleanup in `Drop`, so nothing is tidied up on unwind). For tests only.
pub trait FaultHook: Send + Sync {
    /// Decides the fate of `op` on `path`.
    fn before(&self, op: FsOp, path: &Path) -> io::Result<()>;
}

/// The store's filesystem access: std calls, each announced to the optional hook.
#[derive(Clone, Default)]
struct Fs {
    /// The fault injector, if any.
    hook: Option<Arc<dyn FaultHook>>,
}

impl Fs {
    fn check(&self, op: FsOp, path: &Path) -> io::Result<()> {
        match &self.hook {
            Some(hook) => hook.before(op, path),
            None => Ok(()),
        }
    }

    fn create_dir(&self, path: &Path) -> Result<()> {
        self.check(FsOp::CreateDir, path)
            .and_then(|_| fs::create_dir(path))
            .map_err(io_err("create directory", path))
    }

    fn create_file(&self, path: &Path) -> Result<File> {
        self.check(FsOp::CreateFile, path)
            .and_then(|_| File::create(path))
            .map_err(io_err("create", path))
    }

    fn sync_file(&self, file: &File, path: &Path) -> Result<()> {
        self.check(FsOp::SyncFile, path)
            .and_then(|_| file.sync_all())
            .map_err(io_err("fsync", path))
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        self.check(FsOp::SyncDir, path)
            .and_then(|_| File::open(path)?.sync_all())
            .map_err(io_err("fsync directory", path))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.check(FsOp::Rename, to)
            .and_then(|_| fs::rename(from, to))
            .map_err(io_err("rename to", to))
    }

    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        self.check(FsOp::RemoveDir, path)
            .and_then(|_| fs::remove_dir_all(path))
            .map_err(io_err("delete", path))
    }

    /// Writes `source` to a new file at `path`, hashing as it goes, then fsyncs it.
    fn write_file(&self, path: &Path, source: FileSource<'_>) -> Result<ManifestEntry> {
        let file = self.create_file(path)?;
        let hashing = HashingWriter {
            file,
            hasher: Sha256::new(),
            size: 0,
            hook: self.hook.as_deref(),
            path,
        };
        let mut out = BufWriter::with_capacity(CHUNK, hashing);
        match source {
            FileSource::Bytes(bytes) => out.write_all(bytes).map_err(io_err("write", path))?,
            FileSource::Writer(produce) => produce(&mut out).map_err(io_err("write", path))?,
            FileSource::Copy(from) => copy_into(from, &mut out, path)?,
        }
        let hashing = out
            .into_inner()
            .map_err(|e| io_err("write", path)(e.into_error()))?;
        self.sync_file(&hashing.file, path)?;
        Ok(ManifestEntry {
            name: file_name_of(path),
            size: hashing.size,
            sha256: hex::encode(hashing.hasher.finalize()),
        })
    }

    /// Replaces the pointer `dir/name` by one naming `step`: tmp file, fsync, rename, then
    /// the directory fsync. Returns a warning if only that last fsync failed.
    fn write_pointer(&self, dir: &Path, name: &str, step: u64) -> Result<Option<Warning>> {
        let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
        let target = dir.join(name);
        let content = format!("{}\n", step_dir_name(step));
        let written = self
            .write_file(&tmp, FileSource::Bytes(content.as_bytes()))
            .and_then(|_| self.rename(&tmp, &target));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(self.sync_dir(dir).err().map(|e| {
            warn(Warning::SyncFailed {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })
        }))
    }
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Streams the file `from` into `out` (read errors name `from`, write errors `to`).
fn copy_into(from: &Path, out: &mut impl Write, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(io_err("open", from))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", from)(e)),
        };
        out.write_all(&buf[..n]).map_err(io_err("write", to))?;
    }
}

/// A file writer that hashes and counts what reaches the file, and asks the hook first.
struct HashingWriter<'a> {
    /// The destination.
    file: File,
    /// sha256 of the bytes written so far.
    hasher: Sha256,
    /// Bytes written so far.
    size: u64,
    /// Fault injection, consulted before each write.
    hook: Option<&'a dyn FaultHook>,
    /// The destination's path, for the hook.
    path: &'a Path,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(hook) = self.hook {
            hook.before(FsOp::Write, self.path)?;
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// sha256 (hex) and size of the file at `path`, read in chunks.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// A callback streaming one file's bytes into the writer it is given.
pub type StreamFn<'a> = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + 'a>;

/// Where the bytes of one checkpoint file come from.
pub enum FileSource<'a> {
    /// Bytes already in memory (config, state, tokenizer files).
    Bytes(&'a [u8]),
    /// A callback that streams the file into the writer it is given (model weights); its
    /// error aborts the save.
    Writer(StreamFn<'a>),
    /// An existing file to copy (a tokenizer file next to the original model).
    Copy(&'a Path),
}

impl fmt::Debug for FileSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
            Self::Writer(_) => f.write_str("Writer(..)"),
            Self::Copy(path) => write!(f, "Copy({})", path.display()),
        }
    }
}

/// A checkpoint being written (from [`CheckpointStore::begin`]): each file goes straight
/// into its temporary directory and is hashed on its way to disk ([`FileSink`]), so a
/// 54 GB model is neither staged elsewhere nor read back. Owned and `Send`: the trainer's
/// thread fills it while the store stays with its owner, who then calls
/// [`CheckpointStore::commit`]. Dropped without a commit, its temporary directory is debris
/// that the next `begin` of the step, or [`CheckpointStore::open`], removes.
pub struct PendingCheckpoint {
    /// The step it will be.
    step: u64,
    /// `.tmp-step-…`, where the files go.
    tmp: PathBuf,
    /// The manifest entries of the files written so far, in order.
    entries: Vec<ManifestEntry>,
    /// Filesystem access (with the store's test hook).
    fs: Fs,
}

impl fmt::Debug for PendingCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingCheckpoint")
            .field("step", &self.step)
            .field("tmp", &self.tmp)
            .field("files", &self.entries.len())
            .finish()
    }
}

impl PendingCheckpoint {
    /// The step this checkpoint will be.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Writes the file `name` from `source`, hashing it. Names follow [`CheckpointStore::save`].
    pub fn add(&mut self, name: &str, source: FileSource<'_>) -> Result<()> {
        self.check_name(name)?;
        let entry = self.fs.write_file(&self.tmp.join(name), source)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Adds the existing file `from` as `name` by a hard link (no byte copied; it is read
    /// once to hash it), or by a streamed copy where the filesystem refuses the link.
    pub fn add_existing(&mut self, name: &str, from: &Path) -> Result<()> {
        self.check_name(name)?;
        let dest = self.tmp.join(name);
        let linked = self
            .fs
            .check(FsOp::Link, &dest)
            .and_then(|_| fs::hard_link(from, &dest));
        let entry = match linked {
            Ok(()) => {
                let (sha256, size) = hash_file(&dest)?;
                ManifestEntry {
                    name: name.to_string(),
                    size,
                    sha256,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, from = %from.display(), "No hard link; copying.");
                self.fs.write_file(&dest, FileSource::Copy(from))?
            }
        };
        self.entries.push(entry);
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<()> {
        validate_names(
            self.entries
                .iter()
                .map(|e| e.name.as_str())
                .chain(std::iter::once(name)),
        )
    }

    /// Step 2 of the protocol: the manifest (last), then the directory fsync.
    fn finish(self) -> Result<Manifest> {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            step: self.step,
            created: rfc3339_utc(SystemTime::now()),
            files: self.entries,
        };
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Io {
            op: "serialise",
            path: manifest_path.clone(),
            source: e.into(),
        })?;
        // Written last: its presence is what makes the directory a checkpoint.
        self.fs
            .write_file(&manifest_path, FileSource::Bytes(&json))?;
        self.fs.sync_dir(&self.tmp)?;
        Ok(manifest)
    }
}

/// The store's errors as I/O errors (kind kept), for writers that only know [`FileSink`].
fn as_io(e: CheckpointError) -> io::Error {
    let kind = match &e {
        CheckpointError::Io { source, .. } => source.kind(),
        CheckpointError::InvalidFileName { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl FileSink for PendingCheckpoint {
    fn put(&mut self, name: &str, produce: Produce<'_>) -> io::Result<()> {
        self.add(
            name,
            FileSource::Writer(Box::new(move |w: &mut dyn Write| produce(w))),
        )
        .map_err(as_io)
    }

    fn put_existing(&mut self, name: &str, from: &Path) -> io::Result<()> {
        self.add_existing(name, from).map_err(as_io)
    }
}

/// `MANIFEST.json`: what a complete checkpoint directory contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT_VERSION`]); newer versions are refused, not guessed at.
    pub format_version: u32,
    /// The optimizer step; must match the directory name.
    pub step: u64,
    /// When the checkpoint was written, RFC 3339 UTC.
    pub created: String,
    /// Every other file of the directory, in the order written.
    pub files: Vec<ManifestEntry>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// File name inside the checkpoint directory (no separators).
    pub name: String,
    /// Size in bytes (a cheap first check).
    pub size: u64,
    /// Lower-case hex sha256 of the contents.
    pub sha256: String,
}

/// A complete checkpoint directory (verified when it comes from `load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDir {
    /// Its step.
    pub step: u64,
    /// The directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl CheckpointDir {
    /// The path of the file `name` inside the checkpoint.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether the manifest lists `name`.
    pub fn has_file(&self, name: &str) -> bool {
        self.manifest.files.iter().any(|f| f.name == name)
    }
}

/// A `step-*` directory as found by [`CheckpointStore::list`].
#[derive(Debug)]
pub struct Listed {
    /// Step from the directory name.
    pub step: u64,
    /// The directory.
    pub path: PathBuf,
    /// Its manifest if it is complete (manifest valid, every file present with its size);
    /// the problem otherwise. File hashes are not checked here.
    pub status: Result<Manifest>,
}

/// What `save` produced.
#[derive(Debug)]
pub struct Saved {
    /// The new checkpoint (now LATEST).
    pub checkpoint: CheckpointDir,
    /// Problems after the commit point (retention, fsync of the pointer's directory).
    pub warnings: Vec<Warning>,
}

/// How many checkpoints to keep, and where to mirror GOOD ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Newest complete checkpoints kept (≥ 1), besides the GOOD and LATEST targets.
    pub keep_last: usize,
    /// A state-directory-like root (another disk or a host mount) receiving every GOOD.
    pub mirror_dir: Option<PathBuf>,
}

/// The checkpoints of one state directory.
pub struct CheckpointStore {
    /// `<state_dir>/checkpoints`.
    dir: PathBuf,
    /// Retention and mirror settings.
    retention: RetentionPolicy,
    /// The LATEST target if it was valid when read or written.
    latest: Option<u64>,
    /// The GOOD target if it was valid when read or written.
    good: Option<u64>,
    /// Filesystem access (with the test hook).
    fs: Fs,
}

impl fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("dir", &self.dir)
            .field("retention", &self.retention)
            .field("latest", &self.latest)
            .field("good", &self.good)
            .finish()
    }
}

impl CheckpointStore {
    /// Opens (creating if needed) `<state_dir>/checkpoints`, removes debris of interrupted
    /// writes and reads the pointers. Each removal and each unusable pointer is a warning.
    pub fn open(state_dir: &Path, retention: RetentionPolicy) -> Result<(Self, Vec<Warning>)> {
        let dir = state_dir.join(CHECKPOINTS_DIR);
        if retention.keep_last == 0 {
            return Err(CheckpointError::InvalidRetention { path: dir });
        }
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let mut warnings = remove_debris(&dir)?;
        let latest = read_valid_pointer(&dir, LATEST_POINTER, &mut warnings);
        let good = read_valid_pointer(&dir, GOOD_POINTER, &mut warnings);
        if let Some(mirror) = &retention.mirror_dir {
            let mirror_dir = mirror.join(CHECKPOINTS_DIR);
            if mirror_dir.is_dir() {
                match remove_debris(&mirror_dir) {
                    Ok(w) => warnings.extend(w),
                    Err(e) => warnings.push(warn(Warning::MirrorFailed {
                        path: mirror_dir,
                        reason: e.to_string(),
                    })),
                }
            }
        }
        let store = Self {
            dir,
            retention,
            latest,
            good,
            fs: Fs::default(),
        };
        Ok((store, warnings))
    }

    /// Routes every later filesystem mutation through `hook` (fault injection in tests).
    pub fn with_fault_hook(mut self, hook: Arc<dyn FaultHook>) -> Self {
        self.fs.hook = Some(hook);
        self
    }

    /// `<state_dir>/checkpoints`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The step LATEST names, if it named a complete checkpoint when last read or written.
    pub fn latest(&self) -> Option<u64> {
        self.latest
    }

    /// The step GOOD names (the rollback target), if it named a complete checkpoint.
    pub fn good(&self) -> Option<u64> {
        self.good
    }

    /// Writes a checkpoint of `step` from `files` (see the module docs for the protocol)
    /// and points LATEST at it. An existing checkpoint of the same step is replaced.
    /// File names must be plain names, unique, and not `MANIFEST.json`.
    pub fn save(&mut self, step: u64, files: Vec<(&str, FileSource<'_>)>) -> Result<Saved> {
        validate_names(files.iter().map(|(name, _)| *name))?;
        let mut pending = self.begin(step)?;
        for (name, source) in files {
            if let Err(e) = pending.add(name, source) {
                self.abandon(pending);
                return Err(e);
            }
        }
        self.commit(pending)
    }

    /// Starts the checkpoint of `step` (step 1 of the protocol): its temporary directory,
    /// which the returned [`PendingCheckpoint`] fills file by file, straight from the
    /// writer (no staging copy). A leftover temporary directory of the same step is removed
    /// first. Finish with [`commit`](Self::commit), or [`abandon`](Self::abandon) it.
    pub fn begin(&self, step: u64) -> Result<PendingCheckpoint> {
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}", step_dir_name(step)));
        if tmp.exists() {
            self.fs.remove_dir_all(&tmp)?;
        }
        self.fs.create_dir(&tmp)?;
        Ok(PendingCheckpoint {
            step,
            tmp,
            entries: Vec::new(),
            fs: self.fs.clone(),
        })
    }

    /// Removes what `pending` wrote; the store is as it was before [`begin`](Self::begin).
    pub fn abandon(&self, pending: PendingCheckpoint) {
        let _ = fs::remove_dir_all(&pending.tmp);
    }

    /// Finishes `pending` (steps 2–4 of the protocol: the manifest, the rename, LATEST) and
    /// applies retention. On an error before the LATEST rename nothing new is left behind.
    pub fn commit(&mut self, pending: PendingCheckpoint) -> Result<Saved> {
        let step = pending.step;
        let tmp = pending.tmp.clone();
        let target = self.dir.join(step_dir_name(step));
        let manifest = match pending.finish() {
            Ok(manifest) => manifest,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let mut warnings = Vec::new();
        self.commit_dir(&tmp, &target, &mut warnings)?;
        if let Some(w) = self.fs.write_pointer(&self.dir, LATEST_POINTER, step)? {
            warnings.push(w);
        }
        self.latest = Some(step);
        warnings.extend(self.apply_retention());
        tracing::info!(step, path = %target.display(), "Checkpoint saved.");
        Ok(Saved {
            checkpoint: CheckpointDir {
                step,
                path: target,
                manifest,
            },
            warnings,
        })
    }

    /// Step 3: renames the finished `tmp` to `target` (moving an existing `target` aside
    /// first) and fsyncs the parent. On error nothing new is left behind.
    fn commit_dir(&self, tmp: &Path, target: &Path, warnings: &mut Vec<Warning>) -> Result<()> {
        let parent = target.parent().unwrap_or(Path::new("."));
        let aside = parent.join(format!(
            "{TMP_PREFIX}{REPLACED_PREFIX}{}",
            file_name_of(target)
        ));
        let replacing = target.exists();
        if replacing {
            if let Err(e) = self.fs.rename(target, &aside) {
                let _ = fs::remove_dir_all(tmp);
                return Err(e);
            }
        }
        if let Err(e) = self.fs.rename(tmp, target) {
            let _ = fs::remove_dir_all(tmp);
            if replacing {
                let _ = fs::rename(&aside, target);
            }
            return Err(e);
        }
        if let Err(e) = self.fs.sync_dir(parent) {
            let _ = fs::remove_dir_all(target);
            if replacing {
                let _ = fs::rename(&aside, target);
            }
            return Err(e);
        }
        if replacing {
            if let Err(e) = self.fs.remove_dir_all(&aside) {
                warnings.push(warn(Warning::RemoveFailed {
                    path: aside,
                    reason: e.to_string(),
                }));
            }
        }
        Ok(())
    }

    /// The checkpoint of `step`, after re-hashing every file against its manifest.
    pub fn load(&self, step: u64) -> Result<CheckpointDir> {
        load_step(&self.dir, step)
    }

    /// Every `step-*` directory, oldest first, with a cheap completeness check.
    pub fn list(&self) -> Result<Vec<Listed>> {
        list_dir(&self.dir)
    }

    /// Where to resume: LATEST if it verifies, else the newest checkpoint that does. Each
    /// checkpoint or pointer passed over is a warning. `None` when nothing is usable.
    pub fn resume_point(&self) -> Result<(Option<CheckpointDir>, Vec<Warning>)> {
        let mut warnings = Vec::new();
        let latest = read_pointer(&self.dir, LATEST_POINTER);
        let mut candidates: Vec<u64> = Vec::new();
        match latest {
            Ok(Some(step)) => candidates.push(step),
            Ok(None) => {}
            Err(reason) => warnings.push(warn(Warning::BadPointer {
                path: self.dir.join(LATEST_POINTER),
                reason,
            })),
        }
        let first = candidates.first().copied();
        let listed = self.list()?;
        candidates.extend(
            listed
                .iter()
                .rev()
                .map(|l| l.step)
                .filter(|&s| Some(s) != first),
        );
        for step in candidates {
            match self.load(step) {
                Ok(checkpoint) => return Ok((Some(checkpoint), warnings)),
                Err(e) => warnings.push(warn(Warning::Skipped {
                    path: self.dir.join(step_dir_name(step)),
                    reason: e.to_string(),
                })),
            }
        }
        Ok((None, warnings))
    }

    /// Makes the checkpoint of `step` the rollback target: verifies it, replaces GOOD,
    /// copies it to the mirror, applies retention. Mirror and retention trouble are warnings.
    pub fn mark_good(&mut self, step: u64) -> Result<Vec<Warning>> {
        let checkpoint = self.load(step)?;
        let mut warnings: Vec<Warning> = self
            .fs
            .write_pointer(&self.dir, GOOD_POINTER, step)?
            .into_iter()
            .collect();
        self.good = Some(step);
        tracing::info!(step, "Checkpoint marked GOOD.");
        if let Some(mirror) = self.retention.mirror_dir.clone() {
            let mirror_dir = mirror.join(CHECKPOINTS_DIR);
            match self.mirror(&checkpoint, &mirror_dir) {
                Ok(w) => warnings.extend(w),
                Err(e) => warnings.push(warn(Warning::MirrorFailed {
                    path: mirror_dir,
                    reason: e.to_string(),
                })),
            }
        }
        warnings.extend(self.apply_retention());
        Ok(warnings)
    }

    /// Copies `checkpoint` into `mirror_dir` with the save protocol, checking each copied
    /// file's hash against the manifest, then sets the mirror's GOOD and LATEST.
    fn mirror(&self, checkpoint: &CheckpointDir, mirror_dir: &Path) -> Result<Vec<Warning>> {
        fs::create_dir_all(mirror_dir).map_err(io_err("create directory", mirror_dir))?;
        let name = step_dir_name(checkpoint.step);
        let target = mirror_dir.join(&name);
        let mut warnings = Vec::new();
        let already =
            verify(&target, checkpoint.step).is_ok_and(|copy| copy.manifest == checkpoint.manifest);
        if !already {
            let tmp = mirror_dir.join(format!("{TMP_PREFIX}{name}"));
            if tmp.exists() {
                self.fs.remove_dir_all(&tmp)?;
            }
            if let Err(e) = self.copy_checkpoint(checkpoint, &tmp) {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
            self.commit_dir(&tmp, &target, &mut warnings)?;
        }
        for pointer in [GOOD_POINTER, LATEST_POINTER] {
            warnings.extend(
                self.fs
                    .write_pointer(mirror_dir, pointer, checkpoint.step)?,
            );
        }
        let kept = keep_set(mirror_dir, self.retention.keep_last, &[checkpoint.step])?;
        warnings.extend(self.remove_unkept(mirror_dir, &kept, |_| true)?);
        Ok(warnings)
    }

    fn copy_checkpoint(&self, checkpoint: &CheckpointDir, tmp: &Path) -> Result<()> {
        self.fs.create_dir(tmp)?;
        for entry in &checkpoint.manifest.files {
            let dest = tmp.join(&entry.name);
            let copied = self
                .fs
                .write_file(&dest, FileSource::Copy(&checkpoint.file(&entry.name)))?;
            if copied.sha256 != entry.sha256 || copied.size != entry.size {
                return Err(CheckpointError::Corrupt {
                    path: checkpoint.file(&entry.name),
                    reason: "changed while being copied to the mirror".into(),
                });
            }
        }
        self.fs.write_file(
            &tmp.join(MANIFEST_FILE),
            FileSource::Copy(&checkpoint.file(MANIFEST_FILE)),
        )?;
        self.fs.sync_dir(tmp)
    }

    /// Restores the timeline to `step`: verifies its checkpoint, points LATEST at it and
    /// deletes every newer checkpoint (the abandoned timeline; its step numbers come again).
    pub fn rollback_to(&mut self, step: u64) -> Result<(CheckpointDir, Vec<Warning>)> {
        let checkpoint = self.load(step)?;
        let mut warnings: Vec<Warning> = self
            .fs
            .write_pointer(&self.dir, LATEST_POINTER, step)?
            .into_iter()
            .collect();
        self.latest = Some(step);
        let keep: BTreeSet<u64> = BTreeSet::new();
        warnings.extend(self.remove_unkept(&self.dir, &keep, |s| s > step)?);
        tracing::info!(step, "Rolled back to checkpoint.");
        Ok((checkpoint, warnings))
    }

    /// Deletes what the retention policy does not keep; failures are warnings.
    fn apply_retention(&self) -> Vec<Warning> {
        let protected: Vec<u64> = self.good.into_iter().chain(self.latest).collect();
        let removal = keep_set(&self.dir, self.retention.keep_last, &protected)
            .and_then(|kept| self.remove_unkept(&self.dir, &kept, |_| true));
        match removal {
            Ok(warnings) => warnings,
            Err(e) => vec![warn(Warning::RemoveFailed {
                path: self.dir.clone(),
                reason: e.to_string(),
            })],
        }
    }

    /// Deletes every `step-*` directory of `dir` not in `kept` for which `select` holds.
    fn remove_unkept(
        &self,
        dir: &Path,
        kept: &BTreeSet<u64>,
        select: impl Fn(u64) -> bool,
    ) -> Result<Vec<Warning>> {
        let mut warnings = Vec::new();
        for listed in list_dir(dir)? {
            if kept.contains(&listed.step) || !select(listed.step) {
                continue;
            }
            // Renamed out of sight first, so a crash halfway through the deletion never
            // leaves a `step-*` directory with files missing.
            let doomed = dir.join(format!(
                "{TMP_PREFIX}{DELETING_PREFIX}{}",
                file_name_of(&listed.path)
            ));
            let removed = self
                .fs
                .rename(&listed.path, &doomed)
                .and_then(|_| self.fs.remove_dir_all(&doomed));
            match removed {
                Ok(()) => tracing::info!(path = %listed.path.display(), "Deleted old checkpoint."),
                Err(e) => warnings.push(warn(Warning::RemoveFailed {
                    path: listed.path,
                    reason: e.to_string(),
                })),
            }
        }
        Ok(warnings)
    }
}

/// Steps kept in `dir`: the newest `keep_last` complete checkpoints plus `protected`.
fn keep_set(dir: &Path, keep_last: usize, protected: &[u64]) -> Result<BTreeSet<u64>> {
    let listed = list_dir(dir)?;
    let mut kept: BTreeSet<u64> = protected.iter().copied().collect();
    kept.extend(
        listed
            .iter()
            .rev()
            .filter(|l| l.status.is_ok())
            .take(keep_last)
            .map(|l| l.step),
    );
    Ok(kept)
}

/// Which checkpoint a reader asks [`load_read_only`] for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The checkpoint of this step.
    Step(u64),
    /// The rollback target (the `GOOD` pointer).
    Good,
    /// The newest checkpoint (the `LATEST` pointer).
    Latest,
}

/// The checkpoint `select` names in `<state_dir>/checkpoints`, after re-hashing every file
/// against its manifest (a flipped byte is [`CheckpointError::Corrupt`] naming the file).
///
/// Read-only, for a process beside the daemon: unlike [`CheckpointStore::open`] it creates
/// nothing and removes no `.tmp-*` directory (that may be the daemon's save in flight). A
/// daemon may also re-aim a pointer and delete the old target (retention) while this reads
/// it, so a failure is retried when the pointer has moved meanwhile; a failure of a pointer
/// that still names the same checkpoint is the checkpoint's own.
pub fn load_read_only(state_dir: &Path, select: Select) -> Result<CheckpointDir> {
    let dir = state_dir.join(CHECKPOINTS_DIR);
    fs::metadata(&dir).map_err(io_err("open", &dir))?;
    let pointer = match select {
        Select::Step(step) => return load_step(&dir, step),
        Select::Good => GOOD_POINTER,
        Select::Latest => LATEST_POINTER,
    };
    let target = || -> Result<u64> {
        let path = dir.join(pointer);
        match read_pointer(&dir, pointer) {
            Ok(Some(step)) => Ok(step),
            Ok(None) => Err(CheckpointError::NoPointer { path, pointer }),
            Err(reason) => Err(CheckpointError::BadPointer { path, reason }),
        }
    };
    // Three reads: a daemon saving every step could move the pointer twice while a large
    // checkpoint is hashed; past that the failure is reported as it is.
    let mut step = target()?;
    for _ in 0..2 {
        match load_step(&dir, step) {
            Ok(checkpoint) => return Ok(checkpoint),
            Err(e) => match target() {
                Ok(now) if now != step => step = now,
                _ => return Err(e),
            },
        }
    }
    load_step(&dir, step)
}

/// The checkpoint of `step` in the checkpoints directory `dir`, verified.
fn load_step(dir: &Path, step: u64) -> Result<CheckpointDir> {
    let path = dir.join(step_dir_name(step));
    if !path.is_dir() {
        return Err(CheckpointError::NotFound {
            step,
            dir: dir.to_path_buf(),
        });
    }
    verify(&path, step)
}

/// Every `step-*` directory in `dir`, oldest first, with its cheap check.
fn list_dir(dir: &Path) -> Result<Vec<Listed>> {
    let mut listed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir_name) else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let status = check_complete(&path, step);
        listed.push(Listed { step, path, status });
    }
    listed.sort_by_key(|l| l.step);
    Ok(listed)
}

/// Deletes `.tmp-*` entries (crash debris) in `dir`, one warning each. A checkpoint moved
/// aside to be replaced (`.tmp-replaced-step-…`) whose replacement never arrived is moved
/// back instead: it is complete, and a pointer may name it.
fn remove_debris(dir: &Path) -> Result<Vec<Warning>> {
    let mut warnings = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let path = entry.path();
        if let Some(original) = rest.strip_prefix(REPLACED_PREFIX) {
            let original = dir.join(original);
            if !original.exists() && fs::rename(&path, &original).is_ok() {
                warnings.push(warn(Warning::Restored { path: original }));
                continue;
            }
        }
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        warnings.push(warn(match removed {
            Ok(()) => Warning::RemovedTemporary { path },
            Err(e) => Warning::RemoveFailed {
                path,
                reason: e.to_string(),
            },
        }));
    }
    Ok(warnings)
}

/// Reads a pointer file: `Ok(None)` if absent, `Err(reason)` if unreadable or malformed.
fn read_pointer(dir: &Path, name: &str) -> std::result::Result<Option<u64>, String> {
    let path = dir.join(name);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    parse_step_dir_name(text.trim())
        .map(Some)
        .ok_or_else(|| format!("{:?} is not a checkpoint directory name", text.trim()))
}

/// The pointer's step if it names a complete checkpoint; a warning otherwise.
fn read_valid_pointer(dir: &Path, name: &str, warnings: &mut Vec<Warning>) -> Option<u64> {
    let path = dir.join(name);
    let step = match read_pointer(dir, name) {
        Ok(step) => step?,
        Err(reason) => {
            warnings.push(warn(Warning::BadPointer { path, reason }));
            return None;
        }
    };
    match check_complete(&dir.join(step_dir_name(step)), step) {
        Ok(_) => Some(step),
        Err(e) => {
            warnings.push(warn(Warning::BadPointer {
                path,
                reason: e.to_string(),
            }));
            None
        }
    }
}

/// Reads and checks the manifest of the directory `path` of `step`, and that every file it
/// lists exists with the listed size.
fn check_complete(path: &Path, step: u64) -> Result<Manifest> {
    let manifest_path = path.join(MANIFEST_FILE);
    let bytes = match fs::read(&manifest_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::Incomplete {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("read", &manifest_path)(e)),
    };
    let bad = |reason: String| CheckpointError::BadManifest {
        path: manifest_path.clone(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(bad(format!(
            "format_version {} is newer than this program's {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    if manifest.step != step {
        return Err(bad(format!(
            "step {} does not match the directory name",
            manifest.step
        )));
    }
    validate_names(manifest.files.iter().map(|f| f.name.as_str()))
        .map_err(|e| bad(e.to_string()))?;
    for entry in &manifest.files {
        let file = path.join(&entry.name);
        let size = match fs::metadata(&file) {
            Ok(meta) => meta.len(),
            Err(e) => {
                return Err(CheckpointError::Corrupt {
                    path: file,
                    reason: format!("cannot stat: {e}"),
                })
            }
        };
        if size != entry.size {
            return Err(CheckpointError::Corrupt {
                path: file,
                reason: format!("size {size} bytes, manifest says {}", entry.size),
            });
        }
    }
    Ok(manifest)
}

/// [`check_complete`] plus the sha256 of every file.
fn verify(path: &Path, step: u64) -> Result<CheckpointDir> {
    let manifest = check_complete(path, step)?;
    for entry in &manifest.files {
        let file = path.join(&entry.name);
        let (sha256, size) = hash_file(&file)?;
        if sha256 != entry.sha256 || size != entry.size {
            return Err(CheckpointError::Corrupt {
                path: file,
                reason: format!(
                    "sha256 {sha256} ({size} bytes), manifest says {} ({} bytes)",
                    entry.sha256, entry.size
                ),
            });
        }
    }
    Ok(CheckpointDir {
        step,
        path: path.to_path_buf(),
        manifest,
    })
}

/// Checks that checkpoint file names are plain, unique and not reserved.
fn validate_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = BTreeSet::new();
    for name in names {
        let invalid = |reason| CheckpointError::InvalidFileName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
            return Err(invalid("must be a plain file name"));
        }
        if name.starts_with('.') {
            return Err(invalid("must not start with '.'"));
        }
        if name == MANIFEST_FILE {
            return Err(invalid("reserved for the manifest"));
        }
        if !seen.insert(name) {
            return Err(invalid("given twice"));
        }
    }
    Ok(())
}

/// One quarantined example: trained in a step that was then rolled back. Kept for
/// inspection; its hash stays in the never-repeat ledger, so it is never trained again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord<T> {
    /// When it was quarantined, RFC 3339 UTC.
    pub ts: String,
    /// The step the example was trained in.
    pub step: u64,
    /// The step whose evaluation triggered the rollback.
    pub rolled_back_from: u64,
    /// The GOOD step restored.
    pub rolled_back_to: u64,
    /// The example itself (the labeler's `Example`).
    pub example: T,
}

/// `<state_dir>/quarantine/examples.jsonl`, append-only (same discipline as `events.jsonl`).
#[derive(Debug)]
pub struct Quarantine {
    /// The JSONL file.
    writer: JsonlWriter,
}

impl Quarantine {
    /// Opens (or creates) the quarantine of `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(QUARANTINE_DIR).join(QUARANTINE_FILE);
        Ok(Self {
            writer: JsonlWriter::open(&path)?,
        })
    }

    /// Appends `example`, trained at `step`, rolled back from `from` to `to`.
    pub fn append<T: Serialize>(
        &mut self,
        step: u64,
        from: u64,
        to: u64,
        example: T,
    ) -> Result<()> {
        let record = QuarantineRecord {
            ts: rfc3339_utc(SystemTime::now()),
            step,
            rolled_back_from: from,
            rolled_back_to: to,
            example,
        };
        Ok(self.writer.append(&record)?)
    }

    /// Every quarantined record of `state_dir` (torn or bad lines skipped with warnings).
    pub fn read<T: serde::de::DeserializeOwned>(
        state_dir: &Path,
    ) -> Result<(Vec<QuarantineRecord<T>>, Vec<LineWarning>)> {
        let path = state_dir.join(QUARANTINE_DIR).join(QUARANTINE_FILE);
        Ok(read_jsonl(&path)?)
    }
}
