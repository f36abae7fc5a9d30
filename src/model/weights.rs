//! Weight I/O in Hugging Face's format: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; bf16/f16/f32 on disk, f32 or bf16 in memory.
//!
//! A source decodes each tensor's bytes straight into the target dtype ([`TensorSource::dtype`]):
//! a bf16 model never has an f32 copy of its weights, not even one tensor at a time from a
//! bf16 file. Saving borrows a parameter's bytes when they already are the disk dtype.
//!
//! Loading goes through [`TensorSource`]: the model asks for each tensor by its checkpoint
//! name and shape, so a missing tensor, a wrong shape, and (at [`TensorSource::finish`]) an
//! extra tensor are errors that name the tensor. Saving walks the module's parameters by
//! path and writes exactly the names, shapes and dtypes that were loaded, with
//! `config.json`, so transformers and vLLM load the directory unchanged.
//!
//! A multimodal qwen3_5 checkpoint keeps its text decoder under `model.language_model.*`:
//! [`TextSource`] maps the decoder's `model.*` names there, and tensors dreamloop does not
//! train (`model.visual.*`, the multi-token-prediction head `mtp.*`) are carried through
//! byte for byte ([`RawTensor`]) so that a save loses nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use std::borrow::Cow;

use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Why weights could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}, only F32, BF16 and F16 are supported")]
    Dtype { name: String, dtype: String },
    #[error("the checkpoint has tensors the model does not use: {names:?}")]
    Extra { names: Vec<String> },
    /// DPO log-probs asked of a trainer made without a reference (SFT only).
    #[error("no DPO reference: this trainer was made for SFT only")]
    NoReference,
}

/// Storage dtype of a tensor on disk; kept so a save writes what was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    Bf16,
    F16,
}

/// Where the model gets its tensors from, by checkpoint name.
pub trait TensorSource {
    /// The tensor `name` with exactly `shape`, on the host, preferably already in
    /// [`dtype`](TensorSource::dtype) (any float dtype is converted when it becomes a tensor).
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError>;
    /// The device tensors are created on.
    fn device(&self) -> Device;
    /// Called after the model took everything it needs: unused tensors are an error.
    fn finish(&mut self) -> Result<(), WeightError>;
    /// The dtype the weights live in on the device (f32 unless the source was opened for bf16).
    fn dtype(&self) -> DType {
        DType::F32
    }

    fn take3(&mut self, name: &str, shape: [usize; 3]) -> Result<Tensor<3>, WeightError> {
        let data = self.take(name, &shape)?;
        Ok(Tensor::from_data(data, (&self.device(), self.dtype())))
    }
    fn take1(&mut self, name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        let data = self.take(name, &[len])?;
        Ok(Tensor::from_data(data, (&self.device(), self.dtype())))
    }
    fn take2(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<2>, WeightError> {
        let data = self.take(name, &shape)?;
        Ok(Tensor::from_data(data, (&self.device(), self.dtype())))
    }
}

/// Any source with its tensors converted to `dtype` one at a time as they are taken (the
/// seeded preset initialiser and GGUF dequantisation produce f32).
pub struct CastSource<'a> {
    pub inner: &'a mut dyn TensorSource,
    pub dtype: DType,
}

impl TensorSource for CastSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        self.inner.take(name, shape)
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn finish(&mut self) -> Result<(), WeightError> {
        self.inner.finish()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A tensor kept exactly as it was on disk (not part of the trained decoder).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Where the decoder's tensors sit in the checkpoint, and what else it holds.
#[derive(Debug, Clone, Default)]
pub struct CheckpointLayout {
    /// Prefix replacing `model.` in the decoder's names (`model.language_model.` for a
    /// multimodal qwen3_5); `None` = the names as they are.
    pub text_prefix: Option<String>,
    /// Tensors carried through unchanged on save (vision tower, MTP head).
    pub passthrough: Vec<RawTensor>,
}

impl CheckpointLayout {
    /// The checkpoint name of the decoder's parameter `name` (`model.…` / `lm_head.…`).
    pub fn disk_name(&self, name: &str) -> String {
        match (&self.text_prefix, name.strip_prefix("model.")) {
            (Some(prefix), Some(rest)) => format!("{prefix}{rest}"),
            _ => name.to_string(),
        }
    }
}

/// Checkpoint prefixes whose tensors dreamloop carries through without loading them: the
/// multi-token-prediction head of qwen3_next / qwen3_5 and qwen3_5's vision tower.
pub const PASSTHROUGH_PREFIXES: [&str; 2] = ["mtp.", "model.visual."];

/// A [`SafetensorsSource`] seen through a [`CheckpointLayout`]: the decoder asks for `model.*`
/// names, and at [`TensorSource::finish`] the pass-through tensors are collected instead of
/// being reported as extra.
pub struct TextSource<'a> {
    pub inner: &'a mut SafetensorsSource,
    pub layout: CheckpointLayout,
}

