//! A minimal `sd_notify` client: tells systemd that the daemon is ready, what it is doing,
//! that it is still alive, and that it is stopping.
//!
//! The protocol (`sd_notify(3)`, <https://www.freedesktop.org/software/systemd/man/sd_notify.html>):
//! newline-separated `KEY=value` assignments in one datagram sent to the `AF_UNIX` socket named
//! by `$NOTIFY_SOCKET`; a name starting with `@` is in the abstract namespace. When the
//! variable is unset (not started by systemd, or `Type=` other than `notify`) every call is a
//! no-op, so the daemon calls these unconditionally. The watchdog interval comes from
//! `$WATCHDOG_USEC` (and applies to this process only if `$WATCHDOG_PID` is unset or names it).
//!
//! Deliberately not here: `libsystemd`, file-descriptor passing, and `Type=notify-reload`
//! (reload is `SIGHUP`, handled in `signals.rs`). The environment is read on each call, not
//! unset after use, so a test can never see another test's socket through it: tests use
//! [`Notifier::new`] directly.

// The daemon's `run()` calls these; until it is wired in, the binary does not, and the tests
// use `Notifier` directly (never the environment's socket: under a systemd-run CI that would
// notify the CI's own service manager).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    /// The socket address as systemd spelled it (`/run/systemd/notify` or `@name`);
    /// `None` makes every call a no-op.
    socket: Option<String>,
}

impl Notifier {
    /// A notifier for `socket` (`$NOTIFY_SOCKET`'s syntax); `None` or empty: a no-op one.
    pub fn new(socket: Option<String>) -> Self {
        Self {
            socket: socket.filter(|s| !s.is_empty()),
        }
    }

    /// The notifier systemd set up for this process, if any.
    pub fn from_env() -> Self {
        Self::new(std::env::var("NOTIFY_SOCKET").ok())
    }

    /// Sends `state` (newline-separated assignments). `Ok(false)` when there is no socket.
    pub fn notify(&self, state: &str) -> io::Result<bool> {
        let Some(socket) = &self.socket else {
            return Ok(false);
        };
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = socket.strip_prefix('@') {
            send_abstract(&sock, name, state.as_bytes())?;
        } else {
            sock.send_to(state.as_bytes(), socket)?;
        }
        Ok(true)
    }

    /// `READY=1`: start-up is complete (the state is loaded, /metrics is served).
    pub fn ready(&self) -> io::Result<bool> {
        self.notify("READY=1")
    }

    /// `STATUS=…`: one line for `systemctl status` (newlines would end the assignment, so
    /// they become spaces).
    pub fn status(&self, text: &str) -> io::Result<bool> {
        self.notify(&format!("STATUS={}", text.replace(['\n', '\r'], " ")))
    }

    /// `WATCHDOG=1`: the training loop is alive. Send at least every half
    /// [`watchdog_interval`].
    pub fn watchdog(&self) -> io::Result<bool> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1`: shutdown has begun (finishing the step, writing the checkpoint).
    pub fn stopping(&self) -> io::Result<bool> {
        self.notify("STOPPING=1")
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &str, payload: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(payload, &addr).map(|_| ())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_sock: &UnixDatagram, name: &str, _payload: &[u8]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("abstract socket @{name} exists only on Linux"),
    ))
}

/// `READY=1` to systemd's socket, if any.
pub fn ready() -> io::Result<bool> {
    Notifier::from_env().ready()
}

/// `STATUS=text` to systemd's socket, if any.
pub fn status(text: &str) -> io::Result<bool> {
    Notifier::from_env().status(text)
}

/// `WATCHDOG=1` to systemd's socket, if any.
pub fn watchdog() -> io::Result<bool> {
    Notifier::from_env().watchdog()
}

/// `STOPPING=1` to systemd's socket, if any.
pub fn stopping() -> io::Result<bool> {
    Notifier::from_env().stopping()
}

/// The watchdog timeout systemd enforces on this process (`WatchdogSec=`), if any. Ping at
/// half of it.
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// `$WATCHDOG_USEC` as a duration when it applies to process `pid`: a positive integer, and
/// `$WATCHDOG_PID` unset or equal to `pid` (a child that inherited the variables must not
/// think the parent's watchdog is its own).
fn parse_watchdog(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match watchdog_pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(pid) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound datagram socket in a fresh temporary directory.
    fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, sock)
    }

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8 datagram")
    }

    #[test]
    fn sends_each_state_as_one_datagram() {
        let (_dir, path, sock) = listener();
        let notifier = Notifier::new(Some(path.to_string_lossy().into_owned()));
        assert!(notifier.ready().unwrap());
        assert_eq!(receive(&sock), "READY=1");
        assert!(notifier.status("step 42\nloss 1.5").unwrap());
        assert_eq!(receive(&sock), "STATUS=step 42 loss 1.5");
        assert!(notifier.watchdog().unwrap());
        assert_eq!(receive(&sock), "WATCHDOG=1");
        assert!(notifier.stopping().unwrap());
        assert_eq!(receive(&sock), "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_namespace_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("dreamloop-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let notifier = Notifier::new(Some(format!("@{name}")));
        assert!(notifier.ready().unwrap());
        assert_eq!(receive(&sock), "READY=1");
    }

    #[test]
    fn no_socket_is_a_no_op() {
        assert!(!Notifier::new(None).ready().unwrap());
        assert!(!Notifier::new(Some(String::new())).watchdog().unwrap());
    }

    #[test]
    fn missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("absent.sock");
        let notifier = Notifier::new(Some(gone.to_string_lossy().into_owned()));
        assert!(notifier.ready().is_err());
    }

    #[test]
    fn watchdog_interval_from_environment_values() {
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog(Some("1500"), Some("7"), 7),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }
}
