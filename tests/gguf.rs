//! GGUF reader, dequantisers, Q/K un-permutation and import on synthetic files.
//!
//! The files are written by a small GGUF writer below (independent of the reader). Expected
//! values come from hand arithmetic on hand-built blocks, from gguf-py's dequantisation of
//! random blocks (`fixtures/gguf_quant_blocks.json`, made by `gen_gguf_quant_blocks.py`), and
//! from llama.cpp's forward Q/K permutation re-implemented here.

use dreamloop::model::gguf::llama::unpermute_qk_rows;
use dreamloop::model::gguf::tokenizer::hf_tokenizer;
use dreamloop::model::gguf::{
    dequant, import_gguf, GgmlType, GgufError, GgufFile, MetadataValue, ValueType,
};
use half::{bf16, f16};
use std::path::Path;

// ---------------------------------------------------------------- writer

/// A tensor to write: name, dims (innermost first), ggml type id, raw bytes.
struct RawTensor {
    /// GGUF tensor name.
    name: String,
    /// Dimensions, innermost first.
    dims: Vec<u64>,
    /// ggml type id.
    type_id: u32,
    /// Encoded blocks.
    data: Vec<u8>,
}

/// A GGUF v3 file under construction.
struct Writer {
    /// Metadata in write order.
    kv: Vec<(String, MetadataValue)>,
    /// Tensors in write order.
    tensors: Vec<RawTensor>,
    /// Data alignment (follows a `general.alignment` entry).
    alignment: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(t: ValueType) -> u32 {
    t as u32
}

fn put_value(out: &mut Vec<u8>, v: &MetadataValue) {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.extend(x.to_le_bytes()),
        MetadataValue::U16(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend(x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend(x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(u8::from(*x)),
        MetadataValue::String(s) => put_str(out, s),
        MetadataValue::Array { elem_type, values } => {
            out.extend(type_id(*elem_type).to_le_bytes());
            out.extend((values.len() as u64).to_le_bytes());
            for e in values {
                put_value(out, e);
            }
        }
        MetadataValue::U64(x) => out.extend(x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend(x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl Writer {
    fn new() -> Self {
        Self {
            kv: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    fn kv(&mut self, key: &str, v: MetadataValue) -> &mut Self {
        if key == "general.alignment" {
            if let MetadataValue::U32(a) = v {
                self.alignment = a.into();
            }
        }
        self.kv.push((key.to_owned(), v));
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push(RawTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            type_id: ty.id(),
            data,
        });
        self
    }

    fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    fn build(&self) -> Vec<u8> {
        let align = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(type_id(v.value_type()).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let data_start = out.len() as u64;
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(&t.data);
        }
        out
    }
}

fn s(x: &str) -> MetadataValue {
    MetadataValue::String(x.to_owned())
}

fn arr(elem_type: ValueType, values: Vec<MetadataValue>) -> MetadataValue {
    MetadataValue::Array { elem_type, values }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

// ---------------------------------------------------------------- hand-built blocks

/// A file with one tensor of every supported type, each built from known values.
fn every_type_file() -> (Vec<u8>, Vec<(&'static str, Vec<f32>)>) {
    let mut w = Writer::new();
    let mut expected = Vec::new();

    w.f32_tensor("f32", &[4], &[1.5, -2.0, 0.25, 3.0e-8]);
    expected.push(("f32", vec![1.5, -2.0, 0.25, 3.0e-8]));

    // 0x3C00 = 1.0, 0xC000 = -2.0, 0x3800 = 0.5, 0x7BFF = 65504 (largest f16), 0x0001 = 2^-24.
    let f16_bits: [u16; 5] = [0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001];
    w.tensor(
        "f16",
        &[5],
        GgmlType::F16,
        f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
    );
    expected.push(("f16", vec![1.0, -2.0, 0.5, 65504.0, 5.960_464_5e-8]));

    // bf16 is the top half of an f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x4049 = 3.140625.
    let bf16_bits: [u16; 3] = [0x3F80, 0xC040, 0x4049];
    w.tensor(
        "bf16",
        &[3],
        GgmlType::BF16,
        bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
    );
    expected.push(("bf16", vec![1.0, -3.0, 3.140625]));

    // Q8_0: d = 0.5, q[i] = i - 16 → (i - 16) / 2.
    let mut q8 = f16_bytes(0.5).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    w.tensor("q8_0", &[32], GgmlType::Q8_0, q8);
    expected.push(("q8_0", (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect()));

    // Q4_0: d = 2, qs[j] = j | (15 - j) << 4 → x[j] = (j - 8) * 2, x[j + 16] = (7 - j) * 2.
    let mut q40 = f16_bytes(2.0).to_vec();
    q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    w.tensor("q4_0", &[32], GgmlType::Q4_0, q40);
    let mut e: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 2.0).collect();
    e.extend((0..16).map(|j| (7.0 - j as f32) * 2.0));
    expected.push(("q4_0", e));

    // Q4_1: d = 0.25, m = -1, same nibbles → x[j] = j/4 - 1, x[j + 16] = (15 - j)/4 - 1.
    let mut q41 = f16_bytes(0.25).to_vec();
    q41.extend(f16_bytes(-1.0));
    q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    w.tensor("q4_1", &[32], GgmlType::Q4_1, q41);
    let mut e: Vec<f32> = (0..16).map(|j| j as f32 * 0.25 - 1.0).collect();
    e.extend((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.0));
    expected.push(("q4_1", e));

    // Q4_K: d = 1, dmin = 0.5; sub-block scales and mins chosen to use the high 2 bits.
    let sc: [u8; 8] = [1, 2, 3, 4, 17, 33, 50, 63];
    let mn: [u8; 8] = [0, 1, 2, 3, 20, 40, 60, 63];
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    let mut q4k = f16_bytes(1.0).to_vec();
    q4k.extend(f16_bytes(0.5));
    q4k.extend(scales);
    // Each 32-byte chunk: byte k holds (k % 16) low and (15 - k % 16) high.
    for _ in 0..4 {
        q4k.extend((0..32u8).map(|k| (k % 16) | ((15 - k % 16) << 4)));
    }
    w.tensor("q4_k", &[256], GgmlType::Q4_K, q4k);
    let e: Vec<f32> = (0..256)
        .map(|i| {
            let (sub, l) = (i / 32, i % 32);
            let q = if sub % 2 == 0 { l % 16 } else { 15 - l % 16 };
            f32::from(sc[sub]) * q as f32 - 0.5 * f32::from(mn[sub])
        })
        .collect();
    expected.push(("q4_k", e));

    // Q6_K: ql[k] = k (both halves), qh = 0b11_10_01_00 (group g gets high bits g),
    // scales[i] = i - 8, d = 0.25.
    let mut q6k: Vec<u8> = (0..128u8).map(|k| k % 64).collect();
    q6k.extend([0xE4u8; 64]);
    q6k.extend((0..16).map(|i| (i as i8 - 8) as u8));
    q6k.extend(f16_bytes(0.25));
    w.tensor("q6_k", &[256], GgmlType::Q6_K, q6k);
    let e: Vec<f32> = (0..256)
        .map(|i| {
            let (half, g, l) = (i / 128, (i % 128) / 32, i % 32);
            let byte = (l + 32 * (g % 2)) as u8;
            let low = if g < 2 { byte & 0x0F } else { byte >> 4 };
            let q = i32::from(low | ((g as u8) << 4)) - 32;
            let scale = (half * 8 + 2 * g + l / 16) as f32 - 8.0;
            0.25 * scale * q as f32
        })
        .collect();
    expected.push(("q6_k", e));

    (w.build(), expected)
}

#[test]
fn hand_built_blocks_dequantize_to_hand_computed_values() {
    let (bytes, expected) = every_type_file();
    let file = GgufFile::parse(&bytes).unwrap();
    for (name, want) in expected {
        let info = file.tensor(name).unwrap();
        let got = file.dequantize(info).unwrap();
        assert_eq!(got, want, "tensor {name}");
    }
    // A few values spelled out (Q4_K sub-blocks 1, 4, 7; Q6_K groups 0..3).
    let q4k = file.dequantize(file.tensor("q4_k").unwrap()).unwrap();
    assert_eq!(
        [q4k[0], q4k[32], q4k[128], q4k[224], q4k[255]],
        [0.0, 29.5, -10.0, 913.5, -31.5]
    );
    let q6k = file.dequantize(file.tensor("q6_k").unwrap()).unwrap();
    // i = 0: low 0, high 0 → -32, scale -8 → 64; i = 33: ql[33] & 15 = 1, high 1 → 17 - 32,
    // scale -6 → 22.5; i = 70: ql[6] >> 4 = 0, high 2 → 0; i = 127: ql[63] >> 4 = 3, high 3
    // → 51 - 32, scale -1 → -4.75.
    assert_eq!(
        [q6k[0], q6k[33], q6k[70], q6k[127]],
        [64.0, 22.5, 0.0, -4.75]
    );
}

#[test]
fn dequantisation_matches_gguf_py_on_random_blocks() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quant_blocks.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 7);
    for (name, case) in cases {
        let ty = GgmlType::from_id(case["ggml_type"].as_u64().unwrap() as u32).unwrap();
        let hex = case["hex"].as_str().unwrap();
        let raw: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let n = case["n_elements"].as_u64().unwrap();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        // Through a file (a 2-D tensor, rows of one block) and directly.
        let (block, _) = ty.block_layout();
        let mut w = Writer::new();
        w.tensor("t", &[block, n / block], ty, raw.clone());
        let bytes = w.build();
        let file = GgufFile::parse(&bytes).unwrap();
        let got = file.dequantize(file.tensor("t").unwrap()).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs gguf-py {w}");
        }
        assert_eq!(dequant::dequantize(ty, &raw, n as usize).unwrap(), got);
    }
}

#[test]
fn dequantize_rejects_wrong_lengths_and_unsupported_types() {
    assert!(matches!(
        dequant::dequantize(GgmlType::Q4_1, &[0; 19], 32),
        Err(GgufError::BadTensor(_))
    ));
    assert!(matches!(
        dequant::dequantize(GgmlType::Q8_0, &[0; 34], 31),
        Err(GgufError::BadTensor(_))
    ));
    assert!(matches!(
        dequant::dequantize(GgmlType::Q5_K, &[0; 176], 256),
        Err(GgufError::NoDequantizer { ty: GgmlType::Q5_K })
    ));
}

// ---------------------------------------------------------------- metadata

fn every_metadata_type() -> Vec<(String, MetadataValue)> {
    use MetadataValue as V;
    vec![
        ("general.architecture".into(), s("test")),
        ("general.alignment".into(), V::U32(64)),
        ("t.u8".into(), V::U8(250)),
        ("t.i8".into(), V::I8(-7)),
        ("t.u16".into(), V::U16(65_000)),
        ("t.i16".into(), V::I16(-30_000)),
        ("t.u32".into(), V::U32(4_000_000_000)),
        ("t.i32".into(), V::I32(-2_000_000_000)),
        ("t.f32".into(), V::F32(-1.25e-5)),
        ("t.bool_true".into(), V::Bool(true)),
        ("t.bool_false".into(), V::Bool(false)),
        ("t.string".into(), s("héllo ✓ \u{1F600}")),
        ("t.empty_string".into(), s("")),
        ("t.u64".into(), V::U64(u64::MAX)),
        ("t.i64".into(), V::I64(i64::MIN)),
        ("t.f64".into(), V::F64(std::f64::consts::PI)),
        (
            "t.array_u8".into(),
            arr(ValueType::U8, vec![V::U8(0), V::U8(1), V::U8(255)]),
        ),
        (
            "t.array_string".into(),
            arr(ValueType::String, vec![s("a"), s(""), s("Ġthe")]),
        ),
        (
            "t.array_f32".into(),
            arr(ValueType::F32, vec![V::F32(0.5), V::F32(-0.0)]),
        ),
        ("t.array_empty".into(), arr(ValueType::I64, vec![])),
        (
            "t.array_nested".into(),
            arr(
                ValueType::Array,
                vec![
                    arr(ValueType::I32, vec![V::I32(1), V::I32(-2)]),
                    arr(ValueType::I32, vec![]),
                    arr(ValueType::I32, vec![V::I32(3)]),
                ],
            ),
        ),
        (
            "t.array_bool".into(),
            arr(ValueType::Bool, vec![V::Bool(true), V::Bool(false)]),
        ),
    ]
}

#[test]
fn every_metadata_type_round_trips() {
    let mut w = Writer::new();
    for (k, v) in every_metadata_type() {
        w.kv(&k, v);
    }
    w.f32_tensor("a", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    w.f32_tensor("b", &[5], &[7.0; 5]);
    let bytes = w.build();
    let file = GgufFile::parse(&bytes).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.metadata, every_metadata_type());
    assert_eq!(file.alignment, 64);
    assert_eq!(file.data_offset % 64, 0);
    let a = file.tensor("a").unwrap();
    assert_eq!(
        (a.dims.as_slice(), a.ty, a.offset, a.n_elements, a.n_bytes),
        (&[3u64, 2][..], GgmlType::F32, 0, 6, 24)
    );
    assert_eq!(a.row_major_shape(), vec![2, 3]);
    let b = file.tensor("b").unwrap();
    assert_eq!(
        b.offset, 64,
        "second tensor starts at the next 64-byte boundary"
    );
    assert_eq!(file.dequantize(b).unwrap(), vec![7.0; 5]);
    assert_eq!(file.get_u64("t.u8").unwrap(), 250);
    assert!(matches!(
        file.get_u64("t.i8"),
        Err(GgufError::WrongMetadataType { .. })
    ));
    assert_eq!(file.get_f64("t.f32").unwrap(), f64::from(-1.25e-5f32));
    assert_eq!(
        file.get_str_array("t.array_string").unwrap(),
        vec!["a", "", "Ġthe"]
    );
    assert!(matches!(
        file.get_str("missing"),
        Err(GgufError::MissingMetadata { .. })
    ));
}

#[test]
fn version_2_is_accepted_and_others_rejected() {
    let mut w = Writer::new();
    w.kv("general.architecture", s("x"));
    let mut bytes = w.build();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::parse(&bytes).unwrap().version, 2);
    for v in [1u32, 4, 0xFFFF_FFFF] {
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(
            matches!(GgufFile::parse(&bytes), Err(GgufError::UnsupportedVersion { version }) if version == v)
        );
    }
}

// ---------------------------------------------------------------- malformed files

/// Header of a v3 file with `n_tensors` tensors and `n_kv` metadata entries.
fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(n_tensors.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out
}

#[test]
fn malformed_files_give_typed_errors_with_offsets() {
    assert!(matches!(
        GgufFile::parse(b"GGML\x03\0\0\0"),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        GgufFile::parse(b"GG"),
        Err(GgufError::Truncated {
            offset: 0,
            what: "magic",
            ..
        })
    ));

    // A lying tensor count: 2^40 tensors in a 24-byte file.
    let e = GgufFile::parse(&header(1 << 40, 0)).unwrap_err();
    assert!(
        matches!(e, GgufError::CountTooLarge { offset: 8, count, .. } if count == 1 << 40),
        "{e}"
    );

    // A lying array length: one u32 array claiming 2^60 elements.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    let count_offset = b.len() as u64;
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 16]);
    match GgufFile::parse(&b).unwrap_err() {
        GgufError::InMetadata { key, source } => {
            assert_eq!(key, "k");
            assert!(
                matches!(*source, GgufError::CountTooLarge { offset, .. } if offset == count_offset)
            );
        }
        e => panic!("unexpected {e}"),
    }

    // A lying string length.
    let mut b = header(0, 1);
    b.extend(u64::MAX.to_le_bytes());
    b.extend([0u8; 16]);
    let e = GgufFile::parse(&b).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                offset: 32,
                what: "metadata key",
                ..
            }
        ),
        "{e}"
    );

    // Unknown value type, invalid bool, invalid UTF-8.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend(13u32.to_le_bytes());
    let e = GgufFile::parse(&b).unwrap_err();
    assert!(
        e.to_string().contains("unknown metadata value type 13"),
        "{e}"
    );
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend(7u32.to_le_bytes());
    b.push(2);
    assert!(GgufFile::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("neither 0 nor 1"));
    let mut b = header(0, 1);
    b.extend(2u64.to_le_bytes());
    b.extend([0xC3, 0x28]);
    b.extend([0u8; 16]);
    assert!(matches!(
        GgufFile::parse(&b),
        Err(GgufError::InvalidUtf8 { offset: 32, .. })
    ));

    // Arrays nested 100 deep.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend([0u8; 64]);
    let e = GgufFile::parse(&b).unwrap_err();
    assert!(e.to_string().contains("nested deeper"), "{e}");

    // Duplicate key.
    let mut w = Writer::new();
    w.kv("a", MetadataValue::U8(1))
        .kv("a", MetadataValue::U8(2));
    assert!(GgufFile::parse(&w.build())
        .unwrap_err()
        .to_string()
        .contains("duplicate key"));

    // Bad alignment value.
    let mut w = Writer::new();
    w.kv("general.alignment", MetadataValue::U32(3));
    w.alignment = 32;
    assert!(GgufFile::parse(&w.build()).is_err());
}

#[test]
fn bad_tensor_infos_are_rejected() {
    let good = {
        let mut w = Writer::new();
        w.f32_tensor("x", &[4], &[1.0; 4]);
        w.build()
    };
    assert!(GgufFile::parse(&good).is_ok());
    // Layout of the tensor info: 24-byte header, name (8 + 1), n_dims (4), dim (8), type (4),
    // offset (8).
    let n_dims_at = 24 + 9;
    let type_at = n_dims_at + 4 + 8;
    let offset_at = type_at + 4;

    let mut b = good.clone();
    b[n_dims_at..n_dims_at + 4].copy_from_slice(&5u32.to_le_bytes());
    assert!(GgufFile::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("dimension count"));

    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = GgufFile::parse(&b).unwrap_err();
    assert!(
        e.to_string().contains("unsupported ggml tensor type 99"),
        "{e}"
    );

    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&GgmlType::Q8_0.id().to_le_bytes());
    assert!(GgufFile::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("block size"));

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&8u64.to_le_bytes());
    assert!(GgufFile::parse(&b)
        .unwrap_err()
        .to_string()
        .contains("alignment"));

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = GgufFile::parse(&b).unwrap_err();
    assert!(e.to_string().contains("tensor data"), "{e}");

    let mut b = good.clone();
    b[n_dims_at + 4..n_dims_at + 12].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(GgufFile::parse(&b).is_err());

    // Data cut short.
    let e = GgufFile::parse(&good[..good.len() - 1]).unwrap_err();
    assert!(
        matches!(&e, GgufError::InTensor { name, source } if name == "x" && matches!(**source, GgufError::Truncated { needed: 16, available: 15, .. })),
        "{e}"
    );
}

