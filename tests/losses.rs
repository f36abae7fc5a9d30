//! SFT and DPO losses against transformers/TRL references: `dpo_reference.json` (policy =
//! llama_tied, reference = llama_untied, cross-checked against TRL's DPOTrainer) and the
//! fixture models' `reference.json` losses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Gradients;
use burn::tensor::Tensor;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::{cpu, Model};
use dreamloop::train::loss::{dpo_loss, sft_loss, DpoVariant};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dpo_reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("dpo_reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// (chosen, rejected) scored sequences of the fixture's pairs.
fn pairs(r: &Value) -> (Vec<ScoredSeq>, Vec<ScoredSeq>) {
    let mut chosen = Vec::new();
    let mut rejected = Vec::new();
    for ex in r["examples"].as_array().unwrap() {
        let prompt = ids(&ex["prompt_ids"]);
        for (out, key) in [(&mut chosen, "chosen_ids"), (&mut rejected, "rejected_ids")] {
            let mut seq = prompt.clone();
            seq.extend(ids(&ex[key]));
            out.push(ScoredSeq {
                ids: seq,
                score_from: prompt.len(),
            });
        }
    }
    (chosen, rejected)
}

fn host_sums(model: &dreamloop::model::CausalLm, seqs: &[ScoredSeq]) -> Vec<f64> {
    logprobs(model, seqs, 0)
        .scored_host()
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).sum())
        .collect()
}

#[test]
fn summed_logprobs_match_reference() {
    let r = dpo_reference();
    let (chosen, rejected) = pairs(&r);
    let policy = Model::load(&fixtures().join("models/llama_tied"), &cpu()).unwrap();
    let reference = Model::load(&fixtures().join("models/llama_untied"), &cpu()).unwrap();
    for (model, key) in [(&policy, "policy"), (&reference, "reference")] {
        let frozen = model.frozen();
        for (seqs, which) in [(&chosen, "chosen"), (&rejected, "rejected")] {
            let got = host_sums(&frozen, seqs);
            let want = f64s(&r[key][format!("{which}_logps")]);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{key} {which}: {g} vs {w}");
            }
            let per_token = logprobs(&frozen, seqs, 0).scored_host();
            for (row, want_row) in per_token.iter().zip(
                r[key][format!("{which}_per_token_logps")]
                    .as_array()
                    .unwrap(),
            ) {
                for (g, w) in row.iter().zip(f64s(want_row)) {
                    assert!((*g as f64 - w).abs() < 1e-4);
                }
            }
        }
    }
}

#[test]
fn dpo_losses_and_rewards_match_trl() {
    let r = dpo_reference();
    let (chosen, rejected) = pairs(&r);
    let policy = Model::load(&fixtures().join("models/llama_tied"), &cpu())
        .unwrap()
        .frozen();
    let reference = Model::load(&fixtures().join("models/llama_untied"), &cpu())
        .unwrap()
        .frozen();
    let (ref_c, ref_r) = (
        host_sums(&reference, &chosen),
        host_sums(&reference, &rejected),
    );
    for beta in ["0.1", "0.01"] {
        let want = &r["results"][beta];
        let b: f64 = beta.parse().unwrap();
        let (lc, lr) = (
            logprobs(&policy, &chosen, 0),
            logprobs(&policy, &rejected, 0),
        );
        let (loss, stats) = dpo_loss(&lc, &lr, &ref_c, &ref_r, b, DpoVariant::Sigmoid);
        let loss: f64 = loss.into_scalar::<f32>() as f64;
        assert!(
            (loss - want["loss"].as_f64().unwrap()).abs() < 1e-5,
            "beta {beta}: loss {loss}"
        );
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        assert!((stats.rewards_chosen - mean(f64s(&want["chosen_rewards"]))).abs() < 1e-5);
        assert!((stats.rewards_rejected - mean(f64s(&want["rejected_rewards"]))).abs() < 1e-5);
        assert!((stats.margins - mean(f64s(&want["reward_margins"]))).abs() < 1e-5);
        assert_eq!(stats.accuracy, want["reward_accuracy"].as_f64().unwrap());
        let trl = &r["trl_crosscheck"]["betas"][beta]["trl_metrics"];
        assert!((stats.logps_chosen - trl["logps/chosen"].as_f64().unwrap()).abs() < 1e-4);
        assert!((stats.logps_rejected - trl["logps/rejected"].as_f64().unwrap()).abs() < 1e-4);
    }
}

