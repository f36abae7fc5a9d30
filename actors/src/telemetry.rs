//! The Prometheus exporter over the metric catalogue (`dreamloop::metrics`, DESIGN.md §7).
//!
//! [`install`] starts `metrics-exporter-prometheus`' HTTP listener (127.0.0.1:9464 by
//! default, `--metrics-addr`), describes every catalogue metric (help text and unit), gives
//! the duration histograms buckets fitted to what they time, pre-registers every counter
//! series at 0 (so the first `increase()` after a restart is seen, and a rollback reason that
//! never happened reads 0 rather than "no data"), and sets `dreamloop_build_info`.
//!
//! Everything else records through the helpers here, which check each name, type and label
//! value against the catalogue: a mismatch panics in debug builds (tests catch it) and is
//! logged and dropped in release builds, so nothing ever exports a name the catalogue lacks.
//! The `record_*` helpers turn the core's reports (StepReport, EvalMetrics, Verdict) into
//! metric updates, so the actors stay one call long.
//!
//! Not here: deciding anything. The exporter serves the values last set; it does not know
//! whether they are good.
// The daemon's `run()` calls these; until it is wired in, the binary uses only part of them.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use dreamloop::metrics::{find, names, LabelValues, MetricDef, MetricKind, Unit, CATALOGUE};
use dreamloop::rollback::{EvalMetrics, PolicyState, Verdict};
use dreamloop::train::trainer::StepReport;
use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// The running build, as `dreamloop_build_info{version}` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Buckets of the optimizer-step histogram: a tiny CPU model takes ~50 ms, a 27B model on
/// the GPU box about a minute, a large model on CPU several minutes.
const STEP_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets of the evaluation histogram: seconds for the tiny model, up to an hour for
/// hundreds of probes on a large one.
const EVAL_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];
/// Buckets of the checkpoint-write histogram: 540 MB take 2.5 s here (BENCHMARKS.md), a
/// 27B model's 54 GB of bf16 weights about 4 minutes at the same 219 MB/s.
const CHECKPOINT_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// The buckets of a catalogue histogram.
fn buckets(name: &str) -> &'static [f64] {
    match name {
        names::TRAIN_STEP_DURATION_SECONDS => STEP_BUCKETS,
        names::EVAL_DURATION_SECONDS => EVAL_BUCKETS,
        names::CHECKPOINT_WRITE_DURATION_SECONDS => CHECKPOINT_BUCKETS,
        // Every catalogue histogram is listed above (a test checks); a new one gets the
        // widest set until it is given its own.
        _ => EVAL_BUCKETS,
    }
}

/// Starts the exporter on `addr`, on a thread of its own, and registers the catalogue; a
/// later call in the same process keeps the first exporter (and says so).
///
/// Fails if the address cannot be bound or another recorder is already installed.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    // The recorder is global to the process: a second run in the same process (the runtime
    // tests call `run()` one after another) keeps the first run's recorder and listener.
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(first) = *installed {
        tracing::warn!(
            %first,
            requested = %addr,
            "This process already serves /metrics; the run's metrics go there."
        );
        return Ok(());
    }
    let mut builder = PrometheusBuilder::new().with_http_listener(addr);
    for def in CATALOGUE.iter().filter(|d| d.kind == MetricKind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(def.name.to_string()), buckets(def.name))?;
    }
    // Installed from a thread outside any tokio runtime, the exporter gets a runtime of its
    // own on a background thread, so the listener lives as long as the process, not as long
    // as the runtime of the run that installed it.
    std::thread::scope(|s| s.spawn(|| builder.install()).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    *installed = Some(addr);
    register_catalogue();
    tracing::info!(%addr, "Serving Prometheus metrics on /metrics.");
    Ok(())
}

/// The address of the exporter this process installed, once it has.
static INSTALLED: std::sync::Mutex<Option<SocketAddr>> = std::sync::Mutex::new(None);

