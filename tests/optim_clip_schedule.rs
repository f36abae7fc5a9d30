//! Global gradient clipping and learning-rate schedules against hand-computed values.

mod optim_common;

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use dreamloop::train::clip::{clip_grad_norm, grad_norm, grads_finite};
use dreamloop::train::schedule::LrSchedule;
use optim_common::{assert_close, values, Lin, Norm, Tiny};

/// A model with a 2×2 and a 1-D gradient whose norms are easy by hand:
/// ‖(3, 0, 0, 4)‖ = 5 and ‖(12)‖ = 12, so the global norm is √(25 + 144) = 13.
fn model_and_grads(device: &Device, last: f32) -> (Tiny, GradientsParams) {
    let model = Tiny {
        q_proj: Lin {
            weight: Param::from_tensor(Tensor::zeros([2, 2], device)),
        },
        embed_tokens: Lin {
            weight: Param::from_tensor(Tensor::zeros([1, 1], device)),
        },
        norm: Norm {
            weight: Param::from_tensor(Tensor::zeros([1], device)),
        },
    };
    let mut grads = GradientsParams::new();
    grads.register(
        model.q_proj.weight.id,
        Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 0.0, 0.0, 4.0], [2, 2]), device),
    );
    grads.register(
        model.norm.weight.id,
        Tensor::<1>::from_data(TensorData::new(vec![last], [1]), device),
    );
    (model, grads)
}

#[test]
fn clipping_matches_hand_computation() {
    let device = Device::flex();
    let (model, mut grads) = model_and_grads(&device, 12.0);
    assert!((grad_norm(&model, &grads) - 13.0).abs() < 1e-9);

    // max_norm 6.5: every gradient is multiplied by 6.5 / (13 + 1e-6).
    let total = clip_grad_norm(&model, &mut grads, 6.5);
    assert!((total - 13.0).abs() < 1e-9, "returns the pre-clip norm");
    let coef = (6.5 / (13.0 + 1e-6)) as f32;
    let q: Tensor<2> = grads.get(model.q_proj.weight.id).unwrap();
    let n: Tensor<1> = grads.get(model.norm.weight.id).unwrap();
    assert_close(
        &values(&q),
        &[3.0 * coef, 0.0, 0.0, 4.0 * coef],
        1e-6,
        0.0,
        "q grad",
    );
    assert_close(&values(&n), &[12.0 * coef], 1e-6, 0.0, "norm grad");
    assert!((grad_norm(&model, &grads) - 6.5).abs() < 1e-5);

    // Below the threshold nothing changes.
    let (model, mut grads) = model_and_grads(&device, 12.0);
    assert!((clip_grad_norm(&model, &mut grads, 20.0) - 13.0).abs() < 1e-9);
    let q: Tensor<2> = grads.get(model.q_proj.weight.id).unwrap();
    assert_eq!(values(&q), [3.0, 0.0, 0.0, 4.0]);
}

#[test]
fn non_finite_gradients_are_reported_and_left_alone() {
    let device = Device::flex();
    let (model, grads) = model_and_grads(&device, 12.0);
    assert!(grads_finite(&model, &grads));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (model, mut grads) = model_and_grads(&device, bad);
        assert!(!grads_finite(&model, &grads), "{bad}");
        let total = clip_grad_norm(&model, &mut grads, 1.0);
        assert!(!total.is_finite(), "{bad}: norm {total}");
        let q: Tensor<2> = grads.get(model.q_proj.weight.id).unwrap();
        assert_eq!(values(&q), [3.0, 0.0, 0.0, 4.0], "{bad}: untouched");
    }
}

#[test]
fn warmup_constant_hand_values() {
    let s = LrSchedule::warmup_constant(1e-3, 4);
    let expected = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3];
    for (step, lr) in expected.iter().enumerate() {
        assert!((s.lr_at(step as u64) - lr).abs() < 1e-15, "step {step}");
    }
    assert_eq!(LrSchedule::warmup_constant(2e-5, 0).lr_at(0), 2e-5);
}

/// Warmup 2, cycle 4, floor 0.1·peak: after warmup p = 0,1,2,3 give
/// peak·(0.1 + 0.9·½(1+cos(πp/4))) = 1, 0.1+0.9·0.853553 = 0.868198, 0.55, 0.231802, then a restart.
#[test]
fn warmup_cosine_with_restarts_hand_values() {
    let s = LrSchedule::warmup_cosine(1.0, 2, 4, 0.1);
    let expected = [0.5, 1.0, 1.0, 0.868_198, 0.55, 0.231_802, 1.0, 0.868_198];
    for (step, lr) in expected.iter().enumerate() {
        assert!(
            (s.lr_at(step as u64) - lr).abs() < 1e-6,
            "step {step}: {}",
            s.lr_at(step as u64)
        );
    }
    assert!(s.validate().is_ok());
    assert!(LrSchedule::warmup_cosine(1.0, 2, 0, 0.1)
        .validate()
        .is_err());
    assert!(LrSchedule::warmup_cosine(1.0, 2, 4, 1.5)
        .validate()
        .is_err());
}

/// A rollback halves the rate (factors compound), and the multiplier survives serialisation so a
/// resumed run uses exactly the same rates.
#[test]
fn scale_and_serde_round_trip() {
    let mut s = LrSchedule::warmup_cosine(2e-5, 10, 100, 0.0);
    s.scale(0.5);
    s.scale(0.5);
    assert!((s.lr_at(10) - 0.5e-5).abs() < 1e-18);
    assert_eq!(s.base_lr_at(10), 2e-5);
    let json = serde_json::to_string(&s).unwrap();
    let back: LrSchedule = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    for step in [0u64, 9, 10, 57, 110, 12345] {
        assert_eq!(back.lr_at(step).to_bits(), s.lr_at(step).to_bits());
    }
}
