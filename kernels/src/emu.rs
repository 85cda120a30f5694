//! Launching the CUDA kernels on the CPU stand-in runtime of `emu/` (the `cuda-emu` feature),
//! for their tests on machines without a GPU. "Device memory" is host memory: a kernel's
//! pointer arguments are the addresses of host buffers.
//!
//! The emulator runs a block's threads as fibers that switch only at barriers, so a kernel that
//! is correct on a GPU gives the same results here; it aborts the process with a message on
//! what it can see is undefined on a GPU (a full-mask shuffle after a lane has exited, a
//! barrier that can never release).

use std::ffi::{c_char, c_int, c_void, CString};

extern "C" {
    fn candela_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// One kernel argument, as the kernel's C signature takes it.
pub(crate) enum Arg {
    Ptr(*const c_void),
    I32(i32),
    U32(u32),
    F32(f32),
}

/// A pointer argument to `buf`'s first element.
pub(crate) fn ptr<T>(buf: &[T]) -> Arg {
    Arg::Ptr(buf.as_ptr().cast())
}

/// A pointer argument the kernel writes through.
pub(crate) fn ptr_mut<T>(buf: &mut [T]) -> Arg {
    Arg::Ptr(buf.as_mut_ptr().cast_const().cast())
}

/// Runs kernel `name` over `grid` blocks of `block` threads; panics if there is no such kernel.
pub(crate) fn launch(name: &str, grid: [u32; 3], block: [u32; 3], args: &[Arg]) {
    // Each argument's value in its C type, then cuLaunchKernel-style pointers to them.
    let mut values: Vec<[u8; 8]> = args
        .iter()
        .map(|a| {
            let mut v = [0u8; 8];
            match *a {
                Arg::Ptr(p) => v.copy_from_slice(&(p as usize).to_ne_bytes()),
                Arg::I32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                Arg::U32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                Arg::F32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
            }
            v
        })
        .collect();
    let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
    let name_c = CString::new(name).expect("kernel names have no NUL");
    let mut error = [0 as c_char; 256];
    // SAFETY: `pointers` points at one value per argument, alive for the call; the caller
    // passes the kernel's arguments in its signature's order and types, and buffers large
    // enough for what the kernel reads and writes.
    let rc = unsafe {
        candela_emu_launch(
            name_c.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            pointers.as_mut_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the runtime wrote a NUL-terminated message into `error`.
        let msg = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        panic!("{name}: {}", msg.to_string_lossy());
    }
}

/// The elementwise kernels (RMSNorm, SiLU-and-mul, rotary embedding, cache writes) on the
/// emulator, launched as their `cuda` modules launch them, against the crate's CPU paths.
#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, WithDType, D};

    use super::{launch, ptr, ptr_mut, Arg};
    use crate::test_util::{assert_close, randn};
    use crate::RopeLayout;

    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    fn type_name(dtype: DType) -> &'static str {
        match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            _ => "bf16",
        }
    }

    fn pack_len(dtype: DType) -> usize {
        16 / dtype.size_in_bytes()
    }

    fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
        t.flatten_all()?.to_vec1::<T>()
    }

    /// Runs `$f::<T>(args)` with T the Rust type of `$dtype`.
    macro_rules! dispatch {
        ($dtype:expr, $f:ident($($arg:expr),*)) => {
            match $dtype {
                DType::F32 => $f::<f32>($($arg),*),
                DType::F16 => $f::<half::f16>($($arg),*),
                _ => $f::<half::bf16>($($arg),*),
            }
        };
    }

    fn rms_norm<T: WithDType>(
        x: &Tensor,
        residual: Option<&Tensor>,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = x.dim(D::Minus1)?;
        let rows = x.elem_count() / hidden;
        let (xs, ws) = (host::<T>(x)?, host::<T>(w)?);
        let mut out = vec![T::zero(); xs.len()];
        let mut sum = vec![T::zero(); xs.len()];
        let threads = (hidden / pack_len(x.dtype()))
            .next_multiple_of(32)
            .min(1024) as u32;
        let ty = type_name(x.dtype());
        match residual {
            None => launch(
                &format!("rms_norm_{ty}"),
                [rows as u32, 1, 1],
                [threads, 1, 1],
                &[
                    ptr_mut(&mut out),
                    ptr(&xs),
                    ptr(&ws),
                    Arg::I32(hidden as i32),
                    Arg::F32(eps),
                ],
            ),
            Some(r) => {
                let rs = host::<T>(r)?;
                launch(
                    &format!("add_rms_norm_{ty}"),
                    [rows as u32, 1, 1],
                    [threads, 1, 1],
                    &[
                        ptr_mut(&mut out),
                        ptr_mut(&mut sum),
                        ptr(&xs),
                        ptr(&rs),
                        ptr(&ws),
                        Arg::I32(hidden as i32),
                        Arg::F32(eps),
                    ],
                )
            }
        }
        Ok((
            Tensor::from_vec(out, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(sum, x.shape(), &Device::Cpu)?,
        ))
    }

    #[test]
    fn rms_norm_plain_and_fused() -> Result<()> {
        let dev = Device::Cpu;
        let eps = 1e-5;
        for dtype in DTYPES {
            // 576: SmolLM's hidden size; 8192: several packs a thread.
            for hidden in [64, 576, 8192] {
                let what = format!("hidden {hidden}");
                let (x, x_ref) = randn(&[3, hidden], dtype, &dev)?;
                let (r, r_ref) = randn(&[3, hidden], dtype, &dev)?;
                let (w, w_ref) = randn(&[hidden], dtype, &dev)?;
                let want = candle_nn::ops::rms_norm(&x_ref, &w_ref, eps)?;
                let (got, _) = dispatch!(dtype, rms_norm(&x, None, &w, eps))?;
                assert_close(&got, &want, dtype, &what)?;
                let sum_ref = (x_ref + r_ref)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let want = candle_nn::ops::rms_norm(&sum_ref, &w_ref, eps)?;
                let (normed, sum) = dispatch!(dtype, rms_norm(&x, Some(&r), &w, eps))?;
                assert_close(&sum, &sum_ref, dtype, &what)?;
                assert_close(&normed, &want, dtype, &what)?;
            }
        }
        Ok(())
    }

    /// `x · wᵀ` through the skinny kernel, launched as `matmul::cuda` launches it, with `x`'s
    /// rows `x_stride` values apart; with `silu`, the activation of its two halves.
    fn skinny_gemm<T: WithDType>(
        x: &Tensor,
        w: &Tensor,
        x_stride: usize,
        silu: bool,
    ) -> Result<Tensor> {
        let (n, k) = w.dims2()?;
        let m = x.dim(0)?;
        let width = if silu { n / 2 } else { n };
        let (mut xs, ws) = (Vec::new(), host::<T>(w)?);
        for row in host::<T>(x)?.chunks(k) {
            xs.extend_from_slice(row);
            xs.resize(xs.len() + x_stride - k, T::zero());
        }
        let mut y = vec![T::zero(); m * width];
        let args = [
            ptr_mut(&mut y),
            ptr(&xs),
            ptr(&ws),
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I32(x_stride as i32),
        ];
        let ty = type_name(x.dtype());
        let (entry, cols) = crate::matmul::skinny_shape(m);
        let grid = n.div_ceil(crate::matmul::SKINNY_WARPS * cols) as u32;
        let threads = (crate::matmul::SKINNY_WARPS * 32) as u32;
        let silu = if silu { "_silu" } else { "" };
        launch(
            &format!("{entry}{silu}_{ty}"),
            [grid, 1, 1],
            [threads, 1, 1],
            &args,
        );
        Tensor::from_vec(y, (m, width), &Device::Cpu)
    }

    /// Every row count the kernel takes (both of its shapes), output widths that leave warps and
    /// columns idle, inner sizes below, at and past one pass of its unrolled loop, rows of `x`
    /// apart (a view).
    #[test]
    fn skinny_gemm_matches_an_f32_product() -> Result<()> {
        for dtype in DTYPES {
            let pack = pack_len(dtype);
            for (n, k) in [(1, 8), (37, 64), (19, 1032), (9, 4104)] {
                let (w, w_ref) = randn(&[n, k], dtype, &Device::Cpu)?;
                for m in 1..=crate::SKINNY_MAX_ROWS {
                    let (x, x_ref) = randn(&[m, k], dtype, &Device::Cpu)?;
                    let want = x_ref.matmul(&w_ref.t()?)?;
                    for x_stride in [k, k + 3 * pack] {
                        let got = dispatch!(dtype, skinny_gemm(&x, &w, x_stride, false))?;
                        let what = format!("{m}x{k} by {n}, rows {x_stride} apart");
                        assert_close(&got, &want, dtype, &what)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The activated form: `w` stacks gate rows over up rows, and each output is
    /// silu(gate) * up of the f32 sums, for every row count and output widths that leave
    /// warps and outputs idle. (x is scaled so that sums stay near 1: each factor's rounding
    /// error is multiplied by the other.)
    #[test]
    fn skinny_gemm_with_silu_matches_silu_of_an_f32_product() -> Result<()> {
        for dtype in DTYPES {
            for (half, k) in [(1, 8), (37, 64), (19, 1032)] {
                let (w, w_ref) = randn(&[2 * half, k], dtype, &Device::Cpu)?;
                for m in 1..=crate::SKINNY_MAX_ROWS {
                    let (_, x) = randn(&[m, k], dtype, &Device::Cpu)?;
                    let x = (x / (k as f64).sqrt())?.to_dtype(dtype)?;
                    let x_ref = x.to_dtype(DType::F32)?;
                    let want = crate::silu_and_mul(&x_ref.matmul(&w_ref.t()?)?)?;
                    let got = dispatch!(dtype, skinny_gemm(&x, &w, k, true))?;
                    assert_close(&got, &want, dtype, &format!("{m}x{k} by 2x{half}"))?;
                }
            }
        }
        Ok(())
    }

    /// The fused form: gate and up are the halves of one `[rows, 2n]` tensor.
    fn silu_and_mul<T: WithDType>(x: &Tensor) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let n = width / 2;
        let xs = host::<T>(x)?;
        let mut out = vec![T::zero(); rows * n];
        let packs = rows * n / pack_len(x.dtype());
        let grid = packs.div_ceil(256).clamp(1, 1 << 16) as u32;
        let args = [
            ptr_mut(&mut out),
            ptr(&xs),
            ptr(&xs[n..]),
            Arg::I32(rows as i32),
            Arg::I32(n as i32),
            Arg::I32(width as i32),
            Arg::I32(width as i32),
        ];
        let ty = type_name(x.dtype());
        launch(&format!("silu_mul_{ty}"), [grid, 1, 1], [256, 1, 1], &args);
        Tensor::from_vec(out, (rows, n), &Device::Cpu)
    }

    #[test]
    fn silu_and_mul_matches_candle() -> Result<()> {
        for dtype in DTYPES {
            for (rows, n) in [(1, 64), (5, 1536), (3, 8)] {
                let (x, x_ref) = randn(&[rows, 2 * n], dtype, &Device::Cpu)?;
                let want = crate::silu_and_mul(&x_ref)?;
                let got = dispatch!(dtype, silu_and_mul(&x))?;
                assert_close(&got, &want, dtype, &format!("{rows}x{n}"))?;
            }
        }
        Ok(())
    }

    /// The rotary kernel over `q` and `k` read from one fused row per token (`[q | k | pad]`,
    /// as q and k of a fused QKV projection are) when `fused`, else from their own tensors.
    fn rotary<T: WithDType>(
        q: &Tensor,
        k: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: RopeLayout,
        fused: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (tokens, heads, head_dim) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let (qs, ks) = (host::<T>(q)?, host::<T>(k)?);
        let (q_len, k_len) = (heads * head_dim, kv_heads * head_dim);
        let width = q_len + 2 * k_len;
        let qkv: Vec<T> = (0..tokens)
            .flat_map(|t| {
                let q_row = &qs[t * q_len..][..q_len];
                let k_row = &ks[t * k_len..][..k_len];
                q_row.iter().chain(k_row).chain(k_row).copied()
            })
            .collect();
        let (q_in, k_in, q_stride, k_stride) = match fused {
            true => (ptr(&qkv), ptr(&qkv[q_len..]), width, width),
            false => (ptr(&qs), ptr(&ks), q_len, k_len),
        };
        let (cs, ss) = (host::<f32>(cos)?, host::<f32>(sin)?);
        let (mut q_out, mut k_out) = (vec![T::zero(); qs.len()], vec![T::zero(); ks.len()]);
        let units = (heads + kv_heads) * head_dim / pack_len(q.dtype());
        let units = match layout {
            RopeLayout::HalfSplit => units / 2,
            RopeLayout::Interleaved => units,
        };
        let ty = type_name(q.dtype());
        let name = match layout {
            RopeLayout::HalfSplit => format!("rotary_{ty}"),
            RopeLayout::Interleaved => format!("rotary_interleaved_{ty}"),
        };
        let args = [
            ptr_mut(&mut q_out),
            ptr_mut(&mut k_out),
            q_in,
            k_in,
            ptr(&cs),
            ptr(&ss),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::I32(q_stride as i32),
            Arg::I32(k_stride as i32),
        ];
        let threads = units.next_multiple_of(32).min(256) as u32;
        launch(&name, [tokens as u32, 1, 1], [threads, 1, 1], &args);
        Ok((
            Tensor::from_vec(q_out, q.shape(), &Device::Cpu)?,
            Tensor::from_vec(k_out, k.shape(), &Device::Cpu)?,
        ))
    }

    /// Rotary tables (`[tokens, head_dim / 2]` cos and sin) for `positions` with frequency
    /// base `base`.
    fn rope_tables(positions: &[f32], head_dim: usize, base: f32) -> Result<(Tensor, Tensor)> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1. / base.powf(2. * i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), &Device::Cpu)?;
        let pos = Tensor::new(positions, &Device::Cpu)?.reshape((positions.len(), 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    #[test]
    fn rotary_both_layouts_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let positions = [0f32, 1., 17., 4095.];
        let tokens = positions.len();
        for dtype in DTYPES {
            for head_dim in [64, 128] {
                let (cos, sin) = rope_tables(&positions, head_dim, 10_000.)?;
                let (q, q_ref) = randn(&[tokens, 8, head_dim], dtype, &dev)?;
                let (k, k_ref) = randn(&[tokens, 2, head_dim], dtype, &dev)?;
                for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                    let (q_want, k_want) =
                        crate::rotary_embedding(&q_ref, &k_ref, &cos, &sin, layout)?;
                    for fused in [false, true] {
                        let (q_got, k_got) =
                            dispatch!(dtype, rotary(&q, &k, &cos, &sin, layout, fused))?;
                        let what = format!("{layout:?} head_dim {head_dim} fused {fused}");
                        assert_close(&q_got, &q_want, dtype, &what)?;
                        assert_close(&k_got, &k_want, dtype, &what)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The fused kernel reads q, k and v from one row per token (`[q | k | v]`, a fused QKV
    /// projection) and leaves in the caches what the rotary kernel then the cache write would:
    /// rotated keys and the values in their slots, a slot past the caches skipped, nothing
    /// else touched; q comes back rotated.
    #[test]
    fn rotary_and_cache_write_rotated_keys_and_values_to_their_slots() -> Result<()> {
        let dev = Device::Cpu;
        let positions = [3f32, 0., 4095., 9.];
        let slots = [5u32, 0, 13, 99];
        let num_slots = 16usize;
        for dtype in DTYPES {
            for head_dim in [64, 128] {
                let (cos, sin) = rope_tables(&positions, head_dim, 500_000.)?;
                let (heads, kv_heads) = (4, 2);
                let (qkv, qkv_ref) = randn(
                    &[positions.len(), heads + 2 * kv_heads, head_dim],
                    dtype,
                    &dev,
                )?;
                let part = |t: &Tensor, at: usize, n: usize| t.narrow(1, at, n);
                for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                    let (q_want, k_want) = crate::rotary_embedding(
                        &part(&qkv_ref, 0, heads)?,
                        &part(&qkv_ref, heads, kv_heads)?,
                        &cos,
                        &sin,
                        layout,
                    )?;
                    let v_want = part(&qkv_ref, heads + kv_heads, kv_heads)?;
                    let what = format!("{dtype:?} {layout:?} head_dim {head_dim}");
                    let (q_got, k_cache, v_cache) = dispatch!(
                        dtype,
                        rotary_cache(&qkv, heads, kv_heads, &cos, &sin, &slots, num_slots, layout)
                    )?;
                    assert_close(&q_got, &q_want, dtype, &what)?;
                    let row_len = kv_heads * head_dim;
                    for (cache, want) in [(&k_cache, &k_want), (&v_cache, &v_want)] {
                        let cache = cache.reshape((num_slots, row_len))?;
                        for (t, &slot) in slots.iter().enumerate() {
                            if (slot as usize) < num_slots {
                                let got = cache.get(slot as usize)?;
                                let want = want.get(t)?.flatten_all()?;
                                assert_close(&got, &want, dtype, &what)?;
                            }
                        }
                        let written: Vec<usize> = slots.iter().map(|&s| s as usize).collect();
                        for slot in (0..num_slots).filter(|s| !written.contains(s)) {
                            let row = cache.get(slot)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                            assert!(row.iter().all(|&x| x == -1.0), "{what}: slot {slot}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The fused rotary and cache write, launched as `rotary::cuda` launches it over views of
    /// one `[tokens, heads + 2 * kv_heads, head_dim]` row per token. Returns the rotated q and
    /// the caches (`[num_slots, kv_heads, head_dim]`, -1 where nothing was written).
    #[allow(clippy::too_many_arguments)]
    fn rotary_cache<T: WithDType>(
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        cos: &Tensor,
        sin: &Tensor,
        slots: &[u32],
        num_slots: usize,
        layout: RopeLayout,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (tokens, width, head_dim) = qkv.dims3()?;
        let stride = width * head_dim;
        let xs = host::<T>(qkv)?;
        let (cs, ss) = (host::<f32>(cos)?, host::<f32>(sin)?);
        let row_len = kv_heads * head_dim;
        let mut q_out = vec![T::zero(); tokens * heads * head_dim];
        let mut k_cache = vec![T::from_f64(-1.0); num_slots * row_len];
        let mut v_cache = k_cache.clone();
        let units = (heads + kv_heads) * head_dim / pack_len(qkv.dtype());
        let (name, units) = match layout {
            RopeLayout::HalfSplit => ("rotary_cache", units / 2),
            RopeLayout::Interleaved => ("rotary_interleaved_cache", units),
        };
        let args = [
            ptr_mut(&mut q_out),
            ptr_mut(&mut k_cache),
            ptr_mut(&mut v_cache),
            ptr(&xs),
            ptr(&xs[heads * head_dim..]),
            ptr(&xs[(heads + kv_heads) * head_dim..]),
            ptr(&cs),
            ptr(&ss),
            ptr(slots),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::I32(stride as i32),
            Arg::I32(stride as i32),
            Arg::I32(stride as i32),
            Arg::U32(num_slots as u32),
        ];
        let threads = units.next_multiple_of(32).min(256) as u32;
        let name = format!("{name}_{}", type_name(qkv.dtype()));
        launch(&name, [tokens as u32, 1, 1], [threads, 1, 1], &args);
        let cache = |c: Vec<T>| Tensor::from_vec(c, (num_slots, kv_heads, head_dim), &Device::Cpu);
        Ok((
            Tensor::from_vec(q_out, (tokens, heads, head_dim), &Device::Cpu)?,
            cache(k_cache)?,
            cache(v_cache)?,
        ))
    }

    /// Rows land in their slots; a slot past the cache is skipped; nothing else is touched.
    /// The rows are read as v of a fused QKV projection: each in the middle of a wider row.
    #[test]
    fn cache_writes_land_in_their_slots() {
        let (num_slots, row_len) = (12usize, 16usize); // [3 blocks, 4 slots, 2 heads, 8 dims]
        let mut cache = vec![half::bf16::from_f32(-1.0); num_slots * row_len];
        let row_stride = 3 * row_len;
        let fused: Vec<half::bf16> = (0..3 * row_stride)
            .map(|i| {
                let (token, at) = (i / row_stride, i % row_stride);
                match at.checked_sub(row_len) {
                    Some(j) if j < row_len => half::bf16::from_f32((token * row_len + j) as f32),
                    _ => half::bf16::from_f32(f32::NAN),
                }
            })
            .collect();
        let slots = [7u32, 0, 99];
        let args = [
            ptr_mut(&mut cache),
            ptr(&fused[row_len..]),
            ptr(&slots),
            Arg::I32(row_len as i32),
            Arg::I32(row_stride as i32),
            Arg::U32(num_slots as u32),
        ];
        let threads = (row_len / 8).next_multiple_of(32).min(256) as u32;
        launch("write_cache_bf16", [3, 1, 1], [threads, 1, 1], &args);
        for slot in 0..num_slots {
            let got: Vec<f32> = cache[slot * row_len..(slot + 1) * row_len]
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let want: Vec<f32> = match slot {
                7 => (0..row_len).map(|i| i as f32).collect(),
                0 => (row_len..2 * row_len).map(|i| i as f32).collect(),
                _ => vec![-1.0; row_len],
            };
            assert_eq!(got, want, "slot {slot}");
        }
    }
}