impl TensorSource for TextSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        // Errors name the tensor as it is called on disk.
        self.inner.take(&self.layout.disk_name(name), shape)
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype
    }
    fn finish(&mut self) -> Result<(), WeightError> {
        self.layout.passthrough = self.inner.take_raw_with_prefixes(&PASSTHROUGH_PREFIXES)?;
        self.inner.finish()
    }
}

/// A memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Tensors from a Hugging Face directory (single file or shards).
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    /// name → index into `shards`.
    index: BTreeMap<String, usize>,
    taken: Vec<String>,
    /// Disk dtype of every tensor taken, for saving back.
    pub dtypes: HashMap<String, DiskDtype>,
    device: Device,
    /// What tensors are decoded into (f32 or bf16).
    dtype: DType,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self, WeightError> {
        Self::open_as(dir, device, DType::F32)
    }

    /// [`open`](Self::open), decoding every tensor straight into `dtype` (f32 or bf16).
    pub fn open_as(dir: &Path, device: &Device, dtype: DType) -> Result<Self, WeightError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else {
            let text = std::fs::read_to_string(&index_path).map_err(|source| WeightError::Io {
                path: index_path.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightError::Format {
                    path: index_path.clone(),
                    reason: e.to_string(),
                })?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| WeightError::Format {
                    path: index_path.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let file = File::open(&path).map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the checkpoint is read-only for the lifetime of this source; a file
            // truncated underneath us is the same hazard every HF loader accepts.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            let parsed = SafeTensors::deserialize(&map).map_err(|e| WeightError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for name in parsed.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push(Shard { path, map });
        }
        Ok(SafetensorsSource {
            shards,
            index,
            taken: Vec::new(),
            dtypes: HashMap::new(),
            device: device.clone(),
            dtype,
        })
    }

    /// Names of every tensor in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The shape the files give `name` (from the header only; nothing is decoded).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        let parsed = SafeTensors::deserialize(&shard.map).ok()?;
        parsed.tensor(name).ok().map(|t| t.shape().to_vec())
    }

    /// Takes every not-yet-taken tensor whose name starts with one of `prefixes`, as raw bytes.
    pub fn take_raw_with_prefixes(
        &mut self,
        prefixes: &[&str],
    ) -> Result<Vec<RawTensor>, WeightError> {
        let names: Vec<String> = self
            .index
            .keys()
            .filter(|k| prefixes.iter().any(|p| k.starts_with(p)) && !self.taken.contains(k))
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let shard = &self.shards[self.index[&name]];
            let parsed = SafeTensors::deserialize(&shard.map).map_err(|e| WeightError::Format {
                path: shard.path.clone(),
                reason: e.to_string(),
            })?;
            let view = parsed.tensor(&name).map_err(|e| WeightError::Format {
                path: shard.path.clone(),
                reason: e.to_string(),
            })?;
            out.push(RawTensor {
                name: name.clone(),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            });
            self.taken.push(name);
        }
        Ok(out)
    }
}

