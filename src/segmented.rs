//! An append-only JSONL log kept as numbered segments, so it can grow for weeks without a
//! start-up having to parse all of it (`<state_dir>/trained.jsonl`).
//!
//! `<stem>.jsonl` is the segment being written ([`JsonlWriter`]: one fsynced line per
//! record). When it has reached the size bound, the next append first *seals* it: a rename to
//! `<stem>.<n>.jsonl` (n = 1, 2, … in eight digits, one more than the highest sealed) and an
//! fsync of the directory, then the record goes to a fresh `<stem>.jsonl`. A rename is atomic,
//! so a crash at any point of a rotation leaves every record in exactly one complete file:
//! before the rename the current segment holds them; after it the sealed one does, and the
//! current segment does not exist yet (it reads as empty) until the next append creates it.
//! Nothing is copied or rewritten, so nothing can be half-written.
//!
//! Readers go newest first ([`read_newest_first`]) and stop when they have what they need;
//! [`segments`] lists every segment oldest first for the ones (tests, audits) that want the
//! whole history. Sealed segments are never written again: an operator may archive or delete
//! old ones (the daemon reads back only as far as its GOOD checkpoint).
//!
//! It knows nothing about what the records mean.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::durable::sync_parent;
use crate::events::{read_jsonl, EventError, JsonlWriter, LineWarning};

/// The segmented log being written.
#[derive(Debug)]
pub struct SegmentedLog {
    /// The directory holding the segments.
    dir: PathBuf,
    /// The file name without `.jsonl` (`trained`).
    stem: String,
    /// A segment at or above this many bytes is sealed before the next append.
    segment_bytes: u64,
    /// The current segment; `None` after a seal until the next append opens a fresh one.
    writer: Option<JsonlWriter>,
}

impl SegmentedLog {
    /// Opens the log `<dir>/<stem>.jsonl` (creating the directory if needed), sealing the
    /// current segment at `segment_bytes` (at least one record per segment).
    pub fn open(dir: &Path, stem: &str, segment_bytes: u64) -> Result<Self, EventError> {
        Ok(SegmentedLog {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            segment_bytes,
            writer: Some(JsonlWriter::open(&current(dir, stem))?),
        })
    }

    /// Appends one record (fsynced), sealing the current segment first if it is full.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), EventError> {
        let path = current(&self.dir, &self.stem);
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(io("stat", &path, source)),
        };
        if len >= self.segment_bytes {
            self.seal(&path)?;
        }
        let writer = match self.writer.as_mut() {
            Some(w) => w,
            None => self.writer.insert(JsonlWriter::open(&path)?),
        };
        writer.append(record)
    }

    /// Renames the full current segment to the next sealed name and makes the rename durable.
    fn seal(&mut self, path: &Path) -> Result<(), EventError> {
        self.writer = None;
        let next = sealed(&self.dir, &self.stem)?
            .last()
            .map_or(1, |(n, _)| n + 1);
        let target = self.dir.join(sealed_name(&self.stem, next));
        std::fs::rename(path, &target).map_err(|e| io("seal", path, e))?;
        sync_parent(&target).map_err(|e| io("fsync the directory of", &target, e))?;
        tracing::info!(segment = %target.display(), "Log segment sealed.");
        Ok(())
    }
}

