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
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use std::borrow::Cow;

use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::sink::FileSink;

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
            shard_names(&index_path)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let map = map_file(&path)?;
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

/// The weight file `path`, memory-mapped read-only.
fn map_file(path: &Path) -> Result<memmap2::Mmap, WeightError> {
    let io = |source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: weight files are read-only while mapped (a load, a digest); a file truncated
    // underneath us is the same hazard every HF loader accepts.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

/// The largest shard a save writes before it starts another: transformers'
/// `save_pretrained` default (`max_shard_size="5GB"`). A tensor larger than this gets a shard
/// of its own.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The single-file weights name, and the index naming the shards of a sharded save.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// See [`WEIGHTS_FILE`].
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a save: its header entry, and where its bytes come from when (and only
/// when) it is written, so a save holds one tensor on the host at a time.
pub struct Outgoing<'a> {
    /// Checkpoint (disk) name.
    pub name: String,
    /// Disk dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes on disk.
    pub len: u64,
    source: OutSource<'a>,
}

/// Reads rows `start..end` of a parameter's leading dimension off the device.
type ReadRows<'a> = Box<dyn Fn(usize, usize) -> TensorData + 'a>;

enum OutSource<'a> {
    /// A parameter: read off the device when written, a block of rows at a time, encoded
    /// into the disk dtype.
    Param { read: ReadRows<'a>, disk: DiskDtype },
    /// Carried through byte for byte.
    Raw(&'a RawTensor),
}

/// The most bytes of one parameter read off the device at once: a larger one (the 27B's
/// embedding and head are 2.5 GB each in bf16) is read in blocks of rows, so a save holds
/// this much (and the read's own transient copy) beyond the writer's buffer.
const READ_BLOCK_BYTES: u64 = 64 << 20;

impl Outgoing<'_> {
    /// Hands the tensor's little-endian bytes in its disk dtype to `each`, in order: a
    /// parameter one block of rows at a time (one device read each), a carried-through
    /// tensor at once. The pieces add up to [`Outgoing::len`] bytes.
    pub fn for_each_piece(
        &self,
        each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let OutSource::Param { read, disk } = &self.source else {
            let OutSource::Raw(raw) = &self.source else {
                unreachable!("two kinds of source")
            };
            return each(&raw.bytes);
        };
        let rows = self.shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = (self.len / rows as u64).max(1);
        let block = ((READ_BLOCK_BYTES / row_bytes).max(1) as usize).min(rows);
        let mut start = 0;
        while start < rows {
            let end = (start + block).min(rows);
            let data = read(start, end);
            let (_, bytes) = encode(&data, *disk).map_err(|reason| {
                std::io::Error::other(format!("tensor `{}`: {reason}", self.name))
            })?;
            each(&bytes)?;
            start = end;
        }
        Ok(())
    }
}

/// Every float parameter of `module` (by `disk_name` of its dotted path, each in its
/// [`save_dtype`]) plus `raw`, sorted by name: what a save writes. Nothing is read off the
/// device yet.
pub fn outgoing<'a, M: Module>(
    module: &'a M,
    disk_name: &dyn Fn(&str) -> String,
    dtypes: &HashMap<String, DiskDtype>,
    raw: &'a [RawTensor],
) -> Vec<Outgoing<'a>> {
    struct Lazy<'a> {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>, DType, ReadRows<'a>)>,
    }
    impl<'a> ModuleVisitor for Lazy<'a> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Off the autodiff graph first: slicing a tracked parameter would record a node
            // that no backward pass ever consumes.
            let tensor = param.val().inner();
            let shape = tensor.dims().to_vec();
            let dtype = tensor.dtype();
            let whole = shape.first().copied().unwrap_or(0);
            self.out.push((
                self.path.join("."),
                shape,
                dtype,
                Box::new(move |start, end| {
                    if D == 0 || (start == 0 && end >= whole) {
                        tensor.clone().into_data()
                    } else {
                        tensor.clone().narrow(0, start, end - start).into_data()
                    }
                }),
            ));
        }
    }
    let mut lazy = Lazy {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut lazy);
    let mut all: Vec<Outgoing<'a>> = lazy
        .out
        .into_iter()
        .map(|(path, shape, dtype, read)| {
            let name = disk_name(&path);
            let disk = save_dtype(dtypes.get(&name).copied(), dtype);
            let len = shape.iter().product::<usize>() as u64 * disk.size() as u64;
            Outgoing {
                name,
                dtype: disk.safetensors(),
                shape,
                len,
                source: OutSource::Param { read, disk },
            }
        })
        .collect();
    all.extend(raw.iter().map(|t| Outgoing {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        len: t.bytes.len() as u64,
        source: OutSource::Raw(t),
    }));
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