/// Describes every catalogue metric and sets the series that exist from the start.
fn register_catalogue() {
    for def in CATALOGUE {
        let unit = match def.unit {
            Unit::Seconds => Some(metrics::Unit::Seconds),
            Unit::Bytes => Some(metrics::Unit::Bytes),
            // `metrics` has no ratio unit; the name's `_ratio` says it.
            Unit::Ratio | Unit::Dimensionless => None,
        };
        match (def.kind, unit) {
            (MetricKind::Counter, Some(u)) => metrics::describe_counter!(def.name, u, def.help),
            (MetricKind::Counter, None) => metrics::describe_counter!(def.name, def.help),
            (MetricKind::Gauge, Some(u)) => metrics::describe_gauge!(def.name, u, def.help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(def.name, def.help),
            (MetricKind::Histogram, Some(u)) => metrics::describe_histogram!(def.name, u, def.help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(def.name, def.help),
        }
        if def.kind == MetricKind::Counter {
            for values in enumerated_label_values(def) {
                let pairs: Vec<(&str, &str)> =
                    def.labels.iter().map(|l| l.name).zip(values).collect();
                counter(def.name, &pairs).increment(0);
            }
        }
    }
    gauge(names::BUILD_INFO, &[("version", VERSION)]).set(1.0);
    gauge(names::PROCESS_START_TIME_SECONDS, &[]).set(unix_now());
    gauge(names::LOOP_PAUSED, &[]).set(0.0);
    gauge(names::POLICY_PAUSED, &[]).set(0.0);
}

/// Every combination of label values of `def` when all its labels are enumerations (one
/// empty combination for an unlabelled metric); none when a label is open-ended (layer).
fn enumerated_label_values(def: &MetricDef) -> Vec<Vec<&'static str>> {
    let mut combos = vec![Vec::new()];
    for label in def.labels {
        let LabelValues::OneOf(values) = label.values else {
            return Vec::new();
        };
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                values.iter().map(move |v| {
                    let mut next = combo.clone();
                    next.push(*v);
                    next
                })
            })
            .collect();
    }
    combos
}

/// Whether `name` is a catalogue metric of type `kind` with exactly these labels (names in
/// catalogue order, values allowed). Panics in debug builds when not; logs in release.
fn checked(name: &str, kind: MetricKind, pairs: &[(&str, &str)]) -> bool {
    let problem = match find(name) {
        None => Some("is not in the catalogue (src/metrics.rs)".to_string()),
        Some(def) if def.kind != kind => Some(format!("is a {:?}, not a {kind:?}", def.kind)),
        Some(def) if def.labels.len() != pairs.len() => Some(format!(
            "takes labels {:?}, got {pairs:?}",
            label_names(def)
        )),
        Some(def) => def
            .labels
            .iter()
            .zip(pairs)
            .find(|(label, (key, value))| label.name != *key || !label.allows(value))
            .map(|(label, pair)| format!("label {pair:?} is not a value of `{}`", label.name)),
    };
    match problem {
        None => true,
        Some(problem) => {
            if cfg!(debug_assertions) {
                panic!("metric {name} {problem}");
            }
            tracing::error!(metric = name, %problem, "Dropping a metric update that is not in the catalogue.");
            false
        }
    }
}

fn label_names(def: &MetricDef) -> Vec<&'static str> {
    def.labels.iter().map(|l| l.name).collect()
}

