//! APOLLO / APOLLO-Mini against `apollo_torch` (`tests/fixtures/apollo_reference.json`), plus the
//! structural and statistical properties the fixture README lists for a port with its own RNG.

mod optim_common;

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use dreamloop::train::optim::{
    gaussian_projection, name_seed, AdamWConfig, ApolloConfig, ApolloTensor, ModelOptimizer,
    OptimizerConfig, ProjectedState, ScaleType,
};
use optim_common::{array, assert_close, assert_rel, fixture, normal2, tensor2, values, Single};
use serde_json::Value;

const CONFIGS: [&str; 3] = [
    "apollo_mini_rank1_tensor",
    "apollo_rank4_channel",
    "apollo_rank4_channel_gap2",
];
const NAME: &str = "q_proj.weight";

/// The fixture's hyper-parameters for configuration `name`.
fn config_of(fx: &Value, name: &str) -> ApolloConfig {
    let kw = &fx["optimizer_kwargs"];
    let group = &fx["configs"][name]["group_hyperparameters"];
    ApolloConfig {
        rank: group["rank"].as_u64().unwrap() as usize,
        scale: group["scale"].as_f64().unwrap(),
        scale_type: match group["scale_type"].as_str().unwrap() {
            "tensor" => ScaleType::Tensor,
            _ => ScaleType::Channel,
        },
        update_proj_gap: group["update_proj_gap"].as_u64().unwrap(),
        beta1: kw["betas"][0].as_f64().unwrap(),
        beta2: kw["betas"][1].as_f64().unwrap(),
        eps: kw["eps"].as_f64().unwrap(),
        weight_decay: kw["weight_decay"].as_f64().unwrap(),
        norm_growth_limit: Some(1.01),
        ..ApolloConfig::default()
    }
}

/// The projections apollo_torch drew, in draw order (steps whose `seed_used` is not null).
fn injected_of(fx: &Value, name: &str) -> Vec<TensorData> {
    let c = &fx["configs"][name];
    (0..3)
        .filter(|&k| !c["seed_used_per_step"][k].is_null())
        .map(|k| {
            let (data, shape) = array(&c["P_used_per_step"][k]);
            TensorData::new(data, [shape[0], shape[1]])
        })
        .collect()
}

fn lr_of(fx: &Value) -> f64 {
    fx["optimizer_kwargs"]["lr"].as_f64().unwrap()
}

fn scalar(t: &Tensor<1>) -> f32 {
    values(t)[0]
}

/// With P injected, every RNG-free intermediate matches apollo_torch (rtol 1e-5) and the
/// parameters match after each step (atol 1e-6), for all three configurations.
#[test]
fn injected_projection_reproduces_apollo_torch_intermediates() {
    let fx = fixture("apollo_reference.json");
    let device = Device::flex();
    for name in CONFIGS {
        let c = &fx["configs"][name];
        let optim = ApolloTensor::projected(
            Arc::new(config_of(&fx, name)),
            NAME,
            [16, 32],
            0,
            Some(Arc::new(injected_of(&fx, name))),
        )
        .unwrap();
        let mut param = tensor2(&fx["initial_param"], &device);
        let mut state: Option<ProjectedState> = None;
        for step in 0..3 {
            let what = |field: &str| format!("{name} step {} {field}", step + 1);
            let grad = tensor2(&fx["grads"][step], &device);
            let (p, s, trace) = optim.step_projected(lr_of(&fx), param, grad, step as u64, state);
            let reference = &c["intermediates"][step];

            assert_eq!(
                trace.refreshed,
                !c["seed_used_per_step"][step].is_null(),
                "{}",
                what("refresh")
            );
            assert_eq!(
                values(&trace.projection),
                array(&c["P_used_per_step"][step]).0
            );
            assert_eq!(
                reference["norm_dim"].as_u64(),
                Some(0),
                "left projection: per column"
            );
            for (field, actual) in [
                ("projected_grad", &trace.projected_grad),
                ("exp_avg", &trace.exp_avg),
                ("exp_avg_sq", &trace.exp_avg_sq),
                ("update_direction", &trace.update),
            ] {
                assert_rel(
                    &values(actual),
                    &array(&reference[field]).0,
                    1e-5,
                    &what(field),
                );
            }
            let step_size = reference["step_size"].as_f64().unwrap();
            assert!(
                (trace.step_size - step_size).abs() <= 1e-12 * step_size,
                "{}",
                what("step_size")
            );
            assert_rel(
                &values(&trace.scaling),
                &array(&reference["grad_scaling_factor"]).0,
                1e-5,
                &what("grad_scaling_factor"),
            );
            for (field, actual) in [
                (
                    "scaled_grad_norm_before_limiter",
                    scalar(&trace.norm_before_limiter),
                ),
                ("limiter", scalar(&trace.limiter)),
                (
                    "nl_state_after",
                    scalar(trace.limiter_state.as_ref().unwrap()),
                ),
            ] {
                let expected = reference[field].as_f64().unwrap() as f32;
                assert_close(&[actual], &[expected], 0.0, 1e-5, &what(field));
            }
            assert_close(
                &values(&p),
                &array(&c["params_after_step"][step]).0,
                1e-6,
                0.0,
                &what("params"),
            );
            param = p;
            state = Some(s);
        }
    }
}