impl DiskDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            DiskDtype::Bf16 | DiskDtype::F16 => 2,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            DiskDtype::F32 => Dtype::F32,
            DiskDtype::Bf16 => Dtype::BF16,
            DiskDtype::F16 => Dtype::F16,
        }
    }
}

/// Whether every parameter among `tensors` is written in the dtype it was read in (by its
/// recorded disk dtype): then files holding the loaded weights hold exactly what a save
/// would write, tensor for tensor.
pub fn unconverted(tensors: &[Outgoing<'_>], dtypes: &HashMap<String, DiskDtype>) -> bool {
    tensors.iter().all(|t| match &t.source {
        OutSource::Param { disk, .. } => dtypes.get(&t.name) == Some(disk),
        OutSource::Raw(_) => true,
    })
}

/// The safetensors header of `tensors` laid out in order: the 8-byte little-endian length,
/// then the JSON, space-padded to a multiple of 8 bytes as the reference implementation does.
fn header(tensors: &[Outgoing<'_>]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for t in tensors {
        map.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.len],
            }),
        );
        offset += t.len;
    }
    let mut json = serde_json::to_vec(&map).expect("a JSON map serialises");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

/// Streams one safetensors file of `tensors` into `out`: the header, then each tensor's
/// bytes as it is read off the device.
fn stream_safetensors(tensors: &[Outgoing<'_>], out: &mut dyn Write) -> std::io::Result<()> {
    out.write_all(&header(tensors))?;
    for t in tensors {
        t.for_each_piece(&mut |bytes| out.write_all(bytes))?;
    }
    Ok(())
}

/// Splits `tensors` (in order) into shards of at most `max_bytes` each, as transformers
/// does: a tensor that would overflow the current shard starts the next one.
fn shard_ranges(tensors: &[Outgoing<'_>], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.len > max_bytes {
            ranges.push(start..i);
            (start, size) = (i, 0);
        }
        size += t.len;
    }
    ranges.push(start..tensors.len());
    ranges
}

/// Writes `tensors` into `sink` as Hugging Face weights: `model.safetensors` when they fit
/// one shard of `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` plus
/// `model.safetensors.index.json` (`metadata.total_size`, `weight_map`), as transformers
/// saves a large model. Extra host memory: two read blocks ([`READ_BLOCK_BYTES`]) and the
/// writer's buffer.
pub fn save_weights(
    sink: &mut dyn FileSink,
    tensors: &[Outgoing<'_>],
    max_shard_bytes: u64,
) -> Result<(), WeightError> {
    let io = |name: &str| {
        let path = PathBuf::from(name);
        move |source| WeightError::Io { path, source }
    };
    let ranges = shard_ranges(tensors, max_shard_bytes);
    if ranges.len() == 1 {
        sink.put(WEIGHTS_FILE, &mut |out| stream_safetensors(tensors, out))
            .map_err(io(WEIGHTS_FILE))?;
        return Ok(());
    }
    let n = ranges.len();
    let mut weight_map = BTreeMap::new();
    for (i, range) in ranges.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let shard = &tensors[range];
        sink.put(&name, &mut |out| stream_safetensors(shard, out))
            .map_err(io(&name))?;
        for t in shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
    }
    let total: u64 = tensors.iter().map(|t| t.len).sum();
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let json = serde_json::to_vec_pretty(&index).expect("a JSON value serialises");
    sink.put(WEIGHTS_INDEX_FILE, &mut |out| out.write_all(&json))
        .map_err(io(WEIGHTS_INDEX_FILE))?;
    Ok(())
}

/// The weight files of a Hugging Face directory: `model.safetensors`, or the index and
/// every shard it names. `None` when the directory has neither.
pub fn weight_files(dir: &Path) -> Result<Option<Vec<String>>, WeightError> {
    if dir.join(WEIGHTS_FILE).is_file() {
        return Ok(Some(vec![WEIGHTS_FILE.to_string()]));
    }
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    if !index_path.is_file() {
        return Ok(None);
    }
    let mut names = shard_names(&index_path)?;
    names.push(WEIGHTS_INDEX_FILE.to_string());
    Ok(Some(names))
}

