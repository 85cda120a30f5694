//! Linear layers over quantized or dense weights.
//!
//! On the CPU, quantized weights go through candela's own kernel ([`QMatrix`]: 4-bit blocks for
//! the GGUF's Q4_1, Q4_0 and Q4_K, 6-bit ones for Q6_K, int8 blocks for other types) for every
//! batch shape: it multiplies int8
//! activations by 4-bit or 8-bit weights with VNNI or AVX2 integer dot products, several
//! sequences per weight load, and beats an f32 GEMM over dequantized weights even for prompt
//! chunks. (candle's own CPU kernels for Q4_0/Q4_1 are scalar, and its Q8_0 kernel re-reads
//! every weight for each row.) Activations go in as one int8 term per block of 32 (as llama.cpp
//! computes every token), or, for rows the batch marks precise, as two (about 15 bits, close to
//! f32, for twice the integer work). The engine marks prompt tokens, which fill the KV cache
//! that every later token reads, where VNNI makes that cheap or when asked
//! (`serve --prompt-precision`).
//!
//! A row's result depends on its mark, never on the rows batched with it, so a request produces
//! the same text alone or among many, and after a preemption recomputes its generated tokens
//! exactly as they were first computed (they are never marked). On a GPU candle's quantized
//! matmul serves every shape, in f32.

use candela_kernels::{CpuQMatMul, QMatrix};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::Result;

pub enum Linear {
    Dense(Tensor),
    /// CPU: candela's block-quantized kernel.
    Blocks(QMatrix),
    /// candle's quantized matmul: on a GPU, and on the CPU for widths the block kernel cannot
    /// take.
    Quantized(QMatMul),
}

impl Linear {
    /// Plain dense weights `[out, in]`.
    pub fn dense(w: Tensor) -> Self {
        Self::Dense(w)
    }

    pub fn from_qtensor(t: QTensor, device: &Device) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        if !device.is_cpu() || cols % candela_kernels::QUANT_BLOCK != 0 {
            return Ok(Self::Quantized(QMatMul::from_qtensor(t)?));
        }
        // 4-bit and 6-bit blocks keep their bits; other types are requantized to int8 blocks.
        Ok(Self::Blocks(
            match QMatrix::from_gguf_blocks(t.dtype(), &t.data()?, rows, cols)? {
                Some(blocks) => blocks,
                None => QMatrix::from_tensor(&t.dequantize(device)?)?,
            },
        ))
    }

    /// `parts` (weights of the same input width) stacked along their outputs into one matrix,
    /// so that one pass computes them all, their outputs side by side; `None` where they do not
    /// stack: candle's quantized weights, mixed kinds, or blocks that do not (see
    /// [`QMatrix::concat_rows`]).
    pub fn stack(parts: &[&Linear]) -> Result<Option<Linear>> {
        if let Some(ws) = parts
            .iter()
            .map(|p| match p {
                Self::Dense(w) => Some(w),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            return Ok(Some(Self::Dense(Tensor::cat(&ws, 0)?)));
        }
        let blocks = parts
            .iter()
            .map(|p| match p {
                Self::Blocks(m) => Some(m),
                _ => None,
            })
            .collect::<Option<Vec<_>>>();
        Ok(blocks
            .and_then(|ms| QMatrix::concat_rows(&ms))
            .map(Self::Blocks))
    }

    /// `x`: `[rows, in]` -> `[rows, out]`; `precise_rows[i]`: whether row `i` takes two int8
    /// terms (see the module's notes).
    pub fn forward(&self, x: &Tensor, precise_rows: &[bool]) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => candela_kernels::linear(x, w),
            Self::Blocks(m) => x.contiguous()?.apply_op1_no_bwd(&CpuQMatMul {
                weights: m,
                precise_rows,
            }),
            Self::Quantized(q) => {
                // candle's kernels for block types take f32 on every path (some take other
                // dtypes too), and it keeps a GGUF's f32, f16 or bf16 matrices as plain tensors
                // that multiply in their own dtype: a model computing in another converts
                // around them.
                let dtype = match q {
                    QMatMul::QTensor(_) => DType::F32,
                    QMatMul::Tensor(w) => w.dtype(),
                    QMatMul::TensorF16(_) => x.dtype(),
                };
                if x.dtype() == dtype {
                    q.forward(x)
                } else {
                    q.forward(&x.to_dtype(dtype)?)?.to_dtype(x.dtype())
                }
            }
        }
    }

    /// `silu(gate) * up` of [`Self::forward`] for a layer that stacks a gate projection over an
    /// up projection; dense layers take it in one kernel where the product is skinny.
    pub fn forward_silu_and_mul(
        &self,
        x: &Tensor,
        precise_rows: &[bool],
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => candela_kernels::linear_silu_and_mul(x, w),
            _ => candela_kernels::silu_and_mul(&self.forward(x, precise_rows)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// candle's quantized matmul (a GPU's, or the CPU's for widths candela's kernel cannot take)
    /// takes activations of the model's dtype, whatever the weights' type: block types compute
    /// in f32, a GGUF's f16 or f32 matrices (which candle keeps as plain tensors) in their own
    /// dtype, and the result comes back in the activations' dtype.
    #[test]
    fn quantized_weights_take_any_activation_dtype() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (48, 96), &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 96), &dev)?;
        for weights in [GgmlDType::Q4_1, GgmlDType::F16, GgmlDType::F32] {
            let q = QTensor::quantize(&w, weights)?;
            let linear = Linear::Quantized(QMatMul::from_qtensor(q)?);
            let want = linear.forward(&x, &[false; 3])?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            for dtype in [DType::BF16, DType::F16] {
                let got = linear.forward(&x.to_dtype(dtype)?, &[false; 3])?;
                assert_eq!(got.dtype(), dtype);
                let err = (got.to_dtype(DType::F32)? - &want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                // bf16 rounds x going in and y coming out: about 2 × 2⁻⁸ of the largest value.
                assert!(
                    err <= 0.02 * scale,
                    "{weights:?} by {dtype:?}: off by {err} of {scale}"
                );
            }
        }
        Ok(())
    }
}
