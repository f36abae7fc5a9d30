//! `dreamloop dream`: ask the config's `[dream]` server for `--count` scenarios, outside the
//! daemon, and measure what comes back.
//!
//! The same [`Dreamer`] the daemon's dreamer actor wraps (seeds from the template library,
//! the request, validation, the near-duplicate window against recent dreams and every probe)
//! and the same [`ChatClient`], with `[dream] concurrency` requests in flight on worker
//! threads. Nothing is trained and no state directory is touched.
//!
//! Every answer is one line of `--out` (JSONL): its kind, the outcome (`accepted` or the
//! rejection's label, with the reason), the completion's tokens and time, and the scenario
//! (accepted) or the raw answer (refused). Besides the daemon's checks, an answer that
//! validates is compared by exact content hash with every earlier valid one (what the
//! never-repeat ledger would refuse), and an accepted dream's similarity to its nearest
//! earlier accepted dream and to its nearest probe is recorded, so the near-duplicate
//! threshold can be re-read on real dreamed text. The summary is printed as one JSON object.
//!
//! Exit codes: 0 done, 78 the config is unusable (no `[dream]` table, invalid, scenarios do
//! not load), 1 the server failed `--max-errors` times in a row.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dreamloop::config::DreamConfig;
use dreamloop::dream::neardup::{MinHasher, Signature};
use dreamloop::dream::{
    provenance, scenario_text, ChatClient, ClientError, Completion, Dreamer, Rejection,
    ResponseFormat, Seed,
};
use dreamloop::example::Message;
use dreamloop::scenario::probe_scenarios;
use serde_json::json;

use crate::cmd_daemon::{print_config_error, EXIT_CONFIG};

/// `dreamloop dream`.
#[derive(clap::Args)]
pub struct DreamArgs {
    /// The daemon's config file; its `[dream]` table names the server.
    #[arg(long)]
    pub config: PathBuf,
    /// Answers to collect (accepted or refused; failed requests are retried, not counted).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Every answer, one JSON object per line.
    #[arg(long)]
    pub out: PathBuf,
    /// Requests in flight (default: `[dream] concurrency`).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Give up after this many failed requests in a row.
    #[arg(long, default_value_t = 20)]
    pub max_errors: usize,
    /// Stream of the seed sampler (the daemon uses the time; fixed here for repeatable seeds).
    #[arg(long, default_value_t = 0)]
    pub stream: u64,
}

/// A request's outcome, from a worker thread.
struct Answer {
    seed: Seed,
    result: Result<Completion, ClientError>,
    seconds: f64,
}

