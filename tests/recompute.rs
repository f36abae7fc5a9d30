//! Per-layer recompute and the chunked LM head ([`dreamloop::train::recompute`]) compute the
//! plain path's numbers: the same losses, the same gradient of every parameter, the same
//! log-probs, on dense (tied and untied, with biases) and hybrid (Gated DeltaNet, MoE)
//! fixture models, for SFT and DPO in one batch with padding; and a DPO reference streamed
//! from the starting model's files gives the resident copy's losses.
//!
//! The plain path is the one checked against transformers and TRL (`tests/losses.rs`,
//! `actors/tests/train_cli.rs`); what may differ here is only the order of f32 sums (a
//! chunk's head gradient is added to the next chunk's instead of one matmul summing all
//! positions; burn's fused forward kernels without autodiff against its composed ones with
//! it), so the bound is 1e-6 relative — ~8 f32 ulps (2⁻²³ ≈ 1.2e-7) — on the whole
//! gradient, far below the 1e-2..1 relative change any missing or doubled term would make.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use dreamloop::model::logprobs::{logprobs, logprobs_chunked, ScoredSeq};
use dreamloop::model::{cpu, Model, Precision};
use dreamloop::train::dataset::hash_ids;
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, OptimizerConfig};
use dreamloop::train::reference::StreamedReference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, DpoItem, SftItem, Trainer, TrainerConfig};

/// Relative bound on log-probs, losses and the whole gradient (see the module docs).
const REL: f64 = 1e-6;
/// Relative bound on each parameter's gradient. A few are sums over positions that nearly
/// cancel (a Gated DeltaNet's `dt_bias` and `A_log`: norms ~1e-3 of the whole gradient),
/// where one rounding more or less moves the result's last digits (measured: 1.1e-5 on
/// qwen3_5's `A_log` with 5-position chunks, ≤ 3.3e-7 elsewhere); a missing or doubled term
/// would move it by 1e-2..1.
const PER_TENSOR: f64 = 1e-4;
/// The whole gradient's relative bound in bf16: one bf16 rounding (2⁻⁸ ≈ 3.9e-3 relative at
/// worst per element) of the few sums the chunked head adds.
const BF16_REL: f64 = 4e-3;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn settings(recompute: bool, logits_chunk: usize, freeze: &[&str]) -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Adamw(AdamWConfig::default()),
        schedule: LrSchedule::warmup_constant(1e-5, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: freeze.iter().map(|s| s.to_string()).collect(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute,
        logits_chunk,
    }
}

/// Two SFT examples and two DPO pairs of different lengths (so rows are padded), ids below
/// the fixtures' vocabulary of 256.
fn batch() -> Batch {
    batch_from(0)
}

/// [`batch`] with other ids for each `seed`.
fn batch_from(seed: u32) -> Batch {
    let at = |k: u32| k + 10 * seed;
    let ids = |seed: u32, len: usize| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (seed * 37 + i * 11) % 250 + 3)
            .collect()
    };
    let sft = |seed: u32, p: usize, c: usize| {
        let (prompt, completion) = (ids(seed, p), ids(seed + 100, c));
        SftItem {
            hash: hash_ids(&[&prompt, &completion]),
            prompt,
            completion,
        }
    };
    let dpo = |seed: u32, p: usize, c: usize, r: usize| {
        let (prompt, chosen, rejected) = (ids(seed, p), ids(seed + 1, c), ids(seed + 2, r));
        DpoItem {
            hash: hash_ids(&[&prompt, &chosen, &rejected]),
            reference: None,
            prompt,
            chosen,
            rejected,
        }
    };
    Batch {
        sft: vec![sft(at(1), 9, 14), sft(at(2), 5, 6)],
        dpo: vec![dpo(at(3), 7, 9, 5), dpo(at(4), 12, 4, 10)],
    }
}

/// Every parameter's gradient by name.
fn by_name(lm: &impl Module, grads: &GradientsParams) -> HashMap<String, Vec<f64>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: HashMap<String, Vec<f64>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let values: Vec<f32> = g.into_data().convert::<f32>().try_to_vec().unwrap();
                self.out.insert(
                    self.path.join("."),
                    values.into_iter().map(f64::from).collect(),
                );
            }
        }
    }
    let mut visitor = Collect {
        grads,
        path: Vec::new(),
        out: HashMap::new(),
    };
    lm.visit(&mut visitor);
    visitor.out
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `‖a − b‖ / ‖b‖`.
fn relative(a: &[f64], b: &[f64]) -> f64 {
    distance(a, b) / norm(b).max(f64::MIN_POSITIVE)
}