/// The same through the model-level driver (projection chosen by the name `q_proj.weight`).
#[test]
fn model_optimizer_with_injected_projection_matches_params() {
    let fx = fixture("apollo_reference.json");
    let device = Device::flex();
    for name in CONFIGS {
        let mut optim = ModelOptimizer::new(OptimizerConfig::Apollo(config_of(&fx, name))).unwrap();
        optim.inject_projections(NAME, injected_of(&fx, name));
        let mut model = Single::new(tensor2(&fx["initial_param"], &device));
        for step in 0..3 {
            let grads = model.grads(tensor2(&fx["grads"][step], &device));
            model = optim.step(lr_of(&fx), model, grads).unwrap();
            assert_close(
                &values(&model.q_proj.weight.val()),
                &array(&fx["configs"][name]["params_after_step"][step]).0,
                1e-6,
                0.0,
                &format!("{name} params after step {}", step + 1),
            );
        }
        let state = optim.apollo_state::<2>(NAME).unwrap();
        assert!(state.projected.is_some() && state.dense.is_none());
    }
}

/// Mean and standard deviation of a sample.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// With our own RNG over 300 seeds, the step-1 update norm and the 3-step displacement have the
/// distribution apollo_torch has over 2000 seeds: means within 4 combined standard errors,
/// standard deviations within 15% (the std of a 300-sample std is ≈ 4%).
#[test]
fn own_rng_matches_reference_statistics_over_seeds() {
    let fx = fixture("apollo_reference.json");
    let device = Device::flex();
    let lr = lr_of(&fx);
    let wd = fx["optimizer_kwargs"]["weight_decay"].as_f64().unwrap();
    let p0 = tensor2(&fx["initial_param"], &device);
    let grads: Vec<Tensor<2>> = (0..3).map(|k| tensor2(&fx["grads"][k], &device)).collect();
    let seeds = 300u64;
    for name in CONFIGS {
        let config = Arc::new(config_of(&fx, name));
        let mut step1 = Vec::new();
        let mut final_delta = Vec::new();
        for seed in 0..seeds {
            let optim = ApolloTensor::projected(
                config.clone(),
                NAME,
                [16, 32],
                name_seed(seed, NAME),
                None,
            )
            .unwrap();
            let mut param = p0.clone();
            let mut state = None;
            for (step, grad) in grads.iter().enumerate() {
                let (p, s, _) = optim.step_projected(lr, param, grad.clone(), step as u64, state);
                if step == 0 {
                    let change = p.clone() - p0.clone().mul_scalar(1.0 - lr * wd);
                    step1.push(f64::from(scalar(&change.square().sum().sqrt())));
                }
                param = p;
                state = Some(s);
            }
            let delta = param - p0.clone();
            final_delta.push(f64::from(scalar(&delta.square().sum().sqrt())));
        }
        let stats = &fx["configs"][name]["statistics_over_seeds"];
        for (key, sample) in [
            ("step1_param_change_norm_approx", &step1),
            ("final_delta_norm_after_3_steps", &final_delta),
        ] {
            let reference = &stats[key];
            let (ref_mean, ref_std) = (
                reference["mean"].as_f64().unwrap(),
                reference["std"].as_f64().unwrap(),
            );
            let ref_se = reference["stderr_mean"].as_f64().unwrap();
            let (mean, std) = mean_std(sample);
            let se = (std * std / sample.len() as f64 + ref_se * ref_se).sqrt();
            assert!(
                (mean - ref_mean).abs() <= 4.0 * se,
                "{name} {key}: mean {mean} vs reference {ref_mean} (combined SE {se})"
            );
            assert!(
                (std / ref_std - 1.0).abs() <= 0.15,
                "{name} {key}: std {std} vs reference {ref_std}"
            );
        }
    }
}

