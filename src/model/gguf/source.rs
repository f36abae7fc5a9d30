//! A GGUF file as a [`TensorSource`]: the model loads straight from llama.cpp's format,
//! with the same Hugging Face names, shapes and Q/K row order an import writes.
//!
//! Each tensor is dequantised on demand ([`super::dequant`]) and, for `q_proj`/`k_proj`,
//! un-permuted back to HF's `rotate_half` row order ([`unpermute_qk_rows`]) — exactly the
//! steps [`super::import_gguf`] takes before writing f32 safetensors, so a model read here
//! and one read from the imported directory hold bit-identical weights.
//!
//! Memory: the file is memory-mapped and only one tensor is dequantised at a time, so loading
//! costs the f32 model plus one tensor, not a second copy of everything.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, TensorData};

use super::llama::{hf_tensor, unpermute_qk_rows, LlamaParams};
use super::tokenizer::{hf_tokenizer, HfTokenizer};
use super::{dequant, GgufError, GgufFile, TensorInfo};
use crate::model::weights::{TensorSource, WeightError};

/// Where one HF tensor lives in the GGUF file.
#[derive(Debug, Clone)]
struct Entry {
    /// The GGUF tensor's description (type, dims, offset inside the data section).
    info: TensorInfo,
    /// Heads to un-permute Q/K rows over; `None` for every other tensor.
    unpermute_heads: Option<usize>,
}

/// Tensors of a GGUF `llama` model under their Hugging Face names.
pub struct GgufSource {
    /// The file, for error messages.
    path: PathBuf,
    /// The whole file, memory-mapped; tensor bytes are sliced from it on demand.
    map: memmap2::Mmap,
    /// Absolute offset of the tensor data section (alignment applied).
    data_offset: u64,
    /// HF name → where it is stored.
    index: BTreeMap<String, Entry>,
    /// HF names already handed out, so `finish` can name the ones the model left unused.
    taken: HashSet<String>,
    /// The model's hyperparameters (they become `config.json`).
    pub params: LlamaParams,
    /// The tokenizer files transformers would build from the same metadata.
    pub tokenizer: HfTokenizer,
    device: Device,
}

impl GgufSource {
    /// Maps `path`, parses its header, and indexes its tensors by HF name. Errors if the
    /// architecture is not `llama`, a tensor has no HF counterpart, or the tokenizer metadata
    /// is unsupported — the same checks an import makes.
    pub fn open(path: &Path, device: &Device) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the model file is read-only for the lifetime of this source; a file
        // truncated underneath us is the same hazard every mmap-based loader accepts.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let in_file = |e: GgufError| GgufError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let parsed = GgufFile::parse(&map).map_err(in_file)?;
        let params = LlamaParams::from_gguf(&parsed).map_err(in_file)?;
        let tokenizer = hf_tokenizer(&parsed, params.context_length).map_err(in_file)?;
        let mut index = BTreeMap::new();
        for info in &parsed.tensors {
            let target = hf_tensor(&info.name, &params).ok_or_else(|| GgufError::Unsupported {
                what: "tensor in a llama GGUF",
                value: info.name.clone(),
            })?;
            index.insert(
                target.name,
                Entry {
                    info: info.clone(),
                    unpermute_heads: target.unpermute_heads,
                },
            );
        }
        let data_offset = parsed.data_offset;
        Ok(GgufSource {
            path: path.to_owned(),
            map,
            data_offset,
            index,
            taken: HashSet::new(),
            params,
            tokenizer,
            device: device.clone(),
        })
    }

    fn format_error(&self, name: &str, e: GgufError) -> WeightError {
        WeightError::Format {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        }
    }
}

impl TensorSource for GgufSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.into() })?;
        let found = entry.info.row_major_shape();
        if found != shape {
            return Err(WeightError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                found,
            });
        }
        // In bounds: `GgufFile::parse` checked every tensor's data lies inside the file.
        let start = (self.data_offset + entry.info.offset) as usize;
        let bytes = &self.map[start..start + entry.info.n_bytes as usize];
        let n = entry.info.n_elements as usize;
        let mut values =
            dequant::dequantize(entry.info.ty, bytes, n).map_err(|e| self.format_error(name, e))?;
        if let Some(n_head) = entry.unpermute_heads {
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.iter().skip(1).product();
            values = unpermute_qk_rows(&values, rows, cols, n_head)
                .map_err(|e| self.format_error(name, e))?;
        }
        self.taken.insert(name.to_owned());
        Ok(TensorData::new(values, shape.to_vec()))
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn finish(&mut self) -> Result<(), WeightError> {
        let extra: Vec<String> = self
            .index
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .cloned()
            .collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(WeightError::Extra { names: extra })
        }
    }
}
