//! `dreamloop eval`, the real binary: its JSON report is complete and finite, its held-out
//! perplexity matches one recomputed window by window through the library's log-prob API
//! (not through `ProbeSuite`), a daemon's GOOD checkpoint evaluates to the numbers the
//! daemon itself recorded when it marked it GOOD (so the CLI measures the daemon's probes),
//! and a corrupt or missing checkpoint is an exit-2 error naming the file or step. On the
//! hybrid preset, attention is reported for its full-attention layer only, by index.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{config_text, latest_dir, repo, Daemon, Overrides};
use dreamloop::eval::PERPLEXITY_WINDOW;
use dreamloop::general::load_heldout;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::{cpu, Model};
use serde_json::Value;

fn eval(args: &[&str], extra: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .arg("eval")
        .args(args)
        .args(extra)
        .output()
        .expect("dreamloop eval runs")
}

/// The test config (`common::config_text` defaults) written into `dir`.
fn default_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("dreamloop.toml");
    std::fs::write(
        &config,
        config_text(&dir.join("state"), &Overrides::default()),
    )
    .unwrap();
    config
}

/// The report printed on stdout: exactly one JSON object on one line.
fn report(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {}\nstdout {stdout}\nstderr {stderr}",
        out.status
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    assert!(
        !stderr.contains("evaluating ["),
        "no progress bar when stderr is not a terminal: {stderr}"
    );
    serde_json::from_str(stdout.trim()).expect("stdout is JSON")
}

fn number(r: &Value, path: &str) -> f64 {
    let mut v = r;
    for key in path.split('.') {
        v = &v[key];
    }
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("`{path}` missing or not a number in {r}"));
    assert!(x.is_finite(), "`{path}` = {x} is not finite");
    x
}

/// Every field of `EvalReport` present and finite; probes of every category counted.
fn check_complete(r: &Value, layers: usize) {
    for category in ["clear_direction", "flawed_direction", "arithmetic", "code"] {
        let acc = number(r, &format!("{category}.accuracy"));
        assert!((0.0..=1.0).contains(&acc), "{category} accuracy {acc}");
        number(r, &format!("{category}.margin"));
        assert!(number(r, &format!("{category}.count")) >= 1.0, "{category}");
    }
    assert!(number(r, "perplexity") > 1.0);
    let attention = number(r, "attention_on_direction");
    assert!((0.0..=1.0).contains(&attention));
    let per_layer = r["attention_per_layer"].as_array().expect("per-layer list");
    assert_eq!(per_layer.len(), layers);
    for a in per_layer {
        assert!(a.as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{a}");
    }
    number(r, "ablation_sensitivity");
    assert!(number(r, "seconds") > 0.0);
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-6),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn tiny_report_is_complete_and_its_perplexity_matches_the_logprob_api() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path());
    let out = eval(&["--model", "tiny", "--json", "--config"], &[&config]);
    let r = report(&out);

    // Perplexity by hand: the first held-out text cut to `heldout_max_bytes = 512` of the
    // test config, 256-token windows each scored alone (batch 1, no padding) from its
    // second token — the definition, not the suite's batched code.
    let model = Model::open("tiny", &cpu()).unwrap();
    check_complete(&r, model.config.num_hidden_layers);
    let tok = model.tokenizer.as_ref().unwrap();
    let mut text = load_heldout(&repo().join("scenarios")).unwrap()[0]
        .text
        .clone();
    let mut end = 512.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    let ids = tok.encode(&text, false).unwrap().ids;
    let lm = model.frozen();
    let (mut nll, mut count) = (0.0f64, 0usize);
    for window in ids.chunks(PERPLEXITY_WINDOW).filter(|w| w.len() >= 2) {
        let seq = ScoredSeq {
            ids: window.to_vec(),
            score_from: 1,
        };
        let row = logprobs(&lm, &[seq], 0).scored_host().remove(0);
        assert_eq!(row.len(), window.len() - 1);
        nll -= row.iter().map(|&x| f64::from(x)).sum::<f64>();
        count += row.len();
    }
    assert!(count > PERPLEXITY_WINDOW, "more than one window: {count}");
    close(
        number(&r, "perplexity"),
        (nll / count as f64).exp(),
        1e-4,
        "perplexity",
    );

    // The human table names every measurement.
    let out = eval(&["--model", "tiny", "--config"], &[&config]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "clear_direction",
        "flawed_direction",
        "held-out perplexity",
        "attention on direction",
        "ablation sensitivity",
        "arithmetic",
        "code",
        "eval seconds",
    ] {
        assert!(table.contains(row), "`{row}` missing:\n{table}");
    }
}

