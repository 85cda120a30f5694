//! Model architectures for candela, written for the engine's batch shape: a ragged batch of new
//! tokens from many sequences, with positions, KV-cache slots and block tables passed in
//! explicitly ([`Batch`]), over a paged KV cache ([`KvCache`]).
//!
//! One file per architecture; weight loading (GGUF, safetensors) and tokenizer loading live here
//! too, so that the server sees only [`CausalLm`], [`Embedder`] and a `tokenizers::Tokenizer`.

mod batch;
pub mod bert;
pub mod dummy;
mod error;
pub mod gguf;
mod linear;
pub mod llama;
mod load;

pub use batch::{Batch, KvCache};
pub use candela_kernels::SeqAttention;
pub use error::{ModelError, Result};
pub use load::{load, LoadedModel, ModelKind, TextModel};

use candle_core::{DType, Device, Tensor};

/// Shape facts about a decoder-only model that the engine needs to size and drive it.
#[derive(Clone, Debug)]
pub struct LmConfig {
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Longest context the model was trained for (prompt + output).
    pub context_len: usize,
    /// Parameter count, for the catalog.
    pub params: u64,
    /// Activations and KV cache (quantized weights compute in f32).
    pub dtype: DType,
}

/// What dense weights, activations and the KV cache use unless told otherwise: bf16 on a GPU
/// (what checkpoints ship and tensor cores take), f32 on the CPU (where bf16 has no fast path).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A decoder-only language model over a paged KV cache.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &LmConfig;
    fn device(&self) -> &Device;
    /// Runs the batch's new tokens, writing their keys and values into `kv`, and returns the logits
    /// (`[batch.logits_rows.len(), vocab]`, f32) of the rows named by `batch.logits_rows`.
    fn forward(&self, batch: &Batch, kv: &KvCache) -> Result<Tensor>;
}

/// A sentence-embedding model.
pub trait Embedder: Send {
    /// Output dimension.
    fn dim(&self) -> usize;
    /// Longest input in tokens.
    fn max_tokens(&self) -> usize;
    /// Rows of the token embeddings: every input id must be below it.
    fn vocab_size(&self) -> usize;
    /// Embeds token sequences (one per input), returning L2-normalised vectors.
    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// Parameter count, for the catalog.
    fn params(&self) -> u64;
}