/// Every segment of `<dir>/<stem>`, oldest first: the sealed ones by number, then the
/// current one if it exists.
pub fn segments(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, EventError> {
    let mut out: Vec<PathBuf> = sealed(dir, stem)?.into_iter().map(|(_, p)| p).collect();
    let now = current(dir, stem);
    if now.exists() {
        out.push(now);
    }
    Ok(out)
}

/// Visits the records of the log newest first (within a segment, last line first) until
/// `visit` breaks; reads a segment only when the newer ones did not suffice. Returns the
/// warnings of the lines that did not parse in the segments read.
pub fn read_newest_first<T: DeserializeOwned>(
    dir: &Path,
    stem: &str,
    mut visit: impl FnMut(T) -> ControlFlow<()>,
) -> Result<Vec<LineWarning>, EventError> {
    let mut warnings = Vec::new();
    for path in segments(dir, stem)?.iter().rev() {
        let (records, mut bad) = read_jsonl::<T>(path)?;
        warnings.append(&mut bad);
        for record in records.into_iter().rev() {
            if visit(record).is_break() {
                return Ok(warnings);
            }
        }
    }
    Ok(warnings)
}

fn current(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.jsonl"))
}

fn sealed_name(stem: &str, n: u64) -> String {
    format!("{stem}.{n:08}.jsonl")
}

/// The sealed segments `<stem>.<n>.jsonl` by ascending `n`.
fn sealed(dir: &Path, stem: &str) -> Result<Vec<(u64, PathBuf)>, EventError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", dir, e)),
    };
    let prefix = format!("{stem}.");
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("list", dir, e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .filter(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> EventError {
    EventError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn all(dir: &Path) -> Vec<u64> {
        segments(dir, "log")
            .unwrap()
            .iter()
            .flat_map(|p| read_jsonl::<u64>(p).unwrap().0)
            .collect()
    }

    #[test]
    fn a_full_segment_is_sealed_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        // Each record is "<n>\n", 2 bytes: three per 6-byte segment.
        let mut log = SegmentedLog::open(dir.path(), "log", 6).unwrap();
        for n in 0..8u64 {
            log.append(&n).unwrap();
        }
        assert_eq!(
            names(dir.path()),
            ["log.00000001.jsonl", "log.00000002.jsonl", "log.jsonl"]
        );
        assert_eq!(all(dir.path()), (0..8).collect::<Vec<_>>());
        // Reopened (a restart), numbering and order go on.
        drop(log);
        let mut log = SegmentedLog::open(dir.path(), "log", 6).unwrap();
        for n in 8..10u64 {
            log.append(&n).unwrap();
        }
        assert_eq!(all(dir.path()), (0..10).collect::<Vec<_>>());
        assert_eq!(names(dir.path()).len(), 4);
    }

    /// A crash after the rename, before the fresh segment exists: nothing is lost, the log
    /// reads the same, and the next append starts the fresh segment.
    #[test]
    fn a_crash_between_seal_and_append_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentedLog::open(dir.path(), "log", 4).unwrap();
        for n in 0..2u64 {
            log.append(&n).unwrap();
        }
        drop(log);
        std::fs::rename(
            dir.path().join("log.jsonl"),
            dir.path().join("log.00000001.jsonl"),
        )
        .unwrap();
        assert_eq!(all(dir.path()), [0, 1]);
        let mut log = SegmentedLog::open(dir.path(), "log", 4).unwrap();
        log.append(&2u64).unwrap();
        assert_eq!(all(dir.path()), [0, 1, 2]);
        assert_eq!(names(dir.path()), ["log.00000001.jsonl", "log.jsonl"]);
    }

    /// Newest first, and a segment older than the record that stops the visit is not read
    /// (an unreadable one — here a directory in its place — would fail the read).
    #[test]
    fn readers_stop_without_reading_older_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentedLog::open(dir.path(), "log", 6).unwrap();
        for n in 0..8u64 {
            log.append(&n).unwrap();
        }
        let oldest = dir.path().join("log.00000001.jsonl");
        std::fs::remove_file(&oldest).unwrap();
        std::fs::create_dir(&oldest).unwrap();
        let mut seen = Vec::new();
        read_newest_first::<u64>(dir.path(), "log", |n| {
            seen.push(n);
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, [7, 6, 5, 4, 3]);
        assert!(
            read_newest_first::<u64>(dir.path(), "log", |_| ControlFlow::Continue(())).is_err()
        );
    }

    #[test]
    fn other_files_are_not_segments() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "log.1.jsonl",
            "log.0000000x.jsonl",
            "logs.00000001.jsonl",
            "log.jsonl.tmp",
        ] {
            std::fs::write(dir.path().join(name), "1\n").unwrap();
        }
        assert!(segments(dir.path(), "log").unwrap().is_empty());
    }
}
