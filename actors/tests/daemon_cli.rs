//! The control subcommands and the process settings against the real binary (issue 15):
//! a pid file never makes `stop` signal a stranger (#9), /metrics is not served beyond
//! loopback by accident (#13), and `status` answers before the first status write (#15).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Daemon, Overrides};

fn dreamloop() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dreamloop"));
    // Its own process group: a `kill(0, …)` by the command reaches only itself, not the
    // test harness.
    cmd.process_group(0);
    cmd
}

fn control(cmd: &str, state: &std::path::Path) -> Output {
    dreamloop()
        .args([cmd, "--state-dir"])
        .arg(state)
        .output()
        .expect("runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn stop_never_signals_the_stranger_a_stale_pid_file_names() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut stranger = Command::new("sleep")
        .arg("120")
        .stdout(Stdio::null())
        .spawn()
        .expect("sleep");
    std::fs::write(
        dir.path().join("dreamloop.pid"),
        format!("{}\n", stranger.id()),
    )
    .expect("write");
    for cmd in ["stop", "pause", "checkpoint"] {
        let out = control(cmd, dir.path());
        assert!(!out.status.success(), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains("stale pid file"), "{}", stderr(&out));
    }
    assert!(
        stranger.try_wait().expect("try_wait").is_none(),
        "the unrelated process was signalled"
    );
    stranger.kill().expect("kill");
    let _ = stranger.wait();

    // Pid 0 would be kill(0, SIGTERM): the command's own process group.
    std::fs::write(dir.path().join("dreamloop.pid"), "0\n").expect("write");
    let out = control("stop", dir.path());
    assert_eq!(out.status.signal(), None, "stop signalled its own group");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stale pid file"), "{}", stderr(&out));
}

#[test]
fn a_stale_pid_file_does_not_block_run_and_stop_reaches_the_daemon() {
    let mut d = Daemon::new(&Overrides::default());
    std::fs::create_dir_all(d.state()).expect("state dir");
    // A live process that is not a daemon (this test), named by a leftover pid file.
    std::fs::write(
        d.state().join("dreamloop.pid"),
        format!("{}\n", std::process::id()),
    )
    .expect("write");
    d.start(&[], &[]);
    d.wait_status(Duration::from_secs(300), "running", |s| {
        s["state"] == "running"
    });
    let pid_text = std::fs::read_to_string(d.state().join("dreamloop.pid")).expect("pid file");
    assert_eq!(pid_text.trim(), d.pid().to_string());
    let out = control("stop", &d.state());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        d.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        d.log()
    );
    assert!(!d.state().join("dreamloop.pid").exists());
}

#[test]
fn status_before_the_first_status_write_says_what_it_knows() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = control("status", dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("not running"), "{text}");

    // A daemon that holds its pid file but has not written status.json yet: this test
    // stands in for it, holding the lock the daemon takes.
    let pid_path = dir.path().join("dreamloop.pid");
    std::fs::write(&pid_path, format!("{}\n", std::process::id())).expect("write");
    let held = std::fs::File::open(&pid_path).expect("open");
    // SAFETY: flock(2) on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = control("status", dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("starting"), "{text}");
    assert!(text.contains(&std::process::id().to_string()), "{text}");
    drop(held);

    let out = control("status", &dir.path().join("nowhere"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no such state directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn metrics_beyond_loopback_need_metrics_public() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let base = common::config_text(&state, &Overrides::default());
    for addr in ["0.0.0.0:9464", "[::]:9464", "192.0.2.7:9464"] {
        let file = dir.path().join("public.toml");
        std::fs::write(
            &file,
            base.replace(
                "metrics_addr = \"127.0.0.1:0\"",
                &format!("metrics_addr = \"{addr}\""),
            ),
        )
        .expect("write");
        let out = dreamloop()
            .arg("validate-config")
            .arg(&file)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(78), "{addr}: {}", stderr(&out));
        assert!(stderr(&out).contains("metrics_addr"), "{}", stderr(&out));
        assert!(stderr(&out).contains("metrics_public"), "{}", stderr(&out));
    }
    let out = dreamloop()
        .args(["run", "--metrics-addr", "[::]:0", "--config"])
        .arg(dir.path().join("public.toml"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(!state.exists(), "nothing is written for a refused config");

    let file = dir.path().join("allowed.toml");
    std::fs::write(
        &file,
        base.replace(
            "metrics_addr = \"127.0.0.1:0\"",
            "metrics_addr = \"0.0.0.0:9464\"\nmetrics_public = true",
        ),
    )
    .expect("write");
    let out = dreamloop()
        .arg("validate-config")
        .arg(&file)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
}