/// The shard file names an index's `weight_map` points at, sorted, each once; a name that
/// is not a plain file name is refused.
fn shard_names(index_path: &Path) -> Result<Vec<String>, WeightError> {
    let format = |reason: String| WeightError::Format {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| WeightError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| format("no `weight_map` object".into()))?;
    let mut names = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format(format!("weight_map.{tensor}: not a string")))?;
        if file.is_empty() || file.contains('/') || file == "." || file == ".." {
            return Err(format(format!(
                "weight_map.{tensor}: `{file}` is not a file name in this directory"
            )));
        }
        names.push(file.to_string());
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// A digest of weights that does not depend on how they are laid out in files: sha256 over
/// every tensor sorted by name, each as its name, dtype, shape and little-endian bytes.
/// Two directories (sharded or not, any header order) holding the same tensors agree, and
/// the weights in memory agree with the files they would be saved as.
pub struct WeightsDigest(Sha256);

impl WeightsDigest {
    fn new() -> Self {
        WeightsDigest(Sha256::new())
    }

    /// Starts a tensor of `len` bytes; its bytes follow through `update`.
    fn start(&mut self, name: &str, dtype: Dtype, shape: &[usize], len: u64) {
        let head = serde_json::json!([name, dtype, shape]).to_string();
        self.0.update((head.len() as u64).to_le_bytes());
        self.0.update(head.as_bytes());
        self.0.update(len.to_le_bytes());
    }

    fn hex(self) -> String {
        hex::encode(self.0.finalize())
    }

    /// The digest of what a save of `tensors` would write (reading each off the device
    /// once, a block of rows at a time).
    pub fn of_outgoing(tensors: &[Outgoing<'_>]) -> Result<String, WeightError> {
        let mut digest = Self::new();
        for t in tensors {
            digest.start(&t.name, t.dtype, &t.shape, t.len);
            t.for_each_piece(&mut |bytes| {
                digest.0.update(bytes);
                Ok(())
            })
            .map_err(|e| WeightError::Format {
                path: PathBuf::from(&t.name),
                reason: e.to_string(),
            })?;
        }
        Ok(digest.hex())
    }

    /// The digest of the weight files of the directory `dir` (memory-mapped, read once).
    pub fn of_dir(dir: &Path) -> Result<String, WeightError> {
        let files = weight_files(dir)?.ok_or_else(|| WeightError::Io {
            path: dir.join(WEIGHTS_FILE),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let mut maps = Vec::new();
        for name in files.iter().filter(|n| *n != WEIGHTS_INDEX_FILE) {
            let path = dir.join(name);
            let map = map_file(&path)?;
            maps.push((path, map));
        }
        let mut all = Vec::new();
        for (path, map) in &maps {
            let parsed = SafeTensors::deserialize(map).map_err(|e| WeightError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for (name, view) in parsed.tensors() {
                all.push((name, view));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut digest = Self::new();
        for (name, view) in &all {
            digest.start(name, view.dtype(), view.shape(), view.data().len() as u64);
            digest.0.update(view.data());
        }
        Ok(digest.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter larger than [`READ_BLOCK_BYTES`] on disk is read in blocks of rows whose
    /// bytes, in order, are exactly the whole tensor's (f32 as it is: two blocks; converted
    /// to bf16: half the size, one block).
    #[test]
    fn a_large_parameter_is_read_in_blocks_that_add_up_to_the_tensor() {
        let device = crate::model::cpu();
        let [rows, cols] = [4_200, 4_096];
        assert!((rows * cols * 4) as u64 > READ_BLOCK_BYTES);
        let linear = burn::nn::LinearConfig::new(rows, cols)
            .with_bias(false)
            .init(&device);
        let whole = linear.weight.val().into_data();
        for (disk, expected) in [
            (DiskDtype::F32, whole.as_bytes().to_vec()),
            (
                DiskDtype::Bf16,
                whole
                    .as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        ] {
            let dtypes = HashMap::from([("weight".to_string(), disk)]);
            let tensors = outgoing(&linear, &|n| n.to_string(), &dtypes, &[]);
            let [t] = tensors.as_slice() else {
                panic!("one parameter")
            };
            assert_eq!(t.len, expected.len() as u64);
            let mut pieces = Vec::new();
            let mut got = Vec::new();
            t.for_each_piece(&mut |bytes| {
                pieces.push(bytes.len());
                got.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
            let blocks = (expected.len() as u64).div_ceil(READ_BLOCK_BYTES) as usize;
            assert!(pieces.len() >= blocks, "{disk:?}: {pieces:?}");
            assert!(
                got == expected,
                "{disk:?}: the blocks differ from the tensor"
            );
        }
    }
}
