//! GGUF file → Hugging Face model directory (f32 safetensors, config, tokenizer, template).
//!
//! The directory is what `transformers.AutoModelForCausalLM.from_pretrained(dir)` and
//! dreamloop's own loader read: `config.json`, `generation_config.json`, `model.safetensors`
//! (float32, HF names and row-major shapes, Q/K rows in HF order, no `lm_head.weight` when
//! the embeddings are tied, as `save_pretrained` writes it), `tokenizer.json`,
//! `tokenizer_config.json` and `chat_template.jinja`.
//!
//! Everything is written into a temporary sibling directory, fsynced, and renamed into place
//! at the end, so a crash or an error never leaves a half-written model behind.

use super::llama::{hf_tensor, required_hf_tensors, unpermute_qk_rows, LlamaParams};
use super::tokenizer::hf_tokenizer;
use super::{GgmlType, GgufError, GgufFile};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The finished model directory.
    pub out_dir: PathBuf,
    /// The model's hyperparameters (also in `config.json`).
    pub params: LlamaParams,
    /// Tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Total parameters written.
    pub parameters: u64,
    /// How many source tensors had each ggml type.
    pub source_types: BTreeMap<GgmlType, usize>,
    /// Wall time of the whole import.
    pub elapsed: Duration,
}

/// A dequantised f32 tensor handed to the safetensors writer.
struct F32Tensor {
    /// Row-major shape (HF order).
    shape: Vec<usize>,
    /// The values.
    data: Vec<f32>,
}

impl View for &F32Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // safetensors is little-endian, as is every target dreamloop builds for.
        Cow::Borrowed(bytemuck::cast_slice(&self.data))
    }

    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Imports the GGUF `llama` model at `gguf` as a Hugging Face directory at `out_dir`.
///
/// `out_dir` must not exist, or be an empty directory; its parent must exist.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportReport, GgufError> {
    let start = Instant::now();
    if let Ok(mut entries) = fs::read_dir(out_dir) {
        if entries.next().is_some() {
            return Err(GgufError::OutputExists(out_dir.to_owned()));
        }
    } else if out_dir.exists() {
        return Err(GgufError::OutputExists(out_dir.to_owned()));
    }
    let bytes = fs::read(gguf).map_err(io_err(gguf))?;
    let file = GgufFile::parse(&bytes).map_err(|e| GgufError::InFile {
        path: gguf.to_owned(),
        source: Box::new(e),
    })?;
    let params = LlamaParams::from_gguf(&file)?;
    let tokenizer = hf_tokenizer(&file, params.context_length)?;
    let tokenizer_bytes = serde_json::to_vec(&tokenizer.tokenizer_json)?;
    tokenizers::Tokenizer::from_bytes(&tokenizer_bytes)
        .map_err(|e| GgufError::TokenizerInvalid(e.to_string()))?;

    let mut tensors: BTreeMap<String, F32Tensor> = BTreeMap::new();
    let mut source_types = BTreeMap::new();
    for info in &file.tensors {
        let target = hf_tensor(&info.name, &params).ok_or_else(|| GgufError::Unsupported {
            what: "tensor in a llama GGUF",
            value: info.name.clone(),
        })?;
        let shape = info.row_major_shape();
        let mut data = file.dequantize(info)?;
        if let Some(n_head) = target.unpermute_heads {
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.iter().skip(1).product();
            data =
                unpermute_qk_rows(&data, rows, cols, n_head).map_err(|e| GgufError::InTensor {
                    name: info.name.clone(),
                    source: Box::new(e),
                })?;
        }
        *source_types.entry(info.ty).or_insert(0) += 1;
        tensors.insert(target.name, F32Tensor { shape, data });
    }
    for name in required_hf_tensors(&params) {
        if !tensors.contains_key(&name) {
            return Err(GgufError::MissingTensor { name });
        }
    }
    check_shapes(&params, &tensors)?;
    let parameters = tensors.values().map(|t| t.data.len() as u64).sum();

    let tmp = temp_sibling(out_dir)?;
    let written = write_dir(&tmp, &params, &tokenizer_bytes, &tokenizer, &tensors);
    if let Err(e) = written {
        // Best effort: the error being reported matters more than a failed cleanup.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out_dir.exists() {
        fs::remove_dir(out_dir).map_err(io_err(out_dir))?;
    }
    fs::rename(&tmp, out_dir).map_err(io_err(out_dir))?;
    if let Some(parent) = out_dir.parent() {
        sync_dir(parent)?;
    }
    let report = ImportReport {
        out_dir: out_dir.to_owned(),
        params,
        tensors: tensors.len(),
        parameters,
        source_types,
        elapsed: start.elapsed(),
    };
    tracing::info!(
        gguf = %gguf.display(),
        out_dir = %out_dir.display(),
        tensors = report.tensors,
        parameters = report.parameters,
        seconds = report.elapsed.as_secs_f64(),
        "Imported GGUF model."
    );
    Ok(report)
}

/// Checks each HF tensor's shape against the hyperparameters (catches a GGUF whose metadata
/// and tensors disagree before anything is written).
fn check_shapes(p: &LlamaParams, tensors: &BTreeMap<String, F32Tensor>) -> Result<(), GgufError> {
    let (h, f, v) = (p.embedding_length, p.feed_forward_length, p.vocab_size);
    let q = p.head_count * p.head_dim;
    let kv = p.head_count_kv * p.head_dim;
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    expected.insert("model.embed_tokens.weight".into(), vec![v, h]);
    expected.insert("model.norm.weight".into(), vec![h]);
    expected.insert("lm_head.weight".into(), vec![v, h]);
    for l in 0..p.block_count {
        let pre = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.bias", vec![h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            expected.insert(format!("{pre}.{name}"), shape);
        }
    }
    for (name, t) in tensors {
        match expected.get(name) {
            Some(shape) if *shape == t.shape => {}
            Some(shape) => {
                return Err(GgufError::BadModel(format!(
                    "{name} has shape {:?}, the metadata implies {shape:?}",
                    t.shape
                )))
            }
            None => {
                return Err(GgufError::Unsupported {
                    what: "tensor in a llama GGUF",
                    value: name.clone(),
                })
            }
        }
    }
    Ok(())
}

/// A fresh hidden directory next to `out_dir` (same filesystem, so the final rename is atomic).
fn temp_sibling(out_dir: &Path) -> Result<PathBuf, GgufError> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned());
    let tmp = parent.join(format!(".{name}.importing-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

fn write_dir(
    dir: &Path,
    params: &LlamaParams,
    tokenizer_bytes: &[u8],
    tokenizer: &super::tokenizer::HfTokenizer,
    tensors: &BTreeMap<String, F32Tensor>,
) -> Result<(), GgufError> {
    let pretty = |v: &serde_json::Value| -> Result<Vec<u8>, GgufError> {
        let mut out = serde_json::to_vec_pretty(v)?;
        out.push(b'\n');
        Ok(out)
    };
    write_synced(&dir.join("config.json"), &pretty(&params.hf_config())?)?;
    write_synced(
        &dir.join("generation_config.json"),
        &pretty(&params.hf_generation_config())?,
    )?;
    write_synced(&dir.join("tokenizer.json"), tokenizer_bytes)?;
    write_synced(
        &dir.join("tokenizer_config.json"),
        &pretty(&tokenizer.tokenizer_config)?,
    )?;
    if let Some(template) = &tokenizer.chat_template {
        write_synced(&dir.join("chat_template.jinja"), template.as_bytes())?;
    }
    let st_path = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &st_path)?;
    fs::File::open(&st_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&st_path))?;
    sync_dir(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), GgufError> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), GgufError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}
