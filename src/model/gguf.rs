//! GGUF: llama.cpp's single-file model format, read from a byte slice.
//!
//! This module parses the container (header, metadata of every value type, tensor infos,
//! alignment, data offset) and hands out each tensor's raw bytes. The submodules turn a
//! parsed file into something the rest of dreamloop understands:
//! [`dequant`] (ggml block formats → f32), [`llama`] (tensor names, shapes, Q/K row order
//! and `config.json` for the `llama` architecture), [`tokenizer`] (HF `tokenizer.json`
//! from `tokenizer.ggml.*`), and [`import`] (a complete Hugging Face directory on disk).
//!
//! It deliberately knows nothing about burn or running a model: the output of an import is
//! an ordinary f32 safetensors checkpoint that the model loader reads like any other.
//!
//! Reference: the GGUF specification (`ggml/docs/gguf.md`) and gguf-py's `gguf_reader.py`.
//! Versions 2 and 3 share one layout (version 1 used 32-bit counts and is rejected).
//! Every count and length read from the file is checked against the bytes that remain
//! before anything is allocated, so a lying length field yields [`GgufError`], never a
//! giant allocation, a panic or an out-of-bounds read.

pub mod dequant;
pub mod import;
pub mod llama;
pub mod tokenizer;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

pub use import::{import_gguf, ImportReport};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data section when `general.alignment` is absent (spec default).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Deepest nesting of arrays inside arrays we accept; real files use at most 2, and the bound
/// keeps a malicious file from exhausting the stack through recursion.
const MAX_ARRAY_NESTING: usize = 8;

/// ggml's `GGML_MAX_DIMS`: tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Everything that can go wrong reading or importing a GGUF file. Parse errors carry the
/// byte offset where the problem was found and what the reader expected there.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file (or an output file) could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: magic bytes are {found:?}, expected \"GGUF\"")]
    BadMagic {
        /// The first bytes of the file.
        found: Vec<u8>,
    },
    /// A GGUF version this reader does not handle.
    #[error("unsupported GGUF version {version} (only versions 2 and 3 are supported)")]
    UnsupportedVersion {
        /// The version field from the header.
        version: u32,
    },
    /// The file ends before a field is complete.
    #[error("truncated file at offset {offset}: expected {what} ({needed} bytes), only {available} bytes left")]
    Truncated {
        /// Where the field starts.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A count or length field claims more items than the rest of the file can hold.
    #[error(
        "offset {offset}: {what} {count} cannot fit in the {remaining} bytes left in the file"
    )]
    CountTooLarge {
        /// Where the count field starts.
        offset: u64,
        /// What is being counted.
        what: &'static str,
        /// The claimed count.
        count: u64,
        /// Bytes left after the count field.
        remaining: u64,
    },
    /// A metadata value type id outside the specification.
    #[error("offset {offset}: unknown metadata value type {type_id}")]
    BadValueType {
        /// Where the type field starts.
        offset: u64,
        /// The type id read.
        type_id: u32,
    },
    /// A field that must hold one of a few values holds another.
    #[error("offset {offset}: invalid {what}: {detail}")]
    Invalid {
        /// Where the field starts.
        offset: u64,
        /// Which field.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A string that is not UTF-8.
    #[error("offset {offset}: {what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Where the string's bytes start.
        offset: u64,
        /// Which string.
        what: &'static str,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_NESTING`].
    #[error("offset {offset}: metadata arrays nested deeper than {MAX_ARRAY_NESTING} levels")]
    NestingTooDeep {
        /// Where the innermost array starts.
        offset: u64,
    },
    /// An error in a named file.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: Box<GgufError>,
    },
    /// An error while reading the value of one metadata key.
    #[error("metadata key {key:?}: {source}")]
    InMetadata {
        /// The key whose value could not be read.
        key: String,
        /// What went wrong.
        source: Box<GgufError>,
    },
    /// An error in the description or data of one tensor.
    #[error("tensor {name:?}: {source}")]
    InTensor {
        /// The tensor's GGUF name.
        name: String,
        /// What went wrong.
        source: Box<GgufError>,
    },
    /// A tensor type id this reader cannot size (and therefore cannot locate or decode).
    #[error("unsupported ggml tensor type {type_id}")]
    UnsupportedTensorType {
        /// The ggml type id.
        type_id: u32,
    },
    /// A tensor type that is known but has no dequantizer here.
    #[error("no dequantizer for ggml type {ty}")]
    NoDequantizer {
        /// The tensor's type.
        ty: GgmlType,
    },
    /// A tensor whose shape, offset or size is inconsistent.
    #[error("{0}")]
    BadTensor(String),
    /// A metadata key the caller needs is absent.
    #[error("missing metadata key {key:?}")]
    MissingMetadata {
        /// The key.
        key: String,
    },
    /// A metadata key holds a value of the wrong type.
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongMetadataType {
        /// The key.
        key: String,
        /// What the caller needs.
        expected: &'static str,
        /// What the file holds.
        found: &'static str,
    },
    /// A model architecture or tokenizer this importer does not translate.
    #[error("unsupported {what}: {value:?}")]
    Unsupported {
        /// What kind of thing (architecture, tokenizer model, pre-tokenizer, tensor).
        what: &'static str,
        /// Its name in the file.
        value: String,
    },
    /// The metadata describes an impossible model (e.g. heads that do not divide the width).
    #[error("inconsistent model metadata: {0}")]
    BadModel(String),
    /// A tensor the architecture requires is absent.
    #[error("missing tensor {name:?}")]
    MissingTensor {
        /// The GGUF name.
        name: String,
    },
    /// The generated tokenizer.json was rejected by the `tokenizers` crate.
    #[error("generated tokenizer.json does not load: {0}")]
    TokenizerInvalid(String),
    /// The output directory already exists and is not empty.
    #[error("output directory {0} already exists and is not empty")]
    OutputExists(PathBuf),
    /// Writing model.safetensors failed.
    #[error("writing safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// Serialising a JSON output file failed.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl GgufError {
    fn in_metadata(key: &str, source: GgufError) -> Self {
        Self::InMetadata {
            key: key.to_owned(),
            source: Box::new(source),
        }
    }

    fn in_tensor(name: &str, source: GgufError) -> Self {
        Self::InTensor {
            name: name.to_owned(),
            source: Box::new(source),
        }
    }
}

