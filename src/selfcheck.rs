//! Does this build compute what transformers computes, on this device? The golden fixtures
//! (`tests/fixtures/models/<name>/`: a tiny model, `reference.json` from transformers in f32,
//! `reference_bf16.json` from transformers in bf16 and f32) run through the real model code on
//! whatever device the caller names, and each one's largest difference is set against the
//! tolerance it is held to.
//!
//! This is what `dreamloop device-check fixtures` runs (and `scripts/gpu-check.sh` on a GPU):
//! the test suite proves the CPU path, this proves a GPU build on the operator's card, from a
//! stripped binary and the fixture files, with nothing else installed.
//!
//! Tolerances, from the references (not from any run of ours):
//! - f32: the fixtures README's for a float32 port — logits and log-probs `1e-4` for dense
//!   models, `3e-4` for the hybrid (Gated DeltaNet) ones; the mean loss `1e-5` / `5e-5`.
//!   A GPU that multiplied f32 matrices in TF32 (10-bit mantissa) would miss these by an
//!   order of magnitude, which is the point of checking.
//! - bf16: `2 ×` transformers' own largest bf16-vs-f32 spread on the model, and our mean
//!   difference below transformers' mean spread (`tests/bf16.rs` gives the reasoning).
//!
//! It knows nothing about devices beyond the `Device` it is handed.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;
use serde_json::Value;

use crate::model::logprobs::{logprobs, ScoredSeq};
use crate::model::{Device, Model, ModelError, Precision};

/// Why a fixture could not be checked (a failed comparison is a [`FixtureCheck`], not this).
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {why}")]
    Field {
        path: PathBuf,
        field: String,
        why: String,
    },
    #[error("{dir}: {source}")]
    Model {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
}

/// One fixture model checked in one dtype.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureCheck {
    /// The fixture directory's name.
    pub model: String,
    pub dtype: &'static str,
    /// Reference cases compared.
    pub cases: usize,
    /// Log-probs compared.
    pub values: usize,
    /// Largest |ours − reference| over every log-prob.
    pub max_logprob_diff: f64,
    /// What `max_logprob_diff` must not exceed.
    pub logprob_bound: f64,
    /// f32 only: largest |ours − reference| over every logit.
    pub max_logit_diff: Option<f64>,
    /// f32 only: largest |ours − reference| of a case's mean loss, and its bound.
    pub max_loss_diff: Option<f64>,
    pub loss_bound: Option<f64>,
    /// bf16 only: mean |ours − transformers bf16|, which must be below `mean_bound`
    /// (transformers' own mean bf16-vs-f32 spread).
    pub mean_logprob_diff: Option<f64>,
    pub mean_bound: Option<f64>,
    /// Every comparison within its bound.
    pub pass: bool,
}

