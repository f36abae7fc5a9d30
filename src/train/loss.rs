//! Training losses over completion tokens, with TRL's semantics.
//!
//! - SFT: mean cross-entropy over every completion token of the batch (prompt and padding
//!   masked) — TRL's `SFTTrainer` with `completion_only_loss`, i.e. one mean over the batch's
//!   tokens, not a mean of per-example means.
//! - DPO (`sigmoid`): `-log σ(β·((π_c − ref_c) − (π_r − ref_r)))` over *summed* completion
//!   log-probs, mean over pairs (Rafailov et al. 2023; TRL `DPOTrainer`).
//! - IPO: `((π_c − π_r) − (ref_c − ref_r) − 1/(2β))²` over *length-averaged* log-probs, as TRL
//!   computes it (Azar et al. 2023).
//!
//! The reference log-probs are plain numbers here: the trainer computes them with a frozen,
//! non-autodiff copy of the weights, so no graph is kept for them.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::logprobs::LogProbs;

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoVariant {
    /// The original DPO sigmoid loss.
    #[default]
    Sigmoid,
    /// Identity preference optimisation (squared loss on the log-ratio gap).
    Ipo,
}

/// SFT loss: mean negative log-likelihood over all scored tokens of the batch.
///
/// # Shapes
/// → `[1]`
pub fn sft_loss(lp: &LogProbs) -> Tensor<1> {
    let total: usize = lp.counts().iter().sum();
    let sum = (lp.token.clone() * lp.mask.clone()).sum();
    sum.neg() / total.max(1) as f64
}

/// DPO statistics of one batch, as TRL logs them (means over pairs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoStats {
    pub loss: f64,
    /// Mean of `β·(π_c − ref_c)`.
    pub rewards_chosen: f64,
    /// Mean of `β·(π_r − ref_r)`.
    pub rewards_rejected: f64,
    /// Mean of `rewards_chosen − rewards_rejected`.
    pub margins: f64,
    /// Share of pairs whose chosen reward beats the rejected one.
    pub accuracy: f64,
    /// Mean summed log-prob of chosen / rejected completions under the policy.
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// The DPO loss of a batch of pairs and its statistics.
///
/// `chosen`/`rejected` are the policy's log-probs (autodiff); `ref_chosen`/`ref_rejected`
/// the reference's summed log-probs per pair (`[pairs]`, plain numbers).
pub fn dpo_loss(
    chosen: &LogProbs,
    rejected: &LogProbs,
    ref_chosen: &[f64],
    ref_rejected: &[f64],
    beta: f64,
    variant: DpoVariant,
) -> (Tensor<1>, DpoStats) {
    let device = chosen.token.device();
    let pairs = ref_chosen.len();
    let vec = |v: Vec<f64>| {
        Tensor::<1>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [pairs]),
            &device,
        )
    };
    let (pc, pr, rc, rr) = match variant {
        DpoVariant::Sigmoid => (
            chosen.sums(),
            rejected.sums(),
            vec(ref_chosen.to_vec()),
            vec(ref_rejected.to_vec()),
        ),
        DpoVariant::Ipo => {
            // TRL averages log-probs over completion length for IPO.
            let (nc, nr) = (lengths(chosen), lengths(rejected));
            let per =
                |v: &[f64], n: &[f64]| v.iter().zip(n).map(|(a, b)| a / b).collect::<Vec<_>>();
            (
                chosen.sums() / vec(nc.clone()),
                rejected.sums() / vec(nr.clone()),
                vec(per(ref_chosen, &nc)),
                vec(per(ref_rejected, &nr)),
            )
        }
    };
    let logits = (pc.clone() - pr.clone()) - (rc.clone() - rr.clone());
    let losses = match variant {
        DpoVariant::Sigmoid => log_sigmoid(logits * beta).neg(),
        DpoVariant::Ipo => (logits - 1.0 / (2.0 * beta)).powi_scalar(2),
    };
    let loss = losses.mean();

    let host = |t: Tensor<1>| -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .try_to_vec()
            .expect("f64 after convert")
    };
    let (pc_h, pr_h) = (host(chosen.sums()), host(rejected.sums()));
    let reward = |p: &[f64], r: &[f64]| -> Vec<f64> {
        p.iter().zip(r).map(|(a, b)| beta * (a - b)).collect()
    };
    let (rw_c, rw_r) = (reward(&pc_h, ref_chosen), reward(&pr_h, ref_rejected));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let stats = DpoStats {
        loss: host(loss.clone())[0],
        rewards_chosen: mean(&rw_c),
        rewards_rejected: mean(&rw_r),
        margins: mean(
            &rw_c
                .iter()
                .zip(&rw_r)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
        ),
        accuracy: mean(
            &rw_c
                .iter()
                .zip(&rw_r)
                .map(|(a, b)| f64::from(u8::from(a > b)))
                .collect::<Vec<_>>(),
        ),
        logps_chosen: mean(&pc_h),
        logps_rejected: mean(&pr_h),
    };
    (loss, stats)
}

fn lengths(lp: &LogProbs) -> Vec<f64> {
    lp.counts().iter().map(|&n| n.max(1) as f64).collect()
}

/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`, stable for large |x|.
/// `log σ(x)` with its exact derivative `σ(−x)` everywhere, x = 0 included.
///
/// The piecewise form `min(x, 0) − log(1 + e^{−|x|})` has the right value but not the right
/// gradient at 0: autodiff takes `d|x|/dx = sign(0) = 0` and `d min(x, 0)/dx = 1`, so the
/// gradient there is 1 instead of ½. DPO's first step (policy = reference) sits exactly at
/// 0, so that doubled the first gradient, which Adam hides on step 1 (it normalises) but
/// carries in its moments into every later step. burn's `log_sigmoid` has a hand-written
/// backward that is exact and overflow-free.
fn log_sigmoid(x: Tensor<1>) -> Tensor<1> {
    burn::tensor::activation::log_sigmoid(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu;

    /// Value and gradient of `log σ` against the closed forms `−log(1 + e^{−x})` and
    /// `σ(−x) = 1 / (1 + e^{x})`, at 0 and far out on both sides.
    #[test]
    fn log_sigmoid_value_and_gradient_are_exact_including_zero() {
        let xs = [-120.0f64, -3.0, -1e-3, 0.0, 1e-3, 2.5, 120.0];
        let device = cpu().autodiff();
        let x = Tensor::<1>::from_data(
            TensorData::new(xs.iter().map(|&v| v as f32).collect::<Vec<_>>(), [xs.len()]),
            &device,
        )
        .require_grad();
        let y = log_sigmoid(x.clone());
        let values: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
        let grads = y.sum().backward();
        let grad: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        for ((&x, &v), &g) in xs.iter().zip(&values).zip(&grad) {
            let want_v = if x < 0.0 {
                x - (1.0 + x.exp()).ln()
            } else {
                -(1.0 + (-x).exp()).ln()
            };
            let want_g = 1.0 / (1.0 + x.exp());
            assert!(
                (v as f64 - want_v).abs() <= 1e-6 * want_v.abs().max(1.0),
                "log σ({x}) = {v}, want {want_v}"
            );
            assert!(
                (g as f64 - want_g).abs() <= 1e-6,
                "d log σ({x}) = {g}, want {want_g}"
            );
        }
    }
}