/// The type of a metadata value, with the spec's numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// `GGUF_METADATA_VALUE_TYPE_UINT8`
    U8 = 0,
    /// `INT8`
    I8 = 1,
    /// `UINT16`
    U16 = 2,
    /// `INT16`
    I16 = 3,
    /// `UINT32`
    U32 = 4,
    /// `INT32`
    I32 = 5,
    /// `FLOAT32`
    F32 = 6,
    /// `BOOL` (one byte, 0 or 1)
    Bool = 7,
    /// `STRING` (u64 length + UTF-8 bytes)
    String = 8,
    /// `ARRAY` (element type, u64 count, elements)
    Array = 9,
    /// `UINT64`
    U64 = 10,
    /// `INT64`
    I64 = 11,
    /// `FLOAT64`
    F64 = 12,
}

impl ValueType {
    fn from_id(type_id: u32, offset: u64) -> Result<Self, GgufError> {
        Ok(match type_id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return Err(GgufError::BadValueType { offset, type_id }),
        })
    }

    /// The fewest bytes one value of this type occupies; bounds array counts.
    fn min_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }

    /// The spec's name for the type, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// A typed array; `elem_type` is kept so that empty arrays keep their type.
    Array {
        /// Type of every element.
        elem_type: ValueType,
        /// The elements (all of `elem_type`; arrays may nest).
        values: Vec<MetadataValue>,
    },
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl MetadataValue {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array { .. } => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type holding a non-negative value, widened (writers disagree on whether
    /// e.g. `block_count` is u32 or u64, so readers accept all of them, as llama.cpp does).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type, widened to i64 (`None` for u64 values above `i64::MAX`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// f32 or f64, widened.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array { values, .. } => Some(values),
            _ => None,
        }
    }
}

