//! Portable kernels: the reference the SIMD ones are tested against, and the fallback.

use super::{dot, XGroup, BLOCK};

pub unsafe fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
    let (cols, blocks) = (wq.len(), ws.len());
    for (k, o) in outs.iter_mut().enumerate() {
        let xq = &x.quants[k * cols..][..cols];
        *o = (0..blocks)
            .map(|b| {
                let s: i32 = (0..BLOCK)
                    .map(|i| wq[b * BLOCK + i] as i32 * xq[b * BLOCK + i] as i32)
                    .sum();
                s as f32 * (ws[b] * x.scales[k * blocks + b])
            })
            .sum();
    }
}

pub unsafe fn q4(nib: &[u8], ws: &[f32], mins: &[f32], x: &XGroup, outs: &mut [f32]) {
    let blocks = ws.len();
    let cols = blocks * BLOCK;
    for (k, o) in outs.iter_mut().enumerate() {
        let xq = &x.quants[k * cols..][..cols];
        let main: f32 = (0..blocks)
            .map(|b| {
                let s: i32 = (0..BLOCK / 2)
                    .map(|i| {
                        let byte = nib[b * BLOCK / 2 + i];
                        (byte & 15) as i32 * xq[b * BLOCK + i] as i32
                            + (byte >> 4) as i32 * xq[b * BLOCK + BLOCK / 2 + i] as i32
                    })
                    .sum();
                s as f32 * (ws[b] * x.scales[k * blocks + b])
            })
            .sum();
        *o = main + dot(mins, &x.sums[k * blocks..][..blocks]);
    }
}
