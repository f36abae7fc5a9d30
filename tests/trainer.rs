//! The one-step trainer on the tiny preset: it learns (SFT lowers held-out loss, DPO raises
//! held-out margins), refuses repeats, skips non-finite steps without touching anything,
//! freezes by name, and resumes bit-identically.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::weights::named_tensors;
use dreamloop::model::{cpu, CausalLm, Model};
use dreamloop::train::dataset::hash_ids;
use dreamloop::train::loss::{sft_loss, DpoVariant};
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::reference::Reference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, DpoItem, SftItem, TrainError, Trainer, TrainerConfig};

/// A deterministic stream of byte strings: `state` advances like a 64-bit LCG.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn word(&mut self, len: usize) -> Vec<u32> {
        (0..len)
            .map(|_| b'a' as u32 + (self.next() % 6) as u32)
            .collect()
    }
    /// "copy task": prompt `<w>=`, completion `<w>` (a pattern a tiny model learns quickly).
    fn sft(&mut self) -> SftItem {
        let w = self.word(6);
        let mut prompt = w.clone();
        prompt.push(b'=' as u32);
        let hash = hash_ids(&[&prompt, &w]);
        SftItem {
            prompt,
            completion: w,
            hash,
        }
    }
    /// chosen repeats the word, rejected reverses it.
    fn pair(&mut self) -> DpoItem {
        let w = self.word(5);
        let mut prompt = w.clone();
        prompt.push(b':' as u32);
        let mut rejected = w.clone();
        rejected.reverse();
        let hash = hash_ids(&[&prompt, &w, &rejected]);
        DpoItem {
            prompt,
            chosen: w,
            rejected,
            hash,
            reference: None,
        }
    }
}

fn settings(optimizer: OptimizerConfig, lr: f64) -> TrainerConfig {
    TrainerConfig {
        optimizer,
        schedule: LrSchedule::warmup_constant(lr, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute: false,
        logits_chunk: 0,
    }
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig::Adamw(AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })
}

fn tiny_trainer(optimizer: OptimizerConfig, lr: f64) -> Trainer {
    preset_trainer("tiny", optimizer, lr)
}

fn preset_trainer(preset: &str, optimizer: OptimizerConfig, lr: f64) -> Trainer {
    let model = Model::preset(preset, 7, &cpu().autodiff()).unwrap();
    Trainer::new(model.config, model.lm, None, settings(optimizer, lr)).unwrap()
}

fn heldout_sft_loss(lm: &CausalLm, items: &[SftItem]) -> f64 {
    let seqs: Vec<ScoredSeq> = items
        .iter()
        .map(|e| ScoredSeq {
            ids: [e.prompt.clone(), e.completion.clone()].concat(),
            score_from: e.prompt.len(),
        })
        .collect();
    sft_loss(&logprobs(lm, &seqs, 0)).into_scalar::<f32>() as f64
}

fn heldout_margin(lm: &CausalLm, items: &[DpoItem]) -> f64 {
    let seq = |p: &[u32], c: &[u32]| ScoredSeq {
        ids: [p, c].concat(),
        score_from: p.len(),
    };
    let chosen: Vec<ScoredSeq> = items.iter().map(|e| seq(&e.prompt, &e.chosen)).collect();
    let rejected: Vec<ScoredSeq> = items.iter().map(|e| seq(&e.prompt, &e.rejected)).collect();
    let sum = |s: &[ScoredSeq]| -> f64 {
        logprobs(lm, s, 0)
            .scored_host()
            .iter()
            .flatten()
            .map(|&x| x as f64)
            .sum()
    };
    (sum(&chosen) - sum(&rejected)) / items.len() as f64
}

#[test]
fn sft_steps_on_fresh_examples_lower_heldout_loss() {
    for optimizer in [
        adamw(),
        OptimizerConfig::Apollo(ApolloConfig {
            scale: 32.0,
            ..ApolloConfig::apollo(16)
        }),
    ] {
        let mut trainer = tiny_trainer(optimizer.clone(), 3e-3);
        let heldout: Vec<SftItem> = {
            let mut s = Stream(999);
            (0..16).map(|_| s.sft()).collect()
        };
        let before = heldout_sft_loss(&trainer.frozen(), &heldout);
        let mut stream = Stream(1);
        for _ in 0..30 {
            let batch = Batch {
                sft: (0..4).map(|_| stream.sft()).collect(),
                dpo: Vec::new(),
            };
            let report = trainer.step(&batch).unwrap();
            assert!(report.loss.is_finite() && report.grad_norm > 0.0);
        }
        let after = heldout_sft_loss(&trainer.frozen(), &heldout);
        assert!(
            after < before - 0.5,
            "{}: held-out loss {before} → {after}",
            optimizer.algorithm()
        );
    }
}

