//! SmolLM2-135M-Instruct running in dreamloop, checked against transformers.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-smollm2.sh`, which
//! `scripts/test.sh` runs first, puts it there); each test prints a note and returns when it
//! is absent. References (`fixtures/`): `smollm2_reference.json` — the `capital` chat prompt's
//! token ids and per-token log-probs from transformers loading the same GGUF in float32,
//! with its README tolerances (token log-probs atol 1e-3, mean NLL atol 1e-4, top-1
//! identical) — and `smollm2_last_position_logits.json` (all 49,152 logits at the last
//! position, atol 1e-3).

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use dreamloop::model::generate::{chat, Sampling};
use dreamloop::model::gguf::import_gguf;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::{cpu, ChatMessage, Model};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture is readable"))
        .expect("fixture is JSON")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The `capital` prompt of the reference file.
fn capital() -> Value {
    fixture("smollm2_reference.json")["prompts"][0].clone()
}

/// Logits of one unpadded sequence, on the host: `[seq][vocab]`.
fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let lm = model.frozen();
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]),
        &lm.device(),
    );
    let out = lm.forward(input, None);
    let [_, seq, vocab] = out.dims();
    let flat: Vec<f32> = out.into_data().convert::<f32>().try_to_vec().expect("f32");
    (0..seq)
        .map(|t| flat[t * vocab..(t + 1) * vocab].to_vec())
        .collect()
}

/// Per-token log-probs of every next token (the reference file's definition).
fn token_logprobs(model: &Model, ids: &[u32]) -> Vec<f32> {
    let seq = ScoredSeq {
        ids: ids.to_vec(),
        score_from: 1,
    };
    logprobs(&model.frozen(), &[seq], 2).scored_host().remove(0)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn gguf_direct_and_imported_directory_give_identical_logprobs() {
    let Some(gguf) = gguf_path() else { return };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("smollm2");
    import_gguf(&gguf, &dir).expect("import succeeds");
    let direct = Model::from_gguf(&gguf, &cpu()).expect("GGUF loads");
    let imported = Model::load(&dir, &cpu()).expect("imported directory loads");

    assert_eq!(direct.config.raw, imported.config.raw, "config.json");
    let ids = u32s(&capital()["token_ids"]);
    let a = token_logprobs(&direct, &ids);
    let b = token_logprobs(&imported, &ids);
    assert_eq!(a.len(), ids.len() - 1);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "log-probs differ: {a:?} vs {b:?}");

    // The tokenizer and template built from the GGUF equal the imported files'.
    let (td, ti) = (direct.tokenizer.unwrap(), imported.tokenizer.unwrap());
    let messages = [ChatMessage {
        role: "user".into(),
        content: "Ünïcode 123 and code: fn main() {}".into(),
    }];
    let (ed, ei) = (
        td.encode_chat(&messages, true).unwrap(),
        ti.encode_chat(&messages, true).unwrap(),
    );
    assert_eq!(ed.text, ei.text);
    assert_eq!(ed.encoding, ei.encoding);
    assert_eq!((td.bos_token, td.eos_token), (ti.bos_token, ti.eos_token));
    let names = |files: &[(String, Vec<u8>)]| {
        let mut n: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&td.files), names(&ti.files));
}

#[test]
fn logprobs_match_transformers() {
    let Some(gguf) = gguf_path() else { return };
    let model = Model::from_gguf(&gguf, &cpu()).expect("GGUF loads");
    let prompt = capital();
    let ids = u32s(&prompt["token_ids"]);

    // Our template + tokenizer give transformers' ids for the same messages.
    let messages: Vec<ChatMessage> = serde_json::from_value(prompt["messages"].clone()).unwrap();
    let tok = model.tokenizer.as_ref().expect("GGUF has a tokenizer");
    let enc = tok.encode_chat(&messages, false).unwrap();
    assert_eq!(enc.text, prompt["rendered"].as_str().unwrap());
    assert_eq!(enc.encoding.ids, ids);

    let reference = &prompt["a_transformers"];
    let want = f64s(&reference["token_logprobs"]);
    let got = token_logprobs(&model, &ids);
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (t, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let diff = (f64::from(g) - w).abs();
        worst = worst.max(diff);
        assert!(diff <= 1e-3, "token {t}: log-prob {g}, transformers {w}");
    }
    let nll = -got.iter().map(|&v| f64::from(v)).sum::<f64>() / got.len() as f64;
    let want_nll = reference["mean_nll"].as_f64().unwrap();
    assert!(
        (nll - want_nll).abs() <= 1e-4,
        "mean NLL {nll}, transformers {want_nll}"
    );
    eprintln!("max |Δ log-prob| = {worst:.2e}, mean NLL {nll:.6} vs {want_nll:.6}");

    let rows = logits(&model, &ids);
    let top1: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
    assert_eq!(top1, u32s(&reference["top1_ids"]), "top-1 ids");

    let last = fixture("smollm2_last_position_logits.json");
    assert_eq!(u32s(&last["capital"]["token_ids"]), ids);
    let want_last = f64s(&last["capital"]["a_transformers_last_position_logits"]);
    let got_last = rows.last().expect("46 positions");
    assert_eq!(got_last.len(), want_last.len());
    for (v, (&g, &w)) in got_last.iter().zip(&want_last).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 1e-3,
            "last-position logit of token {v}: {g}, transformers {w}"
        );
    }
}

#[test]
fn greedy_answer_to_the_capital_question_is_paris() {
    let Some(gguf) = gguf_path() else { return };
    let model = Model::from_gguf(&gguf, &cpu()).expect("GGUF loads");
    let tok = model.tokenizer.as_ref().expect("GGUF has a tokenizer");
    let messages = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let sampling = Sampling {
        max_new_tokens: 32,
        ..Sampling::default()
    };
    let out = chat(&model.frozen(), tok, &messages, &[2], &sampling).expect("generates");
    assert_eq!(out.text, "The capital of France is Paris.");
    assert!(out.stopped, "stops at <|im_end|>: {:?}", out.ids);
    // The transformers reference scores exactly this answer: its ids follow the prompt.
    let ids = u32s(&capital()["token_ids"]);
    assert_eq!(out.ids, ids[37..44].to_vec());
}
