use candela_kernels::{AttentionMeta, SeqAttention};
use candle_core::{DType, Device, Result, Tensor};

use crate::LmConfig;

/// One forward pass's worth of work: the new tokens of many sequences, back to back.
#[derive(Debug)]
pub struct Batch {
    /// `[tokens]` u32.
    pub input_ids: Tensor,
    /// `[tokens]` u32: each token's position in its sequence.
    pub positions: Tensor,
    /// `[tokens]` u32: each token's KV-cache slot (block_id * block_size + offset).
    pub slot_mapping: Tensor,
    /// Per sequence: its rows in the batch and its block table (uploaded once for all layers).
    pub attention: AttentionMeta,
    /// `[n]` u32: the rows whose logits are wanted (usually each sequence's last token).
    pub logits_rows: Tensor,
    /// Host copy of `logits_rows`.
    pub logits_rows_host: Vec<u32>,
    /// Per row: whether to compute it at the model's higher precision, where it has one (the
    /// CPU kernel for quantized weights: activations as two int8 terms instead of one). The
    /// engine marks prompt tokens where that is cheap or asked for (`serve --prompt-precision`). A row's result
    /// depends on its mark, never on the rows batched with it.
    pub precise_rows: Vec<bool>,
}

impl Batch {
    /// Builds the device tensors from host vectors: the four u32 vectors go over in one copy
    /// (on a GPU, each copy from pageable memory costs the step some microseconds before its
    /// first kernel), as views of one tensor.
    pub fn new(
        input_ids: &[u32],
        positions: &[u32],
        slot_mapping: &[u32],
        seqs: Vec<SeqAttention>,
        logits_rows: &[u32],
        precise_rows: Vec<bool>,
        device: &Device,
    ) -> Result<Self> {
        let parts = [input_ids, positions, slot_mapping, logits_rows];
        let all = Tensor::new(parts.concat().as_slice(), device)?;
        let mut start = 0;
        let [input_ids, positions, slot_mapping, logits_rows] = parts.map(|part| {
            let view = all.narrow(0, start, part.len());
            start += part.len();
            view
        });
        Ok(Self {
            input_ids: input_ids?,
            positions: positions?,
            slot_mapping: slot_mapping?,
            attention: AttentionMeta::new(seqs),
            logits_rows: logits_rows?,
            logits_rows_host: parts[3].to_vec(),
            precise_rows,
        })
    }

    /// `precise_rows` of the rows whose logits are wanted.
    pub fn logits_precise_rows(&self) -> Vec<bool> {
        self.logits_rows_host
            .iter()
            .map(|&r| self.precise_rows[r as usize])
            .collect()
    }
}

/// A zeroed cache tensor. On the CPU a half-precision one comes from zeroed 16-bit integers,
/// which the allocator takes from the kernel's zero pages (`calloc`) rather than writing every
/// byte, as candle's `zeros` does for f16 and bf16: the cache (gigabytes, sized from the free
/// memory) then costs neither the seconds of writing it at start nor resident memory before its
/// blocks are used.
fn zeros(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    use half::vec::HalfBitsVecExt;
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(match (device, dtype) {
        (Device::Cpu, DType::F16) => {
            Tensor::from_vec(vec![0u16; n].reinterpret_into::<half::f16>(), shape, device)?
        }
        (Device::Cpu, DType::BF16) => Tensor::from_vec(
            vec![0u16; n].reinterpret_into::<half::bf16>(),
            shape,
            device,
        )?,
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// The paged KV cache: per layer, keys and values as `[num_blocks, block_size, kv_heads, head_dim]`.
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl KvCache {
    pub fn new(
        cfg: &LmConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim);
        let layers = (0..cfg.num_layers)
            .map(|_| Ok((zeros(shape, dtype, device)?, zeros(shape, dtype, device)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(cfg: &LmConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::KvCache;
    use crate::LmConfig;

    /// Every dtype's cache comes out zeroed, in its dtype and shape (the half-precision ones
    /// built from zeroed integers on the CPU).
    #[test]
    fn caches_start_zeroed() -> candle_core::Result<()> {
        let cfg = LmConfig {
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            hidden_size: 32,
            vocab_size: 10,
            context_len: 64,
            params: 0,
            dtype: DType::F32,
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let kv = KvCache::new(&cfg, 3, 4, dtype, &Device::Cpu)?;
            assert_eq!(kv.layers.len(), 2);
            for (k, v) in &kv.layers {
                for t in [k, v] {
                    assert_eq!((t.dtype(), t.dims()), (dtype, &[3, 4, 2, 8][..]));
                    let sum = t
                        .to_dtype(DType::F32)?
                        .abs()?
                        .sum_all()?
                        .to_scalar::<f32>()?;
                    assert_eq!(sum, 0.0, "{dtype:?}");
                }
            }
        }
        Ok(())
    }
}
