//! Portable kernels: the reference the SIMD ones are tested against, and the fallback.

use half::f16;

use super::{
    q4k_at, q6_at, Activations, Out, Panels, RowOut, BLOCK, PANEL, Q4K_BLOCK, Q4K_D, Q4K_MN,
    Q4K_NEG_DMIN, Q4K_SC, Q4_MINS, Q4_PANEL_BLOCK, Q4_SCALES, Q6_BLOCK, Q6_D, Q6_HIGH, Q6_SCALES,
    Q8_PANEL_BLOCK,
};

pub unsafe fn quantize(x: &[f32], first: RowOut, rest: Option<RowOut>) {
    super::quantize_row(x, first, rest)
}

pub unsafe fn tile(w: &Panels, panels: usize, x: &Activations, out: Out) {
    let blocks = x.blocks();
    for p in 0..panels {
        for i in (0..x.m).step_by(x.terms) {
            let row = out.at(x.out_row(i), p);
            for lane in 0..PANEL {
                // Each term's sum, the terms added at the end as the SIMD kernels do.
                let terms = (i..i + x.terms).map(|i| {
                    (0..blocks)
                        .map(|b| term(w, p * blocks + b, lane, x, i, b))
                        .sum::<f32>()
                });
                *row.add(lane) = terms.sum();
            }
        }
    }
}

/// Block `b` of activation row `i` against panel-block `pb`'s row `lane`.
fn term(w: &Panels, pb: usize, lane: usize, x: &Activations, i: usize, b: usize) -> f32 {
    let blocks = x.blocks();
    let xb = &x.quants[i * x.cols + b * BLOCK..][..BLOCK];
    let dx = x.scales[i * blocks + b];
    match *w {
        Panels::Q8 { codes, scales } => {
            let c = &codes[pb * Q8_PANEL_BLOCK..][..Q8_PANEL_BLOCK];
            let dot: i32 = (0..BLOCK)
                .map(|v| {
                    let q = (c[(v / 4 * PANEL + lane) * 4 + v % 4] ^ 0x80) as i8;
                    q as i32 * xb[v] as i32
                })
                .sum();
            dot as f32 * (scales[pb * PANEL + lane] * dx)
        }
        Panels::Q4(data) => {
            let c = &data[pb * Q4_PANEL_BLOCK..][..Q4_PANEL_BLOCK];
            let half = |at: usize| f16::from_le_bytes([c[at + 2 * lane], c[at + 2 * lane + 1]]);
            dot4(c, lane, xb) as f32 * (half(Q4_SCALES).to_f32() * dx)
                + half(Q4_MINS).to_f32() * x.sums[i * blocks + b]
        }
        Panels::Q4K(data) => {
            let (at, head) = q4k_at(pb);
            let c = &data[at..][..Q4K_BLOCK];
            let half = |at: usize| {
                f16::from_le_bytes([data[head + at + 2 * lane], data[head + at + 2 * lane + 1]])
            };
            // As the SIMD kernels round: each byte scale times its super-block's f16 first.
            let d = f32::from(c[Q4K_SC + lane]) * half(Q4K_D).to_f32();
            let neg_min = f32::from(c[Q4K_MN + lane]) * half(Q4K_NEG_DMIN).to_f32();
            dot4(c, lane, xb) as f32 * (d * dx) + neg_min * x.sums[i * blocks + b]
        }
        Panels::Q6(data) => {
            let (at, head) = q6_at(pb);
            let c = &data[at..][..Q6_BLOCK];
            // Value v's code: its low 4 bits in the 4-bit layout, its high 2 bits in the nibble
            // of its step.
            let code = |v: usize| {
                let (half, v) = (v / (BLOCK / 2), v % (BLOCK / 2));
                let (step, i) = (v / 4, v % 4);
                let low = c[(step * PANEL + lane) * 4 + i] >> (4 * half) & 15;
                let nibble = c[Q6_HIGH + (step / 2) * 4 * PANEL + lane * 4 + i] >> (4 * (step % 2));
                (low | ((nibble >> (2 * half)) & 3) << 4) as i32
            };
            // Each half's dot product, from -32 * the sum of its activations.
            let dot = |h: usize| {
                let x0 = h * BLOCK / 2;
                (0..BLOCK / 2)
                    .map(|v| code(x0 + v) * xb[x0 + v] as i32)
                    .fold(x.halves[(i * blocks + b) * 2 + h], |a, d| a + d)
            };
            let scale = |h: usize| c[Q6_SCALES + h * PANEL + lane] as i8 as f32;
            let d = &data[head + Q6_D + 2 * lane..];
            let d = f16::from_le_bytes([d[0], d[1]]).to_f32();
            (dot(0) as f32 * scale(0) + dot(1) as f32 * scale(1)) * (d * dx)
        }
    }
}

/// Row `lane` of a 4-bit panel-block's codes (`c`) against a block of activations.
fn dot4(c: &[u8], lane: usize, xb: &[i8]) -> i32 {
    (0..BLOCK / 2)
        .map(|v| {
            let byte = c[(v / 4 * PANEL + lane) * 4 + v % 4];
            (byte & 15) as i32 * xb[v] as i32 + (byte >> 4) as i32 * xb[BLOCK / 2 + v] as i32
        })
        .sum()
}
