//! Durable, private state files: the one way the daemon replaces a small file.
//!
//! A replacement goes to a temporary sibling created with mode 0600 (state files hold
//! conversation text and must not be world-readable), is fsynced, renamed over the
//! target, and the directory is fsynced so the rename itself survives a power loss
//! (POSIX makes a rename durable only once its directory is). Directories the daemon
//! creates for its state are 0700 for the same reason.
//!
//! It does not know what the bytes mean; callers serialize.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every state file (owner read/write only).
pub const FILE_MODE: u32 = 0o600;
/// Mode of every state directory (owner only).
pub const DIR_MODE: u32 = 0o700;

/// Replaces `path` with `bytes` atomically and durably (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// fsyncs the directory holding `path` (after a rename or a create in it).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents with mode 0700 (existing ones keep theirs).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for appending, creating it with mode 0600.
pub fn open_append_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        fs::write(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        assert!(!dir.path().join("a.json.tmp").exists());
        let sub = dir.path().join("x/y");
        create_private_dir(&sub).unwrap();
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, DIR_MODE);
    }
}
