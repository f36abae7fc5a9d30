//! Per-token log-probabilities of completions given prompts: the one API under the SFT and
//! DPO losses, the probes, and `dreamloop logprobs`.
//!
//! A [`ScoredSeq`] is the full token sequence (prompt + completion) and the index of its
//! first scored token. Sequences of different lengths are right-padded into one batch; the
//! returned mask says which target positions count. Whether gradients flow is decided by the
//! weights: pass autodiff weights to train, `valid()` weights to only measure.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

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

/// A batch of scored sequences laid out for one forward pass: right-padded ids, the
/// attention mask, the next-token targets and the scoring mask.
pub(crate) struct Padded {
    pub batch: usize,
    /// Padded length.
    pub width: usize,
    /// `[batch, width]` ids, row-major.
    pub ids: Vec<i64>,
    /// Per row, 1 for tokens and 0 for padding.
    pub attention: Vec<Vec<u8>>,
    /// `[batch, width - 1]` row-major: the target of position `t` is `ids[t + 1]`.
    pub targets: Vec<i64>,
    /// `[batch][width - 1]`: whether target `t + 1` is scored.
    pub mask_host: Vec<Vec<bool>>,
}

impl Padded {
    /// Every sequence must have at least two tokens and `score_from ≥ 1`.
    pub fn new(seqs: &[ScoredSeq], pad_id: u32) -> Self {
        let batch = seqs.len();
        let (ids, attention, width) = pad_batch(seqs, pad_id);
        let targets: Vec<i64> = (0..batch)
            .flat_map(|b| ids[b * width + 1..(b + 1) * width].to_vec())
            .collect();
        let mask_host: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| {
                (0..width - 1)
                    .map(|t| t + 1 >= s.score_from.max(1) && t + 1 < s.ids.len())
                    .collect()
            })
            .collect();
        Padded {
            batch,
            width,
            ids,
            attention,
            targets,
            mask_host,
        }
    }

    /// The ids as a tensor.
    ///
    /// # Shapes
    /// → `[batch, width]`
    pub fn input(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(
            TensorData::new(self.ids.clone(), [self.batch, self.width]),
            device,
        )
    }

    /// Wraps per-target log-probs `[batch, width - 1]` with the scoring mask.
    pub fn log_probs(&self, token: Tensor<2>) -> LogProbs {
        let device = token.device();
        let flat: Vec<f32> = self
            .mask_host
            .iter()
            .flatten()
            .map(|&m| if m { 1.0 } else { 0.0 })
            .collect();
        let mask =
            Tensor::<2>::from_data(TensorData::new(flat, [self.batch, self.width - 1]), &device);
        LogProbs {
            token,
            mask,
            mask_host: self.mask_host.clone(),
        }
    }
}

/// Log-probs of every scored token of every sequence, in one batched forward pass.
///
/// Every sequence must have at least two tokens and `score_from ≥ 1`.
pub fn logprobs(lm: &CausalLm, seqs: &[ScoredSeq], pad_id: u32) -> LogProbs {
    logprobs_chunked(lm, seqs, pad_id, 0)
}

/// [`logprobs`] with the vocabulary projection and log-softmax done `chunk` target positions
/// at a time (0 = all at once), so `[tokens × vocab]` logits never exist whole. Meant for
/// forward-only weights (the DPO reference, probes): with autodiff weights every chunk's
/// log-softmax would still be kept for backward — the trainer's recomputed head
/// ([`crate::train::recompute`]) is the training path.
pub fn logprobs_chunked(lm: &CausalLm, seqs: &[ScoredSeq], pad_id: u32, chunk: usize) -> LogProbs {
    let padded = Padded::new(seqs, pad_id);
    let normed = lm.hidden_states(padded.input(&lm.device()), Some(&padded.attention), None);
    let token = token_logprobs(&|h| lm.logits_from_hidden(h), normed, &padded, chunk);
    padded.log_probs(token)
}

/// `log p(ids[t + 1] | ids[..= t])` from final-normed hidden states through the head
/// `logits`, `chunk` target positions at a time (0 = the whole batch in one matmul).
///
/// # Shapes
/// `normed: [batch, width, hidden]` → `[batch, width - 1]`
pub(crate) fn token_logprobs(
    logits: &dyn Fn(Tensor<3>) -> Tensor<3>,
    normed: Tensor<3>,
    padded: &Padded,
    chunk: usize,
) -> Tensor<2> {
    let (batch, width) = (padded.batch, padded.width);
    let [_, _, hidden] = normed.dims();
    if chunk == 0 {
        let device = normed.device();
        let logp = log_softmax(logits(normed).narrow(1, 0, width - 1), 2);
        let targets = Tensor::<2, Int>::from_data(
            TensorData::new(padded.targets.clone(), [batch, width - 1]),
            &device,
        );
        return logp
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .reshape([batch, width - 1]);
    }
    let rows = normed
        .narrow(1, 0, width - 1)
        .reshape([batch * (width - 1), hidden]);
    normed_rows_logprobs(logits, rows, &padded.targets, chunk).reshape([batch, width - 1])
}

/// `log p(target)` of each row of final-normed hidden states, `chunk` rows at a time
/// (0 = all at once): `logits` (the LM head), log-softmax over the vocabulary, gather.
///
/// # Shapes
/// `rows: [n, hidden]`, `targets: n` → `[n]`; `logits`: `[1, len, hidden]` → `[1, len, vocab]`
pub(crate) fn normed_rows_logprobs(
    logits: &dyn Fn(Tensor<3>) -> Tensor<3>,
    rows: Tensor<2>,
    targets: &[i64],
    chunk: usize,
) -> Tensor<1> {
    let [n, _] = rows.dims();
    let device = rows.device();
    let chunk = if chunk == 0 { n } else { chunk.min(n) };
    let parts: Vec<Tensor<1>> = (0..n)
        .step_by(chunk.max(1))
        .map(|start| {
            let len = chunk.min(n - start);
            let logits = logits(rows.clone().narrow(0, start, len).unsqueeze_dim(0));
            let target = Tensor::<3, Int>::from_data(
                TensorData::new(targets[start..start + len].to_vec(), [1, len, 1]),
                &device,
            );
            log_softmax(logits, 2).gather(2, target).reshape([len])
        })
        .collect();
    Tensor::cat(parts, 0)
}