/// The fixture directories under `dir` (each with a `config.json` and a `reference.json`), by
/// name.
pub fn fixture_dirs(dir: &Path) -> Result<Vec<PathBuf>, SelfCheckError> {
    let io = |source| SelfCheckError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.join("config.json").is_file() && path.join("reference.json").is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Checks the fixture in `dir` on `device` in `precision`.
pub fn check_fixture(
    dir: &Path,
    device: &Device,
    precision: Precision,
) -> Result<FixtureCheck, SelfCheckError> {
    let model = Model::load_as(dir, device, precision).map_err(|source| SelfCheckError::Model {
        dir: dir.to_path_buf(),
        source,
    })?;
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    match precision {
        Precision::F32 => check_f32(&model, name, &dir.join("reference.json")),
        Precision::Bf16 => check_bf16(&model, name, &dir.join("reference_bf16.json")),
    }
}

/// Logits, log-probs and mean loss of every case against transformers' f32 run.
fn check_f32(model: &Model, name: String, path: &Path) -> Result<FixtureCheck, SelfCheckError> {
    let reference = read_json(path)?;
    let hybrid = model.config.family.is_hybrid();
    let (atol, loss_atol) = if hybrid { (3e-4, 5e-5) } else { (1e-4, 1e-5) };
    let lm = model.frozen();
    let (mut logit_max, mut lp_max, mut loss_max, mut values) = (0.0f64, 0.0f64, 0.0f64, 0);
    let cases = cases(&reference, path)?;
    for (case_name, case) in cases {
        let field = |f: &str| format!("cases.{case_name}.{f}");
        let rows = ids_of(case, path, &field("input_ids"))?;
        let logits = forward_logits(&lm, &rows);
        let want = floats(&case["logits"], path, &field("logits"))?;
        logit_max = logit_max.max(max_diff(&logits, &want, path, &field("logits"))?);
        let got = scored_logprobs(&lm, &rows);
        let want = floats(&case["logprobs"], path, &field("logprobs"))?;
        lp_max = lp_max.max(max_diff(&got, &want, path, &field("logprobs"))?);
        values += got.len();
        let loss = -got.iter().map(|&v| f64::from(v)).sum::<f64>() / got.len().max(1) as f64;
        let want = case["loss"].as_f64().ok_or_else(|| SelfCheckError::Field {
            path: path.to_path_buf(),
            field: field("loss"),
            why: "not a number".into(),
        })?;
        loss_max = loss_max.max((loss - want).abs());
    }
    Ok(FixtureCheck {
        model: name,
        dtype: "f32",
        cases: cases.len(),
        values,
        max_logprob_diff: lp_max,
        logprob_bound: atol,
        max_logit_diff: Some(logit_max),
        max_loss_diff: Some(loss_max),
        loss_bound: Some(loss_atol),
        mean_logprob_diff: None,
        mean_bound: None,
        pass: logit_max <= atol && lp_max <= atol && loss_max <= loss_atol,
    })
}

/// Log-probs of every case against transformers' bf16 run, bounded by its own bf16-vs-f32
/// spread.
fn check_bf16(model: &Model, name: String, path: &Path) -> Result<FixtureCheck, SelfCheckError> {
    let reference = read_json(path)?;
    let lm = model.frozen();
    let cases = cases(&reference, path)?;
    let (mut spread, mut max, mut ours_sum, mut theirs_sum, mut values) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    for (case_name, case) in cases {
        let field = |f: &str| format!("cases.{case_name}.{f}");
        let rows = ids_of(case, path, &field("input_ids"))?;
        let got = scored_logprobs(&lm, &rows);
        let bf16 = floats(&case["logprobs_bf16"], path, &field("logprobs_bf16"))?;
        let f32s = floats(&case["logprobs_f32"], path, &field("logprobs_f32"))?;
        max = max.max(max_diff(&got, &bf16, path, &field("logprobs_bf16"))?);
        // transformers' own bf16 error scale: the largest spread of any case.
        spread = spread.max(max_diff(&f32s, &bf16, path, &field("logprobs_f32"))?);
        ours_sum += abs_sum(&got, &bf16);
        theirs_sum += abs_sum(&f32s, &bf16);
        values += got.len();
    }
    let n = values.max(1) as f64;
    let (mean, mean_spread) = (ours_sum / n, theirs_sum / n);
    Ok(FixtureCheck {
        model: name,
        dtype: "bf16",
        cases: cases.len(),
        values,
        max_logprob_diff: max,
        logprob_bound: 2.0 * spread,
        max_logit_diff: None,
        max_loss_diff: None,
        loss_bound: None,
        mean_logprob_diff: Some(mean),
        mean_bound: Some(mean_spread),
        pass: max <= 2.0 * spread && mean < mean_spread,
    })
}

fn read_json(path: &Path) -> Result<Value, SelfCheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| SelfCheckError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SelfCheckError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn cases<'a>(
    reference: &'a Value,
    path: &Path,
) -> Result<&'a serde_json::Map<String, Value>, SelfCheckError> {
    reference["cases"]
        .as_object()
        .ok_or_else(|| SelfCheckError::Field {
            path: path.to_path_buf(),
            field: "cases".into(),
            why: "not an object".into(),
        })
}

/// `input_ids` of a case, one row per sequence.
fn ids_of(case: &Value, path: &Path, field: &str) -> Result<Vec<Vec<u32>>, SelfCheckError> {
    let bad = || SelfCheckError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        why: "not a list of lists of token ids".into(),
    };
    case["input_ids"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|row| {
            row.as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(bad)
                })
                .collect()
        })
        .collect()
}

