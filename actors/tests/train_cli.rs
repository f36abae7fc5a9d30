//! `dreamloop train` against PyTorch: `tests/fixtures/train_reference/` holds trajectories
//! made by `scripts/gen-train-reference.py` (torch eager, TRL's loss semantics,
//! `torch.optim.AdamW`, constant lr, no clipping) on the tiny `llama_untied` fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn train_and_compare(loss: &str, data: &str, want: &str) {
    let out = tempfile::tempdir().unwrap();
    let fixtures = root().join("tests/fixtures");
    let status = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(["train", "--model"])
        .arg(fixtures.join("models/llama_untied"))
        .arg("--data")
        .arg(fixtures.join("train_reference").join(data))
        .arg("--out")
        .arg(out.path())
        .args([
            "--loss",
            loss,
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.01",
            "--batch-size",
            "2",
            "--max-grad-norm",
            "0",
            "--beta",
            "0.1",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "dreamloop train failed");
    let got = tensors(&out.path().join("model.safetensors"));
    let want = tensors(&fixtures.join("train_reference").join(want));
    assert_eq!(got.len(), want.len());
    let start = tensors(&fixtures.join("models/llama_untied/model.safetensors"));
    for (((name, shape, g), (wname, wshape, w)), (_, _, s)) in got.iter().zip(&want).zip(&start) {
        assert_eq!((name, shape), (wname, wshape));
        // Adam divides by sqrt(v), so an element whose gradient is at float-noise level (DPO's
        // chosen − rejected cancels in places) can move by a fraction of lr in either
        // implementation (seen: 1e-4 on one element, against torch in float64 as well).
        // Require 99.9% of elements within 2e-6 and every element within lr/2.
        let diffs: Vec<f32> = g.iter().zip(w).map(|(a, b)| (a - b).abs()).collect();
        let worst = diffs.iter().cloned().fold(0.0f32, f32::max);
        let off = diffs.iter().filter(|d| **d > 2e-6).count();
        assert!(worst < 5e-4, "{loss}: {name} differs from torch by {worst}");
        assert!(
            off * 1000 <= diffs.len(),
            "{loss}: {name}: {off} of {} elements differ by more than 2e-6",
            diffs.len()
        );
        let moved = w
            .iter()
            .zip(s)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-4,
            "{loss}: {name} did not move in the reference ({moved})"
        );
    }
}

#[test]
fn sft_matches_torch_with_trl_semantics() {
    train_and_compare("sft", "sft.jsonl", "sft_after.safetensors");
}

/// Three DPO steps, the first at policy = reference (DPO logits exactly 0), where a wrong
/// `log σ` derivative once doubled the gradient: Adam hides that on step 1 but its moments
/// carry it into steps 2 and 3 (session 2 found and fixed it; see `train::loss::log_sigmoid`).
#[test]
fn dpo_matches_torch_with_trl_semantics() {
    train_and_compare("dpo", "dpo.jsonl", "dpo_after.safetensors");
}

#[test]
fn bad_lines_are_reported_with_file_and_line_and_the_rest_is_trained() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mixed.jsonl");
    let good =
        std::fs::read_to_string(root().join("tests/fixtures/train_reference/sft.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(1, "{not json");
    lines.insert(
        3,
        r#"{"input_ids": [1, 2, 999], "completion_mask": [0, 1, 1]}"#,
    );
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_dreamloop"))
        .args(["train", "--model"])
        .arg(root().join("tests/fixtures/models/llama_untied"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--lr", "1e-4", "--batch-size", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("mixed.jsonl:2: <line>: not JSON"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mixed.jsonl:4: input_ids: 999 is not a token id below 256"),
        "{stderr}"
    );
    assert!(stderr.contains("3 steps"), "{stderr}");
    assert_eq!(result.status.code(), Some(2));
    assert!(out.join("model.safetensors").exists());
}