#[test]
fn daemon_checkpoints_evaluate_as_the_daemon_did_and_bad_ones_are_refused() {
    let mut d = Daemon::new(&Overrides::default());
    d.start(&["--max-steps", "4"], &[]);
    let status = d.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "exit {status}\n{}", d.log());
    let s = d.status().expect("status.json");
    let good = s["good_step"].as_u64().expect("a GOOD checkpoint");
    let (state, config) = (d.state(), d.config());
    let flags: [&Path; 4] = [
        Path::new("--state-dir"),
        &state,
        Path::new("--config"),
        &config,
    ];
    let layers = Model::open("tiny", &cpu())
        .unwrap()
        .config
        .num_hidden_layers;

    // LATEST: the same numbers as evaluating its directory as a plain model directory.
    let latest = report(&eval(&["--checkpoint", "latest", "--json"], &flags));
    check_complete(&latest, layers);
    let dir = latest_dir(&state).expect("LATEST");
    let plain = report(&eval(
        &["--json", "--config"],
        &[&config, Path::new("--model"), &dir],
    ));
    for field in [
        "clear_direction.margin",
        "flawed_direction.margin",
        "perplexity",
        "attention_on_direction",
        "ablation_sensitivity",
    ] {
        close(
            number(&latest, field),
            number(&plain, field),
            1e-6,
            &format!("latest vs --model: {field}"),
        );
    }

    // GOOD: the numbers the daemon recorded in its mark_good event for that step.
    let by_step = report(&eval(
        &["--checkpoint", &good.to_string(), "--json"],
        &flags,
    ));
    let r = report(&eval(&["--checkpoint", "good", "--json"], &flags));
    check_complete(&r, layers);
    assert_eq!(r["perplexity"], by_step["perplexity"]);
    let event = d
        .events()
        .into_iter()
        .rfind(|e| e["event"] == "mark_good" && e["step"] == good)
        .unwrap_or_else(|| panic!("a mark_good event for step {good}"));
    let m = &event["metrics"];
    for (cli, daemon) in [
        ("clear_direction.accuracy", "clear_accuracy"),
        ("clear_direction.margin", "clear_margin"),
        ("flawed_direction.accuracy", "flawed_accuracy"),
        ("flawed_direction.margin", "flawed_margin"),
        ("perplexity", "perplexity"),
        ("attention_on_direction", "attention_on_direction"),
        ("ablation_sensitivity", "ablation_sensitivity"),
    ] {
        close(
            number(&r, cli),
            number(m, daemon),
            1e-5,
            &format!("good vs daemon: {cli}"),
        );
    }

    // A missing step: exit 2 naming it.
    let out = eval(&["--checkpoint", "999"], &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no checkpoint for step 999"), "{stderr}");

    // One flipped byte in LATEST's weights: exit 2 naming the file, nothing evaluated.
    let weights = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let out = eval(&["--checkpoint", "latest", "--json"], &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&weights.display().to_string()) && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// `tiny-hybrid` (three Gated-DeltaNet layers, one gated-attention layer): the report names
/// layer 3 as the only attention layer, and ablation sensitivity (which sees through the
/// recurrent layers) is measured.
#[test]
fn hybrid_report_reads_attention_from_the_full_attention_layer() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path());
    let r = report(&eval(
        &["--model", "tiny-hybrid", "--json", "--config"],
        &[&config],
    ));
    assert_eq!(r["attention_layers"], serde_json::json!([3]), "{r}");
    assert_eq!(r["attention_per_layer"].as_array().unwrap().len(), 1);
    assert!((0.0..=1.0).contains(&number(&r, "attention_on_direction")));
    number(&r, "ablation_sensitivity");
    assert!(number(&r, "perplexity") > 1.0);

    // And the preset decodes through its recurrent and KV caches.
    let out = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args([
            "generate",
            "--model",
            "tiny-hybrid",
            "--prompt",
            "Rename x to y.",
        ])
        .args(["--max-new-tokens", "8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
