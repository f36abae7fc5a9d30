//! Dreaming against the real component (issue 16, item 5): llama.cpp's `llama-server`
//! (built from source and cached by `scripts/build-llama-server.sh`, which `scripts/test.sh`
//! runs and names in `DREAMLOOP_LLAMA_SERVER`) serving SmolLM2-135M-Instruct's GGUF on
//! 127.0.0.1. The daemon trains while the dreamer asks the server; every answer is validated
//! and counted (SmolLM2-135M writes almost no valid scenario: BENCHMARKS.md, "Dreaming with
//! llama-server"); the server killed mid-run costs nothing but its dreams (steps go on from
//! templates, the failure is an event and counted), and once it is started again on the same
//! port dreaming resumes. A daemon restart in between loses and repeats no example.
//!
//! Skipped, with a message, when `DREAMLOOP_LLAMA_SERVER` or the GGUF is absent (a plain
//! `cargo test`); `scripts/test.sh`, and so CI, provides both.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_lines, step, surviving_timeline, Daemon, Overrides};
use serde_json::Value;

// Timeouts, not speed bounds: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(600);

/// A llama-server process on a loopback port.
struct LlamaServer {
    bin: PathBuf,
    gguf: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl LlamaServer {
    /// Starts `bin` serving `gguf` on a free loopback port and waits until it is healthy.
    fn start(bin: PathBuf, gguf: PathBuf, log: PathBuf) -> LlamaServer {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let mut server = LlamaServer {
            bin,
            gguf,
            addr,
            log,
            child: None,
        };
        server.restart();
        server
    }

    /// One slot and one thread: the trainer has the other core, and llama.cpp's threads
    /// spin, so two of them on one free core slow it tenfold.
    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(&self.bin)
            .args(["-m", &self.gguf.display().to_string()])
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
            ])
            .args(["-np", "1", "-t", "1", "-c", "4096", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn llama-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "llama-server not healthy in 120 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if write!(
            stream,
            "GET /health HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.addr
        )
        .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
    }

    /// SIGKILL: connections are refused from now on.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server binary and the GGUF, or `None` (the test is skipped).
fn real_server() -> Option<(PathBuf, PathBuf)> {
    let Some(bin) = std::env::var_os("DREAMLOOP_LLAMA_SERVER").map(PathBuf::from) else {
        eprintln!("skipped: DREAMLOOP_LLAMA_SERVER is not set (scripts/test.sh sets it)");
        return None;
    };
    let gguf = common::repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "skipped: {} is absent (scripts/fetch-smollm2.sh)",
            gguf.display()
        );
        return None;
    }
    Some((bin, gguf))
}

fn alarms(state: &Path, name: &str) -> usize {
    read_lines(&state.join("events.jsonl"))
        .iter()
        .filter(|e: &&Value| e["event"] == "alarm" && e["name"] == name)
        .count()
}

/// The sum of a metric's series in the scrape of the daemon's listener.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return 0.0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Answers the dreamer got back (accepted or refused).
fn answers(addr: SocketAddr) -> f64 {
    metric(addr, "dreamloop_dream_scenarios_total") + metric(addr, "dreamloop_dream_rejected_total")
}

#[test]
fn llama_server_dreams_fail_over_and_resume() {
    let Some((bin, gguf)) = real_server() else {
        return;
    };
    let mut d = Daemon::new(&Overrides::default());
    let mut server = LlamaServer::start(bin, gguf, d.dir.path().join("llama-server.log"));
    // Short answers: what is measured here is the path (request, answer, validation,
    // counting), not the dreams (64 tokens is a cut JSON object, refused as not_json).
    d.rewrite(&Overrides {
        top: format!(
            "[dream]\nserver = \"http://{}\"\nmodel = \"SmolLM2-135M-Instruct\"\n\
             max_tokens = 64\ntimeout_seconds = 120\nconnect_timeout_seconds = 2\nshare = 0.5",
            server.addr
        ),
        eval: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    let state = d.state();
    let metrics = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    d.start_in_process(
        &["--metrics-addr", &metrics.to_string()],
        dreamloop_actors::Faults::default(),
    );
    d.wait_status(LIMIT, "answers from llama-server", |s| {
        step(s) >= 2 && answers(metrics) >= 2.0
    });
    assert_eq!(metric(metrics, "dreamloop_dream_errors_total"), 0.0);
    assert_eq!(metric(metrics, "dreamloop_dream_server_up"), 1.0);

    // The server dies: steps go on from templates, the failure is counted and an event.
    server.kill();
    let at_kill = step(&d.status().expect("status"));
    d.wait_status(LIMIT, "steps without the server", |s| {
        step(s) >= at_kill + 4 && alarms(&state, "dream_server_down") == 1
    });
    assert!(metric(metrics, "dreamloop_dream_errors_total") >= 1.0);
    assert_eq!(metric(metrics, "dreamloop_dream_server_up"), 0.0);

    // The daemon restarts while the server is down (a clean stop, then a new run).
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    d.start_in_process(
        &["--metrics-addr", &metrics.to_string()],
        dreamloop_actors::Faults::default(),
    );
    let at_restart = step(&d.status().expect("status"));
    d.wait_status(LIMIT, "steps after the restart", |s| {
        step(s) >= at_restart + 2
    });

    // The server comes back on the same port: dreaming resumes (the back-off is at most a
    // few seconds this early in the run).
    server.restart();
    let before = answers(metrics);
    d.wait_status(LIMIT, "answers after the server came back", |_| {
        answers(metrics) > before && alarms(&state, "dream_server_back") >= 1
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
    common::assert_trained_once(&surviving_timeline(d.trained_log()));
}
