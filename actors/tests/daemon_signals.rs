//! Signals drive the real binary: pause/resume, checkpoint on request, SIGTERM, SIGHUP.

mod common;

use std::time::Duration;

use std::io::{Read, Write};

use common::{latest_dir, step, Daemon, Overrides};

/// A free loopback port (bound then released; the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET /metrics over a plain TCP connection.
fn scrape(port: u16) -> String {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn pause_takes_no_step_until_resume() {
    let mut d = Daemon::new(&Overrides {
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    let port = free_port();
    d.start(&["--metrics-addr", &format!("127.0.0.1:{port}")], &[]);
    d.wait_status(LIMIT, "two steps", |s| step(s) >= 2);
    d.signal(libc::SIGTSTP);
    let paused = d.wait_status(LIMIT, "paused", |s| s["paused"] == true);
    let at = step(&paused);
    // While paused the daemon still serves requests: a checkpoint on SIGUSR1 lands at the
    // paused step, and after it the step has not moved.
    d.signal(libc::SIGUSR1);
    d.wait_status(LIMIT, "checkpoint while paused", |s| {
        s["latest_step"].as_u64() == Some(at)
    });
    assert_eq!(
        step(&d.status().expect("status")),
        at,
        "a step was taken while paused"
    );
    assert_eq!(
        d.trained().len() as u64,
        at,
        "trained.jsonl grew while paused"
    );
    // /metrics answers while paused, and says so.
    let body = scrape(port);
    assert!(body.contains(" 200 "), "{body}");
    assert!(body.contains("dreamloop_loop_paused 1"), "{body}");
    assert!(
        body.contains(&format!("dreamloop_train_steps_total {at}")),
        "{body}"
    );
    // The trainer's job queue was used and is empty while paused.
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{body}"))
    };
    assert_eq!(value(r#"dreamloop_queue_capacity{queue="trainer"}"#), 1.0);
    let pushed = value(r#"dreamloop_queue_pushed_total{queue="trainer"}"#);
    assert!(pushed >= at as f64, "{pushed} jobs for {at} steps");
    assert_eq!(
        pushed,
        value(r#"dreamloop_queue_popped_total{queue="trainer"}"#)
    );
    d.signal(libc::SIGCONT);
    d.wait_status(LIMIT, "steps after resume", |s| {
        s["paused"] == false && step(s) > at
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
}

#[test]
fn sigterm_checkpoints_and_exits_zero() {
    let mut d = Daemon::new(&Overrides {
        checkpoint: "every_n_steps = 1000".into(),
        ..Overrides::default()
    });
    d.start(&[], &[]);
    d.wait_status(LIMIT, "three steps", |s| step(s) >= 3);
    let sent = std::time::Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}\n{}", d.log());
    assert!(sent.elapsed() < Duration::from_secs(30));
    let s = d.status().expect("status");
    assert_eq!(s["state"], "stopped");
    // The final checkpoint holds the last step (no periodic checkpoint was due).
    assert_eq!(s["latest_step"], s["step"]);
    let latest = latest_dir(&d.state()).expect("LATEST");
    assert!(latest.join("MANIFEST.json").exists());
    assert!(latest.ends_with(format!("step-{:08}", step(&s))));
}

#[test]
fn sighup_changes_the_learning_rate_without_a_restart() {
    let base = Overrides {
        eval: "every_n_steps = 1000".into(),
        checkpoint: "every_n_steps = 1000".into(),
        ..Overrides::default()
    };
    let mut d = Daemon::new(&base);
    d.start(&[], &[]);
    let s = d.wait_status(LIMIT, "a step", |s| step(s) >= 1);
    assert!((s["lr"].as_f64().expect("lr") - 2e-5).abs() < 1e-12, "{s}");
    let pid = s["pid"].clone();
    d.rewrite(&Overrides {
        train: "lr = 5e-5".into(),
        ..base
    });
    d.signal(libc::SIGHUP);
    let s = d.wait_status(LIMIT, "new lr", |s| {
        (s["lr"].as_f64().unwrap_or(0.0) - 5e-5).abs() < 1e-12
    });
    assert_eq!(s["pid"], pid, "the daemon restarted");
    let before = step(&s);
    d.wait_status(LIMIT, "training on at the new lr", |s| {
        step(s) > before && (s["lr"].as_f64().unwrap_or(0.0) - 5e-5).abs() < 1e-12
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());
}
