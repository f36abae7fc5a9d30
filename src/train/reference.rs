//! The DPO reference: log-probs of each pair under the starting model, which never changes.
//!
//! - [`Reference::Resident`]: a frozen copy of the weights in memory. It shares the policy's
//!   buffers until the first optimizer step replaces them; from then on it is a second
//!   model's worth of memory (54 GB for the operator's 27B in bf16).
//! - [`Reference::Streamed`]: the starting model's safetensors files, memory-mapped and read
//!   one decoder layer at a time, forward only, for each batch of pairs: memory of one layer
//!   plus the batch's hidden states. TRL's `precompute_ref_log_probs` computes these once
//!   for a whole dataset before training; online, the trainer computes them for the batch it
//!   is about to train on, all of its pairs in one pass over the files.
//!
//! - [`Reference::Absent`]: no reference at all, for SFT-only training.
//!
//! Both give the same numbers: the same tensors from the same files through the same layer
//! code, in the same order.
//!
//! A streamed reference reads the whole model once per pass, so its passes are made for
//! blocks of pairs: [`Trainer::precompute_reference`](super::trainer::Trainer::precompute_reference)
//! computes a block of queued pairs in one pass and stores each pair's sums with it
//! ([`PairReference`]), keyed by [`pair_key`]: the reference's [`fingerprint`](StreamedReference::fingerprint)
//! and the sequences as the step will feed them. The step uses a stored pair whose key is its
//! own and computes the rest itself.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use burn::tensor::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::model::config::LayerKind;
use crate::model::llama::{tied_logits, DecoderLayer, ForwardContext, Linear, RmsNorm};
use crate::model::logprobs::{logprobs_chunked, token_logprobs, Padded, ScoredSeq};
use crate::model::weights::{CheckpointLayout, SafetensorsSource, TensorSource, TextSource};
use crate::model::{CausalLm, ModelConfig, ModelError, Precision, WeightError};

/// Where the reference log-probs come from (see the module docs).
#[derive(Clone)]
pub enum Reference {
    /// Frozen weights in memory (no autodiff).
    Resident(CausalLm),
    /// The starting model's files, read layer by layer.
    Streamed(StreamedReference),
    /// None: SFT only (`dreamloop train --phase sft`, `dreamloop device-check step`), where a
    /// resident copy would be a second model's worth of memory that nothing reads. A DPO
    /// pair is refused ([`WeightError::NoReference`]).
    Absent,
}

impl Reference {
    /// Summed scored log-probs of each sequence, the vocabulary projected `chunk` positions
    /// at a time (0 = all at once).
    pub fn sums(
        &self,
        seqs: &[ScoredSeq],
        pad_id: u32,
        chunk: usize,
    ) -> Result<Vec<f64>, WeightError> {
        let per_token = match self {
            Reference::Resident(lm) => logprobs_chunked(lm, seqs, pad_id, chunk).scored_host(),
            Reference::Streamed(s) => return s.sums(seqs, pad_id, chunk),
            Reference::Absent => return Err(WeightError::NoReference),
        };
        Ok(sum_rows(&per_token))
    }

    /// What identifies this reference's numbers across restarts, for stored pairs (see the
    /// module docs): a streamed reference's files. `None` for a resident one (its pairs are
    /// computed in the step, where they cost one forward without any file reads) and for
    /// none.
    pub fn fingerprint(&self) -> Option<u64> {
        match self {
            Reference::Streamed(s) => Some(s.fingerprint),
            Reference::Resident(_) | Reference::Absent => None,
        }
    }
}

/// The key of a pair's stored reference log-probs: the reference's fingerprint and both
/// sequences exactly as the step scores them (ids and where scoring starts).
pub fn pair_key(fingerprint: u64, chosen: &ScoredSeq, rejected: &ScoredSeq) -> u64 {
    let mut h = Sha256::new();
    h.update(b"dreamloop.pair-reference.v1");
    h.update(fingerprint.to_le_bytes());
    for seq in [chosen, rejected] {
        h.update((seq.ids.len() as u64).to_le_bytes());
        for id in &seq.ids {
            h.update(id.to_le_bytes());
        }
        h.update((seq.score_from as u64).to_le_bytes());
    }
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// A streamed reference's fingerprint: the directory, the dtype its weights are read in, and
/// the name, size and modification time of each file in it, so that replaced weights (or a
/// bf16 run's reference read in f32) never reuse stored numbers.
fn fingerprint(dir: &Path, precision: Precision) -> Result<u64, ModelError> {
    let io = |source: std::io::Error| {
        ModelError::Weights(WeightError::Io {
            path: dir.to_path_buf(),
            source,
        })
    };
    let mut h = Sha256::new();
    h.update(b"dreamloop.reference-files.v1");
    let canonical = dir.canonicalize().map_err(io)?;
    h.update(canonical.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(format!("{precision:?}").as_bytes());
    let mut files: Vec<(String, u64, u128)> = Vec::new();
    for entry in std::fs::read_dir(&canonical).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".safetensors") || name.ends_with(".json")) {
            continue;
        }
        let meta = entry.metadata().map_err(io)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push((name, meta.len(), mtime));
    }
    files.sort();
    for (name, len, mtime) in files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    let digest = h.finalize();
    Ok(u64::from_le_bytes(
        digest[..8].try_into().expect("sha256 has 32 bytes"),
    ))
}

fn sum_rows(per_token: &[Vec<f32>]) -> Vec<f64> {
    per_token
        .iter()
        .map(|v| v.iter().map(|&x| f64::from(x)).sum())
        .collect()
}

