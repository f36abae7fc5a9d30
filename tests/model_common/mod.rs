//! Helpers shared by the decoder fixture tests (`model_fixtures`, `hybrid`): reading the
//! golden references and running the model on their ids.

#![allow(dead_code)]

use burn::tensor::{Int, Tensor, TensorData};
use dreamloop::model::llama::KvCache;
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
