//! Writing an f32 update back into a bf16 parameter: stochastic rounding (the default) or
//! round-to-nearest (the control that shows why it is needed).
//!
//! bf16 keeps 8 significant bits: at |w| ≈ 0.02 its spacing is ~1.2e-4, so an update of ~1e-5
//! (lr 1e-5) rounds to nothing under round-to-nearest, every step, and training silently stops.
//! Stochastic rounding rounds up with probability equal to the fraction of the spacing the
//! exact value passes, so the rounded weight equals the f32 one in expectation and small
//! updates accumulate over steps (Gupta et al. 2015, "Deep learning with limited numerical
//! precision"; Zamirai et al. 2020, "Revisiting BFloat16 training").
//!
//! The noise is counter-based: the 16 random bits of element `i` of parameter `name` at
//! rounding step `n` are a pure function of `(seed, n, name, i)` (SplitMix64), with no global
//! RNG. The seed and `n` are part of the optimizer state file, so a resumed run draws exactly
//! the noise the uninterrupted run would have drawn.
//!
//! Where it runs:
//! - On the CPU (flex) the bits are rounded directly, as above, on the host where the tensor
//!   already lives.
//! - On any other device (CUDA) reading every parameter back would be ~2 × 54 GB of PCIe
//!   traffic per step for the 27B, so the rounding is tensor ops on the device
//!   ([`stochastic_on_device`]): the two bf16 neighbours of each value found with casts, the
//!   far one taken with probability equal to the distance passed, against uniform noise the
//!   device draws from a seed that is the same pure function of `(seed, n, name)`. The
//!   distribution is exactly the host path's; the noise stream is the device's generator's,
//!   so a CUDA run and a CPU run of the same seed round differently (each reproducibly).

use std::sync::Mutex;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::apollo::name_seed;

/// How an f32 update is written back into a bf16 parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Unbiased random rounding from `seed` (the default).
    Stochastic { seed: u64 },
    /// Round to nearest even: small updates are lost (kept as the experiment's control).
    Nearest,
}

impl Default for Rounding {
    fn default() -> Self {
        Rounding::Stochastic { seed: DEFAULT_SEED }
    }
}

/// Seed of the stochastic rounding unless the caller picks another.
pub const DEFAULT_SEED: u64 = 0x5eed_b0f1_6000_0001;

/// SplitMix64 (Steele et al. 2014): one 64-bit output per counter value.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `x` rounded to a bf16 neighbour: up (in magnitude) with probability equal to the fraction of
/// the spacing between the two that `x` passes, given 16 uniform random bits `noise`.
/// Non-finite values are rounded to nearest (NaN stays NaN, ±inf stays ±inf).
pub fn stochastic_bf16(x: f32, noise: u16) -> half::bf16 {
    if !x.is_finite() {
        return half::bf16::from_f32(x);
    }
    // The low 16 bits of an f32 are the part bf16 drops; adding uniform noise below them and
    // truncating carries into the kept bits with exactly that probability. A carry out of the
    // mantissa moves to the next binade correctly; at the top of the range it gives ±inf,
    // which round-to-nearest would give too.
    let bits = x.to_bits().wrapping_add(u32::from(noise));
    half::bf16::from_bits((bits >> 16) as u16)
}

/// Rounds `values` (parameter `name`, rounding step `step`) to bf16 with `seed`'s noise.
pub fn stochastic_round(values: &[f32], seed: u64, step: u64, name: &str) -> Vec<half::bf16> {
    let base = splitmix64(name_seed(seed, name) ^ splitmix64(step));
    values
        .chunks(4)
        .enumerate()
        .flat_map(|(block, chunk)| {
            // One 64-bit draw gives the 16 noise bits of four consecutive elements.
            let word = splitmix64(base.wrapping_add(block as u64));
            chunk
                .iter()
                .enumerate()
                .map(move |(k, &x)| stochastic_bf16(x, (word >> (16 * k)) as u16))
        })
        .collect()
}

/// `updated` (f32) written back as bf16 on its device.
pub fn round_to_bf16<const D: usize>(
    updated: Tensor<D>,
    rounding: Rounding,
    step: u64,
    name: &str,
) -> Tensor<D> {
    match rounding {
        Rounding::Nearest => updated.cast(DType::BF16),
        Rounding::Stochastic { seed } if !on_host(&updated.device()) => {
            stochastic_on_device(updated, seed, step, name)
        }
        Rounding::Stochastic { seed } => {
            let device = updated.device();
            let dims = updated.dims();
            let data = updated.into_data();
            let values = data
                .as_slice::<f32>()
                .expect("the optimizer computes bf16 parameters' updates in f32");
            let rounded = stochastic_round(values, seed, step, name);
            Tensor::from_data(
                TensorData::new(rounded, dims.to_vec()),
                (&device, DType::BF16),
            )
        }
    }
}