fn to_labels(pairs: &[(&str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(k.to_string(), v.to_string()))
        .collect()
}

/// The counter `name` with `labels` (`&[("reason", "sycophancy")]`), checked against the
/// catalogue.
pub fn counter(name: &'static str, labels: &[(&str, &str)]) -> Counter {
    if checked(name, MetricKind::Counter, labels) {
        metrics::counter!(name, to_labels(labels))
    } else {
        Counter::noop()
    }
}

/// The gauge `name` with `labels`, checked against the catalogue.
pub fn gauge(name: &'static str, labels: &[(&str, &str)]) -> Gauge {
    if checked(name, MetricKind::Gauge, labels) {
        metrics::gauge!(name, to_labels(labels))
    } else {
        Gauge::noop()
    }
}

/// The histogram `name` with `labels`, checked against the catalogue.
pub fn histogram(name: &'static str, labels: &[(&str, &str)]) -> Histogram {
    if checked(name, MetricKind::Histogram, labels) {
        metrics::histogram!(name, to_labels(labels))
    } else {
        Histogram::noop()
    }
}

/// Seconds since the Unix epoch, for the `_timestamp_seconds` gauges.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One completed optimizer step.
pub fn record_step(report: &StepReport) {
    counter(names::TRAIN_STEPS_TOTAL, &[]).increment(1);
    gauge(names::TRAIN_LOSS, &[]).set(report.loss);
    if let Some(sft) = report.sft_loss {
        gauge(names::TRAIN_SFT_LOSS, &[]).set(sft);
    }
    if let Some(dpo) = &report.dpo {
        gauge(names::TRAIN_DPO_LOSS, &[]).set(dpo.loss);
        gauge(names::DPO_REWARD_CHOSEN, &[]).set(dpo.rewards_chosen);
        gauge(names::DPO_REWARD_REJECTED, &[]).set(dpo.rewards_rejected);
        gauge(names::DPO_REWARD_MARGIN, &[]).set(dpo.margins);
        gauge(names::DPO_REWARD_ACCURACY_RATIO, &[]).set(dpo.accuracy);
    }
    gauge(names::TRAIN_LEARNING_RATE, &[]).set(report.lr);
    gauge(names::TRAIN_GRAD_NORM, &[]).set(report.grad_norm);
    counter(names::TRAIN_TOKENS_TOTAL, &[]).increment(report.tokens as u64);
    counter(names::TRAIN_EXAMPLES_TOTAL, &[("kind", "sft")]).increment(report.sft_examples as u64);
    counter(names::TRAIN_EXAMPLES_TOTAL, &[("kind", "dpo")]).increment(report.dpo_pairs as u64);
    histogram(names::TRAIN_STEP_DURATION_SECONDS, &[]).record(report.seconds);
    gauge(names::TRAIN_LAST_STEP_TIMESTAMP_SECONDS, &[]).set(unix_now());
}

/// One step skipped because its loss or gradients were not finite.
pub fn record_non_finite_step() {
    counter(names::TRAIN_NON_FINITE_STEPS_TOTAL, &[]).increment(1);
}

/// One evaluation: the two behaviour categories, perplexity, attention and ablation, and its
/// duration. General probes are per domain: report them with [`record_probe`].
pub fn record_eval(metrics: &EvalMetrics, seconds: f64) {
    counter(names::EVAL_RUNS_TOTAL, &[]).increment(1);
    record_probe(
        "clear_direction",
        metrics.clear_accuracy,
        metrics.clear_margin,
    );
    record_probe(
        "flawed_direction",
        metrics.flawed_accuracy,
        metrics.flawed_margin,
    );
    gauge(names::EVAL_PERPLEXITY, &[]).set(metrics.perplexity);
    gauge(names::EVAL_ATTENTION_ON_DIRECTION_RATIO, &[]).set(metrics.attention_on_direction);
    gauge(names::EVAL_ABLATION_SENSITIVITY, &[]).set(metrics.ablation_sensitivity);
    histogram(names::EVAL_DURATION_SECONDS, &[]).record(seconds);
}

/// Accuracy (0–1) and mean margin (nats) of one probe `category`
/// (`labels::PROBE_CATEGORY`: clear_direction, flawed_direction, arithmetic, code, reasoning).
pub fn record_probe(category: &str, accuracy: f64, margin: f64) {
    gauge(names::EVAL_PROBE_ACCURACY_RATIO, &[("category", category)]).set(accuracy);
    gauge(names::EVAL_PROBE_MARGIN, &[("category", category)]).set(margin);
}

/// Attention mass on the direction span in full-attention layer `layer`.
pub fn record_layer_attention(layer: usize, ratio: f64) {
    let layer = layer.to_string();
    gauge(
        names::EVAL_LAYER_ATTENTION_ON_DIRECTION_RATIO,
        &[("layer", &layer)],
    )
    .set(ratio);
}

/// The policy's verdict on one evaluation and the state after it was applied.
pub fn record_verdict(verdict: &Verdict, state: &PolicyState) {
    match verdict {
        Verdict::Keep { .. } => {}
        Verdict::MarkGood { .. } => counter(names::POLICY_MARK_GOOD_TOTAL, &[]).increment(1),
        Verdict::Rollback { reason, .. } => {
            counter(names::POLICY_ROLLBACKS_TOTAL, &[("reason", reason.label())]).increment(1);
        }
        Verdict::PauseForOperator { reason, .. } => {
            counter(names::POLICY_PAUSES_TOTAL, &[("reason", reason.label())]).increment(1);
            gauge(names::POLICY_PAUSED, &[]).set(1.0);
        }
    }
    gauge(names::POLICY_BREACH_STREAK, &[]).set(f64::from(state.breach_streak));
    if let Some(good) = state.good_step {
        gauge(names::POLICY_GOOD_STEP, &[]).set(good as f64);
    }
    gauge(names::POLICY_LR_FACTOR_RATIO, &[]).set(state.lr_factor);
    gauge(names::MIX_REPLAY_RATIO, &[]).set(state.replay_ratio);
}

/// Whether the loop is paused (`policy`: and whether the policy is the reason, which the
/// pause alert watches). An operator's resume clears both.
pub fn set_paused(paused: bool, policy: bool) {
    gauge(names::LOOP_PAUSED, &[]).set(if paused { 1.0 } else { 0.0 });
    gauge(names::POLICY_PAUSED, &[]).set(if paused && policy { 1.0 } else { 0.0 });
}

/// One checkpoint write: its size on success, and how long it took either way.
pub fn record_checkpoint_write(bytes: Option<u64>, seconds: f64) {
    match bytes {
        Some(bytes) => {
            counter(names::CHECKPOINT_WRITES_TOTAL, &[]).increment(1);
            gauge(names::CHECKPOINT_SIZE_BYTES, &[]).set(bytes as f64);
        }
        None => counter(names::CHECKPOINT_WRITE_FAILURES_TOTAL, &[]).increment(1),
    }
    histogram(names::CHECKPOINT_WRITE_DURATION_SECONDS, &[]).record(seconds);
}

/// The capacity of `queue` (`labels::QUEUE`), set once when the channel is made.
pub fn set_queue_capacity(queue: &str, capacity: usize) {
    gauge(names::QUEUE_CAPACITY, &[("queue", queue)]).set(capacity as f64);
}

/// An item sent into `queue`.
pub fn queue_pushed(queue: &str) {
    counter(names::QUEUE_PUSHED_TOTAL, &[("queue", queue)]).increment(1);
}

/// An item taken out of `queue`.
pub fn queue_popped(queue: &str) {
    counter(names::QUEUE_POPPED_TOTAL, &[("queue", queue)]).increment(1);
}

/// A checkpoint was loaded back into the trainer (at start-up, after a trainer restart, or
/// by a rollback).
pub fn checkpoint_restored() {
    counter(names::CHECKPOINT_RESTORES_TOTAL, &[]).increment(1);
}

/// The generator drew `n` new scenarios of `kind` (`clear_direction`, `flawed_direction`, or
/// `general` for replay examples) and skipped `duplicates` draws the ledger already held.
pub fn record_generated(kind: &str, n: usize, duplicates: u64) {
    counter(names::GENERATOR_SCENARIOS_TOTAL, &[("kind", kind)]).increment(n as u64);
    counter(names::GENERATOR_DUPLICATES_SKIPPED_TOTAL, &[]).increment(duplicates);
}

/// The dreamer queued a valid dream of `kind`.
pub fn record_dream(kind: &str) {
    counter(names::DREAM_SCENARIOS_TOTAL, &[("kind", kind)]).increment(1);
}

/// The dreamer refused an answer (`labels::DREAM_REJECTION`).
pub fn record_dream_rejected(reason: &str) {
    counter(names::DREAM_REJECTED_TOTAL, &[("reason", reason)]).increment(1);
}

/// A request to the dream server failed (`labels::DREAM_ERROR`).
pub fn record_dream_error(error: &str) {
    counter(names::DREAM_ERRORS_TOTAL, &[("error", error)]).increment(1);
}

/// Valid dreams of `kind` waiting for the generator.
pub fn set_dream_queue_depth(kind: &str, depth: usize) {
    gauge(names::DREAM_QUEUE_DEPTH, &[("kind", kind)]).set(depth as f64);
}

/// The policy's own reply to a prompt of `kind` was judged `judged`.
pub fn record_on_policy_reply(kind: &str, judged: &str) {
    counter(
        names::ON_POLICY_REPLIES_TOTAL,
        &[("kind", kind), ("judged", judged)],
    )
    .increment(1);
}

/// DPO pairs of the policy's wrong replies were queued.
pub fn record_on_policy_pairs(n: usize) {
    counter(names::ON_POLICY_PAIRS_TOTAL, &[]).increment(n as u64);
}

/// Whether the dream server's last request succeeded.
pub fn set_dream_server_up(up: bool) {
    gauge(names::DREAM_SERVER_UP, &[]).set(if up { 1.0 } else { 0.0 });
}

/// The generation probes' measures of the last evaluation.
pub fn record_generations(m: &dreamloop::eval::generations::GenerationMeasures) {
    for (name, value) in m.named() {
        if name == "mean_words" {
            gauge(names::EVAL_GENERATION_WORDS, &[]).set(value);
        } else {
            gauge(names::EVAL_GENERATION_RATIO, &[("measure", name)]).set(value);
        }
    }
}

/// The run this daemon trains (`dreamloop_loop_run_info{run_id}`).
pub fn set_run_id(run_id: &str) {
    gauge(names::LOOP_RUN_INFO, &[("run_id", run_id)]).set(1.0);
}

/// The phase in force, and the stall boost of its lr.
pub fn set_phase(index: usize, lr_boost: f64) {
    gauge(names::TRAIN_PHASE_INDEX, &[]).set(index as f64);
    gauge(names::TRAIN_LR_BOOST, &[]).set(lr_boost);
}

/// The controller changed the phase (`why`: `controller::Why`'s label).
pub fn record_phase_change(why: &str) {
    counter(names::TRAIN_PHASE_CHANGES_TOTAL, &[("reason", why)]).increment(1);
}

/// The controller raised the lr after a stall.
pub fn record_lr_raise() {
    counter(names::TRAIN_LR_RAISES_TOTAL, &[]).increment(1);
}

/// The general replay weights in force, in `controller::REPLAY_SOURCES` order.
pub fn set_replay_weights(weights: [f64; 4]) {
    for (source, w) in dreamloop::controller::REPLAY_SOURCES.iter().zip(weights) {
        gauge(names::MIX_REPLAY_WEIGHT, &[("source", source)]).set(w);
    }
}

/// The share of the last minute's unpaused wall time spent in steps.
pub fn set_duty_cycle(ratio: f64) {
    gauge(names::TRAIN_DUTY_CYCLE_RATIO, &[]).set(ratio);
}

/// The never-repeat ledger now holds `entries` hashes.
pub fn set_ledger_entries(entries: usize) {
    gauge(names::LEDGER_ENTRIES, &[]).set(entries as f64);
}

/// The supervisor restarted `actor` (`labels::ACTOR`).
pub fn actor_restarted(actor: &str) {
    counter(names::ACTOR_RESTARTS_TOTAL, &[("actor", actor)]).increment(1);
}

#[cfg(test)]
mod tests {
    //! The exporter end to end: a real scrape over TCP, `promtool check metrics` on it, and a
    //! real Prometheus server scraping it. The two external tools come from Debian's
    //! `prometheus` package (`scripts/check-observability.sh` installs it); without them
    //! those checks print a note and pass, unless `DREAMLOOP_REQUIRE_PROMETHEUS=1`.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// The exporter of this test process (a global recorder can be installed only once).
    fn exporter() -> SocketAddr {
        static ADDR: OnceLock<SocketAddr> = OnceLock::new();
        *ADDR.get_or_init(|| {
            let addr = free_port();
            install(addr).expect("install the exporter");
            addr
        })
    }

    /// A loopback address with a port that was free a moment ago (the exporter cannot report
    /// the port it bound, so an ephemeral port is picked here first).
    fn free_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener.local_addr().expect("local address")
    }

    /// A plain HTTP/1.0 GET: the status code and the body.
    fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_string()))
    }

    /// `tool` on `$PATH`, if installed.
    fn which(tool: &str) -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    }

    /// `tool`, or `None` after a note (a failure if the environment requires the tools).
    fn tool_or_skip(tool: &str) -> Option<PathBuf> {
        let found = which(tool);
        if found.is_none() {
            assert!(
                std::env::var("DREAMLOOP_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
                "{tool} is required (DREAMLOOP_REQUIRE_PROMETHEUS=1) but not on PATH"
            );
            eprintln!(
                "note: {tool} not found; skipping (scripts/check-observability.sh installs it)"
            );
        }
        found
    }

    /// Held by the tests that set values and read them back (the recorder is global).
    static VALUES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Sets a value on every catalogue metric, one series each.
    fn touch_every_metric() {
        for def in CATALOGUE {
            let values: Vec<String> = def
                .labels
                .iter()
                .map(|label| match label.values {
                    LabelValues::OneOf(values) => values[0].to_string(),
                    LabelValues::LayerIndex => "3".to_string(),
                    LabelValues::Version => VERSION.to_string(),
                    LabelValues::RunId => "run-0".to_string(),
                })
                .collect();
            let pairs: Vec<(&str, &str)> = def
                .labels
                .iter()
                .map(|l| l.name)
                .zip(values.iter().map(String::as_str))
                .collect();
            match def.kind {
                MetricKind::Counter => counter(def.name, &pairs).increment(2),
                MetricKind::Gauge if def.name == names::BUILD_INFO => {}
                MetricKind::Gauge => gauge(def.name, &pairs).set(0.5),
                MetricKind::Histogram => histogram(def.name, &pairs).record(0.7),
            }
        }
    }

    /// The `# TYPE` of each metric family in a scrape.
    fn types(scrape: &str) -> std::collections::HashMap<&str, &str> {
        scrape
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect()
    }

    #[test]
    fn scrape_has_every_catalogue_metric_and_passes_promtool() {
        let addr = exporter();
        let _values = VALUES.lock().unwrap_or_else(|e| e.into_inner());
        touch_every_metric();
        let (status, scrape) = http_get(addr, "/metrics").expect("scrape the exporter");
        assert_eq!(status, 200, "{scrape}");
        if let Some(out) = std::env::var_os("DREAMLOOP_SCRAPE_OUT") {
            std::fs::write(&out, &scrape).expect("write the scrape");
        }
        let types = types(&scrape);
        for def in CATALOGUE {
            let expected = match def.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            assert_eq!(types.get(def.name), Some(&expected), "{}", def.name);
            assert!(
                scrape.contains(&format!("# HELP {} {}\n", def.name, def.help)),
                "{}: help text",
                def.name
            );
        }
        // Every family in the scrape is a catalogue metric (nothing else is exported).
        for name in types.keys() {
            assert!(find(name).is_some(), "{name} exported but not catalogued");
        }
        assert!(scrape.contains(&format!(
            "dreamloop_build_info{{version=\"{VERSION}\"}} 1\n"
        )));
        // Pre-registered: every rollback reason, including ones that never happened.
        assert!(scrape.contains("dreamloop_policy_rollbacks_total{reason=\"general_probe\"} 0\n"));
        // Histogram buckets are the step buckets: 0.7 s falls in le="1".
        assert!(scrape.contains("dreamloop_train_step_duration_seconds_bucket{le=\"0.5\"} 0\n"));
        assert!(scrape.contains("dreamloop_train_step_duration_seconds_bucket{le=\"1\"} 1\n"));

        let Some(promtool) = tool_or_skip("promtool") else {
            return;
        };
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(scrape.as_bytes())
            .expect("feed promtool");
        let out = child.wait_with_output().expect("promtool finishes");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A Prometheus server process, killed when dropped (also when a test fails).
    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn real_prometheus_scrapes_the_exporter() {
        let Some(prometheus) = tool_or_skip("prometheus") else {
            return;
        };
        let exporter = exporter();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: dreamloop\n    static_configs:\n      \
                 - targets: ['{exporter}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let web = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let _server = Server(
            Command::new(prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={web}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus"),
        );

        // Poll the query API until the first scrape is in (start-up plus one interval).
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            let answer = http_get(web, "/api/v1/query?query=dreamloop_build_info")
                .ok()
                .filter(|(status, _)| *status == 200)
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
            if let Some(answer) = answer {
                let result = &answer["data"]["result"];
                if result.as_array().is_some_and(|r| !r.is_empty()) {
                    break result.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no dreamloop_build_info in Prometheus after 60 s; its log:\n{}",
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        let series = &result[0];
        assert_eq!(series["metric"]["__name__"], "dreamloop_build_info");
        assert_eq!(series["metric"]["version"], VERSION);
        assert_eq!(series["metric"]["job"], "dreamloop");
        assert_eq!(series["metric"]["instance"], exporter.to_string());
        assert_eq!(series["value"][1], "1");
    }

    /// The value of `series` (name and labels exactly as exported) in a scrape, if present.
    fn find_value(scrape: &str, series: &str) -> Option<f64> {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    /// The value of `series` in a scrape.
    fn value(scrape: &str, series: &str) -> f64 {
        find_value(scrape, series).unwrap_or_else(|| panic!("{series} not in the scrape"))
    }

    #[test]
    fn record_helpers_map_reports_to_metrics() {
        use dreamloop::rollback::{Adjustments, RollbackReason};
        use dreamloop::train::loss::DpoStats;
        let addr = exporter();
        let _values = VALUES.lock().unwrap_or_else(|e| e.into_inner());
        let scrape = || http_get(addr, "/metrics").expect("scrape").1;
        let before = scrape();

        record_step(&StepReport {
            step: 7,
            loss: 1.25,
            sft_loss: Some(1.5),
            dpo: Some(DpoStats {
                loss: 0.625,
                rewards_chosen: 0.02,
                rewards_rejected: -0.01,
                margins: 0.03,
                accuracy: 0.75,
                logps_chosen: -10.0,
                logps_rejected: -12.0,
            }),
            grad_norm: 3.5,
            lr: 2e-5,
            tokens: 1000,
            sft_examples: 3,
            dpo_pairs: 1,
            truncated: 0,
            reference_stored: 0,
            seconds: 30.0,
        });
        record_non_finite_step();
        let eval = EvalMetrics {
            clear_accuracy: 0.875,
            clear_margin: 1.5,
            flawed_accuracy: 0.625,
            flawed_margin: -0.25,
            perplexity: 12.5,
            attention_on_direction: 0.125,
            ablation_sensitivity: 2.25,
            general_accuracy: 0.9,
        };
        record_eval(&eval, 90.0);
        record_probe("code", 0.8, 0.375);
        record_layer_attention(5, 0.0625);
        let mut state = PolicyState::new(0.4);
        state.good_step = Some(3);
        state.lr_factor = 0.5;
        state.breach_streak = 0;
        let verdict = Verdict::Rollback {
            to: 3,
            reason: RollbackReason::Sycophancy,
            adjustments: Adjustments {
                lr_factor: 0.5,
                replay_ratio: 0.4,
            },
        };
        record_verdict(&verdict, &state);
        record_checkpoint_write(Some(1234), 2.0);
        record_checkpoint_write(None, 1.0);
        set_queue_capacity("trainer", 4);
        queue_pushed("trainer");
        queue_pushed("trainer");
        queue_popped("trainer");
        actor_restarted("labeler");
        set_paused(true, true);
        let after = scrape();

        let gauges = [
            ("dreamloop_train_loss", 1.25),
            ("dreamloop_train_sft_loss", 1.5),
            ("dreamloop_train_dpo_loss", 0.625),
            ("dreamloop_dpo_reward_chosen", 0.02),
            ("dreamloop_dpo_reward_rejected", -0.01),
            ("dreamloop_dpo_reward_margin", 0.03),
            ("dreamloop_dpo_reward_accuracy_ratio", 0.75),
            ("dreamloop_train_grad_norm", 3.5),
            ("dreamloop_train_learning_rate", 2e-5),
            (
                "dreamloop_eval_probe_accuracy_ratio{category=\"clear_direction\"}",
                0.875,
            ),
            (
                "dreamloop_eval_probe_margin{category=\"clear_direction\"}",
                1.5,
            ),
            (
                "dreamloop_eval_probe_accuracy_ratio{category=\"flawed_direction\"}",
                0.625,
            ),
            (
                "dreamloop_eval_probe_margin{category=\"flawed_direction\"}",
                -0.25,
            ),
            (
                "dreamloop_eval_probe_accuracy_ratio{category=\"code\"}",
                0.8,
            ),
            ("dreamloop_eval_probe_margin{category=\"code\"}", 0.375),
            ("dreamloop_eval_perplexity", 12.5),
            ("dreamloop_eval_attention_on_direction_ratio", 0.125),
            (
                "dreamloop_eval_layer_attention_on_direction_ratio{layer=\"5\"}",
                0.0625,
            ),
            ("dreamloop_eval_ablation_sensitivity", 2.25),
            ("dreamloop_policy_breach_streak", 0.0),
            ("dreamloop_policy_good_step", 3.0),
            ("dreamloop_policy_lr_factor_ratio", 0.5),
            ("dreamloop_mix_replay_ratio", 0.4),
            ("dreamloop_checkpoint_size_bytes", 1234.0),
            ("dreamloop_queue_capacity{queue=\"trainer\"}", 4.0),
            ("dreamloop_loop_paused", 1.0),
            ("dreamloop_policy_paused", 1.0),
        ];
        for (series, expected) in gauges {
            assert_eq!(value(&after, series), expected, "{series}");
        }
        let last_step = value(&after, "dreamloop_train_last_step_timestamp_seconds");
        assert!(
            (unix_now() - last_step).abs() < 60.0,
            "last step at {last_step}"
        );

        let increments = [
            ("dreamloop_train_steps_total", 1.0),
            ("dreamloop_train_tokens_total", 1000.0),
            ("dreamloop_train_examples_total{kind=\"sft\"}", 3.0),
            ("dreamloop_train_examples_total{kind=\"dpo\"}", 1.0),
            ("dreamloop_train_non_finite_steps_total", 1.0),
            ("dreamloop_eval_runs_total", 1.0),
            (
                "dreamloop_policy_rollbacks_total{reason=\"sycophancy\"}",
                1.0,
            ),
            (
                "dreamloop_policy_rollbacks_total{reason=\"perplexity\"}",
                0.0,
            ),
            ("dreamloop_policy_mark_good_total", 0.0),
            ("dreamloop_checkpoint_writes_total", 1.0),
            ("dreamloop_checkpoint_write_failures_total", 1.0),
            ("dreamloop_queue_pushed_total{queue=\"trainer\"}", 2.0),
            ("dreamloop_queue_popped_total{queue=\"trainer\"}", 1.0),
            ("dreamloop_actor_restarts_total{actor=\"labeler\"}", 1.0),
            ("dreamloop_train_step_duration_seconds_count", 1.0),
            ("dreamloop_train_step_duration_seconds_sum", 30.0),
            ("dreamloop_eval_duration_seconds_sum", 90.0),
            ("dreamloop_checkpoint_write_duration_seconds_count", 2.0),
        ];
        for (series, delta) in increments {
            // Histogram series appear with their first observation, so may be absent before.
            let from = find_value(&before, series).unwrap_or(0.0);
            let to = value(&after, series);
            assert_eq!(to - from, delta, "{series}: {from} -> {to}");
        }

        set_paused(false, false);
        let resumed = scrape();
        assert_eq!(value(&resumed, "dreamloop_loop_paused"), 0.0);
        assert_eq!(value(&resumed, "dreamloop_policy_paused"), 0.0);
    }

    #[test]
    fn every_histogram_has_its_own_buckets() {
        for def in CATALOGUE.iter().filter(|d| d.kind == MetricKind::Histogram) {
            let expected = match def.name {
                names::TRAIN_STEP_DURATION_SECONDS => STEP_BUCKETS,
                names::EVAL_DURATION_SECONDS => EVAL_BUCKETS,
                names::CHECKPOINT_WRITE_DURATION_SECONDS => CHECKPOINT_BUCKETS,
                other => panic!("{other} has no buckets of its own"),
            };
            assert_eq!(buckets(def.name), expected);
            assert!(
                expected.windows(2).all(|w| w[0] < w[1]),
                "{} ascending",
                def.name
            );
        }
    }

    #[test]
    fn checks_names_kinds_and_label_values() {
        assert!(checked(names::TRAIN_LOSS, MetricKind::Gauge, &[]));
        assert!(checked(
            names::POLICY_ROLLBACKS_TOTAL,
            MetricKind::Counter,
            &[("reason", "sycophancy")]
        ));
        assert!(checked(
            names::EVAL_LAYER_ATTENTION_ON_DIRECTION_RATIO,
            MetricKind::Gauge,
            &[("layer", "11")]
        ));
        #[allow(clippy::type_complexity)]
        let bad: [(&str, MetricKind, &[(&str, &str)]); 5] = [
            ("dreamloop_train_lossy", MetricKind::Gauge, &[]),
            (names::TRAIN_LOSS, MetricKind::Counter, &[]),
            (names::POLICY_ROLLBACKS_TOTAL, MetricKind::Counter, &[]),
            (
                names::POLICY_ROLLBACKS_TOTAL,
                MetricKind::Counter,
                &[("reason", "step_42")],
            ),
            (
                names::QUEUE_PUSHED_TOTAL,
                MetricKind::Counter,
                &[("actor", "scenarios")],
            ),
        ];
        for (name, kind, pairs) in bad {
            let outcome = std::panic::catch_unwind(|| checked(name, kind, pairs));
            // Debug builds panic; release builds log and refuse.
            assert!(
                matches!(outcome, Err(_) | Ok(false)),
                "{name} {pairs:?} accepted"
            );
        }
    }

    #[test]
    fn enumerates_bounded_label_combinations() {
        let rollbacks = find(names::POLICY_ROLLBACKS_TOTAL).unwrap();
        assert_eq!(enumerated_label_values(rollbacks).len(), 5);
        let steps = find(names::TRAIN_STEPS_TOTAL).unwrap();
        assert_eq!(enumerated_label_values(steps), vec![Vec::<&str>::new()]);
        let layer = find(names::EVAL_LAYER_ATTENTION_ON_DIRECTION_RATIO).unwrap();
        assert!(enumerated_label_values(layer).is_empty());
    }
}
