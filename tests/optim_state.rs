//! Optimizer state: save → load → next steps bit-identical to an uninterrupted run, state-size
//! accounting, errors on foreign state, and stepping autodiff parameters.

mod optim_common;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use dreamloop::train::optim::{
    AdamWConfig, ApolloConfig, ModelOptimizer, OptimError, OptimizerConfig, WeightLayout,
};
use optim_common::{normal2, values, Single, Tiny};

/// All parameter values of a [`Tiny`] model, as bit patterns.
fn bits(model: &Tiny) -> Vec<u32> {
    [
        values(&model.q_proj.weight.val()),
        values(&model.embed_tokens.weight.val()),
        values(&model.norm.weight.val()),
    ]
    .concat()
    .iter()
    .map(|x| x.to_bits())
    .collect()
}

fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    vec![
        ("adamw", OptimizerConfig::Adamw(AdamWConfig::default())),
        (
            "apollo rank 4, refresh every 2 steps, decay",
            OptimizerConfig::Apollo(ApolloConfig {
                update_proj_gap: 2,
                weight_decay: 0.1,
                ..ApolloConfig::apollo(4)
            }),
        ),
        ("apollo mini", OptimizerConfig::Apollo(ApolloConfig::mini())),
        (
            "apollo [in, out] layout",
            OptimizerConfig::Apollo(ApolloConfig {
                layout: WeightLayout::InOut,
                update_proj_gap: 2,
                ..ApolloConfig::apollo(4)
            }),
        ),
    ]
}

/// Three steps, save to a file, load into a new optimizer, two more steps (crossing an APOLLO
/// refresh): every parameter is bit-identical to five uninterrupted steps.
#[test]
fn save_load_resumes_bit_identically() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    for (label, config) in configs() {
        let mut optim = ModelOptimizer::new(config.clone()).unwrap();
        let mut model = Tiny::new(1, [16, 32], &device);
        for step in 0..3 {
            let grads = model.grads(9, step, &device);
            model = optim.step(1e-2, model, grads).unwrap();
        }
        let path = dir.path().join("optimizer.bpk");
        optim.save(&path).unwrap();
        let mut resumed = ModelOptimizer::new(config).unwrap();
        resumed.load(&path, &device).unwrap();
        assert_eq!(
            resumed.param_names().collect::<Vec<_>>(),
            ["embed_tokens.weight", "norm.weight", "q_proj.weight"],
            "{label}: state keyed by module path"
        );
        assert_eq!(resumed.state_bytes(), optim.state_bytes(), "{label}");

        let mut a = model.clone();
        let mut b = model;
        for step in 3..5 {
            a = optim
                .step(1e-2, a.clone(), a.grads(9, step, &device))
                .unwrap();
            b = resumed
                .step(1e-2, b.clone(), b.grads(9, step, &device))
                .unwrap();
            assert_eq!(bits(&a), bits(&b), "{label}: step {}", step + 1);
        }
    }
}

/// The in-memory form round-trips the same way.
#[test]
fn bytes_round_trip() {
    let device = Device::flex();
    let config = OptimizerConfig::Apollo(ApolloConfig::mini());
    let mut optim = ModelOptimizer::new(config.clone()).unwrap();
    let model = Tiny::new(2, [16, 32], &device);
    let grads = model.grads(3, 0, &device);
    let model = optim.step(1e-2, model, grads).unwrap();
    let mut resumed = ModelOptimizer::new(config).unwrap();
    resumed
        .load_bytes(optim.to_bytes().unwrap(), &device)
        .unwrap();
    let a = optim
        .step(1e-2, model.clone(), model.grads(3, 1, &device))
        .unwrap();
    let b = resumed
        .step(1e-2, model.clone(), model.grads(3, 1, &device))
        .unwrap();
    assert_eq!(bits(&a), bits(&b));
}

