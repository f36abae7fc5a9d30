//! `<state_dir>/dreamloop.pid`: the running daemon's pid, and the proof that it is running.
//!
//! A pid alone proves nothing: after a crash the file names whatever process got the pid
//! next, and a hand-edited `0` would make `kill(2)` signal the caller's own process group.
//! So the daemon holds an exclusive `flock(2)` on the file for its whole life (the kernel
//! drops it when the process dies, however it dies), and a control command signals a pid
//! only when
//! - the lock is held (a shared lock attempt fails), and
//! - the pid is positive and is the process the kernel lists as the lock's holder in
//!   `/proc/locks` (or, where that file is unavailable, a process whose executable is
//!   named `dreamloop`).
//!
//! Anything else is a stale pid file, reported as such, and nobody is signalled.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::status::PID_FILE;

/// The live daemon's hold on its pid file; the file is removed when dropped.
pub struct PidLock {
    /// Where the file is.
    path: PathBuf,
    /// Open for the process's whole life: closing it would release the lock.
    _file: File,
}

/// What the pid file of a state directory says about a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// No pid file.
    None,
    /// A file no live daemon holds (the pid in it, when it parses, is not ours to signal).
    Stale(Option<i32>),
    /// A live daemon with this pid holds the lock.
    Running(i32),
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn would_block(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl PidLock {
    /// Takes the state directory: locks `dreamloop.pid` (refusing when a live daemon holds
    /// it) and writes this process's pid into it, durably.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<PidLock> {
        let path = state_dir.join(PID_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(dreamloop::durable::FILE_MODE)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Err(e) = flock(&file, libc::LOCK_EX) {
            if would_block(&e) {
                let pid =
                    read_pid(&mut file).map_or_else(|| "unknown".to_string(), |p| p.to_string());
                bail!(
                    "{}: another dreamloop (pid {pid}) is running on this state directory",
                    path.display()
                );
            }
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .and_then(|()| file.sync_all())
            .and_then(|()| dreamloop::durable::sync_parent(&path))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidLock { path, _file: file })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other daemon can have taken it in between.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who holds the pid file of `state_dir` (see the module docs for the checks).
pub fn owner(state_dir: &Path) -> anyhow::Result<Owner> {
    let path = state_dir.join(PID_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Owner::None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let pid = read_pid(&mut file);
    match flock(&file, libc::LOCK_SH) {
        // Nobody holds it: whatever pid it names is not a running daemon. Our shared lock
        // goes when `file` is dropped.
        Ok(()) => return Ok(Owner::Stale(pid)),
        Err(e) if would_block(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
    }
    let Some(pid) = pid.filter(|&p| p > 0) else {
        return Ok(Owner::Stale(pid));
    };
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    let verified = match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => lock_holders(&locks, meta.dev(), meta.ino()).contains(&pid),
        Err(_) => std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
            .is_some_and(|name| name.starts_with("dreamloop")),
    };
    Ok(if verified {
        Owner::Running(pid)
    } else {
        Owner::Stale(Some(pid))
    })
}

/// Pids holding a `FLOCK` on the file `dev:ino`, from `/proc/locks` lines like
/// `1: FLOCK  ADVISORY  WRITE 4242 08:01:1311 0 EOF` (the device as `major:minor` in hex).
fn lock_holders(locks: &str, dev: u64, ino: u64) -> Vec<i32> {
    let major = libc::major(dev) as u64;
    let minor = libc::minor(dev) as u64;
    locks
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "->" marks a waiter, which shifts the fields by one; waiters hold nothing.
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid: i32 = fields.get(4)?.parse().ok()?;
            let mut id = fields.get(5)?.split(':');
            let ma = u64::from_str_radix(id.next()?, 16).ok()?;
            let mi = u64::from_str_radix(id.next()?, 16).ok()?;
            let i: u64 = id.next()?.parse().ok()?;
            (ma == major && mi == minor && i == ino).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 08:01:1311 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 08:01:1311 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 7 fd:02:1311 0 EOF\n";
        assert_eq!(lock_holders(locks, libc::makedev(8, 1), 1311), vec![4242]);
        assert_eq!(lock_holders(locks, libc::makedev(0xfd, 2), 1311), vec![7]);
    }

    #[test]
    fn a_held_lock_is_running_and_a_released_one_stale() {
        let dir = tempfile::tempdir().unwrap();
        let lock = PidLock::acquire(dir.path()).unwrap();
        assert_eq!(
            owner(dir.path()).unwrap(),
            Owner::Running(std::process::id() as i32)
        );
        assert!(PidLock::acquire(dir.path()).is_err());
        drop(lock);
        assert_eq!(owner(dir.path()).unwrap(), Owner::None);
        std::fs::write(dir.path().join(PID_FILE), "1\n").unwrap();
        assert_eq!(owner(dir.path()).unwrap(), Owner::Stale(Some(1)));
    }
}
