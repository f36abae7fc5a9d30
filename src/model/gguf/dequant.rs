//! ggml block formats → f32.
//!
//! Follows `dequantize_row_*` in ggml's `ggml-quants.c` and the `dequantize_blocks` methods
//! of gguf-py's `quants.py`, operation for operation in f32 (scale products are formed
//! before multiplying the quant, as there), so results are bit-identical to gguf-py's.
//!
//! Block layouts (little-endian; `d`, `m`, `dmin` are f16):
//!
//! | type | elements | bytes | layout | value |
//! | --- | --- | --- | --- | --- |
//! | Q4_0 | 32 | 18 | `d, qs[16]` | `(q - 8) * d`; element `j` is the low nibble of `qs[j]`, `j + 16` the high nibble |
//! | Q4_1 | 32 | 20 | `d, m, qs[16]` | `q * d + m`, nibbles as Q4_0 |
//! | Q8_0 | 32 | 34 | `d, qs[32] (i8)` | `q * d` |
//! | Q4_K | 256 | 144 | `d, dmin, scales[12], qs[128]` | 8 sub-blocks of 32 with 6-bit scale `sc` and min `m`: `d*sc * q - dmin*m`; 32-byte chunk `c` holds sub-block `2c` in its low nibbles and `2c + 1` in its high nibbles |
//! | Q6_K | 256 | 210 | `ql[128], qh[64], scales[16] (i8), d` | 16 sub-blocks of 16 with scale `d*scales[i]`, 6-bit quant minus 32 (see [`q6_k_block`]) |
//!
//! It does not know about tensor names or shapes: input is a byte run of whole blocks.

use super::{GgmlType, GgufError};
use half::{bf16, f16};

/// Decodes `n_elements` values of type `ty` from `data`, which must hold exactly the
/// corresponding whole blocks.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    let (block, block_bytes) = ty.block_layout();
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    if n_elements % block != 0 {
        return Err(GgufError::BadTensor(format!(
            "{n_elements} elements are not a whole number of {ty} blocks of {block}"
        )));
    }
    let expected = n_elements / block * block_bytes;
    if data.len() != expected {
        return Err(GgufError::BadTensor(format!(
            "{n_elements} {ty} elements need {expected} bytes, got {}",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(n_elements);
    let blocks = data.chunks_exact(block_bytes);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::BF16 => out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0_block(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1_block(b, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0_block(b, &mut out)),
        GgmlType::Q4_K => blocks.for_each(|b| q4_k_block(b, &mut out)),
        GgmlType::Q6_K => blocks.for_each(|b| q6_k_block(b, &mut out)),
        other => return Err(GgufError::NoDequantizer { ty: other }),
    }
    Ok(out)
}

/// f16 at `b[i..i + 2]`.
fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `dequantize_row_q4_0`: 32 elements from 18 bytes.
fn q4_0_block(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| (i32::from(q & 0x0F) - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
}

/// `dequantize_row_q4_1`: 32 elements from 20 bytes.
fn q4_1_block(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
}

/// `dequantize_row_q8_0`: 32 elements from 34 bytes.
fn q8_0_block(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
///
/// Bytes 0..4 hold the low 6 bits of scales 0..4 (top 2 bits: high bits of scales 4..8),
/// bytes 4..8 the same for the mins, bytes 8..12 the low nibbles of scales 4..8 and
/// (high nibble) of mins 4..8.
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// `dequantize_row_q4_K`: 256 elements from 144 bytes.
fn q4_k_block(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk_index, chunk) in qs.chunks_exact(32).enumerate() {
        let (sc_lo, m_lo) = scale_min_k4(2 * chunk_index, scales);
        let (sc_hi, m_hi) = scale_min_k4(2 * chunk_index + 1, scales);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        out.extend(chunk.iter().map(|&q| d_lo * f32::from(q & 0x0F) - min_lo));
        out.extend(chunk.iter().map(|&q| d_hi * f32::from(q >> 4) - min_hi));
    }
}

/// `dequantize_row_q6_K`: 256 elements from 210 bytes.
///
/// Each half (128 elements) uses 64 bytes of `ql`, 32 of `qh` and 8 scales. Within a half,
/// element `32 * g + l` (group `g` in 0..4, `l` in 0..32) takes its low 4 bits from
/// `ql[l + 32 * (g % 2)]` (low nibble for `g < 2`, high nibble otherwise), its top 2 bits
/// from bits `2g..2g + 2` of `qh[l]`, and scale `scales[2g + l / 16]`.
fn q6_k_block(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        for g in 0..4 {
            for l in 0..32 {
                let low = if g < 2 {
                    ql[l + 32 * (g % 2)] & 0x0F
                } else {
                    ql[l + 32 * (g % 2)] >> 4
                };
                let high = (qh[l] >> (2 * g)) & 3;
                let q = i32::from(low | (high << 4)) - 32;
                let scale = d * f32::from(sc[2 * g + l / 16] as i8);
                out.push(scale * q as f32);
            }
        }
    }
}
