//! GGUF: llama.cpp's single-file model format, read from a byte slice.
//!
//! This module parses the container (header, metadata of every value type, tensor infos,
//! alignment, data offset) and hands out each tensor's raw bytes. The submodules turn a
//! parsed file into something the rest of dreamloop understands:
//! [`dequant`] (ggml block formats → f32), [`llama`] (tensor names, shapes, Q/K row order
//! and `config.json` for the `llama` architecture), [`tokenizer`] (HF `tokenizer.json`
//! from `tokenizer.ggml.*`), [`import`] (a complete Hugging Face directory on disk), and
//! [`source`] (the same tensors handed straight to the model loader, no directory).
//!
//! Apart from [`source`], it knows nothing about burn or running a model: the output of an
//! import is an ordinary f32 safetensors checkpoint that the model loader reads like any other.
//!
//! Reference: the GGUF specification (`ggml/docs/gguf.md`) and gguf-py's `gguf_reader.py`.
//! Versions 2 and 3 share one layout (version 1 used 32-bit counts and is rejected).
//! Every count and length read from the file is checked against the bytes that remain
//! before anything is allocated, so a lying length field yields [`GgufError`], never a
//! giant allocation, a panic or an out-of-bounds read.

pub mod dequant;
mod error;
pub mod import;
pub mod llama;
pub mod source;
pub mod tokenizer;
mod types;

use std::collections::HashSet;

pub use error::GgufError;
pub use import::{import_gguf, ImportReport};
pub use source::GgufSource;
pub use types::{GgmlType, MetadataValue, ValueType};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data section when `general.alignment` is absent (spec default).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Deepest nesting of arrays inside arrays we accept; real files use at most 2, and the bound
/// keeps a malicious file from exhausting the stack through recursion.
const MAX_ARRAY_NESTING: usize = 8;

/// ggml's `GGML_MAX_DIMS`: tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

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