/// A ggml tensor type: how elements are packed into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32 weights: f16 scale, 4-bit signed (offset 8) quants.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit quants.
    Q4_1,
    /// 32 weights: f16 scale, 5-bit signed quants.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5-bit quants.
    Q5_1,
    /// 32 weights: f16 scale, int8 quants.
    Q8_0,
    /// 32 weights: f32 scale and sum, int8 quants (activations only).
    Q8_1,
    /// K-quant, 256 weights, 2 bits.
    Q2_K,
    /// K-quant, 256 weights, 3 bits.
    Q3_K,
    /// K-quant, 256 weights: f16 d and dmin, 6-bit sub-block scales/mins, 4-bit quants.
    Q4_K,
    /// K-quant, 256 weights, 5 bits.
    Q5_K,
    /// K-quant, 256 weights: 4+2-bit quants, int8 sub-block scales, f16 d.
    Q6_K,
    /// K-quant, 256 weights, 8 bits (activations only).
    Q8_K,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// From ggml's `enum ggml_type` id; `None` for ids this reader cannot size.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
        }
    }

    /// `(elements per block, bytes per block)`, as in gguf-py's `GGML_QUANT_SIZES`.
    pub fn block_layout(self) -> (u64, u64) {
        match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::I8 => (1, 1),
            Self::I64 | Self::F64 => (1, 8),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions innermost first (ggml's `ne`): a `[out, in]` matrix is listed `[in, out]`.
    pub dims: Vec<u64>,
    /// How the elements are stored.
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Number of elements (product of `dims`, checked for overflow).
    pub n_elements: u64,
    /// Size of the data in bytes (checked to lie inside the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape outermost first (row-major, as numpy/PyTorch/safetensors list it).
    pub fn row_major_shape(&self) -> Vec<usize> {
        // usize conversion cannot fail: n_bytes was checked to fit in the in-memory file.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Debug)]
pub struct GgufFile<'a> {
    /// The whole file.
    bytes: &'a [u8],
    /// Format version from the header (2 or 3).
    pub version: u32,
    /// Metadata in file order (keys are unique).
    pub metadata: Vec<(String, MetadataValue)>,
    /// Tensor descriptions in file order (names are unique).
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or the default 32.
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

impl<'a> GgufFile<'a> {
    /// Parses the header, metadata and tensor infos, and checks that every tensor's data lies
    /// inside `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, GgufError> {
        let mut cur = Cursor { bytes, pos: 0 };
        let magic = cur.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = cur.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let tensor_count = cur.count("tensor count", 32)?;
        let kv_count = cur.count("metadata key/value count", 13)?;

        let mut metadata = Vec::with_capacity(kv_count);
        let mut seen_keys = HashSet::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key_offset = cur.offset();
            let key = cur.string("metadata key")?;
            let value = cur
                .typed_value(0)
                .map_err(|e| GgufError::in_metadata(&key, e))?;
            if !seen_keys.insert(key.clone()) {
                return Err(GgufError::Invalid {
                    offset: key_offset,
                    what: "metadata key",
                    detail: format!("duplicate key {key:?}"),
                });
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetadataValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(GgufError::BadTensor(format!(
                    "general.alignment must be a power-of-two u32, found {v:?}"
                )))
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count);
        let mut seen_names = HashSet::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name_offset = cur.offset();
            let name = cur.string("tensor name")?;
            let info = cur
                .tensor_info(name.clone(), alignment)
                .map_err(|e| GgufError::in_tensor(&name, e))?;
            if !seen_names.insert(name.clone()) {
                return Err(GgufError::Invalid {
                    offset: name_offset,
                    what: "tensor name",
                    detail: format!("duplicate tensor {name:?}"),
                });
            }
            tensors.push(info);
        }

        let data_offset = cur.offset().next_multiple_of(alignment);
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::in_tensor(
                        &t.name,
                        GgufError::Truncated {
                            offset: data_offset.saturating_add(t.offset),
                            what: "tensor data",
                            needed: t.n_bytes,
                            available: file_len
                                .saturating_sub(data_offset.saturating_add(t.offset)),
                        },
                    ))
                }
            }
        }

        Ok(Self {
            bytes,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    fn require(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingMetadata {
            key: key.to_owned(),
        })
    }

    fn wrong_type(key: &str, expected: &'static str, v: &MetadataValue) -> GgufError {
        GgufError::WrongMetadataType {
            key: key.to_owned(),
            expected,
            found: v.value_type().name(),
        }
    }

    /// A required non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| Self::wrong_type(key, "non-negative integer", v))
    }

    /// An optional non-negative integer (absent → `None`, wrong type → error).
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_u64(key).map(Some),
        }
    }

    /// A required float (f32 or f64).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| Self::wrong_type(key, "float", v))
    }

    /// An optional float (absent → `None`, wrong type → error).
    pub fn get_f64_opt(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_f64(key).map(Some),
        }
    }

    /// An optional bool (absent → `None`, wrong type → error).
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong_type(key, "bool", v)),
        }
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong_type(key, "string", v))
    }

    /// An optional string (absent → `None`, wrong type → error).
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_str(key).map(Some),
        }
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(MetadataValue::as_str).collect())
            .ok_or_else(|| Self::wrong_type(key, "array of strings", v))
    }

    /// An optional array of integers (absent → `None`, wrong type → error).
    pub fn get_int_array_opt(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_array()
            .and_then(|a| a.iter().map(MetadataValue::as_i64).collect())
            .map(Some)
            .ok_or_else(|| Self::wrong_type(key, "array of integers", v))
    }

    /// A tensor's description by GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes (in bounds: checked by [`GgufFile::parse`]).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &'a [u8] {
        let start = (self.data_offset + info.offset) as usize;
        let end = start + info.n_bytes as usize;
        self.bytes.get(start..end).unwrap_or(&[])
    }

    /// A tensor's elements as f32, in ggml order (innermost dimension fastest).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        dequant::dequantize(info.ty, self.tensor_bytes(info), info.n_elements as usize)
            .map_err(|e| GgufError::in_tensor(&info.name, e))
    }
}