impl TensorSource for SafetensorsSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        let shard = &self.shards[*self
            .index
            .get(name)
            .ok_or_else(|| WeightError::Missing { name: name.into() })?];
        let parsed = SafeTensors::deserialize(&shard.map).map_err(|e| WeightError::Format {
            path: shard.path.clone(),
            reason: e.to_string(),
        })?;
        let view = parsed.tensor(name).map_err(|e| WeightError::Format {
            path: shard.path.clone(),
            reason: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(WeightError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let (data, dtype) = if self.dtype == DType::BF16 {
            to_bf16(name, &view)?
        } else {
            let (values, dtype) = to_f32(name, &view)?;
            (TensorData::new(values, shape.to_vec()), dtype)
        };
        self.taken.push(name.to_string());
        self.dtypes.insert(name.to_string(), dtype);
        Ok(data)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn finish(&mut self) -> Result<(), WeightError> {
        let mut extra: Vec<String> = self
            .index
            .keys()
            .filter(|k| !self.taken.contains(k))
            .cloned()
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        Err(WeightError::Extra { names: extra })
    }
}

/// Decodes a tensor's bytes (little-endian) to f32.
fn to_f32(name: &str, view: &TensorView<'_>) -> Result<(Vec<f32>, DiskDtype), WeightError> {
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => Ok((
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DiskDtype::F32,
        )),
        Dtype::BF16 => Ok((
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DiskDtype::Bf16,
        )),
        Dtype::F16 => Ok((
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DiskDtype::F16,
        )),
        other => Err(WeightError::Dtype {
            name: name.into(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Decodes a tensor's bytes (little-endian) to bf16 without an f32 buffer: bf16 bytes are
/// copied as they are, f32 and f16 values are rounded to nearest one element at a time.
fn to_bf16(name: &str, view: &TensorView<'_>) -> Result<(TensorData, DiskDtype), WeightError> {
    let bytes = view.data();
    let shape = view.shape().to_vec();
    let (values, dtype): (Vec<half::bf16>, DiskDtype) = match view.dtype() {
        Dtype::BF16 => (
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
            DiskDtype::Bf16,
        ),
        Dtype::F32 => (
            bytes
                .chunks_exact(4)
                .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DiskDtype::F32,
        ),
        Dtype::F16 => (
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            DiskDtype::F16,
        ),
        other => {
            return Err(WeightError::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok((TensorData::new(values, shape), dtype))
}

/// Collects every float parameter with its dotted checkpoint path.
struct NamedParams {
    path: Vec<String>,
    out: Vec<(String, TensorData)>,
}

impl ModuleVisitor for NamedParams {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out
            .push((self.path.join("."), param.val().into_data()));
    }
}

/// Every float parameter of a module as `(checkpoint name, data)`, in module order.
pub fn named_tensors<M: Module>(module: &M) -> Vec<(String, TensorData)> {
    let mut visitor = NamedParams {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// The dtype a parameter is written in: what it was loaded from, except that a bf16
/// parameter loaded from f32 is written as the bf16 it is (widening it back adds nothing but
/// an f32 copy); a parameter with no recorded dtype is written as it is in memory.
fn save_dtype(recorded: Option<DiskDtype>, in_memory: DType) -> DiskDtype {
    match (recorded, in_memory) {
        (Some(DiskDtype::F32) | None, DType::BF16) => DiskDtype::Bf16,
        (Some(d), _) => d,
        (None, _) => DiskDtype::F32,
    }
}

/// One tensor's little-endian bytes in `disk`: borrowed when memory already holds that
/// dtype, converted element by element otherwise.
fn encode<'a>(data: &'a TensorData, disk: DiskDtype) -> Result<(Dtype, Cow<'a, [u8]>), String> {
    let same = matches!(
        (disk, data.dtype()),
        (DiskDtype::F32, DType::F32)
            | (DiskDtype::Bf16, DType::BF16)
            | (DiskDtype::F16, DType::F16)
    );
    let st_dtype = match disk {
        DiskDtype::F32 => Dtype::F32,
        DiskDtype::Bf16 => Dtype::BF16,
        DiskDtype::F16 => Dtype::F16,
    };
    if same && cfg!(target_endian = "little") {
        return Ok((st_dtype, Cow::Borrowed(data.as_bytes())));
    }
    if !matches!(
        data.dtype(),
        DType::F32 | DType::BF16 | DType::F16 | DType::F64
    ) {
        return Err(format!("unsupported in-memory dtype {:?}", data.dtype()));
    }
    let values = data.iter::<f32>();
    let bytes: Vec<u8> = match disk {
        DiskDtype::F32 => values.flat_map(|v| v.to_le_bytes()).collect(),
        DiskDtype::Bf16 => values
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        DiskDtype::F16 => values
            .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    };
    Ok((st_dtype, Cow::Owned(bytes)))
}

/// A tensor ready to write: name, dtype, shape, little-endian bytes.
type Encoded<'a> = (String, Dtype, Vec<usize>, Cow<'a, [u8]>);

/// Writes `tensors` to a safetensors file at `path`, each in its recorded disk dtype (see
/// [`save_dtype`]), plus `raw` tensors byte for byte. Written to a temporary sibling and
/// renamed, so a crash never leaves a half-written file under the real name.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    dtypes: &HashMap<String, DiskDtype>,
    raw: &[RawTensor],
) -> Result<(), WeightError> {
    let mut encoded: Vec<Encoded<'_>> = Vec::with_capacity(tensors.len() + raw.len());
    for (name, data) in tensors {
        let disk = save_dtype(dtypes.get(name).copied(), data.dtype());
        let (st_dtype, bytes) = encode(data, disk).map_err(|reason| WeightError::Format {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {reason}"),
        })?;
        encoded.push((name.clone(), st_dtype, data.shape().to_vec(), bytes));
    }
    encoded.extend(raw.iter().map(|t| {
        (
            t.name.clone(),
            t.dtype,
            t.shape.clone(),
            Cow::Borrowed(t.bytes.as_slice()),
        )
    }));
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes.as_ref())
                .map(|v| (name.clone(), v))
                .map_err(|e| WeightError::Format {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<_, _>>()?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        WeightError::Format {
            path: tmp.clone(),
            reason: e.to_string(),
        }
    })?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        })
}