// ---------------------------------------------------------------- Q/K permutation

/// `x.reshape(a, b, c, cols).swapaxes(1, 2).reshape(a*b*c, cols)` on row-major data.
fn swap_row_axes(w: &[f32], a: usize, b: usize, c: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for ia in 0..a {
        for ic in 0..c {
            for ib in 0..b {
                let row = (ia * b + ib) * c + ic;
                out.extend_from_slice(&w[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF rows → GGUF rows.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    swap_row_axes(w, n_head, 2, rows / n_head / 2, cols)
}

#[test]
fn unpermute_inverts_llama_cpp_permute_with_gqa() {
    let (n_head, n_kv, head_dim, hidden) = (8usize, 2usize, 6usize, 5usize);
    let q: Vec<f32> = (0..n_head * head_dim * hidden).map(|i| i as f32).collect();
    let k: Vec<f32> = (0..n_kv * head_dim * hidden).map(|i| -(i as f32)).collect();
    let q_gguf = llama_cpp_permute(&q, n_head * head_dim, hidden, n_head);
    let k_gguf = llama_cpp_permute(&k, n_kv * head_dim, hidden, n_kv);
    assert_ne!(q_gguf, q);
    assert_eq!(
        unpermute_qk_rows(&q_gguf, n_head * head_dim, hidden, n_head).unwrap(),
        q
    );
    assert_eq!(
        unpermute_qk_rows(&k_gguf, n_kv * head_dim, hidden, n_kv).unwrap(),
        k
    );
    // The head count matters: K un-permuted with the query head count is wrong.
    assert_ne!(
        unpermute_qk_rows(&k_gguf, n_kv * head_dim, hidden, n_head).unwrap_or_default(),
        k
    );
    // Row 1 of GGUF head 0 is HF row head_dim/2 (the rotate-half partner of row 0).
    assert_eq!(q_gguf[hidden..2 * hidden], q[3 * hidden..4 * hidden]);
    // A bias (one column) too.
    let bias: Vec<f32> = (0..n_kv * head_dim).map(|i| i as f32).collect();
    let bias_gguf = llama_cpp_permute(&bias, n_kv * head_dim, 1, n_kv);
    assert_eq!(
        unpermute_qk_rows(&bias_gguf, n_kv * head_dim, 1, n_kv).unwrap(),
        bias
    );
    assert!(unpermute_qk_rows(&q, 10, 24, 3).is_err());
}

// ---------------------------------------------------------------- synthetic llama import

/// GPT-2's byte → printable character map (`bytes_to_unicode`).
fn byte_level_chars() -> Vec<String> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable.contains(&b) {
                b
            } else {
                n += 1;
                255 + n
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// A tiny GGUF llama and the HF-order weights it encodes.
struct TinyLlama {
    /// The GGUF file.
    bytes: Vec<u8>,
    /// Per layer: q_proj in HF row order (the file holds it permuted).
    q: Vec<Vec<f32>>,
    /// Per layer: k_proj in HF row order.
    k: Vec<Vec<f32>>,
    /// The embedding's exact values.
    embed: Vec<f32>,
    /// Number of tokens.
    vocab: usize,
}

const HIDDEN: usize = 32;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 4;
const FFN: usize = 64;
const LAYERS: usize = 2;

fn tiny_llama(tied: bool) -> TinyLlama {
    use MetadataValue as V;
    let mut tokens = vec![
        "<|endoftext|>".to_owned(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_level_chars());
    tokens.extend(["he".to_owned(), "Ġt".into()]);
    let vocab = tokens.len();
    let mut types = vec![V::I32(3); 3];
    types.extend(std::iter::repeat_n(V::I32(1), vocab - 3));

    let mut w = Writer::new();
    w.kv("general.architecture", s("llama"))
        .kv("llama.block_count", V::U32(LAYERS as u32))
        .kv("llama.context_length", V::U32(256))
        .kv("llama.embedding_length", V::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", V::U32(FFN as u32))
        .kv("llama.attention.head_count", V::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", V::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", V::F32(10000.0))
        .kv("llama.rope.dimension_count", V::U32(HEAD_DIM as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-6))
        .kv("llama.vocab_size", V::U32(vocab as u32))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv(
            "tokenizer.ggml.tokens",
            arr(ValueType::String, tokens.iter().map(|t| s(t)).collect()),
        )
        .kv("tokenizer.ggml.token_type", arr(ValueType::I32, types))
        .kv(
            "tokenizer.ggml.merges",
            arr(ValueType::String, vec![s("h e"), s("Ġ t")]),
        )
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", V::U32(0))
        .kv("tokenizer.ggml.padding_token_id", V::U32(2))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(false))
        .kv(
            "tokenizer.chat_template",
            s("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"),
        );

    // Embedding as Q8_0: row r, block b has d = 1/64 and q[i] = (r + i + b) % 200 - 100.
    let mut embed_bytes = Vec::new();
    let mut embed = Vec::new();
    for r in 0..vocab {
        for b in 0..HIDDEN / 32 {
            embed_bytes.extend(f16_bytes(1.0 / 64.0));
            for i in 0..32 {
                let q = ((r + i + b) % 200) as i32 - 100;
                embed_bytes.push(q as i8 as u8);
                embed.push(q as f32 / 64.0);
            }
        }
    }
    w.tensor(
        "token_embd.weight",
        &[HIDDEN as u64, vocab as u64],
        GgmlType::Q8_0,
        embed_bytes,
    );
    let ramp = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 101) as f32 / 50.0 - 1.0)
            .collect()
    };
    // Norm weights: f16 and bf16 encodings of exactly representable values.
    let norm: Vec<f32> = (0..HIDDEN).map(|i| 1.0 + i as f32 / 32.0).collect();
    w.tensor(
        "output_norm.weight",
        &[HIDDEN as u64],
        GgmlType::F16,
        norm.iter().flat_map(|&x| f16_bytes(x)).collect(),
    );
    let (mut qs, mut ks) = (Vec::new(), Vec::new());
    for l in 0..LAYERS {
        let q = ramp(HEADS * HEAD_DIM * HIDDEN, 10 * l + 1);
        let k = ramp(KV_HEADS * HEAD_DIM * HIDDEN, 10 * l + 2);
        let p = |name: &str| format!("blk.{l}.{name}.weight");
        w.f32_tensor(
            &p("attn_q"),
            &[HIDDEN as u64, (HEADS * HEAD_DIM) as u64],
            &llama_cpp_permute(&q, HEADS * HEAD_DIM, HIDDEN, HEADS),
        );
        w.f32_tensor(
            &p("attn_k"),
            &[HIDDEN as u64, (KV_HEADS * HEAD_DIM) as u64],
            &llama_cpp_permute(&k, KV_HEADS * HEAD_DIM, HIDDEN, KV_HEADS),
        );
        w.f32_tensor(
            &p("attn_v"),
            &[HIDDEN as u64, (KV_HEADS * HEAD_DIM) as u64],
            &ramp(KV_HEADS * HEAD_DIM * HIDDEN, 10 * l + 3),
        );
        w.f32_tensor(
            &p("attn_output"),
            &[(HEADS * HEAD_DIM) as u64, HIDDEN as u64],
            &ramp(HIDDEN * HEADS * HEAD_DIM, 10 * l + 4),
        );
        w.f32_tensor(
            &p("ffn_gate"),
            &[HIDDEN as u64, FFN as u64],
            &ramp(FFN * HIDDEN, 10 * l + 5),
        );
        w.f32_tensor(
            &p("ffn_up"),
            &[HIDDEN as u64, FFN as u64],
            &ramp(FFN * HIDDEN, 10 * l + 6),
        );
        w.f32_tensor(
            &p("ffn_down"),
            &[FFN as u64, HIDDEN as u64],
            &ramp(FFN * HIDDEN, 10 * l + 7),
        );
        w.tensor(
            &p("attn_norm"),
            &[HIDDEN as u64],
            GgmlType::BF16,
            norm.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        );
        w.f32_tensor(&p("ffn_norm"), &[HIDDEN as u64], &norm);
        qs.push(q);
        ks.push(k);
    }
    if !tied {
        w.f32_tensor(
            "output.weight",
            &[HIDDEN as u64, vocab as u64],
            &ramp(vocab * HIDDEN, 99),
        );
    }
    TinyLlama {
        bytes: w.build(),
        q: qs,
        k: ks,
        embed,
        vocab,
    }
}

fn read_f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), values)
}

#[test]
fn synthetic_llama_imports_as_hf_directory() {
    let tiny = tiny_llama(true);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, &tiny.bytes).unwrap();
    let out = dir.path().join("hf");
    let report = import_gguf(&gguf, &out).unwrap();
    assert_eq!(report.tensors, 2 + 9 * LAYERS);
    assert!(report.params.tied_embeddings);

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("hidden_size", serde_json::json!(HIDDEN)),
        ("intermediate_size", serde_json::json!(FFN)),
        ("num_hidden_layers", serde_json::json!(LAYERS)),
        ("num_attention_heads", serde_json::json!(HEADS)),
        ("num_key_value_heads", serde_json::json!(KV_HEADS)),
        ("head_dim", serde_json::json!(HEAD_DIM)),
        ("vocab_size", serde_json::json!(tiny.vocab)),
        ("max_position_embeddings", serde_json::json!(256)),
        ("tie_word_embeddings", serde_json::json!(true)),
        ("rope_theta", serde_json::json!(10000.0)),
        ("rms_norm_eps", serde_json::json!(f64::from(1e-6f32))),
        ("model_type", serde_json::json!("llama")),
        ("torch_dtype", serde_json::json!("float32")),
        ("bos_token_id", serde_json::json!(1)),
        ("eos_token_id", serde_json::json!(2)),
        ("pad_token_id", serde_json::json!(2)),
    ] {
        assert_eq!(config[key], want, "config.json {key}");
    }
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 + 9 * LAYERS);
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "tied: no lm_head.weight"
    );
    let (shape, embed) = read_f32_tensor(&st, "model.embed_tokens.weight");
    assert_eq!(
        (shape, embed),
        (vec![tiny.vocab, HIDDEN], tiny.embed.clone())
    );
    for l in 0..LAYERS {
        let (shape, q) = read_f32_tensor(&st, &format!("model.layers.{l}.self_attn.q_proj.weight"));
        assert_eq!(shape, vec![HEADS * HEAD_DIM, HIDDEN]);
        assert_eq!(q, tiny.q[l], "layer {l} q_proj back in HF row order");
        let (shape, k) = read_f32_tensor(&st, &format!("model.layers.{l}.self_attn.k_proj.weight"));
        assert_eq!(shape, vec![KV_HEADS * HEAD_DIM, HIDDEN]);
        assert_eq!(k, tiny.k[l], "layer {l} k_proj back in HF row order");
        let (shape, down) = read_f32_tensor(&st, &format!("model.layers.{l}.mlp.down_proj.weight"));
        assert_eq!(shape, vec![HIDDEN, FFN]);
        assert_eq!(down.len(), HIDDEN * FFN);
        let (_, norm) = read_f32_tensor(&st, &format!("model.layers.{l}.input_layernorm.weight"));
        assert_eq!(norm[31], 1.0 + 31.0 / 32.0);
    }

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("the<|im_end|> 12", false).unwrap();
    // Byte b's token is id 3 + b; "he" is the second-to-last token.
    let byte_id = |c: char| 3 + c as u32;
    let he = tiny.vocab as u32 - 2;
    // "the" → t + he; the special token; " 12" → Ġ (the space byte), 1, 2 (no merges).
    assert_eq!(
        enc.get_ids(),
        &[
            byte_id('t'),
            he,
            2,
            byte_id(' '),
            byte_id('1'),
            byte_id('2')
        ]
    );
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "the<|im_end|> 12"
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["model_max_length"], 256);
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        tc["chat_template"].as_str().unwrap()
    );
    assert!(out.join("generation_config.json").exists());

    // No temp directory left behind, and a second import refuses to overwrite.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    assert!(matches!(
        import_gguf(&gguf, &out),
        Err(GgufError::OutputExists(_))
    ));
}

