//! Other GGUF block types of 4 and 6 bits, kept at (about) their own size, rather than
//! requantized to int8 blocks, which take twice the bytes that a decode step reads.
//!
//! A Q4_1 block is 32 values `d·q + m`: an f16 scale `d`, an f16 minimum `m` and 16 bytes of
//! codes `q` in 0..16 (byte `i` holds value `i` in its low nibble, value `i + 16` in its high one).
//! - Q4_0 (`d·(q − 8)`, an f16 `d` then the same 16 bytes) becomes a Q4_1 block with exactly
//!   `m = −8·d`.
//! - Q4_K super-blocks hold 256 values in eight sub-blocks of 32, each `d·sc·q − dmin·mn` with
//!   6-bit `sc` and `mn` and f16 `d`, `dmin` shared by the super-block: kept as they are, in
//!   panels of their own (see [`q4_k_panels`]), 4.625 bits a weight. (As Q4_1 blocks, with
//!   `d·sc` and `−dmin·mn` in f16, they took 5: 8 % more bytes for a decode step to read.)
//! - Q6_K super-blocks (256 values `d·sc·(q − 32)`, 6-bit `q`, an int8 `sc` per 16 values, an
//!   f16 `d`) are kept as they are, in 6-bit panels of their own (see [`q6_k_panels`]).

use candle_core::Result;
use half::f16;

use super::{
    q4k_at, q6_at, Codes, QMatrix, BLOCK, PANEL, Q4K_BLOCK, Q4K_D, Q4K_MN, Q4K_NEG_DMIN,
    Q4K_PANEL_SUPER, Q4K_SC, Q6_BLOCK, Q6_D, Q6_HIGH, Q6_PANEL_SUPER, Q6_SCALES, SUPER,
};

/// Bytes of a GGUF Q4_0 block: f16 scale, 16 bytes of codes.
const Q4_0_BYTES: usize = 18;
/// Values and bytes of a GGUF Q4_K super-block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit
/// scales and minimums, 128 bytes of codes.
const Q4_K_VALUES: usize = 256;
const Q4_K_BYTES: usize = 144;

