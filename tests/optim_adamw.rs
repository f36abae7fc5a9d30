//! AdamW against `torch.optim.AdamW` (`tests/fixtures/adamw_reference.json`, torch 2.15).

mod optim_common;

use burn::tensor::{Device, Tensor, TensorData};
use dreamloop::train::optim::{AdamWConfig, ModelOptimizer, OptimizerConfig};
use optim_common::{array, assert_close, fixture, tensor2, values, Norm, Single};

/// Parameters after each of torch's three steps within 1e-7 (the fixture's recommended
/// tolerance; float32 vs float64 in torch differ by 3e-8), moments within 1e-6 relative.
#[test]
fn adamw_matches_torch_trajectory() {
    let fx = fixture("adamw_reference.json");
    let hp = &fx["hyperparameters"];
    let config = AdamWConfig {
        beta1: hp["betas"][0].as_f64().unwrap(),
        beta2: hp["betas"][1].as_f64().unwrap(),
        eps: hp["eps"].as_f64().unwrap(),
        weight_decay: hp["weight_decay"].as_f64().unwrap(),
        decay_1d: false,
    };
    let lr = hp["lr"].as_f64().unwrap();
    let device = Device::flex();
    let mut model = Single::new(tensor2(&fx["initial_param"], &device));
    let mut optim = ModelOptimizer::new(OptimizerConfig::Adamw(config)).unwrap();

    for step in 0..3 {
        let grads = model.grads(tensor2(&fx["grads"][step], &device));
        model = optim.step(lr, model, grads).unwrap();

        let expected = array(&fx["float32"]["params_after_step"][step]).0;
        let actual = values(&model.q_proj.weight.val());
        assert_close(
            &actual,
            &expected,
            1e-7,
            0.0,
            &format!("param after step {}", step + 1),
        );

        let state = optim
            .adamw_state::<2>("q_proj.weight")
            .expect("state by path name");
        assert_eq!(state.step, step as u64 + 1);
        let m = array(&fx["float32"]["exp_avg_after_step"][step]).0;
        let v = array(&fx["float32"]["exp_avg_sq_after_step"][step]).0;
        assert_close(&values(&state.exp_avg), &m, 1e-12, 1e-6, "exp_avg");
        assert_close(&values(&state.exp_avg_sq), &v, 1e-15, 1e-6, "exp_avg_sq");
    }
}

/// The defaults are torch's, not burn's (burn: ε 1e-5, λ 1e-4).
#[test]
fn defaults_are_torch_defaults() {
    let c = AdamWConfig::default();
    assert_eq!(
        (c.beta1, c.beta2, c.eps, c.weight_decay),
        (0.9, 0.999, 1e-8, 0.01)
    );
}

/// A 1-D tensor is not decayed by default; with `decay_1d` it is. Hand values for one step on
/// p = 1, g = 0.5: the Adam step is lr·m̂/(√v̂+ε) = lr·0.5/(0.5+1e-8), and decay multiplies p by
/// (1 − lr·λ) first.
#[test]
fn one_dimensional_tensors_skip_decay_unless_asked() {
    let device = Device::flex();
    let lr = 0.1;
    let adam_step = lr * 0.5 / (0.5 + 1e-8);
    for (decay_1d, expected) in [
        (false, 1.0 - adam_step),
        (true, 1.0 * (1.0 - lr * 0.5) - adam_step),
    ] {
        let config = AdamWConfig {
            weight_decay: 0.5,
            decay_1d,
            ..AdamWConfig::default()
        };
        let norm = Norm {
            weight: burn::module::Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(vec![1.0f32], [1]),
                &device,
            )),
        };
        let mut grads = burn::optim::GradientsParams::new();
        grads.register(
            norm.weight.id,
            Tensor::<1>::from_data(TensorData::new(vec![0.5f32], [1]), &device),
        );
        let mut optim = ModelOptimizer::new(OptimizerConfig::Adamw(config)).unwrap();
        let norm = optim.step(lr, norm, grads).unwrap();
        assert_close(
            &values(&norm.weight.val()),
            &[expected as f32],
            1e-7,
            0.0,
            &format!("decay_1d={decay_1d}"),
        );
    }
}