/// APOLLO-Mini moves the weight along the raw gradient: ΔW = −c·G with one scalar c (weight
/// decay off), also at a step where the limiter acts.
#[test]
fn mini_update_is_raw_gradient_times_one_scalar() {
    let fx = fixture("apollo_reference.json");
    let device = Device::flex();
    let config = ApolloConfig {
        weight_decay: 0.0,
        ..ApolloConfig::mini()
    };
    let mut optim = ModelOptimizer::new(OptimizerConfig::Apollo(config)).unwrap();
    let mut model = Single::new(tensor2(&fx["initial_param"], &device));
    for step in 0..3 {
        let before = values(&model.q_proj.weight.val());
        let grad = tensor2(&fx["grads"][step], &device);
        let g = values(&grad);
        let grads = model.grads(grad);
        model = optim.step(0.01, model, grads).unwrap();
        let after = values(&model.q_proj.weight.val());
        let max_g = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let ratios: Vec<f64> = (0..g.len())
            .filter(|&i| g[i].abs() > 0.05 * max_g)
            .map(|i| f64::from(after[i] - before[i]) / f64::from(g[i]))
            .collect();
        let (mean, _) = mean_std(&ratios);
        assert!(mean < 0.0, "moves against the gradient");
        for r in &ratios {
            // float32 rounding of W ± ΔW bounds how exactly the ratio can be recovered.
            assert!(
                (r / mean - 1.0).abs() < 2e-3,
                "step {}: ratio {r} vs {mean}",
                step + 1
            );
        }
    }
}

/// At t = 1, APOLLO's channel factor ‖R̃_j‖/‖R_j‖ times √(m/r) converges to AdamW's per-channel
/// factor ‖m̂/(√v̂+ε)‖_j/‖G_j‖ (computed here by hand in f64) as the rank grows, because a
/// Gaussian P preserves norms ever more tightly (relative spread ≈ 1/√(2r)).
#[test]
fn channel_factors_approach_adamw_as_rank_grows() {
    let device = Device::flex();
    let (m, n) = (8usize, 64usize);
    let grad = normal2(7, [m, n], 1.0, &device);
    let g = values(&grad);
    let adamw_factor: Vec<f64> = (0..n)
        .map(|j| {
            let column: Vec<f64> = (0..m).map(|i| f64::from(g[i * n + j])).collect();
            let normalized: f64 = column
                .iter()
                .map(|x| (0.1 * x / ((0.001 * x * x).sqrt() + 1e-6)).powi(2))
                .sum::<f64>()
                .sqrt();
            normalized / column.iter().map(|x| x * x).sum::<f64>().sqrt()
        })
        .collect();
    let mut errors = Vec::new();
    for rank in [4usize, 64, 1024] {
        let config = Arc::new(ApolloConfig::apollo(rank));
        let mut error = 0.0;
        let trials = 4;
        for trial in 0..trials {
            let optim =
                ApolloTensor::projected(config.clone(), NAME, [m, n], 100 + trial, None).unwrap();
            let (_, _, trace) =
                optim.step_projected(1e-3, grad.zeros_like(), grad.clone(), 0, None);
            let scaling = values(&trace.scaling);
            assert_eq!(
                scaling.len(),
                n,
                "one factor per column (channels of the larger dim)"
            );
            let correction = (m as f64 / rank as f64).sqrt();
            error += scaling
                .iter()
                .zip(&adamw_factor)
                .map(|(s, a)| (f64::from(*s) * correction / a - 1.0).abs())
                .sum::<f64>()
                / n as f64;
        }
        errors.push(error / trials as f64);
    }
    assert!(
        errors[0] > errors[1] && errors[1] > errors[2],
        "errors by rank {errors:?}"
    );
    assert!(
        errors[2] < 0.04,
        "rank 1024 mean relative error {}",
        errors[2]
    );
}