/// `dreamloop dream`.
pub fn run(args: DreamArgs) -> anyhow::Result<ExitCode> {
    let config = match DreamConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let Some(dream) = config.dream.clone() else {
        eprintln!(
            "{}: no [dream] table: nothing names a server to dream with",
            args.config.display()
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    };
    let library = match crate::generator::load_library(&config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e:#}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let probes = probe_scenarios(&library, config.eval.probe_samples);
    let client = std::sync::Arc::new(
        ChatClient::new(dream.client_settings())
            .with_context(|| format!("the dream server {}", dream.server))?,
    );
    let mut dreamer = Dreamer::new(
        library,
        &probes,
        dream.dreamer_config(config.data.seed, args.stream),
        provenance(client.model(), client.server()),
    );
    let format = if dream.json_mode {
        ResponseFormat::JsonObject
    } else {
        ResponseFormat::Text
    };
    let concurrency = args.concurrency.unwrap_or(dream.concurrency).max(1);
    let hasher = MinHasher::default();
    let probe_signatures: Vec<Signature> = probes
        .iter()
        .map(|p| hasher.signature(&scenario_text(p)))
        .collect();

    let (job_tx, job_rx) = mpsc::channel::<(Seed, Vec<Message>)>();
    let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
    let (answer_tx, answer_rx) = mpsc::channel::<Answer>();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (jobs, answers, client) = (job_rx.clone(), answer_tx.clone(), client.clone());
        workers.push(std::thread::spawn(move || loop {
            let job = jobs.lock().expect("job queue lock").recv();
            let Ok((seed, messages)) = job else { return };
            let started = Instant::now();
            let result = client.complete(&messages, format);
            let seconds = started.elapsed().as_secs_f64();
            if answers
                .send(Answer {
                    seed,
                    result,
                    seconds,
                })
                .is_err()
            {
                return;
            }
        }));
    }
    drop(answer_tx);

    let mut out = BufWriter::new(
        File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?,
    );
    let started = Instant::now();
    let mut sent = 0usize;
    let mut answered = 0usize;
    let mut errors_in_a_row = 0usize;
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut seen_hashes = HashSet::new();
    let mut exact_duplicates = 0u64;
    let mut valid = 0u64;
    let mut accepted_signatures: Vec<Signature> = Vec::new();
    let mut nearest_recent: Vec<f64> = Vec::new();
    let mut nearest_probe: Vec<f64> = Vec::new();
    let (mut tokens, mut truncated, mut request_seconds) = (0u64, 0u64, 0.0f64);
    let send = |dreamer: &mut Dreamer, sent: &mut usize| -> anyhow::Result<()> {
        let seed = dreamer.seed().context("seeding a dream")?;
        let messages = dreamer.request(&seed);
        job_tx
            .send((seed, messages))
            .map_err(|_| anyhow::anyhow!("the worker threads are gone"))?;
        *sent += 1;
        Ok(())
    };
    for _ in 0..concurrency.min(args.count) {
        send(&mut dreamer, &mut sent)?;
    }
    while answered < args.count {
        let answer = answer_rx.recv().context("the worker threads are gone")?;
        let kind = answer.seed.kind.as_str();
        let completion = match answer.result {
            Ok(c) => {
                errors_in_a_row = 0;
                c
            }
            Err(e) => {
                *errors.entry(e.label()).or_default() += 1;
                errors_in_a_row += 1;
                tracing::warn!(error = %e, "A dream request failed.");
                if errors_in_a_row >= args.max_errors {
                    anyhow::bail!("{errors_in_a_row} failed requests in a row; the last: {e}");
                }
                std::thread::sleep(Duration::from_millis(500 * errors_in_a_row as u64));
                send(&mut dreamer, &mut sent)?;
                continue;
            }
        };
        answered += 1;
        request_seconds += answer.seconds;
        tokens += completion.completion_tokens.unwrap_or(0);
        truncated += u64::from(completion.truncated());
        let checked = dreamer.check(&answer.seed, &completion.content);
        let mut record = json!({
            "n": answered,
            "kind": kind,
            "domain": answer.seed.domain,
            "seconds": answer.seconds,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason,
        });
        let outcome: Result<_, Rejection> = match checked {
            Ok(scenario) => {
                valid += 1;
                let exact = !seen_hashes.insert(scenario.ledger_key().0);
                exact_duplicates += u64::from(exact);
                record["exact_duplicate"] = json!(exact);
                if exact {
                    Err(Rejection::ExactDuplicate)
                } else {
                    dreamer.admit(scenario)
                }
            }
            Err(r) => Err(r),
        };
        let label = match &outcome {
            Ok(scenario) => {
                let signature = hasher.signature(&scenario_text(scenario));
                let nearest = |kept: &[Signature]| {
                    kept.iter()
                        .map(|s| signature.similarity(s))
                        .fold(0.0f64, f64::max)
                };
                let (recent, probe) = (nearest(&accepted_signatures), nearest(&probe_signatures));
                nearest_recent.push(recent);
                nearest_probe.push(probe);
                accepted_signatures.push(signature);
                record["outcome"] = json!("accepted");
                record["nearest_accepted"] = json!(recent);
                record["nearest_probe"] = json!(probe);
                record["scenario"] = serde_json::to_value(scenario)?;
                "accepted"
            }
            Err(rejection) => {
                record["outcome"] = json!(rejection.label());
                record["reason"] = json!(rejection.to_string());
                record["answer"] = json!(completion.content);
                rejection.label()
            }
        };
        *outcomes
            .entry(kind.to_string())
            .or_default()
            .entry(label)
            .or_default() += 1;
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
        if answered % 50 == 0 {
            out.flush()?;
            eprintln!(
                "dream: {answered}/{} answers, {} accepted, {:.0} s",
                args.count,
                dreamer.accepted().iter().sum::<u64>(),
                started.elapsed().as_secs_f64()
            );
        }
        if sent < args.count + errors.values().sum::<u64>() as usize {
            send(&mut dreamer, &mut sent)?;
        }
    }
    out.flush()?;
    drop(job_tx);
    for w in workers {
        let _ = w.join();
    }
    let wall = started.elapsed().as_secs_f64();
    let accepted = dreamer.accepted();
    let summary = json!({
        "server": client.server(),
        "model": client.model(),
        "answers": answered,
        "valid": valid,
        "valid_share": valid as f64 / answered.max(1) as f64,
        "accepted": accepted.iter().sum::<u64>(),
        "accepted_share": accepted.iter().sum::<u64>() as f64 / answered.max(1) as f64,
        "accepted_by_kind": {"accept": accepted[0], "push_back": accepted[1], "general": accepted[2]},
        "kind_weights": dream.kind_weights,
        "exact_duplicates": exact_duplicates,
        "exact_duplicate_share_of_valid": exact_duplicates as f64 / valid.max(1) as f64,
        "outcomes_by_kind": outcomes,
        "request_errors": errors,
        "truncated": truncated,
        "near_duplicate_threshold": dream.near_duplicate_threshold,
        "nearest_accepted": quantiles(&mut nearest_recent),
        "nearest_probe": quantiles(&mut nearest_probe),
        "completion_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens as f64 / wall,
        "mean_request_seconds": request_seconds / answered.max(1) as f64,
        "concurrency": concurrency,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}

/// min, p50, p95, p99 and max of `xs` (empty: null).
fn quantiles(xs: &mut [f64]) -> serde_json::Value {
    if xs.is_empty() {
        return serde_json::Value::Null;
    }
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    json!({"n": xs.len(), "min": xs[0], "p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": xs[xs.len() - 1]})
}