/// State sizes follow APOLLO.md's accounting (AdamW 2·m·n; APOLLO 2·max·r + r·min; Mini
/// 2·max + min; plus one limiter norm), and APOLLO-Mini's state for projected weights of a
/// SmolLM2-sized MLP (576×1536) is under 1% of AdamW's.
#[test]
fn state_bytes_match_the_accounting() {
    let device = Device::flex();
    let (m, n) = (576usize, 1536usize);
    for (config, rank) in [(ApolloConfig::mini(), 1usize), (ApolloConfig::apollo(8), 8)] {
        let mut optim = ModelOptimizer::new(OptimizerConfig::Apollo(config)).unwrap();
        let model = Single::new(normal2(1, [m, n], 0.02, &device));
        let grads = model.grads(normal2(2, [m, n], 1e-3, &device));
        let _ = optim.step(1e-3, model, grads).unwrap();
        let bytes = optim.state_bytes();
        let expected = (2 * n * rank + rank * m + 1) * 4;
        assert_eq!(bytes.projected(), expected, "rank {rank}");
        assert_eq!(bytes.projected_adamw(), 2 * m * n * 4);
        if rank == 1 {
            let ratio = bytes.projected() as f64 / bytes.projected_adamw() as f64;
            assert!(ratio <= 0.01, "Mini/AdamW state ratio {ratio}");
        }
    }
    let mut adamw = ModelOptimizer::new(OptimizerConfig::Adamw(AdamWConfig::default())).unwrap();
    let model = Tiny::new(1, [16, 32], &device);
    let grads = model.grads(1, 0, &device);
    let _ = adamw.step(1e-3, model, grads).unwrap();
    assert_eq!(
        adamw.state_bytes().total(),
        2 * (16 * 32 + 10 * 16 + 16) * 4
    );
}

/// Loading AdamW state into an APOLLO optimizer is refused; APOLLO state of a 16×32 weight
/// applied to an 8×32 weight is refused before any parameter changes.
#[test]
fn foreign_state_is_refused() {
    let device = Device::flex();
    let mut adamw = ModelOptimizer::new(OptimizerConfig::Adamw(AdamWConfig::default())).unwrap();
    let model = Tiny::new(1, [16, 32], &device);
    let grads = model.grads(1, 0, &device);
    let _ = adamw.step(1e-3, model, grads).unwrap();
    let mut apollo = ModelOptimizer::new(OptimizerConfig::Apollo(ApolloConfig::apollo(4))).unwrap();
    let error = apollo
        .load_bytes(adamw.to_bytes().unwrap(), &device)
        .unwrap_err();
    assert!(matches!(error, OptimError::Corrupt { .. }), "{error}");

    let model = Tiny::new(1, [16, 32], &device);
    let grads = model.grads(1, 0, &device);
    let _ = apollo.step(1e-3, model, grads).unwrap();
    let other = Tiny::new(5, [8, 32], &device);
    let before = bits(&other);
    let grads = other.grads(1, 1, &device);
    let error = apollo.step(1e-3, other.clone(), grads).unwrap_err();
    assert!(
        matches!(&error, OptimError::StateMismatch { name, .. } if name == "q_proj.weight"),
        "{error}"
    );
    assert_eq!(bits(&other), before);

    let mut injected =
        ModelOptimizer::new(OptimizerConfig::Apollo(ApolloConfig::apollo(4))).unwrap();
    injected.inject_projections(
        "q_proj.weight",
        vec![burn::tensor::TensorData::new(vec![0.0f32; 12], [3, 4])],
    );
    let model = Tiny::new(1, [16, 32], &device);
    let grads = model.grads(1, 0, &device);
    let error = injected.step(1e-3, model, grads).unwrap_err();
    assert!(matches!(error, OptimError::InjectedShape { .. }), "{error}");
}

/// On an autodiff device the updated parameters keep requiring gradients, so the next backward
/// pass still reaches them; names given per ParamId replace module paths.
#[test]
fn autodiff_parameters_stay_trainable() {
    let device = Device::flex().autodiff();
    let mut model = Single::new(normal2(1, [16, 32], 0.1, &device));
    let x = normal2(2, [4, 32], 1.0, &device);
    let names = [(
        model.q_proj.weight.id,
        "model.layers.0.self_attn.q_proj.weight".to_string(),
    )]
    .into_iter()
    .collect();
    let mut optim = ModelOptimizer::new(OptimizerConfig::Apollo(ApolloConfig::apollo(2)))
        .unwrap()
        .with_names(names);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let out: Tensor<2> = x.clone().matmul(model.q_proj.weight.val().transpose());
        let loss = out.square().mean();
        losses.push(values(&loss)[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(grads.len(), 1, "the weight still receives a gradient");
        model = optim.step(1e-2, model, grads).unwrap();
    }
    assert!(losses[2] < losses[0], "loss decreases: {losses:?}");
    assert_eq!(
        optim.param_names().collect::<Vec<_>>(),
        ["model.layers.0.self_attn.q_proj.weight"]
    );
    assert!(optim
        .apollo_state::<2>("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .projected
        .is_some());
    let _ = model.num_params();
}
