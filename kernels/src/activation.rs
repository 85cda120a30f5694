//! SiLU-and-multiply, the gate of SwiGLU MLPs (Llama, Mistral, SmolLM): `silu(gate) * up`.
//!
//! On CUDA one kernel reads both operands and writes the product, with no intermediate `silu`
//! tensor; on the CPU (f32) one vectorised pass with no libm call; elsewhere (or for rows that are
//! not whole 16-byte packs) plain candle ops.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::exp_nonpositive;
use crate::isa::{self, plain_tiers};

/// `silu(x[.., :n]) * x[.., n:]` for `x` of shape `[.., 2n]`, e.g. a fused gate/up projection.
/// Returns `[.., n]`.
pub fn silu_and_mul(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("silu_and_mul: last dim {width} is odd");
    }
    let n = width / 2;
    #[cfg(feature = "cuda")]
    if cuda::fits(x, n) {
        return cuda::silu_and_mul(x, n);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && n > 0 {
        return x.contiguous()?.apply_op1_no_bwd(&CpuSiluAndMul);
    }
    let gate = x.narrow(D::Minus1, 0, n)?;
    let up = x.narrow(D::Minus1, n, n)?;
    silu_mul(&gate, &up)
}

/// `silu(a) * b` for two tensors of the same shape.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "silu_mul: {:?} {:?} and {:?} {:?} differ",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    if cuda::fits(a, a.dim(D::Minus1)?) && b.device().same_device(a.device()) {
        return cuda::silu_mul(a, b);
    }
    if a.device().is_cpu() && a.dtype() == DType::F32 {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &CpuSiluMul);
    }
    candle_nn::ops::silu(a)? * b
}

plain_tiers! {
    /// `out[i] = silu(gate[i]) * up[i]`, vectorised for the CPU's widest instruction set.
    fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) = silu_mul_loop
}

#[inline(always)]
fn silu_mul_loop(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * u;
    }
}

/// `silu(x) = x / (1 + e^-x)`, with the exponential taken of `-|x|` only (never overflows).
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    // x >= 0: x / (1 + e^-x); x < 0: x e^x / (1 + e^x).
    let numerator = if x >= 0.0 { x } else { x * e };
    numerator / (1.0 + e)
}

struct CpuSiluMul;

impl CustomOp2 for CpuSiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("silu-mul: non-contiguous input".into()))?;
            Ok(&s.as_slice::<f32>()?[start..end])
        }
        let (a, b) = (slice(a, a_l)?, slice(b, b_l)?);
        let mut out = vec![0f32; a.len()];
        const CHUNK: usize = 4096;
        let tier = isa::plain();
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| silu_mul_into(tier, o, a, b));
        Ok((CpuStorage::F32(out), a_l.shape().clone()))
    }
}

/// `silu_and_mul` over contiguous f32 rows `[gate | up]`, a row at a time.
struct CpuSiluAndMul;