/// The norm-growth limiter keeps ‖S_t‖ ≤ 1.01·‖S_{t−1}‖. The adversarial case it exists for: P is
/// injected as e₀ (rank 1), the first gradient lies in row 0 and the later ones almost
/// orthogonal to P, so ‖R‖ ≪ ‖G‖ and the factor s = ‖M/√V‖/‖R‖ explodes. Without the limiter
/// ‖S‖ grows more than a hundredfold at step 2.
#[test]
fn limiter_caps_norm_growth_at_one_percent() {
    let device = Device::flex();
    let (m, n) = (16usize, 32usize);
    let mut e0 = vec![0.0f32; m];
    e0[0] = 1.0;
    let row0 = |inside: f32, outside: f32| {
        let data: Vec<f32> = (0..m * n)
            .map(|i| if i < n { inside } else { outside })
            .collect();
        Tensor::<2>::from_data(TensorData::new(data, [m, n]), &device)
    };
    for limit in [Some(1.01), None] {
        let config = Arc::new(ApolloConfig {
            norm_growth_limit: limit,
            ..ApolloConfig::mini()
        });
        let injected = Arc::new(vec![TensorData::new(e0.clone(), [m, 1])]);
        let optim = ApolloTensor::projected(config, NAME, [m, n], 5, Some(injected)).unwrap();
        let mut param = Tensor::<2>::zeros([m, n], &device);
        let mut state = None;
        let mut previous: Option<f32> = None;
        for step in 0..4u64 {
            let grad = if step == 0 {
                row0(1.0, 0.0)
            } else {
                row0(0.01, 1.0).mul_scalar(10f64.powi(step as i32 - 1))
            };
            let (p, s, trace) = optim.step_projected(0.01, param, grad, step, state);
            let norm = scalar(&trace.update.clone().square().sum().sqrt()) / 128f32.sqrt();
            if let Some(prev) = previous {
                match limit {
                    Some(gamma) => {
                        assert!(
                            norm <= prev * gamma as f32 * (1.0 + 1e-6),
                            "step {}: {norm} > 1.01·{prev}",
                            step + 1
                        );
                        assert!(scalar(&trace.limiter) > 1.0, "the limiter acted");
                    }
                    None if step == 1 => assert!(norm > 100.0 * prev, "unlimited {norm} vs {prev}"),
                    None => {}
                }
            }
            previous = Some(norm);
            param = p;
            state = Some(s);
        }
    }
}

