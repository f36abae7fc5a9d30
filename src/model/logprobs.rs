//! Per-token log-probabilities of completions given prompts: the one API under the SFT and
//! DPO losses, the probes, and `dreamloop logprobs`.
//!
//! A [`ScoredSeq`] is the full token sequence (prompt + completion) and the index of its
//! first scored token. Sequences of different lengths are right-padded into one batch; the
//! returned mask says which target positions count. Whether gradients flow is decided by the
//! weights: pass autodiff weights to train, `valid()` weights to only measure.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use super::llama::CausalLm;

/// One sequence to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredSeq {
    /// Prompt followed by completion.
    pub ids: Vec<u32>,
    /// Index of the first token whose log-probability is scored (the completion's start;
    /// 1 to score every next token).
    pub score_from: usize,
}

/// Log-probabilities of a batch, aligned on target positions.
pub struct LogProbs {
    /// `[batch, seq - 1]`: `log p(ids[t + 1] | ids[..= t])`.
    pub token: Tensor<2>,
    /// `[batch, seq - 1]`: 1.0 where target `t + 1` is scored, 0.0 for prompt and padding.
    pub mask: Tensor<2>,
    /// The same mask on the host, for callers that report per-token values.
    pub mask_host: Vec<Vec<bool>>,
}

impl LogProbs {
    /// Sum of the scored log-probs of each sequence.
    ///
    /// # Shapes
    /// → `[batch]`
    pub fn sums(&self) -> Tensor<1> {
        (self.token.clone() * self.mask.clone())
            .sum_dim(1)
            .squeeze_dim(1)
    }

    /// Number of scored tokens of each sequence.
    pub fn counts(&self) -> Vec<usize> {
        self.mask_host
            .iter()
            .map(|r| r.iter().filter(|m| **m).count())
            .collect()
    }

    /// Scored log-probs per sequence, on the host (a CPU–GPU sync point).
    pub fn scored_host(&self) -> Vec<Vec<f32>> {
        let [batch, width] = self.token.dims();
        let values: Vec<f32> = self
            .token
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 after convert");
        (0..batch)
            .map(|b| {
                (0..width)
                    .filter(|&t| self.mask_host[b][t])
                    .map(|t| values[b * width + t])
                    .collect()
            })
            .collect()
    }
}

/// Right-pads `seqs` into `[batch, seq]` ids and a 0/1 attention mask.
pub fn pad_batch(seqs: &[ScoredSeq], pad_id: u32) -> (Vec<i64>, Vec<Vec<u8>>, usize) {
    let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut mask = Vec::with_capacity(seqs.len());
    for s in seqs {
        ids.extend(s.ids.iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(pad_id as i64, width - s.ids.len()));
        let mut row = vec![1u8; s.ids.len()];
        row.resize(width, 0);
        mask.push(row);
    }
    (ids, mask, width)
}

/// Log-probs of every scored token of every sequence, in one batched forward pass.
///
/// Every sequence must have at least two tokens and `score_from ≥ 1`.
pub fn logprobs(lm: &CausalLm, seqs: &[ScoredSeq], pad_id: u32) -> LogProbs {
    let device = lm.device();
    let batch = seqs.len();
    let (ids, attention, width) = pad_batch(seqs, pad_id);
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [batch, width]), &device);
    let logits = lm.forward(input, Some(&attention));
    let [_, _, vocab] = logits.dims();
    let logp = log_softmax(logits.narrow(1, 0, width - 1), 2);
    let targets: Vec<i64> = (0..batch)
        .flat_map(|b| ids[b * width + 1..(b + 1) * width].to_vec())
        .collect();
    let targets =
        Tensor::<2, Int>::from_data(TensorData::new(targets, [batch, width - 1]), &device);
    let token = logp
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .reshape([batch, width - 1]);
    debug_assert!(vocab > 0);
    let mask_host: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| {
            (0..width - 1)
                .map(|t| t + 1 >= s.score_from.max(1) && t + 1 < s.ids.len())
                .collect()
        })
        .collect();
    let flat: Vec<f32> = mask_host
        .iter()
        .flatten()
        .map(|&m| if m { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::<2>::from_data(TensorData::new(flat, [batch, width - 1]), &device);
    LogProbs {
        token,
        mask,
        mask_host,
    }
}