/// Every number of a nested JSON array, flattened in order.
fn floats(v: &Value, path: &Path, field: &str) -> Result<Vec<f32>, SelfCheckError> {
    fn walk(v: &Value, out: &mut Vec<f32>) -> bool {
        match v {
            Value::Array(items) => items.iter().all(|i| walk(i, out)),
            other => other.as_f64().map(|x| out.push(x as f32)).is_some(),
        }
    }
    let mut out = Vec::new();
    if v.is_array() && walk(v, &mut out) {
        Ok(out)
    } else {
        Err(SelfCheckError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            why: "not a (nested) list of numbers".into(),
        })
    }
}

fn max_diff(got: &[f32], want: &[f32], path: &Path, field: &str) -> Result<f64, SelfCheckError> {
    if got.len() != want.len() {
        return Err(SelfCheckError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            why: format!("{} values, the model gave {}", want.len(), got.len()),
        });
    }
    Ok(got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max))
}

fn abs_sum(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum()
}

/// Logits `[rows, width, vocab]` flattened, rows right-padded with id 0 (the reference cases
/// with several rows have equal lengths).
fn forward_logits(lm: &crate::model::CausalLm, rows: &[Vec<u32>]) -> Vec<f32> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| {
            let mut r: Vec<i64> = r.iter().map(|&i| i64::from(i)).collect();
            r.resize(width, 0);
            r
        })
        .collect();
    let input =
        Tensor::<2, Int>::from_data(TensorData::new(ids, [rows.len(), width]), &lm.device());
    lm.forward(input, None)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above")
}

/// Every next-token log-prob of each row (scored from its second token), flattened.
fn scored_logprobs(lm: &crate::model::CausalLm, rows: &[Vec<u32>]) -> Vec<f32> {
    let seqs: Vec<ScoredSeq> = rows
        .iter()
        .map(|ids| ScoredSeq {
            ids: ids.clone(),
            score_from: 1,
        })
        .collect();
    logprobs(lm, &seqs, 0)
        .scored_host()
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
    }

    /// On the CPU every fixture passes in both dtypes (the same comparisons as
    /// `tests/model_fixtures.rs`, `tests/hybrid.rs` and `tests/bf16.rs`).
    #[test]
    fn every_fixture_passes_on_the_cpu() {
        let dirs = fixture_dirs(&models()).unwrap();
        assert_eq!(dirs.len(), 7, "{dirs:?}");
        for dir in &dirs {
            for precision in [Precision::F32, Precision::Bf16] {
                let check = check_fixture(dir, &cpu(), precision).unwrap();
                assert!(check.pass, "{check:?}");
                assert!(check.cases >= 3 && check.values > 0, "{check:?}");
            }
        }
    }

    /// A reference that the model does not match fails the check instead of passing.
    #[test]
    fn a_wrong_reference_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let src = models().join("llama_tied");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        let mut reference = read_json(&src.join("reference.json")).unwrap();
        let case = reference["cases"].as_object_mut().unwrap().values_mut();
        for c in case {
            // One log-prob (rows are nested lists) moved by 1e-3: ten times the dense
            // tolerance.
            let first = &mut c["logprobs"][0][0];
            *first = serde_json::json!(first.as_f64().unwrap() + 1e-3);
        }
        std::fs::write(
            tmp.path().join("reference.json"),
            serde_json::to_string(&reference).unwrap(),
        )
        .unwrap();
        let check = check_fixture(tmp.path(), &cpu(), Precision::F32).unwrap();
        assert!(!check.pass, "{check:?}");
        assert!(check.max_logprob_diff > 9e-4, "{check:?}");
    }

    /// A malformed reference names the file and the field.
    #[test]
    fn a_malformed_reference_names_its_field() {
        let tmp = tempfile::tempdir().unwrap();
        let src = models().join("llama_tied");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        std::fs::write(
            tmp.path().join("reference.json"),
            r#"{"cases": {"seq7": {"input_ids": [[1, 2, "x"]]}}}"#,
        )
        .unwrap();
        let err = check_fixture(tmp.path(), &cpu(), Precision::F32).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("reference.json"), "{text}");
        assert!(text.contains("cases.seq7.input_ids"), "{text}");
    }
}
