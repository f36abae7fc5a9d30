//! The soak (issue 15): `dreamloop run` of the `tiny` model for `SOAK_SECONDS` (default 1800)
//! while conversation logs are appended and rotated every few seconds, with SIGHUPs, pauses,
//! SIGUSR1 checkpoints and three SIGKILLs (each followed by a restart) at random moments.
//! Then it stops the daemon and checks what an operator leaving it alone for weeks needs:
//!
//! - resident memory flat after warm-up (sampled from `/proc/<pid>/status` every 2 s; the
//!   figures go to BENCHMARKS.md);
//! - every log line trained exactly once in the surviving timeline, or quarantined by a
//!   rollback, or still queued when the daemon stopped (a line lost, or trained twice, fails);
//! - every file in the state directory mode 0600, every directory 0700.
//!
//! `trained.jsonl` is sealed into segments every 256 KiB here, so restarts read across them.
//!
//! `cargo bench --profile dev -p dreamloop-actors --bench soak` (or `SOAK_SECONDS=120` for a
//! short run; `DREAMLOOP_BIN=<copy of the binary>` keeps later builds out of a long run). It
//! prints a summary and exits 1 when a check fails.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{surviving_timeline, Daemon, Overrides};
use serde_json::Value;

/// Marks each log line's text; the number identifies the line wherever it ends up.
const TAG: &str = "soak-line-";

/// One log line: a user request and an assistant answer marked good (an SFT example).
fn line(n: u64) -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"Please summarise {TAG}{n} of the maintenance log."}},{{"role":"assistant","content":"Entry {n}: the pump was serviced.","label":"good"}}]}}"#
    ) + "\n"
}

/// A small xorshift generator: the soak's schedule is reproducible from `SOAK_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() % 1_000_000) as f64 / 1e6
    }
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The line numbers tagged in `value`'s text, with repeats.
fn tags(value: &Value) -> Vec<u64> {
    let text = value.to_string();
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(TAG) {
        rest = &rest[at + TAG.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            out.push(n);
        }
    }
    out
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Files not 0600 and directories not 0700 under `dir`.
fn bad_modes(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            if mode != 0o700 {
                out.push(format!("{} {mode:o}", path.display()));
            }
            bad_modes(&path, out);
        } else if meta.is_file() && mode != 0o600 {
            out.push(format!("{} {mode:o}", path.display()));
        }
    }
}

/// RSS samples of one daemon process: (seconds since its start, KiB).
struct Process {
    samples: Vec<(f64, u64)>,
}

impl Process {
    /// Min, max and the least-squares slope (MiB per hour) of the samples after `warmup`.
    fn after(&self, warmup: f64) -> Option<(u64, u64, f64, usize)> {
        let s: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= warmup)
            .map(|&(t, k)| (t, k as f64))
            .collect();
        if s.len() < 3 {
            return None;
        }
        let n = s.len() as f64;
        let (mt, mk) = (
            s.iter().map(|p| p.0).sum::<f64>() / n,
            s.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let cov: f64 = s.iter().map(|(t, k)| (t - mt) * (k - mk)).sum();
        let var: f64 = s.iter().map(|(t, _)| (t - mt).powi(2)).sum();
        let slope_kib_per_s = if var > 0.0 { cov / var } else { 0.0 };
        let min = s.iter().map(|p| p.1 as u64).min()?;
        let max = s.iter().map(|p| p.1 as u64).max()?;
        Some((min, max, slope_kib_per_s * 3600.0 / 1024.0, s.len()))
    }
}

fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800);
    let warmup: f64 = std::env::var("SOAK_WARMUP_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((seconds as f64 / 6.0).min(300.0));
    let mut rng = Rng(std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe_f00d));

    let mut d = Daemon::new(&Overrides::default());
    let logs = d.dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    d.rewrite(&Overrides {
        data: format!("logs_dir = \"{}\"", logs.display()),
        checkpoint: "every_n_steps = 25".into(),
        eval: "every_n_steps = 20".into(),
        // Small segments, so that the run seals many and restarts read across them.
        supervisor: "trained_segment_bytes = 262144".into(),
        // Thresholds the tiny model's probe noise cannot reach: with the defaults nearly every
        // evaluation rolled back to step 0 and the run trained ~30 steps in 30 minutes (a
        // 2026-12-07 run). Rollbacks and quarantine have their own tests.
        rollback: common::noise_proof_rollback(),
        ..Overrides::default()
    });
    eprintln!(
        "soak: {seconds} s in {}, warm-up {warmup} s",
        d.dir.path().display()
    );

    // The log writer: a line every 0.3 s; every 5–10 s the file is rotated by rename to a
    // name the reader still reads (`chat.<k>.jsonl`), and the next line starts a new one.
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, done, logs) = (written.clone(), done.clone(), logs.clone());
        let mut rng = Rng(rng.next() | 1);
        std::thread::spawn(move || {
            let mut rotations = 0u64;
            let mut next_rotation = Instant::now() + Duration::from_secs_f64(rng.range(5.0, 10.0));
            while !done.load(Ordering::SeqCst) {
                let n = written.load(Ordering::SeqCst);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(logs.join("chat.jsonl"))
                    .expect("open log");
                f.write_all(line(n).as_bytes()).expect("append");
                written.store(n + 1, Ordering::SeqCst);
                drop(f);
                if Instant::now() >= next_rotation {
                    rotations += 1;
                    std::fs::rename(
                        logs.join("chat.jsonl"),
                        logs.join(format!("chat.{rotations}.jsonl")),
                    )
                    .expect("rotate");
                    next_rotation = Instant::now() + Duration::from_secs_f64(rng.range(5.0, 10.0));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            rotations
        })
    };

    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    // Three SIGKILLs spread over the run, at random moments.
    let mut kills: Vec<Instant> = (0..3)
        .map(|i| {
            let third = seconds as f64 / 3.0;
            started + Duration::from_secs_f64(third * (i as f64 + rng.range(0.15, 0.85)))
        })
        .collect();
    kills.reverse();
    let mut processes: Vec<Process> = Vec::new();
    let mut actions: BTreeMap<&str, usize> = BTreeMap::new();

    d.start(&[], &[]);
    let mut process_start = Instant::now();
    processes.push(Process {
        samples: Vec::new(),
    });
    let mut next_action = Instant::now() + Duration::from_secs_f64(rng.range(10.0, 40.0));
    let mut resume_at: Option<Instant> = None;
    let mut last_sample = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
            panic!("the daemon exited on its own: {status}\n{}", d.log());
        }
        if last_sample.elapsed() >= Duration::from_secs(2) {
            last_sample = Instant::now();
            if let Some(kib) = rss_kib(d.pid()) {
                let t = process_start.elapsed().as_secs_f64();
                processes
                    .last_mut()
                    .expect("a process")
                    .samples
                    .push((t, kib));
            }
        }
        if resume_at.is_some_and(|t| Instant::now() >= t) {
            d.signal(libc::SIGCONT);
            resume_at = None;
        }
        if kills.last().is_some_and(|t| Instant::now() >= *t) {
            kills.pop();
            d.signal(libc::SIGKILL);
            let _ = d.child.as_mut().expect("child").wait();
            *actions.entry("SIGKILL + restart").or_default() += 1;
            resume_at = None;
            d.start(&[], &[]);
            process_start = Instant::now();
            processes.push(Process {
                samples: Vec::new(),
            });
            continue;
        }
        if Instant::now() >= next_action && resume_at.is_none() {
            next_action = Instant::now() + Duration::from_secs_f64(rng.range(10.0, 40.0));
            let pick = rng.next() % 10;
            if pick < 4 {
                d.signal(libc::SIGHUP);
                *actions.entry("SIGHUP").or_default() += 1;
            } else if pick < 7 {
                d.signal(libc::SIGTSTP);
                resume_at = Some(Instant::now() + Duration::from_secs_f64(rng.range(2.0, 8.0)));
                *actions.entry("SIGTSTP … SIGCONT").or_default() += 1;
            } else {
                d.signal(libc::SIGUSR1);
                *actions.entry("SIGUSR1").or_default() += 1;
            }
        }
    }
    if resume_at.is_some() {
        d.signal(libc::SIGCONT);
    }
    done.store(true, Ordering::SeqCst);
    let rotations = writer.join().expect("writer");
    // Let the daemon read the last lines before it stops.
    std::thread::sleep(Duration::from_secs(5));
    d.signal(libc::SIGTERM);
    let exit = d.wait_exit(Duration::from_secs(600));
    let written = written.load(Ordering::SeqCst);

    // Where each line went.
    let state = d.state();
    let timeline = surviving_timeline(d.trained_log());
    let mut trained: HashMap<u64, usize> = HashMap::new();
    for record in &timeline {
        for n in tags(&record["examples"]) {
            *trained.entry(n).or_default() += 1;
        }
    }
    let quarantined: BTreeSet<u64> = read_jsonl(&state.join("quarantine/examples.jsonl"))
        .iter()
        .flat_map(tags)
        .collect();
    let pending: BTreeSet<u64> = std::fs::read_to_string(state.join("convo-pending.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| tags(&v).into_iter().collect())
        .unwrap_or_default();
    let trained_and_quarantined = trained.keys().filter(|n| quarantined.contains(n)).count();
    let twice: Vec<u64> = trained
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(&n, _)| n)
        .collect();
    // Lines are read in order, so those after the last one seen anywhere were not read yet
    // when the daemon stopped (polling pauses while the queue is full): unread, not lost.
    let seen = trained
        .keys()
        .chain(&quarantined)
        .chain(&pending)
        .max()
        .map_or(0, |&n| n + 1);
    let lost: Vec<u64> = (0..seen)
        .filter(|n| !trained.contains_key(n) && !quarantined.contains(n) && !pending.contains(n))
        .collect();
    let mut twice = twice;
    twice.extend(trained.keys().filter(|n| quarantined.contains(n)).copied());
    let mut modes = Vec::new();
    bad_modes(&state, &mut modes);

    println!(
        "## soak: {seconds} s, tiny, {} steps in the surviving timeline",
        timeline
            .last()
            .and_then(|r| r["step"].as_u64())
            .unwrap_or(0)
    );
    println!();
    println!("- exit after SIGTERM: {exit}");
    println!("- log lines written: {written}, rotations: {rotations}");
    println!(
        "- lines trained once: {}, quarantined: {}, still queued: {}, not read yet: {}, trained twice (or trained and quarantined: {trained_and_quarantined}): {}, lost: {}",
        trained.values().filter(|&&c| c == 1).count(),
        quarantined.len(),
        pending.len(),
        written - seen.min(written),
        twice.len(),
        lost.len()
    );
    println!("- actions: {actions:?}");
    println!(
        "- state files not 0600 / directories not 0700: {}",
        modes.len()
    );
    println!();
    println!("| process | samples after warm-up | RSS min (MiB) | RSS max (MiB) | slope (MiB/h) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (i, p) in processes.iter().enumerate() {
        match p.after(warmup) {
            Some((min, max, slope, n)) => println!(
                "| {} | {n} | {:.1} | {:.1} | {slope:+.1} |",
                i + 1,
                min as f64 / 1024.0,
                max as f64 / 1024.0
            ),
            None => println!("| {} | too short for the warm-up | | | |", i + 1),
        }
    }
    let mut failed = Vec::new();
    if !exit.success() {
        failed.push(format!("the daemon exited {exit} after SIGTERM"));
    }
    if !twice.is_empty() {
        failed.push(format!("lines trained twice: {twice:?}"));
    }
    if !lost.is_empty() {
        failed.push(format!("lines lost: {lost:?}"));
    }
    if !modes.is_empty() {
        failed.push(format!("modes: {modes:?}"));
    }
    if failed.is_empty() {
        println!("\nsoak: all checks passed");
    } else {
        println!("\nsoak: FAILED\n{}", failed.join("\n"));
        eprintln!(
            "{}",
            d.log()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::process::exit(1);
    }
}