#[test]
fn dpo_steps_raise_heldout_margin() {
    let mut trainer = tiny_trainer(adamw(), 1e-3);
    let heldout: Vec<DpoItem> = {
        let mut s = Stream(4242);
        (0..16).map(|_| s.pair()).collect()
    };
    let before = heldout_margin(&trainer.frozen(), &heldout);
    let mut stream = Stream(2);
    let mut last = None;
    for _ in 0..20 {
        let batch = Batch {
            sft: Vec::new(),
            dpo: (0..4).map(|_| stream.pair()).collect(),
        };
        last = Some(trainer.step(&batch).unwrap());
    }
    let after = heldout_margin(&trainer.frozen(), &heldout);
    assert!(after > before + 0.25, "held-out margin {before} → {after}");
    let dpo = last.unwrap().dpo.unwrap();
    assert!((dpo.margins - (dpo.rewards_chosen - dpo.rewards_rejected)).abs() < 1e-9);
}

#[test]
fn a_repeated_example_is_refused() {
    let mut trainer = tiny_trainer(adamw(), 1e-3);
    let mut stream = Stream(3);
    let item = stream.sft();
    trainer
        .step(&Batch {
            sft: vec![item.clone()],
            dpo: Vec::new(),
        })
        .unwrap();
    let before = named_tensors(trainer.model());
    match trainer.step(&Batch {
        sft: vec![stream.sft(), item.clone()],
        dpo: Vec::new(),
    }) {
        Err(TrainError::Repeated { hash }) => assert_eq!(hash, item.hash),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let fresh = stream.sft();
    assert!(matches!(
        trainer.step(&Batch {
            sft: vec![fresh.clone(), fresh],
            dpo: Vec::new()
        }),
        Err(TrainError::Repeated { .. })
    ));
    assert_eq!(trainer.step_count(), 1);
    assert_eq!(before, named_tensors(trainer.model()));
}

/// Poisons one weight with NaN: the step is skipped with a typed error and neither weights
/// nor optimizer state change.
#[test]
fn non_finite_loss_skips_the_step_and_touches_nothing() {
    let mut trainer = tiny_trainer(adamw(), 1e-3);
    let mut stream = Stream(5);
    trainer
        .step(&Batch {
            sft: vec![stream.sft()],
            dpo: Vec::new(),
        })
        .unwrap();
    let clean = tempfile::tempdir().unwrap();
    trainer.save(clean.path()).unwrap();

    // The same trainer state, with one norm weight set to NaN.
    let poisoned = tempfile::tempdir().unwrap();
    let mut model = Model::load(clean.path(), &cpu()).unwrap();
    let w = model.lm.model.norm.weight.val();
    let [n] = w.dims();
    let mut values = w.into_data().try_to_vec::<f32>().unwrap();
    values[0] = f32::NAN;
    model.lm.model.norm.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), &cpu()));
    model.save(poisoned.path()).unwrap();
    for f in ["optimizer.bpk", "trainer_state.json", "seen.bin"] {
        std::fs::copy(clean.path().join(f), poisoned.path().join(f)).unwrap();
    }
    let reference = Model::load(clean.path(), &cpu()).unwrap().lm;
    let mut trainer = Trainer::restore(
        poisoned.path(),
        Reference::Resident(reference),
        &cpu().autodiff(),
    )
    .unwrap();
    let weights_before = named_tensors(trainer.model());

    let err = trainer
        .step(&Batch {
            sft: vec![stream.sft()],
            dpo: Vec::new(),
        })
        .unwrap_err();
    assert!(matches!(err, TrainError::NonFiniteLoss { .. }), "{err:?}");
    assert_eq!(trainer.step_count(), 1);
    let after = named_tensors(trainer.model());
    assert_eq!(weights_before.len(), after.len());
    for ((n1, a), (n2, b)) in weights_before.iter().zip(&after) {
        assert_eq!(n1, n2);
        assert_eq!(a.as_bytes(), b.as_bytes(), "{n1} changed");
    }
    let again = tempfile::tempdir().unwrap();
    trainer.save(again.path()).unwrap();
    assert_eq!(
        std::fs::read(again.path().join("optimizer.bpk")).unwrap(),
        std::fs::read(clean.path().join("optimizer.bpk")).unwrap(),
        "optimizer state changed"
    );
}