/// Q4_0 blocks as Q4_1 blocks of the same values; `None` where a block's `−8·d` overflows f16
/// (a scale above 8188, which no quantizer writes).
pub(super) fn q4_0_as_q4_1(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.len().is_multiple_of(Q4_0_BYTES) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / Q4_0_BYTES * super::Q4_1_BYTES);
    for block in bytes.chunks_exact(Q4_0_BYTES) {
        let d = f16::from_le_bytes([block[0], block[1]]);
        // ×8 is exact in f16 (a power of two) unless it overflows.
        let m = f16::from_f32(-8. * d.to_f32());
        if !m.is_finite() {
            return None;
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        out.extend_from_slice(&block[2..]);
    }
    Some(out)
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K super-block's 12 packed bytes: the first
/// four pairs in the low 6 bits of bytes `j` and `j + 4`; the last four in the nibbles of bytes
/// 8 to 11, with their top 2 bits in the top bits of the first eight bytes.
fn scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// A K-quant matrix's super-blocks of `sb_bytes` bytes (256 values each, row by row), each with
/// its row's lane in its panel and the panel-block of its first block of 32.
fn super_blocks(
    bytes: &[u8],
    cols: usize,
    sb_bytes: usize,
) -> impl Iterator<Item = (usize, usize, &[u8])> {
    let blocks = cols / BLOCK;
    let row_bytes = cols / (SUPER * BLOCK) * sb_bytes;
    bytes
        .chunks_exact(row_bytes)
        .enumerate()
        .flat_map(move |(r, row)| {
            let (p, lane) = (r / PANEL, r % PANEL);
            let sbs = row.chunks_exact(sb_bytes).enumerate();
            sbs.map(move |(s, sb)| (lane, p * blocks + s * SUPER, sb))
        })
}

/// GGUF Q4_K blocks (`rows * cols / 256` super-blocks of 144 bytes) as Q4_K panels, without
/// changing a value: each block of 32 keeps its codes and its 6-bit scale and minimum (a byte
/// each), each super-block its f16 `d` and `dmin` (the latter negated, which is exact).
pub(super) fn q4_k_panels(bytes: &[u8], rows: usize, cols: usize) -> Result<QMatrix> {
    super::check_block_bytes("q4_k", bytes, rows, cols, Q4_K_VALUES, Q4_K_BYTES)?;
    let blocks = cols / BLOCK;
    // Padding rows: everything zero, so w = 0.
    let mut out = vec![0u8; rows.div_ceil(PANEL) * blocks / SUPER * Q4K_PANEL_SUPER];
    for (lane, first, sb) in super_blocks(bytes, cols, Q4_K_BYTES) {
        let (packed, qs) = (&sb[4..16], &sb[16..]);
        let (_, head) = q4k_at(first);
        out[head + Q4K_D + 2 * lane..][..2].copy_from_slice(&sb[0..2]);
        let neg_dmin = -f16::from_le_bytes([sb[2], sb[3]]);
        out[head + Q4K_NEG_DMIN + 2 * lane..][..2].copy_from_slice(&neg_dmin.to_le_bytes());
        for j in 0..SUPER {
            let (at, _) = q4k_at(first + j);
            let dst = &mut out[at..][..Q4K_BLOCK];
            // Sub-blocks 2i and 2i + 1 share 32 bytes: the low nibbles, then the high ones.
            let shift = 4 * (j % 2);
            let code = |v: usize| (qs[32 * (j / 2) + v] >> shift) & 0xF;
            for step in 0..BLOCK / 8 {
                for i in 0..4 {
                    let v = 4 * step + i;
                    dst[(step * PANEL + lane) * 4 + i] = code(v) | (code(v + BLOCK / 2) << 4);
                }
            }
            let (sc, mn) = scale_min(j, packed);
            dst[Q4K_SC + lane] = sc;
            dst[Q4K_MN + lane] = mn;
        }
    }
    Ok(QMatrix {
        rows,
        cols,
        codes: Codes::Q4K(out),
    })
}

/// Values and bytes of a GGUF Q6_K super-block: 128 bytes of low 4 bits, 64 of high 2 bits, 16
/// int8 scales, f16 `d`.
const Q6_K_VALUES: usize = 256;
const Q6_K_BYTES: usize = 210;

/// A Q6_K super-block's 256 codes (0..64), in order.
fn q6_k_codes(sb: &[u8]) -> [u8; Q6_K_VALUES] {
    let (ql, qh) = (&sb[..128], &sb[128..192]);
    let mut q = [0u8; Q6_K_VALUES];
    // Each half of 128 values: bytes `l` of its 64 low-bit bytes and 32 high-bit bytes hold
    // values `l`, `l + 32`, `l + 64` and `l + 96`.
    for half in 0..2 {
        let (ql, qh, q) = (&ql[64 * half..], &qh[32 * half..], &mut q[128 * half..]);
        for l in 0..32 {
            q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// GGUF Q6_K blocks (`rows * cols / 256` super-blocks of 210 bytes) as 6-bit panels, without
/// changing a value: each block of 32 keeps its codes and its two sub-blocks' int8 scales, each
/// super-block its `d`.
pub(super) fn q6_k_panels(bytes: &[u8], rows: usize, cols: usize) -> Result<QMatrix> {
    super::check_block_bytes("q6_k", bytes, rows, cols, Q6_K_VALUES, Q6_K_BYTES)?;
    let blocks = cols / BLOCK;
    // Padding rows: everything zero, so w = 0.
    let mut out = vec![0u8; rows.div_ceil(PANEL) * blocks / SUPER * Q6_PANEL_SUPER];
    for (lane, first, sb) in super_blocks(bytes, cols, Q6_K_BYTES) {
        let codes = q6_k_codes(sb);
        let (scales, d) = (&sb[192..208], &sb[208..210]);
        let (_, head) = q6_at(first);
        out[head + Q6_D + 2 * lane..][..2].copy_from_slice(d);
        for k in 0..SUPER {
            let q = &codes[BLOCK * k..][..BLOCK];
            let (at, _) = q6_at(first + k);
            let dst = &mut out[at..][..Q6_BLOCK];
            for j in 0..BLOCK / 8 {
                for i in 0..4 {
                    let (lo, hi) = (q[4 * j + i], q[BLOCK / 2 + 4 * j + i]);
                    dst[(j * PANEL + lane) * 4 + i] = (lo & 0xF) | ((hi & 0xF) << 4);
                    // Step j's high bits: a nibble, steps 2i and 2i + 1 sharing a byte.
                    let high = (lo >> 4) | ((hi >> 4) << 2);
                    dst[Q6_HIGH + (j / 2) * 4 * PANEL + lane * 4 + i] |= high << (4 * (j % 2));
                }
            }
            dst[Q6_SCALES + lane] = scales[2 * k];
            dst[Q6_SCALES + PANEL + lane] = scales[2 * k + 1];
        }
    }
    Ok(QMatrix {
        rows,
        cols,
        codes: Codes::Q6(out),
    })
}