/// A read position in the file; every read checks the remaining length first.
struct Cursor<'a> {
    /// The whole file.
    bytes: &'a [u8],
    /// Next byte to read.
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.offset(),
                what,
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count of items that each take at least `min_item_size` bytes.
    fn count(&mut self, what: &'static str, min_item_size: u64) -> Result<usize, GgufError> {
        let offset = self.offset();
        let count = self.u64(what)?;
        let remaining = self.remaining();
        if count > remaining / min_item_size {
            return Err(GgufError::CountTooLarge {
                offset,
                what,
                count,
                remaining,
            });
        }
        // Fits: count is at most the file length, which is a usize.
        Ok(count as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let start = self.offset();
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 {
                offset: start,
                what,
            })
    }

    fn typed_value(&mut self, depth: usize) -> Result<MetadataValue, GgufError> {
        let offset = self.offset();
        let ty = ValueType::from_id(self.u32("metadata value type")?, offset)?;
        self.value(ty, depth)
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<MetadataValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(self.array::<1>("u8 value")?[0]),
            ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.array("i8 value")?)),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            ValueType::U32 => MetadataValue::U32(self.u32("u32 value")?),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            ValueType::U64 => MetadataValue::U64(self.u64("u64 value")?),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            ValueType::Bool => {
                let offset = self.offset();
                match self.array::<1>("bool value")?[0] {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    b => {
                        return Err(GgufError::Invalid {
                            offset,
                            what: "bool value",
                            detail: format!("byte {b} is neither 0 nor 1"),
                        })
                    }
                }
            }
            ValueType::String => MetadataValue::String(self.string("string value")?),
            ValueType::Array => {
                let offset = self.offset();
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep { offset });
                }
                let elem_type = ValueType::from_id(self.u32("array element type")?, offset)?;
                let count = self.count("array length", elem_type.min_size())?;
                let mut values = Vec::with_capacity(count);
                for _ in 0..count {
                    values.push(self.value(elem_type, depth + 1)?);
                }
                MetadataValue::Array { elem_type, values }
            }
        })
    }

    /// Reads the rest of a tensor info (after its name) and validates shape and offset.
    fn tensor_info(&mut self, name: String, alignment: u64) -> Result<TensorInfo, GgufError> {
        let dims_offset = self.offset();
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Invalid {
                offset: dims_offset,
                what: "tensor dimension count",
                detail: format!("{n_dims} (expected 1..={MAX_DIMS})"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("tensor dimension")?);
        }
        let type_offset = self.offset();
        let type_id = self.u32("tensor type")?;
        let ty = GgmlType::from_id(type_id).ok_or(GgufError::UnsupportedTensorType { type_id })?;
        let data_offset_field = self.offset();
        let offset = self.u64("tensor data offset")?;
        if offset % alignment != 0 {
            return Err(GgufError::Invalid {
                offset: data_offset_field,
                what: "tensor data offset",
                detail: format!("{offset} is not a multiple of the alignment {alignment}"),
            });
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| GgufError::Invalid {
                offset: dims_offset,
                what: "tensor dimensions",
                detail: format!("{dims:?} overflow the element count"),
            })?;
        let (block, block_bytes) = ty.block_layout();
        if dims[0] % block != 0 {
            return Err(GgufError::Invalid {
                offset: type_offset,
                what: "tensor shape",
                detail: format!(
                    "row length {} is not a multiple of the {ty} block size {block}",
                    dims[0]
                ),
            });
        }
        let n_bytes = (n_elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| GgufError::Invalid {
                offset: dims_offset,
                what: "tensor dimensions",
                detail: format!("{dims:?} overflow the byte size"),
            })?;
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_elements,
            n_bytes,
        })
    }
}
