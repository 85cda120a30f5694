//! BERT sentence encoders (all-MiniLM-L6-v2 and kin): padded batch, mean pooling over the mask,
//! L2 normalisation — what sentence-transformers computes for these models.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use crate::{Embedder, ModelError, Result};

pub struct BertEmbedder {
    model: BertModel,
    device: Device,
    dim: usize,
    max_tokens: usize,
    vocab_size: usize,
    params: u64,
}

impl BertEmbedder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Config = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let weights = dir.join("model.safetensors");
        let params = candle_core::safetensors::load(&weights, &Device::Cpu)?
            .values()
            .map(|t| t.elem_count() as u64)
            .sum();
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            device: device.clone(),
            dim: config.hidden_size,
            max_tokens: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            params,
        })
    }
}

impl Embedder for BertEmbedder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn params(&self) -> u64 {
        self.params
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let n = inputs.len();
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (i, input) in inputs.iter().enumerate() {
            ids[i * len..i * len + input.len()].copy_from_slice(input);
            mask[i * len..i * len + input.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // [n, len, dim]
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?;
        let counts = mask_f.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2()?)
    }
}
