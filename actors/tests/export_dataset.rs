//! `dreamloop export-dataset` writes TRL conversational rows. `main.rs` wires the
//! subcommand; this test compiles the command module on its own and runs it on the
//! core crate's test templates.

#[path = "../src/cmd_export.rs"]
mod cmd_export;

use std::path::{Path, PathBuf};

use cmd_export::{run, ExportDatasetArgs};
use dreamloop::label::Phase;
use serde_json::Value;

fn templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/templates")
}

fn export(phase: Phase, n: usize, name: &str) -> Vec<Value> {
    let out = std::env::temp_dir().join(format!(
        "dreamloop-export-{}-{name}.jsonl",
        std::process::id()
    ));
    run(ExportDatasetArgs {
        n,
        out: out.clone(),
        phase,
        seed: 5,
        scenarios: templates(),
    })
    .expect("export runs");
    let text = std::fs::read_to_string(&out).expect("output written");
    std::fs::remove_file(&out).expect("cleanup");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn keys(row: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = row
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort();
    k
}

#[test]
fn dpo_rows_are_trl_preference_rows() {
    let rows = export(Phase::Dpo, 40, "dpo");
    assert_eq!(rows.len(), 40);
    for row in &rows {
        assert_eq!(keys(row), ["chosen", "prompt", "rejected"]);
        let prompt = row["prompt"].as_array().expect("prompt list");
        assert_eq!(prompt.last().expect("non-empty")["role"], "user");
        assert_eq!(row["chosen"][0]["role"], "assistant");
        assert_eq!(row["rejected"][0]["role"], "assistant");
        assert_ne!(row["chosen"], row["rejected"]);
        assert!(
            !row.to_string().contains("[["),
            "direction markers are removed"
        );
    }
    let distinct: std::collections::HashSet<String> = rows.iter().map(|r| r.to_string()).collect();
    assert_eq!(distinct.len(), 40);
}

#[test]
fn sft_and_mixed_rows() {
    for row in export(Phase::Sft, 20, "sft") {
        assert_eq!(keys(&row), ["completion", "prompt"]);
        assert_eq!(row["completion"][0]["role"], "assistant");
    }
    let mixed = export(Phase::Mixed, 200, "mixed");
    let sft = mixed
        .iter()
        .filter(|r| r.get("completion").is_some())
        .count();
    assert!(
        (60..=140).contains(&sft),
        "about half of 200 are SFT: {sft}"
    );
}

#[test]
fn missing_library_is_an_error_naming_the_directory() {
    let err = run(ExportDatasetArgs {
        n: 1,
        out: std::env::temp_dir().join("dreamloop-never-written.jsonl"),
        phase: Phase::Dpo,
        seed: 0,
        scenarios: PathBuf::from("/nonexistent/scenarios"),
    })
    .expect_err("no templates");
    assert!(
        format!("{err:#}").contains("/nonexistent/scenarios"),
        "{err:#}"
    );
}