#[test]
fn frozen_parameters_get_no_gradient_and_no_state() {
    let model = Model::preset("tiny", 7, &cpu().autodiff()).unwrap();
    let mut s = settings(adamw(), 1e-3);
    s.train_only = vec!["model.layers.3.*".into()];
    s.freeze = vec!["*.mlp.*".into()];
    let mut trainer = Trainer::new(model.config, model.lm, None, s).unwrap();
    let before = named_tensors(trainer.model());
    let mut stream = Stream(6);
    trainer
        .step(&Batch {
            sft: (0..2).map(|_| stream.sft()).collect(),
            dpo: Vec::new(),
        })
        .unwrap();
    let after = named_tensors(trainer.model());
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let trainable = name.starts_with("model.layers.3.") && !name.contains(".mlp.");
        assert_eq!(a.as_bytes() != b.as_bytes(), trainable, "{name}");
    }
    let mut with_state: Vec<String> = trainer
        .optimizer()
        .param_names()
        .map(String::from)
        .collect();
    with_state.sort();
    assert_eq!(
        with_state,
        [
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ]
    );
}

fn run_steps(trainer: &mut Trainer, stream: &mut Stream, n: usize) {
    for _ in 0..n {
        let batch = Batch {
            sft: (0..2).map(|_| stream.sft()).collect(),
            dpo: (0..2).map(|_| stream.pair()).collect(),
        };
        trainer.step(&batch).unwrap();
    }
}

/// N steps straight vs N/2, save, a fresh trainer restored from disk, N/2: identical weights —
/// for the llama preset and the hybrid one (GDN layers: 3-D `conv1d` and 1-D `A_log` state).
#[test]
fn resumed_run_is_bit_identical() {
    for preset in ["tiny", "tiny-hybrid"] {
        for optimizer in [
            adamw(),
            OptimizerConfig::Apollo(ApolloConfig {
                update_proj_gap: 3,
                ..ApolloConfig::apollo(8)
            }),
        ] {
            let mut straight = preset_trainer(preset, optimizer.clone(), 1e-3);
            let mut stream = Stream(11);
            run_steps(&mut straight, &mut stream, 6);

            let mut first = preset_trainer(preset, optimizer.clone(), 1e-3);
            let mut stream = Stream(11);
            run_steps(&mut first, &mut stream, 3);
            let dir = tempfile::tempdir().unwrap();
            first.save(dir.path()).unwrap();
            drop(first);
            let reference = Model::preset(preset, 7, &cpu()).unwrap().lm;
            let mut resumed = Trainer::restore(
                dir.path(),
                Reference::Resident(reference),
                &cpu().autodiff(),
            )
            .unwrap();
            run_steps(&mut resumed, &mut stream, 3);

            assert_eq!(resumed.step_count(), 6);
            for ((n1, a), (n2, b)) in named_tensors(straight.model())
                .iter()
                .zip(&named_tensors(resumed.model()))
            {
                assert_eq!(n1, n2);
                assert_eq!(
                    a.as_bytes(),
                    b.as_bytes(),
                    "{preset}/{}: {n1} differs after resume",
                    optimizer.algorithm()
                );
            }
        }
    }
}

/// `max_seq_len` cuts as TRL does: the step on a long example equals the step on the example
/// cut by hand (prompt keeps its last tokens, completion its first), and is reported.
#[test]
fn long_examples_are_cut_to_max_seq_len() {
    let mut s = Stream(11);
    let prompt = s.word(30);
    let completion = s.word(40);
    let long = SftItem {
        hash: hash_ids(&[&prompt, &completion]),
        prompt: prompt.clone(),
        completion: completion.clone(),
    };
    // Budget 24: the completion keeps max(24 − 30, 12) = 12 tokens, the prompt the last 12.
    let cut = SftItem {
        prompt: prompt[18..].to_vec(),
        completion: completion[..12].to_vec(),
        hash: hash_ids(&[&prompt[18..], &completion[..12]]),
    };
    let limited = {
        let mut config = settings(adamw(), 1e-3);
        config.max_seq_len = 24;
        let model = Model::preset("tiny", 7, &cpu().autodiff()).unwrap();
        let mut t = Trainer::new(model.config, model.lm, None, config).unwrap();
        t.step(&Batch {
            sft: vec![long],
            dpo: vec![],
        })
        .unwrap()
    };
    let by_hand = tiny_trainer(adamw(), 1e-3)
        .step(&Batch {
            sft: vec![cut],
            dpo: vec![],
        })
        .unwrap();
    assert_eq!(limited.truncated, 1);
    assert_eq!(by_hand.truncated, 0);
    assert_eq!(limited.tokens, 24);
    assert_eq!(limited.loss, by_hand.loss);
    assert_eq!(limited.grad_norm, by_hand.grad_norm);
}