#[test]
fn untied_llama_writes_lm_head_and_bad_models_fail_cleanly() {
    let tiny = tiny_llama(false);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, &tiny.bytes).unwrap();
    let report = import_gguf(&gguf, &dir.path().join("hf")).unwrap();
    assert!(!report.params.tied_embeddings);
    assert_eq!(report.tensors, 3 + 9 * LAYERS);

    // A truncated file: a typed error, and no output directory.
    std::fs::write(&gguf, &tiny.bytes[..tiny.bytes.len() - 10]).unwrap();
    let out = dir.path().join("hf2");
    let e = import_gguf(&gguf, &out).unwrap_err();
    assert!(e.to_string().contains("tiny.gguf"), "{e}");
    assert!(!out.exists());
    assert!(matches!(
        import_gguf(&dir.path().join("absent.gguf"), &out),
        Err(GgufError::Io { .. })
    ));
}

#[test]
fn gpt2_tokenizer_applies_merges_and_bos_and_rejects_other_models() {
    let mut w = Writer::new();
    w.kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("gpt2"))
        .kv(
            "tokenizer.ggml.tokens",
            arr(
                ValueType::String,
                byte_level_chars()
                    .iter()
                    .chain([&"12".to_owned()])
                    .map(|t| s(t))
                    .collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.merges",
            arr(ValueType::String, vec![s("1 2")]),
        )
        .kv("tokenizer.ggml.bos_token_id", MetadataValue::U32(0))
        .kv("tokenizer.ggml.add_bos_token", MetadataValue::Bool(true));
    let bytes = w.build();
    let file = GgufFile::parse(&bytes).unwrap();
    let hf = hf_tokenizer(&file, 100).unwrap();
    assert_eq!(hf.tokenizer_json["pre_tokenizer"]["type"], "ByteLevel");
    let json = serde_json::to_string(&hf.tokenizer_json).unwrap();
    let tok: tokenizers::Tokenizer = json.parse().unwrap();
    // Merge "1 2" applies; add_bos puts token 0 first.
    assert_eq!(tok.encode("12", true).unwrap().get_ids(), &[0, 256]);

    let mut w = Writer::new();
    w.kv("tokenizer.ggml.model", s("llama"));
    let bytes = w.build();
    let e = hf_tokenizer(&GgufFile::parse(&bytes).unwrap(), 1).unwrap_err();
    assert!(matches!(e, GgufError::Unsupported { .. }), "{e}");
}

