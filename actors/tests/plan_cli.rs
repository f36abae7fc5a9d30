//! `dreamloop plan` from a model directory that holds only `config.json` (planning comes
//! before downloading the weights), its `--json` object, its flag errors, and the start-up
//! refusal of `run` / `validate-config` for a configuration whose plan does not fit.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Overrides;
use serde_json::Value;

/// The operator's Qwen3.5-27B `config.json` as published (multimodal wrapper, text decoder
/// nested), with none of its 54 GB of weights.
fn qwen3_5_27b_config() -> Vec<u8> {
    std::fs::read(common::repo().join("tests/fixtures/qwen3_5_27b/config.json"))
        .expect("tests/fixtures/qwen3_5_27b/config.json")
}

fn dreamloop() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dreamloop"));
    // No config/dreamloop.toml in the working directory: built-in defaults unless --config.
    c.current_dir(std::env::temp_dir());
    c
}

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("config.json"), qwen3_5_27b_config())
        .expect("write config.json");
    dir
}

fn json_plan(model: &Path, extra: &[&str]) -> Value {
    let out = dreamloop()
        .args(["plan", "--json", "--device-memory", "141GB", "--model"])
        .arg(model)
        .args(["--seq-len", "4096", "--batch", "1", "--phase", "sft"])
        .args(extra)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn plans_the_27b_from_a_directory_with_only_config_json() {
    let dir = model_dir();
    let plain = json_plan(dir.path(), &["--optimizer", "apollo-mini"]);
    assert_eq!(plain["device_bytes"], 141_000_000_000u64);
    let params = plain["parameters"].as_f64().expect("parameters");
    assert!((params / 1e9 - 26.90).abs() < 0.005, "{params}");
    let items = plain["items"].as_array().expect("items");
    let names: Vec<&str> = items.iter().filter_map(|i| i["name"].as_str()).collect();
    for want in [
        "weights",
        "gradients",
        "optimizer: projected",
        "optimizer: dense",
        "optimizer: embeddings + LM head",
        "activations kept for backward",
        "logits chunk",
        "allocator headroom",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The items sum to the total, and f32 weights alone (107.6 GB) leave no room.
    let sum: u64 = items
        .iter()
        .map(|i| i["bytes"].as_u64().expect("bytes"))
        .sum();
    assert_eq!(Some(sum), plain["total_bytes"].as_u64());
    assert_eq!(items[0]["bytes"].as_u64(), Some(params as u64 * 4));
    assert_eq!(plain["fits"], false);
    // More than 6 FLOPs per token for each parameter in a matmul (all but the embedding).
    let in_matmuls = params - 248_320.0 * 5120.0;
    assert!(plain["flops_per_token"].as_f64().unwrap() > 6.0 * in_matmuls);

    let what_if = json_plan(
        dir.path(),
        &[
            "--optimizer",
            "apollo-mini",
            "--dtype",
            "bf16",
            "--recompute",
            "--logits-chunk",
            "1024",
            "--reference",
            "streamed",
            "--freeze",
            "model.embed_tokens.*",
            "--freeze",
            "lm_head.*",
            "--peak-tflops",
            "989",
        ],
    );
    assert_eq!(what_if["fits"], true, "{what_if:#}");
    let step = what_if["step_seconds"]
        .as_f64()
        .expect("a step time with --peak-tflops");
    let flops = what_if["flops_per_step"].as_f64().unwrap();
    assert!(
        (step - flops / (0.4 * 989e12)).abs() < 1e-9 * step,
        "{step}"
    );
    assert_eq!(
        plain["step_seconds"],
        Value::Null,
        "no step time on cpu unless asked"
    );
}

#[test]
fn a_bad_device_memory_names_the_flag() {
    let dir = model_dir();
    let out = dreamloop()
        .args(["plan", "--device-memory", "lots", "--model"])
        .arg(dir.path())
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--device-memory"), "{err}");
    assert!(err.contains("lots"), "{err}");
}

fn refused(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{err}");
    err
}

/// A step that cannot fit the stated device is refused by `validate-config` and by `run`
/// before anything starts, naming the field and what would make it fit; the tiny model fits
/// this host.
#[test]
fn run_refuses_a_config_whose_plan_does_not_fit() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let file = dir.path().join("small-device.toml");
    let text = common::config_text(&state, &Overrides::default()).replace(
        "backend = \"cpu\"",
        "backend = \"cpu\"\ndevice_memory = \"1MB\"",
    );
    std::fs::write(&file, &text).expect("write");
    let err = refused(
        dreamloop()
            .arg("validate-config")
            .arg(&file)
            .output()
            .expect("runs"),
    );
    assert!(err.contains("model.device_memory"), "{err}");
    assert!(err.contains("1MB"), "{err}");
    let err = refused(
        dreamloop()
            .args(["run", "--config"])
            .arg(&file)
            .output()
            .expect("runs"),
    );
    assert!(err.contains("model.device_memory"), "{err}");
    assert!(!state.exists(), "nothing is written for a refused config");

    let roomy = dir.path().join("roomy.toml");
    std::fs::write(&roomy, text.replace("\"1MB\"", "\"24GiB\"")).expect("write");
    let out = dreamloop()
        .arg("validate-config")
        .arg(&roomy)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
