//! Where a save puts its files: a plain directory ([`DirSink`]), or a checkpoint being
//! written ([`crate::checkpoint::PendingCheckpoint`]), which hashes every file on its way to
//! disk so that nothing is written twice or read back.
//!
//! A writer of a model directory (the weights, streamed one tensor at a time; the optimizer
//! state; small JSON files) only sees [`FileSink`]: it never learns where the bytes end up,
//! and the checkpoint store never sees a staging copy.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A callback streaming one file's bytes into the writer it is given.
pub type Produce<'a> = &'a mut dyn FnMut(&mut dyn Write) -> io::Result<()>;

/// A destination for the files of one directory being written.
pub trait FileSink {
    /// Writes the file `name` (a plain name, no separators) with the bytes `produce`
    /// streams. An error names the destination.
    fn put(&mut self, name: &str, produce: Produce<'_>) -> io::Result<()>;

    /// Adds the existing file `from` as `name` without copying its bytes where the
    /// filesystem allows it (a hard link), and as a streamed copy where it does not (another
    /// filesystem, or links refused).
    fn put_existing(&mut self, name: &str, from: &Path) -> io::Result<()>;
}

/// `put` of a byte slice.
pub fn put_bytes(sink: &mut dyn FileSink, name: &str, bytes: &[u8]) -> io::Result<()> {
    sink.put(name, &mut |out| out.write_all(bytes))
}

/// Streams the file `from` into `out`.
pub fn copy_file_into(from: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut src = File::open(from).map_err(|e| named(e, from))?;
    io::copy(&mut src, out).map(|_| ())
}

/// `e` with `path` in front of its message, kind kept.
pub fn named(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Files written straight into a directory: each to a temporary sibling, fsynced, then
/// renamed, so a crash never leaves a half-written file under its real name.
pub struct DirSink {
    dir: PathBuf,
}

impl DirSink {
    /// A sink into `dir`, created (with its parents) if missing.
    pub fn create(dir: &Path) -> io::Result<DirSink> {
        fs::create_dir_all(dir).map_err(|e| named(e, dir))?;
        Ok(DirSink {
            dir: dir.to_path_buf(),
        })
    }
}

impl FileSink for DirSink {
    fn put(&mut self, name: &str, produce: Produce<'_>) -> io::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = (|| {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            produce(&mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(|e| named(e, &path))
    }

    fn put_existing(&mut self, name: &str, from: &Path) -> io::Result<()> {
        let path = self.dir.join(name);
        let _ = fs::remove_file(&path);
        if fs::hard_link(from, &path).is_ok() {
            return Ok(());
        }
        self.put(name, &mut |out| copy_file_into(from, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_directory_sink_writes_files_and_links_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source.bin");
        fs::write(&src, b"weights").unwrap();
        let mut sink = DirSink::create(&dir.path().join("out")).unwrap();
        put_bytes(&mut sink, "a.json", b"{}").unwrap();
        sink.put_existing("w.bin", &src).unwrap();
        let out = dir.path().join("out");
        assert_eq!(fs::read(out.join("a.json")).unwrap(), b"{}");
        assert_eq!(fs::read(out.join("w.bin")).unwrap(), b"weights");
        // The same inode: no byte was copied.
        assert_eq!(
            fs::metadata(out.join("w.bin")).unwrap().ino(),
            fs::metadata(&src).unwrap().ino()
        );
        let names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_under_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = DirSink::create(dir.path()).unwrap();
        let err = sink
            .put("x.bin", &mut |out| {
                out.write_all(b"half")?;
                Err(io::Error::other("device read failed"))
            })
            .unwrap_err();
        assert!(err.to_string().contains("x.bin"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
