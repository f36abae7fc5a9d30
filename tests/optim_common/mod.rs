//! Helpers shared by the `optim_*` integration tests: fixture loading, tiny modules, tensor
//! conversion and tolerance checks.

#![allow(dead_code)]

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

/// Parses `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A nested JSON array of numbers as (row-major values, shape).
pub fn array(value: &Value) -> (Vec<f32>, Vec<usize>) {
    fn walk(value: &Value, depth: usize, out: &mut Vec<f32>, shape: &mut Vec<usize>) {
        match value {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                for item in items {
                    walk(item, depth + 1, out, shape);
                }
            }
            other => out.push(other.as_f64().expect("numeric fixture entry") as f32),
        }
    }
    let mut out = Vec::new();
    let mut shape = Vec::new();
    walk(value, 0, &mut out, &mut shape);
    (out, shape)
}

/// A 2-D fixture array as a tensor.
pub fn tensor2(value: &Value, device: &Device) -> Tensor<2> {
    let (data, shape) = array(value);
    assert_eq!(shape.len(), 2, "expected a matrix");
    Tensor::from_data(TensorData::new(data, [shape[0], shape[1]]), device)
}

/// A tensor's values as f32.
pub fn values<const D: usize>(tensor: &Tensor<D>) -> Vec<f32> {
    tensor.to_data().try_to_vec::<f32>().expect("f32 tensor")
}

/// `|a − e| ≤ atol + rtol·|e|` element-wise, with the worst offender in the message.
pub fn assert_close(actual: &[f32], expected: &[f32], atol: f64, rtol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let (a, e) = (f64::from(*a), f64::from(*e));
        let excess = (a - e).abs() - (atol + rtol * e.abs());
        assert!(a.is_finite(), "{what}[{i}] is {a}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let (i, excess) = worst;
    assert!(
        excess <= 0.0,
        "{what}[{i}]: actual {} expected {} (tolerance exceeded by {excess:e})",
        actual[i],
        expected[i]
    );
}

/// Relative check scaled to the array: `|a − e| ≤ rtol·(|e| + 1e-3·max|e|)`, so entries many
/// orders of magnitude below the largest are not held to a relative bound float32 cannot meet.
pub fn assert_rel(actual: &[f32], expected: &[f32], rtol: f64, what: &str) {
    let max = expected
        .iter()
        .fold(0.0f64, |m, e| m.max(f64::from(e.abs())));
    assert_close(actual, expected, rtol * 1e-3 * max, rtol, what);
}

/// A linear layer's weight only (the optimizer sees the path `<field>.weight`).
#[derive(Module, Debug)]
pub struct Lin {
    /// The weight.
    pub weight: Param<Tensor<2>>,
}

/// A norm layer's weight.
#[derive(Module, Debug)]
pub struct Norm {
    /// The weight.
    pub weight: Param<Tensor<1>>,
}

/// One projected weight, named like an attention projection.
#[derive(Module, Debug)]
pub struct Single {
    /// `q_proj.weight`.
    pub q_proj: Lin,
}

impl Single {
    /// A model holding `weight`.
    pub fn new(weight: Tensor<2>) -> Self {
        Self {
            q_proj: Lin {
                weight: Param::from_tensor(weight),
            },
        }
    }

    /// Gradients for this model holding `grad` for its weight.
    pub fn grads(&self, grad: Tensor<2>) -> GradientsParams {
        let mut grads = GradientsParams::new();
        grads.register(self.q_proj.weight.id, grad);
        grads
    }
}

/// A projected weight, an embedding (never projected) and a 1-D norm weight.
#[derive(Module, Debug)]
pub struct Tiny {
    /// Projected under the default APOLLO config.
    pub q_proj: Lin,
    /// Dense branch (not an attention / MLP projection).
    pub embed_tokens: Lin,
    /// Dense branch, 1-D (no weight decay by default).
    pub norm: Norm,
}

impl Tiny {
    /// Deterministic weights from `seed` with `q_proj` of shape `q_dims`.
    pub fn new(seed: u64, q_dims: [usize; 2], device: &Device) -> Self {
        Self {
            q_proj: Lin {
                weight: Param::from_tensor(normal2(seed, q_dims, 0.1, device)),
            },
            embed_tokens: Lin {
                weight: Param::from_tensor(normal2(seed + 1, [10, 16], 0.1, device)),
            },
            norm: Norm {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(normal(seed + 2, 16, 0.1), [16]),
                    device,
                )),
            },
        }
    }

    /// Deterministic gradients for step `step`.
    pub fn grads(&self, seed: u64, step: u64, device: &Device) -> GradientsParams {
        let s = seed * 1000 + step * 10;
        let mut grads = GradientsParams::new();
        grads.register(
            self.q_proj.weight.id,
            normal2(s, self.q_proj.weight.val().dims(), 0.01, device),
        );
        grads.register(
            self.embed_tokens.weight.id,
            normal2(s + 1, [10, 16], 0.01, device),
        );
        grads.register(
            self.norm.weight.id,
            Tensor::<1>::from_data(TensorData::new(normal(s + 2, 16, 0.01), [16]), device),
        );
        grads
    }
}

/// `len` deterministic N(0, std²) values (our projection generator used as a data source).
pub fn normal(seed: u64, len: usize, std: f32) -> Vec<f32> {
    dreamloop::train::optim::gaussian_projection(seed, 1, len, 1)
        .into_iter()
        .map(|x| x * std)
        .collect()
}

/// A deterministic N(0, std²) matrix.
pub fn normal2(seed: u64, dims: [usize; 2], std: f32, device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(normal(seed, dims[0] * dims[1], std), dims),
        device,
    )
}
