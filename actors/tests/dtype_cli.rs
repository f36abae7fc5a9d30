//! `--dtype bf16` on the command line: `dreamloop logprobs` of the hybrid qwen3_5 fixture in
//! bf16 against transformers run in bf16 (`tests/fixtures/models/qwen3_5/reference_bf16.json`),
//! within twice transformers' own bf16-vs-f32 spread (the bound `tests/bf16.rs` explains), and
//! not equal to the f32 run's (the flag reaches the model).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen3_5")
}

/// Every next-token log-prob `dreamloop logprobs` prints for `lines`, in order.
fn cli_logprobs(input: &Path, dtype: &str) -> Vec<f64> {
    let out = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(["logprobs", "--dtype", dtype, "--model"])
        .arg(fixture())
        .arg("--input")
        .arg(input)
        .output()
        .expect("dreamloop runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .flat_map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn logprobs_in_bf16_match_transformers_bf16() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("reference_bf16.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"]["seq33"];
    let ids = &case["input_ids"][0];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, format!("{{\"ids\": {ids}}}\n")).unwrap();
    let want: Vec<f64> = case["logprobs_bf16"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let spread = reference["cases"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["spread_bf16_vs_f32"].as_f64().unwrap())
        .fold(0.0, f64::max);

    let bf16 = cli_logprobs(&input, "bf16");
    assert_eq!(bf16.len(), want.len());
    let max = bf16
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        max <= 2.0 * spread,
        "max diff {max}, 2 × spread {}",
        2.0 * spread
    );
    let f32s = cli_logprobs(&input, "f32");
    assert_ne!(bf16, f32s, "--dtype bf16 ran in f32");
}