/// A Hugging Face model directory used as a forward-only reference, one layer in memory at
/// a time.
#[derive(Debug, Clone)]
pub struct StreamedReference {
    dir: PathBuf,
    config: ModelConfig,
    /// A device without autodiff: nothing here is trained.
    device: Device,
    /// The dtype the weights are read into: the policy's, so that reference and policy
    /// agree exactly at the start.
    precision: Precision,
    /// See [`StreamedReference::fingerprint`].
    fingerprint: u64,
}

impl StreamedReference {
    /// The model in `dir` (`config.json` and `model.safetensors` or its sharded index), read
    /// onto `device` when used. The files' headers are checked now; a missing or misshapen
    /// tensor is reported by name at the first use.
    pub fn open(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::open_as(dir, device, Precision::F32)
    }

    /// [`open`](Self::open) with the weights read in `precision` (a bf16 run's reference is
    /// bf16, as its resident copy would be).
    pub fn open_as(dir: &Path, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        SafetensorsSource::open(dir, device)?;
        Ok(StreamedReference {
            dir: dir.to_path_buf(),
            config,
            device: device.clone().inner(),
            precision,
            fingerprint: fingerprint(dir, precision)?,
        })
    }

    /// Identifies the numbers this reference gives (see the module docs): taken when it is
    /// opened, from the directory, the dtype and each file's name, size and mtime.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The directory the reference is read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Summed scored log-probs of each sequence: embedding, every layer loaded once, applied
    /// to each bucket of sequences and dropped, then the final norm and the head `chunk`
    /// positions at a time. The sequences are sorted by length into buckets of at most
    /// [`BUCKET_SEQUENCES`], each padded only to its own longest: a block of many pairs
    /// costs one read of the files, the compute of its real tokens, and the working set of
    /// one bucket.
    pub fn sums(
        &self,
        seqs: &[ScoredSeq],
        pad_id: u32,
        chunk: usize,
    ) -> Result<Vec<f64>, WeightError> {
        let cfg = &self.config;
        let mut files =
            SafetensorsSource::open_as(&self.dir, &self.device, self.precision.dtype())?;
        let mut src = TextSource {
            inner: &mut files,
            layout: CheckpointLayout {
                text_prefix: (cfg.text_prefix != "model.").then(|| cfg.text_prefix.clone()),
                passthrough: Vec::new(),
            },
        };
        let hidden = cfg.hidden_size;
        let has_gdn =
            cfg.linear_attn.is_some() && cfg.layer_types.contains(&LayerKind::LinearAttention);
        // Longest first, so the first bucket's width bounds every other's.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
        let mut buckets: Vec<Bucket> = order
            .chunks(BUCKET_SEQUENCES)
            .map(|rows| {
                let part: Vec<ScoredSeq> = rows.iter().map(|&i| seqs[i].clone()).collect();
                let padded = Padded::new(&part, pad_id);
                let ctx = ForwardContext::new(
                    &cfg.inv_freq(),
                    cfg.sliding_window,
                    has_gdn,
                    (padded.batch, padded.width),
                    Some(&padded.attention),
                    (&self.device, self.precision.dtype()),
                );
                Bucket {
                    rows: rows.to_vec(),
                    padded,
                    ctx,
                    x: None,
                }
            })
            .collect();
        let embedding = src.take2("model.embed_tokens.weight", [cfg.vocab_size, hidden])?;
        for b in &mut buckets {
            b.x = Some(burn::tensor::module::embedding(
                embedding.clone(),
                b.padded.input(&self.device),
            ));
        }
        // Kept only when it is also the head.
        let embedding = cfg.tie_word_embeddings.then_some(embedding);
        for i in 0..cfg.num_hidden_layers {
            let layer = DecoderLayer::load(cfg, &mut src, i)?;
            for b in &mut buckets {
                let x = b.x.take().expect("every bucket has its hidden states");
                b.x = Some(layer.forward(x, &b.ctx, false).0);
            }
        }
        let (eps, offset) = (cfg.rms_norm_eps, cfg.norm_unit_offset);
        let norm = RmsNorm::load(&mut src, "model.norm", hidden, eps, offset)?;
        let head = match embedding {
            Some(_) => None,
            None => Some(Linear::load(
                &mut src,
                "lm_head",
                cfg.vocab_size,
                hidden,
                false,
            )?),
        };
        let logits = |h: Tensor<3>| match (&head, &embedding) {
            (Some(linear), _) => linear.forward(h),
            (None, Some(weight)) => tied_logits(h, weight.clone()),
            (None, None) => unreachable!("a head or a tied embedding was loaded"),
        };
        let mut out = vec![0.0; seqs.len()];
        for b in buckets {
            let x = b.x.expect("every bucket has its hidden states");
            let token = token_logprobs(&logits, norm.forward(x), &b.padded, chunk);
            let sums = sum_rows(&b.padded.log_probs(token).scored_host());
            for (&row, sum) in b.rows.iter().zip(sums) {
                out[row] = sum;
            }
        }
        Ok(out)
    }
}

/// Sequences per bucket of a streamed reference pass (see [`StreamedReference::sums`]): one
/// step's pairs fit one bucket; a block of pairs is several.
pub const BUCKET_SEQUENCES: usize = 8;

/// Sequences of similar length that go through the layers together.
struct Bucket {
    /// Their indices in the caller's order.
    rows: Vec<usize>,
    padded: Padded,
    ctx: ForwardContext,
    /// Hidden states between layers.
    x: Option<Tensor<3>>,
}