#[test]
fn recompute_and_chunked_head_give_the_plain_gradients() {
    let cases: [(&str, &[&str]); 6] = [
        ("llama_tied", &[]),
        ("qwen2", &[]),
        ("qwen2", &["model.embed_tokens.*", "model.layers.0.*"]),
        ("qwen3_next", &[]),
        ("qwen3_next_moe", &[]),
        ("qwen3_5", &[]),
    ];
    let batch = batch();
    for (name, freeze) in cases {
        let model = Model::load(&models().join(name), &cpu().autodiff()).unwrap();
        let trainer = |recompute, chunk| {
            Trainer::new(
                model.config.clone(),
                model.lm.clone(),
                None,
                settings(recompute, chunk, freeze),
            )
            .unwrap()
        };
        let plain = trainer(false, 0);
        let (plain_report, plain_grads) = plain.gradients(&batch).unwrap();
        let expected = by_name(plain.model(), &plain_grads);
        assert!(!expected.is_empty());
        // Chunks of 7 and 5 positions split rows of 20–27 targets unevenly, and a chunk of
        // only prompt or padding positions is skipped.
        for (recompute, chunk) in [(true, 0), (false, 7), (true, 5)] {
            let what = format!("{name} (freeze {freeze:?}) recompute={recompute} chunk={chunk}");
            let segmented = trainer(recompute, chunk);
            let (report, grads) = segmented.gradients(&batch).unwrap();
            for (a, b) in [
                (report.loss, plain_report.loss),
                (report.sft_loss.unwrap(), plain_report.sft_loss.unwrap()),
                (
                    report.dpo.as_ref().unwrap().loss,
                    plain_report.dpo.as_ref().unwrap().loss,
                ),
            ] {
                assert!(
                    (a - b).abs() <= REL * b.abs(),
                    "{what}: loss {a} vs plain {b}"
                );
            }
            let got = by_name(segmented.model(), &grads);
            assert_eq!(
                got.keys().len(),
                expected.len(),
                "{what}: the same parameters have gradients"
            );
            let (mut diff2, mut norm2, mut worst) = (0.0, 0.0, (0.0, ""));
            for (param, b) in &expected {
                let a = &got[param];
                diff2 += distance(a, b).powi(2);
                norm2 += norm(b).powi(2);
                let rel = relative(a, b);
                if rel > worst.0 {
                    worst = (rel, param.as_str());
                }
            }
            let rel = (diff2 / norm2).sqrt();
            assert!(
                rel <= REL && worst.0 <= PER_TENSOR,
                "{what}: the gradient differs by {rel:e}, {} by {:e}",
                worst.1,
                worst.0
            );
        }
    }
}

