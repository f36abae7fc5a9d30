//! Helpers shared by the decoder fixture tests (`model_fixtures`, `hybrid`): reading the
//! golden references and running the model on their ids.

#![allow(dead_code)]

use burn::tensor::{Int, Tensor, TensorData};
use dreamloop::model::llama::KvCache;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::Model;
use serde_json::Value;

/// `input_ids` of a reference case, one row per sequence.
pub fn ids_of(case: &Value) -> Vec<Vec<u32>> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// Every number of a nested JSON array, flattened in order.
pub fn floats(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            other => out.push(other.as_f64().unwrap() as f32),
        }
    }
    walk(v, &mut out);
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits `[rows, width, vocab]` flattened; rows right-padded with id 0 to the longest.
pub fn logits_of(model: &Model, rows: &[Vec<u32>], mask: Option<&[Vec<u8>]>) -> Vec<f32> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| {
            let mut r: Vec<i64> = r.iter().map(|&i| i as i64).collect();
            r.resize(width, 0);
            r
        })
        .collect();
    let lm = model.frozen();
    let input =
        Tensor::<2, Int>::from_data(TensorData::new(ids, [rows.len(), width]), &lm.device());
    lm.forward(input, mask)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Decodes the single sequence of `case` through the cache in pieces of `pieces` tokens (the
/// last piece takes the rest) and checks each piece's logits against the case's
/// full-sequence logits within `atol`.
pub fn check_cached_decoding(model: &Model, name: &str, case: &Value, pieces: &[usize], atol: f32) {
    let lm = model.frozen();
    let ids = ids_of(case).remove(0);
    let want = floats(&case["logits"]);
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::default();
    let mut pos = 0;
    let mut lengths = pieces.to_vec();
    lengths.push(ids.len() - pieces.iter().sum::<usize>());
    for n in lengths {
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(
                ids[pos..pos + n]
                    .iter()
                    .map(|&i| i as i64)
                    .collect::<Vec<_>>(),
                [1, n],
            ),
            &lm.device(),
        );
        let got = lm
            .forward_cached(input, &mut cache)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let diff = max_abs_diff(&got, &want[pos * vocab..(pos + n) * vocab]);
        assert!(
            diff <= atol,
            "{name}: cached logits at {pos}..{} differ by {diff}",
            pos + n
        );
        pos += n;
    }
    assert_eq!(cache.len, ids.len());
}

/// Each row scored from its second token (every next-token log-prob).
pub fn scored(rows: &[Vec<u32>]) -> Vec<ScoredSeq> {
    rows.iter()
        .map(|ids| ScoredSeq {
            ids: ids.clone(),
            score_from: 1,
        })
        .collect()
}

/// Logits, next-token log-probs and mean loss of one reference case against transformers'.
pub fn check_case(
    model: &Model,
    label: &str,
    case: &Value,
    logit_atol: f32,
    logprob_atol: f32,
    loss_atol: f64,
) {
    let rows = ids_of(case);
    let diff = max_abs_diff(&logits_of(model, &rows, None), &floats(&case["logits"]));
    assert!(diff <= logit_atol, "{label}: logits differ by {diff}");
    let lp = logprobs(&model.frozen(), &scored(&rows), 0);
    let got: Vec<f32> = lp.scored_host().into_iter().flatten().collect();
    let diff = max_abs_diff(&got, &floats(&case["logprobs"]));
    assert!(diff <= logprob_atol, "{label}: log-probs differ by {diff}");
    let loss = -got.iter().map(|&v| v as f64).sum::<f64>() / got.len() as f64;
    let want = case["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() <= loss_atol,
        "{label}: loss {loss} vs {want}"
    );
}