// ---------------------------------------------------------------- fuzz

/// xorshift64*: a deterministic stream for the fuzz loop (the field is the state).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Parses and, when that succeeds, exercises everything downstream; must never panic.
fn exercise(bytes: &[u8]) -> bool {
    let Ok(file) = GgufFile::parse(bytes) else {
        return false;
    };
    for t in &file.tensors {
        let _ = file.dequantize(t);
    }
    let _ = dreamloop::model::gguf::llama::LlamaParams::from_gguf(&file);
    let _ = hf_tokenizer(&file, 16);
    true
}

/// Applies 1..=8 random edits: random bytes, 0x00/0xFF runs, or a huge u64 written somewhere.
fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut b = original.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(b.len());
        match rng.below(4) {
            0 => b[at] = rng.next() as u8,
            1 => b[at] ^= 1 << rng.below(8),
            2 => {
                let fill = if rng.below(2) == 0 { 0x00 } else { 0xFF };
                let end = (at + 1 + rng.below(8)).min(b.len());
                b[at..end].fill(fill);
            }
            _ => {
                let end = (at + 8).min(b.len());
                let v = rng.next().to_le_bytes();
                b[at..end].copy_from_slice(&v[..end - at]);
            }
        }
    }
    b
}

#[test]
fn fuzz_truncated_and_mutated_files_never_panic() {
    let (types_file, _) = every_type_file();
    let tiny = tiny_llama(true).bytes;
    let mut meta = Writer::new();
    for (k, v) in every_metadata_type() {
        meta.kv(&k, v);
    }
    meta.f32_tensor("a", &[3, 2], &[1.0; 6]);
    let meta = meta.build();

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = 0;
    let mut parsed = 0;
    for original in [&types_file, &meta, &tiny] {
        assert!(exercise(original));
        // Every prefix of the smaller files; an even spread over the tiny llama.
        let step = (original.len() / 1500).max(1);
        for len in (0..original.len()).step_by(step) {
            assert!(!exercise(&original[..len]), "prefix {len} parsed");
            cases += 1;
        }
        for _ in 0..1500 {
            parsed += usize::from(exercise(&mutate(&mut rng, original)));
            cases += 1;
        }
    }
    assert!(cases > 5000);
    // Some mutations land in tensor data or padding and still parse; the loop covers both.
    assert!(parsed > 0 && parsed < cases, "{parsed} of {cases}");
}