/// P depends only on (global seed, parameter name, draw): a new optimizer instance (a restart)
/// regenerates it bit for bit; another name or global seed gives another P; entries are
/// N(0, 1/r).
#[test]
fn projection_is_regenerated_from_the_name() {
    let device = Device::flex();
    let projection = |seed: u64| {
        let config = ApolloConfig {
            seed,
            ..ApolloConfig::apollo(4)
        };
        let mut optim = ModelOptimizer::new(OptimizerConfig::Apollo(config)).unwrap();
        let model = Single::new(normal2(1, [16, 32], 0.1, &device));
        let grads = model.grads(normal2(2, [16, 32], 0.01, &device));
        let model = optim.step(0.01, model, grads).unwrap();
        let state = optim.apollo_state::<2>(NAME).unwrap();
        let p = values(&state.projected.as_ref().unwrap().projection);
        (p, values(&model.q_proj.weight.val()))
    };
    let (p_a, w_a) = projection(3);
    let (p_b, w_b) = projection(3);
    assert_eq!(p_a, p_b, "same name, new instance: same P");
    assert_eq!(w_a, w_b, "and the same step");
    let (p_c, _) = projection(4);
    assert_ne!(p_a, p_c, "another global seed: another P");
    assert_ne!(name_seed(3, "q_proj.weight"), name_seed(3, "k_proj.weight"));
    assert_ne!(
        gaussian_projection(name_seed(3, "q_proj.weight"), 16, 4, 4),
        gaussian_projection(name_seed(3, "k_proj.weight"), 16, 4, 4)
    );

    let rank = 4;
    let sample = gaussian_projection(11, 512, 64, rank);
    let n = sample.len() as f64;
    let mean = sample.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
    let var = sample
        .iter()
        .map(|x| (f64::from(*x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let expected_var = 1.0 / rank as f64;
    assert!(mean.abs() < 4.0 * (expected_var / n).sqrt(), "mean {mean}");
    // Var of a sample variance of normals: 2σ⁴/n.
    assert!(
        (var - expected_var).abs() < 4.0 * expected_var * (2.0 / n).sqrt(),
        "var {var}"
    );
}

/// Least squares min ‖X·Wᵀ − Y‖² from W = 0 (W 16×32, projected): after 300 steps at lr 1e-2,
/// APOLLO (rank 4) and APOLLO-Mini reach a loss within a factor of 3 of AdamW's, each below 5% of
/// the initial loss.
#[test]
fn least_squares_apollo_and_mini_reach_adamw_loss() {
    let device = Device::flex();
    let x = normal2(21, [64, 32], 1.0, &device);
    let w_true = normal2(22, [16, 32], 0.5, &device);
    let y = x.clone().matmul(w_true.transpose());
    let run = |config: OptimizerConfig| {
        let mut optim = ModelOptimizer::new(config).unwrap();
        let mut model = Single::new(Tensor::<2>::zeros([16, 32], &device));
        let loss = |w: Tensor<2>| {
            let r = x.clone().matmul(w.transpose()) - y.clone();
            f64::from(scalar(&r.square().mean()))
        };
        let initial = loss(model.q_proj.weight.val());
        for _ in 0..300 {
            let w = model.q_proj.weight.val();
            let residual = x.clone().matmul(w.transpose()) - y.clone();
            let grad = residual
                .transpose()
                .matmul(x.clone())
                .mul_scalar(2.0 / (64.0 * 16.0));
            let grads = model.grads(grad);
            model = optim.step(1e-2, model, grads).unwrap();
        }
        (initial, loss(model.q_proj.weight.val()))
    };
    let no_decay = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let (initial, adamw) = run(OptimizerConfig::Adamw(no_decay));
    let (_, apollo) = run(OptimizerConfig::Apollo(ApolloConfig {
        update_proj_gap: 50,
        ..ApolloConfig::apollo(4)
    }));
    let (_, mini) = run(OptimizerConfig::Apollo(ApolloConfig::mini()));
    eprintln!("least squares: initial {initial} adamw {adamw} apollo {apollo} mini {mini}");
    for (label, loss) in [("adamw", adamw), ("apollo", apollo), ("mini", mini)] {
        assert!(
            loss < 0.05 * initial,
            "{label}: {loss} vs initial {initial}"
        );
    }
    assert!(
        apollo < 3.0 * adamw.max(1e-3 * initial),
        "apollo {apollo} vs adamw {adamw}"
    );
    assert!(
        mini < 3.0 * adamw.max(1e-3 * initial),
        "mini {mini} vs adamw {adamw}"
    );
}