#[test]
fn chunked_logprobs_equal_the_whole_vocabulary_pass() {
    for name in ["llama_untied", "qwen3_next"] {
        let model = Model::load(&models().join(name), &cpu()).unwrap();
        let seqs: Vec<ScoredSeq> = [(17usize, 4usize), (9, 1), (30, 12)]
            .iter()
            .map(|&(len, from)| ScoredSeq {
                ids: (0..len as u32)
                    .map(|i| (i * 13 + len as u32) % 250 + 3)
                    .collect(),
                score_from: from,
            })
            .collect();
        let whole = logprobs(&model.lm, &seqs, 0).scored_host();
        for chunk in [1, 7, 64, 10_000] {
            let chunked = logprobs_chunked(&model.lm, &seqs, 0, chunk).scored_host();
            for (a, b) in chunked.iter().flatten().zip(whole.iter().flatten()) {
                assert!(
                    (a - b).abs() as f64 <= REL * b.abs().max(1.0) as f64,
                    "{name} chunk {chunk}: {a} vs {b}"
                );
            }
            assert_eq!(
                chunked.iter().map(Vec::len).collect::<Vec<_>>(),
                whole.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
    }
}

/// Streamed from the files, the reference gives exactly the resident copy's DPO numbers, at
/// the first step and after the policy moved away from it.
#[test]
fn a_streamed_reference_gives_the_resident_dpo_losses() {
    for name in ["llama_untied", "qwen3_5"] {
        let dir = models().join(name);
        let model = Model::load(&dir, &cpu().autodiff()).unwrap();
        for chunk in [0, 6] {
            let trainer = || {
                Trainer::new(
                    model.config.clone(),
                    model.lm.clone(),
                    None,
                    settings(false, chunk, &[]),
                )
                .unwrap()
            };
            let mut resident = trainer();
            let mut streamed =
                trainer().with_streamed_reference(StreamedReference::open(&dir, &cpu()).unwrap());
            for seed in 0..3 {
                let batch = batch_from(seed);
                let (a, _) = resident.gradients(&batch).unwrap();
                let (b, _) = streamed.gradients(&batch).unwrap();
                assert_eq!(a.dpo, b.dpo, "{name} chunk {chunk} step {seed}");
                let (a, b) = (
                    resident.step(&batch).unwrap(),
                    streamed.step(&batch).unwrap(),
                );
                assert_eq!(a.loss, b.loss);
                assert!(a.dpo.unwrap().margins.abs() > 0.0 || seed == 0);
            }
        }
    }
}

/// Reference log-probs precomputed for a block of queued pairs (one pass over the files for
/// pairs of three steps, padded together) are the resident copy's: every step then uses the
/// stored sums and gives the resident DPO numbers exactly. A pair whose key is stale (its
/// sequences are cut differently now) is computed in the step, still the same numbers.
#[test]
fn a_block_of_precomputed_reference_pairs_gives_the_resident_dpo_losses() {
    for name in ["llama_untied", "qwen3_5"] {
        let dir = models().join(name);
        let model = Model::load(&dir, &cpu().autodiff()).unwrap();
        let trainer = |max_seq_len: usize| {
            let mut config = settings(false, 6, &[]);
            config.max_seq_len = max_seq_len;
            Trainer::new(model.config.clone(), model.lm.clone(), None, config).unwrap()
        };
        let mut resident = trainer(0);
        let mut streamed =
            trainer(0).with_streamed_reference(StreamedReference::open(&dir, &cpu()).unwrap());
        let mut batches: Vec<Batch> = (0..3).map(batch_from).collect();
        let mut queued: Vec<DpoItem> = batches.iter().flat_map(|b| b.dpo.clone()).collect();
        // Blocks of 4 pairs: the first spans two steps' pairs.
        assert_eq!(streamed.precompute_reference(&mut queued, 4).unwrap(), 6);
        assert_eq!(streamed.precompute_reference(&mut queued, 4).unwrap(), 0);
        // A resident reference stores nothing: its step reads no files.
        assert_eq!(
            resident
                .precompute_reference(&mut queued.clone(), 4)
                .unwrap(),
            0
        );
        for (b, pairs) in batches.iter_mut().zip(queued.chunks(2)) {
            b.dpo = pairs.to_vec();
        }
        for (seed, batch) in batches.iter().enumerate() {
            let (a, b) = (resident.step(batch).unwrap(), streamed.step(batch).unwrap());
            assert_eq!(a.dpo, b.dpo, "{name} step {seed}");
            assert_eq!(a.loss, b.loss, "{name} step {seed}");
            assert_eq!((a.reference_stored, b.reference_stored), (0, 2));
        }
        // An edited max_seq_len cuts the sequences: the stored sums are stale, and the step
        // computes them (and agrees with the resident copy cut the same way).
        let batch = Batch {
            sft: Vec::new(),
            dpo: batch_from(5).dpo,
        };
        let mut pairs = batch.dpo.clone();
        let (mut resident, streamed_cut) = (
            trainer(10),
            trainer(10).with_streamed_reference(StreamedReference::open(&dir, &cpu()).unwrap()),
        );
        trainer(0)
            .with_streamed_reference(StreamedReference::open(&dir, &cpu()).unwrap())
            .precompute_reference(&mut pairs, 0)
            .unwrap();
        let stale = Batch {
            sft: Vec::new(),
            dpo: pairs,
        };
        let mut streamed_cut = streamed_cut;
        let (a, b) = (
            resident.step(&batch).unwrap(),
            streamed_cut.step(&stale).unwrap(),
        );
        assert!(b.truncated > 0);
        assert_eq!(b.reference_stored, 0, "{name}: stale sums were used");
        assert_eq!(a.dpo, b.dpo, "{name}: the stale pairs computed afresh");
    }
}

/// In bf16 the segmented paths give the plain bf16 path's gradients up to one bf16 rounding:
/// a parameter used twice (SFT and DPO forwards, head chunks, the tied embedding) gets its
/// contributions summed in f32 and rounded once, where burn's autodiff adds them in bf16;
/// the head's matmuls see `[rows, hidden]` instead of `[batch, seq, hidden]`. Measured
/// 1.0e-3..2.6e-3 of the whole gradient (2026-12-02).
#[test]
fn recompute_and_chunked_head_in_bf16() {
    let batch = batch();
    for name in ["llama_tied", "qwen3_5"] {
        let model =
            Model::load_as(&models().join(name), &cpu().autodiff(), Precision::Bf16).unwrap();
        let trainer = |recompute, chunk| {
            Trainer::new(
                model.config.clone(),
                model.lm.clone(),
                None,
                settings(recompute, chunk, &[]),
            )
            .unwrap()
        };
        let plain = trainer(false, 0);
        let (plain_report, plain_grads) = plain.gradients(&batch).unwrap();
        let expected = by_name(plain.model(), &plain_grads);
        for (recompute, chunk) in [(true, 0), (true, 5)] {
            let segmented = trainer(recompute, chunk);
            let (report, grads) = segmented.gradients(&batch).unwrap();
            let got = by_name(segmented.model(), &grads);
            let (mut diff2, mut norm2) = (0.0, 0.0);
            for (param, b) in &expected {
                diff2 += distance(&got[param], b).powi(2);
                norm2 += norm(b).powi(2);
            }
            let rel = (diff2 / norm2).sqrt();
            assert_eq!(
                report.loss, plain_report.loss,
                "{name}: the forward is the plain one"
            );
            assert!(
                rel <= BF16_REL,
                "{name} bf16 recompute={recompute} chunk={chunk}: {rel:e}"
            );
        }
    }
}
