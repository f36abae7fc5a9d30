//! The `dreamloop` binary on the real SmolLM2-135M-Instruct GGUF: what an operator types.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-smollm2.sh`, run by
//! `scripts/test.sh`); each test prints a note and returns when it is absent. The expected
//! answer and the log-probs come from transformers (`tests/fixtures/smollm2_reference.json`:
//! its `capital` prompt is this question with this answer, scored in float32).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn gguf_path() -> Option<PathBuf> {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} is absent (run scripts/fetch-smollm2.sh)",
            path.display()
        );
        None
    }
}

fn dreamloop(args: &[&str], model: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(args)
        .arg("--model")
        .arg(model)
        .output()
        .expect("the dreamloop binary runs");
    assert!(
        out.status.success(),
        "dreamloop {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn generate_answers_paris_from_the_gguf() {
    let Some(gguf) = gguf_path() else { return };
    let out = dreamloop(
        &["generate", "--prompt", "What is the capital of France?"],
        &gguf,
    );
    assert_eq!(out, "The capital of France is Paris.\n");
}

#[test]
fn logprobs_of_the_gguf_match_transformers() {
    let Some(gguf) = gguf_path() else { return };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let prompt = &reference["prompts"][0];
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let line = serde_json::json!({ "messages": prompt["messages"] });
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let out = dreamloop(&["logprobs", "--input", input.to_str().unwrap()], &gguf);
    let got: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(got["ids"], prompt["token_ids"]);
    let want = prompt["a_transformers"]["mean_nll"].as_f64().unwrap();
    let nll = got["mean_nll"].as_f64().unwrap();
    assert!(
        (nll - want).abs() <= 1e-4,
        "mean NLL {nll}, transformers {want}"
    );
    let got_lp = got["logprobs"].as_array().unwrap();
    let want_lp = prompt["a_transformers"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(got_lp.len(), want_lp.len());
    for (t, (g, w)) in got_lp.iter().zip(want_lp).enumerate() {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!((g - w).abs() <= 1e-3, "token {t}: {g}, transformers {w}");
    }
}