impl candle_core::CustomOp1 for CpuSiluAndMul {
    fn name(&self) -> &'static str {
        "silu-and-mul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("silu-and-mul: non-contiguous input".into()))?;
        let x = &x.as_slice::<f32>()?[start..end];
        let mut dims = l.dims().to_vec();
        let n = dims.last().copied().unwrap_or(0) / 2;
        *dims.last_mut().expect("checked by silu_and_mul") = n;
        let mut out = vec![0f32; x.len() / 2];
        // Rows in chunks of about 4096 outputs, as `CpuSiluMul` splits its work.
        let rows_per_chunk = 4096usize.div_ceil(n).max(1);
        let tier = isa::plain();
        out.par_chunks_mut(rows_per_chunk * n)
            .zip(x.par_chunks(rows_per_chunk * 2 * n))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
                    let (gate, up) = x.split_at(n);
                    silu_mul_into(tier, o, gate, up);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, DType, Result, Tensor, D};

    use crate::cuda::{self as cu, dispatch_float};

    /// Rows of `n` values are whole packs, so both halves of a fused row start aligned.
    pub(super) fn fits(x: &Tensor, n: usize) -> bool {
        cu::on_cuda(x) && x.elem_count() > 0 && n.is_multiple_of(cu::pack_len(x.dtype()))
    }

    pub(super) fn silu_and_mul(x: &Tensor, n: usize) -> Result<Tensor> {
        let x = cu::packed(x)?;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("x has a last dim") = n;
        dispatch_float!(x.dtype(), fused(&x, n, shape))
    }

    pub(super) fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (cu::packed(a)?, cu::packed(b)?);
        dispatch_float!(a.dtype(), pair(&a, &b))
    }

    fn fused<T: CudaDType + DeviceRepr>(x: &Tensor, n: usize, shape: Vec<usize>) -> Result<Tensor> {
        let dev = x.device().as_cuda_device()?;
        let rows = x.elem_count() / (2 * n);
        let (storage, layout) = x.storage_and_layout();
        let gate = cu::view::<T>(&storage, layout)?;
        let up = gate.slice(n..);
        let out = launch(dev, x.dtype(), &gate, &up, rows, n, 2 * n)?;
        Ok(cu::tensor(out, dev, shape))
    }

    fn pair<T: CudaDType + DeviceRepr>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dev = a.device().as_cuda_device()?;
        let n = a.dim(D::Minus1)?;
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let a_view = cu::view::<T>(&a_storage, a_layout)?;
        let b_view = cu::view::<T>(&b_storage, b_layout)?;
        let out = launch(dev, a.dtype(), &a_view, &b_view, a.elem_count() / n, n, n)?;
        Ok(cu::tensor(out, dev, a.shape()))
    }

    /// Grid-stride over the packs of `[rows, n]`, 256 threads a block.
    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        dtype: DType,
        a: &CudaView<T>,
        b: &CudaView<T>,
        rows: usize,
        n: usize,
        stride: usize,
    ) -> Result<CudaSlice<T>> {
        let name = format!(
            "silu_mul_{}",
            cu::type_name(dtype).expect("checked by fits")
        );
        let func = cu::ACTIVATION.function(dev, &name)?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * n)? };
        let packs = rows * n / cu::pack_len(dtype);
        let cfg = LaunchConfig {
            grid_dim: (packs.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, n, stride) = (cu::int(rows)?, cu::int(n)?, cu::int(stride)?);
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut out).arg(a).arg(b);
        args.arg(&rows).arg(&n).arg(&stride).arg(&stride);
        // SAFETY: argument types and order match `silu_mul_*` in cuda/activation.cu.
        unsafe { args.launch(cfg) }?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor};

    use super::{silu_and_mul, silu_mul};

    /// Fused `[gate | up]` rows give what the two halves give through `silu_mul`, bit for bit,
    /// for rows narrower and wider than a chunk of work.
    #[test]
    fn fused_rows_match_the_halves() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n) in [(1, 8), (5, 1536), (3, 9000)] {
            let x = (Tensor::randn(0f32, 1., (rows, 2 * n), &dev)? * 10.)?;
            let want = silu_mul(&x.narrow(1, 0, n)?, &x.narrow(1, n, n)?)?;
            let got = silu_and_mul(&x)?;
            assert_eq!(got.dims(), &[rows, n]);
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{rows}x{n}");
        }
        Ok(())
    }

    /// Each instruction set's loop gives the scalar loop's bits.
    #[test]
    fn every_tier_gives_the_same_bits() {
        use crate::isa::Tier;
        let n = 1000;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 - 56.0).collect();
        let run = |tier| {
            let mut out = vec![0f32; n];
            super::silu_mul_into(tier, &mut out, &gate, &up);
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let scalar = run(Tier::Scalar);
        assert_eq!(run(Tier::Avx2), scalar);
        assert_eq!(run(Tier::Avx512), scalar);
    }

    #[test]
    fn cpu_pass_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Large magnitudes too: the exponential must neither overflow nor lose the sign.
        let a = (Tensor::randn(0f32, 1., (7, 5000), &dev)? * 30.)?;
        let b = Tensor::randn(0f32, 1., (7, 5000), &dev)?;
        let want = (candle_nn::ops::silu(&a)? * &b)?;
        let err = (silu_mul(&a, &b)? - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err <= 1e-6 * scale, "max error {err} at magnitude {scale}");
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Result, Tensor, D};

    use super::{silu_and_mul, silu_mul};
    use crate::test_util::{assert_close, cuda_device, randn, DTYPES};

    fn reference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        candle_nn::ops::silu(a)? * b
    }

    #[test]
    fn fused_and_pair_match_candle() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        for dtype in DTYPES {
            // 8 and 1376 are whole packs of every dtype; 12 is not for 16-bit types (fallback).
            for n in [8, 12, 1376] {
                let (x, x_ref) = randn(&[5, 2 * n], dtype, &dev)?;
                let gate = x_ref.narrow(D::Minus1, 0, n)?;
                let up = x_ref.narrow(D::Minus1, n, n)?;
                let want = reference(&gate, &up)?;
                assert_close(&silu_and_mul(&x)?, &want, dtype, &format!("fused n {n}"))?;
                let (a, a_ref) = randn(&[3, 7, n], dtype, &dev)?;
                let (b, b_ref) = randn(&[3, 7, n], dtype, &dev)?;
                let got = silu_mul(&a, &b)?;
                assert_close(
                    &got,
                    &reference(&a_ref, &b_ref)?,
                    dtype,
                    &format!("pair n {n}"),
                )?;
            }
        }
        // A non-contiguous operand is copied first.
        let (x, x_ref) = randn(&[16, 8], DType::F32, &dev)?;
        let got = silu_mul(&x.t()?, &x.t()?)?;
        assert_close(
            &got,
            &reference(&x_ref.t()?, &x_ref.t()?)?,
            DType::F32,
            "transposed",
        )
    }
}