/// The flex CPU backend, where the tensor's values already are host memory.
fn on_host(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Serialises the device draws: backends seed one global generator, so two threads drawing
/// noise at once would take each other's numbers.
static NOISE: Mutex<()> = Mutex::new(());

/// Uniform `[0, 1)` noise of `dims` drawn on `device` from the seed of `(seed, step, name)`.
fn device_noise<const D: usize>(
    dims: [usize; D],
    device: &Device,
    seed: u64,
    step: u64,
    name: &str,
) -> Tensor<D> {
    let _draw = NOISE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(splitmix64(name_seed(seed, name) ^ splitmix64(step)));
    let noise = Tensor::random(dims, Distribution::Uniform(0.0, 1.0), (device, DType::F32));
    // A backend that queues work (fusion) must launch the draw while this seed is set, not
    // after the next parameter has reseeded the generator.
    let _ = device.flush();
    noise
}

/// Stochastic rounding of `updated` (f32) to bf16 with tensor ops on its own device; the
/// same distribution as [`stochastic_bf16`], the device's noise (module docs).
pub fn stochastic_on_device<const D: usize>(
    updated: Tensor<D>,
    seed: u64,
    step: u64,
    name: &str,
) -> Tensor<D> {
    let noise = device_noise(updated.dims(), &updated.device(), seed, step, name);
    stochastic_with_noise(updated, noise)
}

/// `x` (f32) rounded to one of its two bf16 neighbours: the far one when `noise` (uniform in
/// `[0, 1)`, same shape) is below the share of the spacing `x` passes beyond the nearest one.
///
/// - `near` = round-to-nearest(x); `d = x − near` is exact in f32 (Sterbenz: they are within
///   a factor of two).
/// - A step of `0.7 · |near| / 128` towards `x` lies strictly between ½ and 1½ spacings from
///   `near` (spacing = |near| · 2⁻⁷ · [½, 1) for a normal bf16, and ½ of that just below a
///   power of two), so rounding `near + step` to nearest lands on the other neighbour `far`.
/// - P(far) = |d| / |far − near|, the probability the host path gives it.
///
/// Edge cases fall to `near` through NaN comparisons: `x` representable (0 / 0), non-finite
/// (`d` is NaN), beyond bf16's range (`near` = ±inf). Values below bf16's normal range round
/// to nearest (their step is smaller than the spacing).
fn stochastic_with_noise<const D: usize>(x: Tensor<D>, noise: Tensor<D>) -> Tensor<D> {
    let near = x.clone().cast(DType::BF16).cast(DType::F32);
    let d = x - near.clone();
    let step = near.clone().abs().mul_scalar(0.7 / 128.0) * d.clone().sign();
    let far = (near.clone() + step).cast(DType::BF16).cast(DType::F32);
    let spacing = (far.clone() - near.clone()).abs();
    let take_far = noise.lower(d.abs() / spacing);
    near.mask_where(take_far, far).cast(DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representable_values_are_unchanged() {
        for x in [0.0f32, 1.0, -0.375, 81.0 / 4096.0, f32::INFINITY] {
            assert_eq!(half::bf16::from_f32(x).to_f32(), x);
            for noise in [0u16, 1, 0x7fff, 0xffff] {
                assert_eq!(stochastic_bf16(x, noise).to_f32(), x, "{x} {noise}");
            }
        }
        assert!(stochastic_bf16(f32::NAN, 5).is_nan());
    }

    #[test]
    fn rounding_is_unbiased() {
        // 0.02 + 1e-5 lies between two bf16 neighbours; the mean of many roundings is it.
        let x = 0.02f32 + 1e-5;
        let values = vec![x; 40_000];
        let rounded = stochastic_round(&values, 7, 3, "w");
        let mean: f64 = rounded.iter().map(|v| f64::from(v.to_f32())).sum::<f64>() / 40_000.0;
        let spacing = 2f64.powi(-13); // bf16 spacing in [2^-6, 2^-5)
                                      // The mean of 40 000 Bernoulli draws scaled by the spacing: σ ≤ spacing / 400.
        assert!(
            (mean - f64::from(x)).abs() < 4.0 * spacing / 400.0,
            "mean {mean} vs {x}"
        );
        let nearest = f64::from(half::bf16::from_f32(x).to_f32());
        assert!(
            (nearest - f64::from(x)).abs() > 5e-6,
            "the control loses the update"
        );
        // Negative values round symmetrically.
        let neg: Vec<f32> = values.iter().map(|v| -v).collect();
        let rneg = stochastic_round(&neg, 7, 3, "w");
        assert!(rneg
            .iter()
            .zip(&rounded)
            .all(|(a, b)| a.to_f32() == -b.to_f32()));
    }

    /// The device path on flex: every result is one of the two bf16 neighbours, the mean is
    /// the exact value (as `rounding_is_unbiased`), representable and non-finite values pass
    /// unchanged, and the same `(seed, step, name)` gives the same result.
    #[test]
    fn the_device_path_is_unbiased_and_reproducible() {
        let device = Device::flex();
        let n = 40_000;
        let x = 0.02f32 + 1e-5;
        let below = half::bf16::from_f32(x).to_f32();
        let spacing = 2f32.powi(-13);
        let (lo, hi) = if below <= x {
            (below, below + spacing)
        } else {
            (below - spacing, below)
        };
        for sign in [1.0f32, -1.0] {
            let t = Tensor::<1>::from_data(TensorData::new(vec![sign * x; n], [n]), &device);
            let r = stochastic_on_device(t, 7, 3, "w");
            assert_eq!(r.dtype(), DType::BF16);
            let v: Vec<f32> = r.cast(DType::F32).into_data().try_to_vec().unwrap();
            assert!(v.iter().all(|&y| y == sign * lo || y == sign * hi));
            let mean = v.iter().map(|&y| f64::from(y)).sum::<f64>() / n as f64;
            let sigma = f64::from(spacing) / 400.0;
            assert!(
                (mean - f64::from(sign * x)).abs() < 4.0 * sigma,
                "mean {mean} vs {}",
                sign * x
            );
        }
        // Just below a power of two the spacing halves; values around 1.0 from both sides,
        // and exact / non-finite ones.
        let xs = vec![
            1.0 - 1e-3,
            1.0 + 1e-3,
            1.0,
            -0.375,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.0e38,
            1e-30,
        ];
        let many: Vec<f32> = xs.iter().flat_map(|&v| vec![v; 4000]).collect();
        let t = Tensor::<1>::from_data(TensorData::new(many.clone(), [many.len()]), &device);
        let a: Vec<half::bf16> = stochastic_on_device(t.clone(), 1, 2, "p")
            .into_data()
            .try_to_vec()
            .unwrap();
        let b: Vec<half::bf16> = stochastic_on_device(t, 1, 2, "p")
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(a, b, "same seed, step and name: same rounding");
        for (k, &v) in xs.iter().enumerate() {
            let got: Vec<f32> = a[k * 4000..(k + 1) * 4000]
                .iter()
                .map(|y| y.to_f32())
                .collect();
            let host: Vec<f32> = stochastic_round(&vec![v; 4000], 9, 9, "h")
                .iter()
                .map(|y| y.to_f32())
                .collect();
            // The same set of outcomes as the host path, with means within noise.
            let outcomes = |s: &[f32]| {
                let mut o: Vec<u32> = s.iter().map(|y| y.to_bits()).collect();
                o.sort_unstable();
                o.dedup();
                o
            };
            assert_eq!(outcomes(&got), outcomes(&host), "{v}");
            if v.is_finite() && outcomes(&got).len() == 2 {
                let mean = |s: &[f32]| s.iter().map(|&y| f64::from(y)).sum::<f64>() / 4000.0;
                let gap = f64::from(half::bf16::from_f32(v).to_f32() - v).abs() * 2.0;
                assert!((mean(&got) - f64::from(v)).abs() < gap, "{v}");
            }
        }
    }

    #[test]
    fn noise_depends_on_seed_step_and_name_only() {
        let values: Vec<f32> = (0..64).map(|i| 0.01 + i as f32 * 1e-6).collect();
        let a = stochastic_round(&values, 1, 2, "p");
        assert_eq!(a, stochastic_round(&values, 1, 2, "p"));
        assert_ne!(a, stochastic_round(&values, 1, 3, "p"));
        assert_ne!(a, stochastic_round(&values, 2, 2, "p"));
        assert_ne!(a, stochastic_round(&values, 1, 2, "q"));
    }
}
