//! Every catalogued metric is emitted by a real run, not only registered: the exporter
//! pre-registers every counter series at 0 (telemetry.rs), so a scrape that merely lists a
//! name proves nothing. One short run of the tiny model (the real `run()` in process, with
//! fault-injecting parts) provokes each event the catalogue counts — conversation logs with
//! a malformed line, both example formats (`phase = "mixed"`), a dream server that answers
//! garbage, an HTTP error and valid dreams in turn, the policy's own replies sampled before
//! every step (the tiny model's wrong ones paired), a trainer that panics once, a
//! step whose loss turns non-finite, a checkpoint that hits a full disk, an
//! evaluation that breaches and rolls back, a second breach that pauses for the operator (the
//! baseline evaluations are the MarkGoods) — and the scrape taken then must show each counter
//! above 0, each gauge set and each histogram observed. ~35 s on 2 cores.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::dream_server::{DreamServer, Reply};
use common::{Daemon, Overrides};
use dreamloop::metrics::{MetricKind, CATALOGUE};
use dreamloop_actors::Faults;

// A timeout, not a speed bound: generous so a loaded 2-core machine still passes.
const LIMIT: Duration = Duration::from_secs(300);

/// Counters whose event this run does not provoke, each with the reason; they must still be
/// exported (registered at 0). Everything else must have been emitted.
const NOT_PROVOKED: &[(&str, &str)] = &[
    (
        "dreamloop_generator_duplicates_skipped_total",
        "a short run over the shipped templates draws no duplicate (the core generator's tests \
         count them: scenario::generate)",
    ),
    (
        "dreamloop_train_phase_changes_total",
        "this run's phase is fixed; daemon_experiment.rs runs a [[phase]] schedule to its change",
    ),
    (
        "dreamloop_train_lr_raises_total",
        "every evaluation here breaches; daemon_experiment.rs provokes the flat evaluations \
         that raise lr",
    ),
];

/// A loopback address with a port that was free a moment ago.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

/// The body of `GET /metrics`.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_string()
}

/// Sample values by metric name (series of one name summed; labels dropped).
fn samples(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let name = series.split('{').next().expect("a name");
        let value: f64 = value.parse().unwrap_or(f64::NAN);
        // Summed over the series; an undefined (NaN) series does not hide a defined one.
        let sum = out.entry(name.to_string()).or_insert(f64::NAN);
        if !value.is_nan() {
            *sum = if sum.is_nan() { value } else { *sum + value };
        }
    }
    out
}

/// `n` OpenAI-chat lines, each one SFT example, and a malformed one.
fn log_lines(n: usize) -> String {
    let mut text: String = (0..n)
        .map(|i| {
            format!(
                r#"{{"messages":[{{"role":"user","content":"Please count to {i}."}},{{"role":"assistant","content":"1 to {i}, counted.","label":"good"}}]}}"#
            ) + "\n"
        })
        .collect();
    text.push_str("{not json\n");
    text
}

#[test]
fn every_catalogued_metric_is_emitted_by_a_run() {
    let mut d = Daemon::new(&Overrides::default());
    let logs = d.dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    std::fs::write(logs.join("chat.jsonl"), log_lines(6)).expect("write log");
    // The dream server answers garbage, an HTTP 500 and a valid dream in turn.
    let server = DreamServer::start(|n| match n % 3 {
        0 => Reply::Garbage,
        1 => Reply::Status(500),
        _ => Reply::Dream,
    });
    d.rewrite(&Overrides {
        top: format!(
            "[dream]\nserver = \"{}\"\nmodel = \"scripted\"\ntimeout_seconds = 5\n\
             [on_policy]\nevery_n_steps = 1\nsamples = 2\nmax_new_tokens = 8",
            server.url
        ),
        phase: "mixed".into(),
        train: "lr = 0.5".into(),
        data: format!("replay_ratio = 0.25\nlogs_dir = \"{}\"", logs.display()),
        eval: "every_n_steps = 3\ngeneration_prompts = 1\ngeneration_tokens = 4".into(),
        checkpoint: "every_n_steps = 2\non_write_error = \"continue\"".into(),
        // Breaches at every evaluation (as daemon_rollback.rs): the first rolls back, the
        // second exceeds max_rollbacks and pauses for the operator.
        rollback: common::always_breach(&["max_rollbacks = 1"]),
        ..Overrides::default()
    });
    let addr = free_port();
    d.start_in_process(
        &["--metrics-addr", &addr.to_string()],
        Faults::default()
            .panic_at_step(1, 1)
            .disk_full_at_step(2)
            .non_finite_at_step(3, 1),
    );
    d.wait_status(LIMIT, "the policy's pause", |s| {
        s["paused_by_policy"] == true
    });
    let body = scrape(addr);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(LIMIT).success(), "{}", d.log());

    let values = samples(&body);
    let mut silent = Vec::new();
    for def in CATALOGUE {
        let exempt = NOT_PROVOKED.iter().any(|(name, _)| *name == def.name);
        // A gauge exists once set (none is pre-registered but the four process-state ones,
        // which install() sets); a counter or histogram must have counted something.
        let (series, emitted): (String, fn(f64) -> bool) = match def.kind {
            MetricKind::Counter => (def.name.to_string(), |v| v > 0.0),
            MetricKind::Gauge => (def.name.to_string(), |v| !v.is_nan()),
            MetricKind::Histogram => (format!("{}_count", def.name), |v| v > 0.0),
        };
        match values.get(&series) {
            None => silent.push(format!("{} is not exported", def.name)),
            Some(&v) if !exempt && !emitted(v) => {
                silent.push(format!("{} was never emitted ({series} = {v})", def.name))
            }
            Some(_) => {}
        }
    }
    assert!(
        silent.is_empty(),
        "{}\n--- scrape ---\n{body}",
        silent.join("\n")
    );
    // The run did what it was set up to do (so the check above measured those events).
    assert_eq!(values["dreamloop_policy_paused"], 1.0, "{body}");
    assert!(values["dreamloop_convo_lines_malformed_total"] >= 1.0);
}
