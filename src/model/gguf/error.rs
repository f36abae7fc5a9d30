//! The error type of GGUF reading and import.

use super::{GgmlType, MAX_ARRAY_NESTING};
use std::path::PathBuf;

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
    pub(super) fn in_metadata(key: &str, source: GgufError) -> Self {
        Self::InMetadata {
            key: key.to_owned(),
            source: Box::new(source),
        }
    }

    pub(super) fn in_tensor(name: &str, source: GgufError) -> Self {
        Self::InTensor {
            name: name.to_owned(),
            source: Box::new(source),
        }
    }
}
