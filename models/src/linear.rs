//! Linear layers over quantized or dense weights, choosing the kernel by batch shape.
//!
//! On the CPU a linear keeps its weights twice: as quantized blocks ([`QMatrix`]: the GGUF's own
//! Q4_1 blocks, or int8 blocks for other types; candela's own kernel, which reads each weight once
//! per step for up to four sequences at a time) for generated tokens, and dequantized to f32 for prompt tokens, where a blocked GEMM reuses each weight across
//! many rows. (candle's own CPU kernels for Q4_0/Q4_1 are scalar, and its Q8_0 kernel re-reads
//! every weight for each row.) On a GPU the quantized matmul serves every shape.
//!
//! The kernel is chosen per row, not per batch, so that a sequence's numbers do not depend on what
//! it is batched with: prompt tokens always take the dense path and generated tokens the
//! quantized one ([`RowSplit`]). A request therefore produces the same text alone or among many,
//! and after a preemption recomputes its generated tokens exactly as they were first computed.

use candela_kernels::{CpuQMatMul, QMatrix};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::Result;

/// Which rows of a batch take the dense path (prompt tokens) and which the quantized one
/// (generated tokens).
pub struct RowSplit {
    dense: Tensor,
    quant: Tensor,
    n_dense: usize,
    n_quant: usize,
    /// Puts `cat([dense rows, quant rows])` back in batch order.
    inverse: Tensor,
}

impl RowSplit {
    /// `prompt_rows[i]`: whether row `i` holds a prompt token.
    pub fn new(prompt_rows: &[bool], device: &Device) -> candle_core::Result<Self> {
        let dense: Vec<u32> = (0..prompt_rows.len() as u32)
            .filter(|&i| prompt_rows[i as usize])
            .collect();
        let quant: Vec<u32> = (0..prompt_rows.len() as u32)
            .filter(|&i| !prompt_rows[i as usize])
            .collect();
        let mut inverse = vec![0u32; prompt_rows.len()];
        for (pos, &row) in dense.iter().chain(&quant).enumerate() {
            inverse[row as usize] = pos as u32;
        }
        Ok(Self {
            n_dense: dense.len(),
            n_quant: quant.len(),
            dense: Tensor::new(dense.as_slice(), device)?,
            quant: Tensor::new(quant.as_slice(), device)?,
            inverse: Tensor::new(inverse.as_slice(), device)?,
        })
    }
}

pub struct Linear {
    /// GPU: the checkpoint's quantized weights.
    quantized: Option<QMatMul>,
    /// CPU: block-quantized weights for generated tokens.
    cpu_quant: Option<QMatrix>,
    dense: Option<Tensor>,
}

impl Linear {
    /// Plain dense weights `[out, in]`.
    pub fn dense(w: Tensor) -> Self {
        Self {
            quantized: None,
            cpu_quant: None,
            dense: Some(w),
        }
    }

    pub fn from_qtensor(t: QTensor, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            return Ok(Self {
                quantized: Some(QMatMul::from_qtensor(t)?),
                cpu_quant: None,
                dense: None,
            });
        }
        let dense = t.dequantize(device)?;
        if dense.dim(1)? % candela_kernels::QUANT_BLOCK != 0 {
            // Widths the block kernel cannot handle keep candle's kernel.
            return Ok(Self {
                quantized: Some(QMatMul::from_qtensor(t)?),
                cpu_quant: None,
                dense: Some(dense),
            });
        }
        // Q4_1 blocks are used as they are; other types are requantized to int8 blocks.
        let (rows, cols) = dense.dims2()?;
        let cpu_quant = match t.dtype() {
            GgmlDType::Q4_1 => QMatrix::from_q4_1(&t.data()?, rows, cols)?,
            _ => QMatrix::from_tensor(&dense)?,
        };
        Ok(Self {
            quantized: None,
            cpu_quant: Some(cpu_quant),
            dense: Some(dense),
        })
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor, split: &RowSplit) -> candle_core::Result<Tensor> {
        let quantized = |x: &Tensor| -> candle_core::Result<Tensor> {
            match (&self.cpu_quant, &self.quantized) {
                (Some(m), _) => x.contiguous()?.apply_op1_no_bwd(&CpuQMatMul(m)),
                (None, Some(q)) => q.forward(x),
                (None, None) => unreachable!("checked by the caller"),
            }
        };
        let has_quantized = self.cpu_quant.is_some() || self.quantized.is_some();
        match &self.dense {
            Some(w) if has_quantized => {
                if split.n_quant == 0 {
                    return x.matmul(&w.t()?);
                }
                if split.n_dense == 0 {
                    return quantized(x);
                }
                let dense = x.index_select(&split.dense, 0)?.matmul(&w.t()?)?;
                let quant = quantized(&x.index_select(&split.quant, 0)?)?;
                Tensor::cat(&[dense, quant], 0)?.index_select(&split.inverse, 0)
            }
            Some(w) => x.matmul(&w.t()?),
            None => quantized(x),
        }
    }
}
