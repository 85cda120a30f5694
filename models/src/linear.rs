//! Linear layers over quantized or dense weights, choosing the kernel by batch shape.
//!
//! On the CPU, candle's quantized kernels are fast for a few rows (decode) only for some GGUF types
//! (Q8_0 among them; Q4_0/Q4_1 run scalar code), and re-read every weight for each activation row.
//! So a CPU linear keeps the weights twice: requantized to Q8_0 for steps of a few rows, and
//! dequantized to f32 for larger batches and prefill, where a blocked GEMM reuses each weight
//! across rows. On a GPU the quantized matmul serves every shape.
//!
//! The kernel is chosen per row, not per batch, so that a sequence's numbers do not depend on what
//! it is batched with: prompt tokens always take the dense path and generated tokens the
//! quantized one ([`RowSplit`]). A request therefore produces the same text alone or among many,
//! and after a preemption recomputes its generated tokens exactly as they were first computed.

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
    quantized: Option<QMatMul>,
    dense: Option<Tensor>,
}

impl Linear {
    /// Plain dense weights `[out, in]`.
    pub fn dense(w: Tensor) -> Self {
        Self {
            quantized: None,
            dense: Some(w),
        }
    }

    pub fn from_qtensor(t: QTensor, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            return Ok(Self {
                quantized: Some(QMatMul::from_qtensor(t)?),
                dense: None,
            });
        }
        let dense = t.dequantize(device)?;
        let fast_on_cpu = matches!(t.dtype(), GgmlDType::Q8_0 | GgmlDType::F32 | GgmlDType::F16);
        let q = if fast_on_cpu {
            t
        } else {
            QTensor::quantize(&dense, GgmlDType::Q8_0)?
        };
        Ok(Self {
            quantized: Some(QMatMul::from_qtensor(q)?),
            dense: Some(dense),
        })
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor, split: &RowSplit) -> candle_core::Result<Tensor> {
        match (&self.quantized, &self.dense) {
            (Some(q), Some(w)) => {
                if split.n_quant == 0 {
                    return x.matmul(&w.t()?);
                }
                if split.n_dense == 0 {
                    return q.forward(x);
                }
                let dense = x.index_select(&split.dense, 0)?.matmul(&w.t()?)?;
                let quant = q.forward(&x.index_select(&split.quant, 0)?)?;
                Tensor::cat(&[dense, quant], 0)?.index_select(&split.inverse, 0)
            }
            (None, Some(w)) => x.matmul(&w.t()?),
            (Some(q), None) => q.forward(x),
            (None, None) => unreachable!("a linear layer has weights"),
        }
    }
}