/// Collects the gradient of every parameter by name.
struct GradNorms<'a> {
    path: Vec<String>,
    grads: &'a Gradients,
    out: HashMap<String, Vec<f32>>,
}

impl ModuleVisitor for GradNorms<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            self.out.insert(
                self.path.join("."),
                g.into_data().try_to_vec::<f32>().unwrap(),
            );
        }
    }
}

#[test]
fn dpo_gradients_match_torch() {
    let r = dpo_reference();
    let (chosen, rejected) = pairs(&r);
    let device = cpu().autodiff();
    let policy = Model::load(&fixtures().join("models/llama_tied"), &device).unwrap();
    let reference = Model::load(&fixtures().join("models/llama_untied"), &cpu())
        .unwrap()
        .frozen();
    let (ref_c, ref_r) = (
        host_sums(&reference, &chosen),
        host_sums(&reference, &rejected),
    );
    let (lc, lr) = (
        logprobs(&policy.lm, &chosen, 0),
        logprobs(&policy.lm, &rejected, 0),
    );
    let (loss, _) = dpo_loss(&lc, &lr, &ref_c, &ref_r, 0.1, DpoVariant::Sigmoid);
    let grads = loss.backward();
    let mut visitor = GradNorms {
        path: Vec::new(),
        grads: &grads,
        out: HashMap::new(),
    };
    policy.lm.visit(&mut visitor);
    let want = &r["policy_grad_beta0.1"];
    let mut total = 0.0f64;
    for (name, norm) in want["grad_l2_norm_per_param"].as_object().unwrap() {
        let g = visitor
            .out
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let got = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        total += got * got;
        let w = norm.as_f64().unwrap();
        assert!(
            ((got - w) / w).abs() < 1e-4,
            "{name}: grad norm {got} vs {w}"
        );
    }
    let w = want["grad_l2_norm_total"].as_f64().unwrap();
    assert!((total.sqrt() - w).abs() / w < 1e-4);
    for name in ["model.norm.weight", "model.layers.1.input_layernorm.weight"] {
        let got = &visitor.out[name];
        for (g, w) in got.iter().zip(f64s(&want[format!("grad_{name}")])) {
            assert!((*g as f64 - w).abs() < 1e-6, "{name}: {g} vs {w}");
        }
    }
}

/// SFT loss with every next token scored equals transformers' `loss` (labels = input_ids),
/// batched case included; with the prompt masked it is the mean of the reference per-token
/// log-probs over the completion tokens of the whole batch.
#[test]
fn sft_loss_matches_transformers() {
    for name in ["llama_tied", "qwen2", "qwen3"] {
        let dir = fixtures().join("models").join(name);
        let reference: Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let model = Model::load(&dir, &cpu()).unwrap().frozen();
        for case in ["seq33", "batch2x16"] {
            let c = &reference["cases"][case];
            let rows: Vec<ScoredSeq> = c["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| ScoredSeq {
                    ids: ids(r),
                    score_from: 1,
                })
                .collect();
            let loss = sft_loss(&logprobs(&model, &rows, 0)).into_scalar::<f32>() as f64;
            assert!(
                (loss - c["loss"].as_f64().unwrap()).abs() < 1e-5,
                "{name}/{case}: {loss}"
            );
        }
        // Prompt masking, two sequences of different lengths in one padded batch.
        let c7 = &reference["cases"]["seq7"];
        let c16 = &reference["cases"]["seq16"];
        let rows = vec![
            ScoredSeq {
                ids: ids(&c7["input_ids"][0]),
                score_from: 4,
            },
            ScoredSeq {
                ids: ids(&c16["input_ids"][0]),
                score_from: 10,
            },
        ];
        let mut scored: Vec<f64> = f64s(&c7["logprobs"][0])[3..].to_vec();
        scored.extend(&f64s(&c16["logprobs"][0])[9..]);
        let want = -scored.iter().sum::<f64>() / scored.len() as f64;
        let loss = sft_loss(&logprobs(&model, &rows, 0)).into_scalar::<f32>() as f64;
        assert!(
            (loss - want).abs() < 1e-5,
            "{name} masked: {loss} vs {want}"
        );
    }
}
