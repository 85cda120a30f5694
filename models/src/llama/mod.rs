//! Llama-architecture decoder (Llama 2/3, SmolLM, Mistral-style GQA) over the paged KV cache.
//!
//! Weights come from a GGUF file (quantized matrices stay quantized; candle's QMatMul runs them)
//! or from a Hugging Face safetensors directory.

use std::path::Path;

use candela_kernels::{
    add_rms_norm, paged_attention, prepare_attention, rms_norm, rotary_and_cache, silu_mul,
    RopeLayout,
};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

use crate::gguf::GgufFile;
use crate::linear::Linear;
use crate::{Batch, CausalLm, KvCache, LmConfig, ModelError, Result};

struct Layer {
    attn_norm: Tensor,
    qkv: Qkv,
    wo: Linear,
    ffn_norm: Tensor,
    gate_up: GateUp,
    w_down: Linear,
}

/// The query, key and value projections: stacked into one matrix where the weights allow (one
/// pass over the activations, one launch on a GPU; q, k and v are then views of its output,
/// which the rotary and cache-write kernels read in place), else three.
enum Qkv {
    Stacked(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

impl Qkv {
    fn new(q: Linear, k: Linear, v: Linear) -> Result<Self> {
        Ok(match Linear::stack(&[&q, &k, &v])? {
            Some(all) => Self::Stacked(all),
            None => Self::Split { q, k, v },
        })
    }

    /// `(q, k, v)` of `h`: `[tokens, heads, head_dim]`, then `[tokens, kv_heads, head_dim]` twice.
    fn forward(
        &self,
        h: &Tensor,
        rows: &[bool],
        c: &LmConfig,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let tokens = h.dim(0)?;
        let (heads, kv) = (c.num_heads, c.num_kv_heads);
        match self {
            Self::Stacked(all) => {
                let qkv = all
                    .forward(h, rows)?
                    .reshape((tokens, heads + 2 * kv, c.head_dim))?;
                Ok((
                    qkv.narrow(1, 0, heads)?,
                    qkv.narrow(1, heads, kv)?,
                    qkv.narrow(1, heads + kv, kv)?,
                ))
            }
            Self::Split { q, k, v } => {
                let shaped =
                    |w: &Linear, n: usize| w.forward(h, rows)?.reshape((tokens, n, c.head_dim));
                Ok((shaped(q, heads)?, shaped(k, kv)?, shaped(v, kv)?))
            }
        }
    }
}

/// The MLP's gate and up projections: stacked into one matrix where the weights allow (one
/// pass over the activations, one launch on a GPU), else two.
enum GateUp {
    Stacked(Linear),
    Split { gate: Linear, up: Linear },
}

impl GateUp {
    fn new(gate: Linear, up: Linear) -> Result<Self> {
        Ok(match Linear::stack(&[&gate, &up])? {
            Some(both) => Self::Stacked(both),
            None => Self::Split { gate, up },
        })
    }

    /// `silu(gate(h)) * up(h)`.
    fn forward(&self, h: &Tensor, rows: &[bool]) -> candle_core::Result<Tensor> {
        match self {
            Self::Stacked(both) => both.forward_silu_and_mul(h, rows),
            Self::Split { gate, up } => silu_mul(&gate.forward(h, rows)?, &up.forward(h, rows)?),
        }
    }
}

pub struct Llama {
    cfg: LmConfig,
    device: Device,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// `[max_positions, head_dim / 2]` rotary tables.
    cos: Tensor,
    sin: Tensor,
    rms_eps: f32,
    /// GGUF stores Q/K permuted for interleaved-pair rotary; HF checkpoints use the half-split form.
    rope_interleaved: bool,
}

impl Llama {
    /// Loads a `llama`-architecture GGUF file whose activations (and KV cache, by default) are
    /// `dtype`: its matrices stay quantized, its vectors and token embeddings are dequantized to
    /// `dtype`. The CPU's quantized kernel takes f32 activations only.
    pub fn from_gguf(gguf: &mut GgufFile, device: &Device, dtype: DType) -> Result<Self> {
        if device.is_cpu() && dtype != DType::F32 {
            return Err(ModelError::Unsupported(format!(
                "GGUF weights on the CPU compute in f32, not {dtype:?}"
            )));
        }
        let arch = gguf.get_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "{}: architecture `{arch}` (supported: llama)",
                gguf.path.display()
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let num_heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let hidden_size = gguf.get_u32(&key("embedding_length"))? as usize;
        let num_layers = gguf.get_u32(&key("block_count"))? as usize;
        let head_dim = gguf
            .get_u32(&key("rope.dimension_count"))
            .map(|d| d as usize)
            .unwrap_or(hidden_size / num_heads);
        let embed_q = gguf.tensor("token_embd.weight", device)?;
        let vocab_size = embed_q.shape().dims()[0];
        let mut cfg = LmConfig {
            num_layers,
            num_heads,
            num_kv_heads: gguf
                .get_u32(&key("attention.head_count_kv"))
                .map(|d| d as usize)
                .unwrap_or(num_heads),
            head_dim,
            hidden_size,
            vocab_size,
            context_len: gguf.get_u32(&key("context_length"))? as usize,
            params: 0,
            dtype,
        };
        let rope_base = gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.);
        let rms_eps = gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?;

        let mut params = embed_q.shape().elem_count() as u64;
        let mut matmul = |gguf: &mut GgufFile, name: &str| -> Result<Linear> {
            let t = gguf.tensor(name, device)?;
            params += t.shape().elem_count() as u64;
            Linear::from_qtensor(t, device)
        };
        let vector = |gguf: &mut GgufFile, name: &str| -> Result<Tensor> {
            Ok(gguf
                .tensor(name, device)?
                .dequantize(device)?
                .to_dtype(dtype)?)
        };
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vector(gguf, &p("attn_norm"))?,
                qkv: Qkv::new(
                    matmul(gguf, &p("attn_q"))?,
                    matmul(gguf, &p("attn_k"))?,
                    matmul(gguf, &p("attn_v"))?,
                )?,
                wo: matmul(gguf, &p("attn_output"))?,
                ffn_norm: vector(gguf, &p("ffn_norm"))?,
                gate_up: GateUp::new(matmul(gguf, &p("ffn_gate"))?, matmul(gguf, &p("ffn_up"))?)?,
                w_down: matmul(gguf, &p("ffn_down"))?,
            });
        }
        let norm = vector(gguf, "output_norm.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?.to_dtype(dtype)?, hidden_size);
        // Tied embeddings when the file has no separate output matrix.
        let lm_head = if gguf.has_tensor("output.weight") {
            matmul(gguf, "output.weight")?
        } else {
            Linear::from_qtensor(embed_q, device)?
        };
        cfg.params = params;
        // Llama 3.1 and later GGUF files carry their RoPE scaling as per-frequency divisors.
        let scaling = if gguf.has_tensor("rope_freqs.weight") {
            let factors = vector(gguf, "rope_freqs.weight")?.to_dtype(DType::F32)?;
            RopeScaling::Divisors(factors.flatten_all()?.to_vec1::<f32>()?)
        } else {
            RopeScaling::None
        };
        let inv = inv_frequencies(head_dim, rope_base, &scaling)?;
        let (cos, sin) = rope_tables(inv, cfg.context_len, device)?;
        Ok(Self {
            cfg,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            rms_eps,
            rope_interleaved: true,
        })
    }

    /// Loads a Hugging Face `LlamaForCausalLM` directory (config.json + *.safetensors), its
    /// weights converted to `dtype`.
    pub fn from_safetensors(
        dir: &Path,
        config: &serde_json::Value,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        Self::from_var_builder(&dir.join("config.json"), config, vb, device)
    }

    /// Random weights at the shapes of a Hugging Face Llama `config.json` (vLLM's "dummy" load
    /// format): for measuring speed at real sizes without the weights.
    pub fn dummy(
        config_path: &Path,
        config: &serde_json::Value,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(crate::dummy::RandomWeights),
            dtype,
            device.clone(),
        );
        Self::from_var_builder(config_path, config, vb, device)
    }

    fn from_var_builder(
        config_path: &Path,
        config: &serde_json::Value,
        vb: candle_nn::VarBuilder,
        device: &Device,
    ) -> Result<Self> {
        let get = |k: &str| config.get(k).and_then(|v| v.as_f64());
        let need = |k: &str| {
            get(k).ok_or_else(|| ModelError::Format {
                path: config_path.into(),
                message: format!("missing or non-numeric `{k}`"),
            })
        };
        let hidden_size = need("hidden_size")? as usize;
        let num_heads = need("num_attention_heads")? as usize;
        let mut cfg = LmConfig {
            num_layers: need("num_hidden_layers")? as usize,
            num_heads,
            num_kv_heads: get("num_key_value_heads")
                .map(|v| v as usize)
                .unwrap_or(num_heads),
            head_dim: get("head_dim")
                .map(|v| v as usize)
                .unwrap_or(hidden_size / num_heads),
            hidden_size,
            vocab_size: need("vocab_size")? as usize,
            context_len: need("max_position_embeddings")? as usize,
            params: 0,
            dtype: vb.dtype(),
        };
        let embed_w = vb.get((cfg.vocab_size, hidden_size), "model.embed_tokens.weight")?;
        let mut params = embed_w.elem_count() as u64;
        let mut linear = |name: &str, shape: (usize, usize)| -> Result<Linear> {
            let w = vb.get(shape, name)?;
            params += w.elem_count() as u64;
            Ok(Linear::dense(w))
        };
        let (h, kv, hd, ffn) = (
            hidden_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            need("intermediate_size")? as usize,
        );
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |n: &str| format!("model.layers.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: vb.get(h, &p("input_layernorm"))?,
                qkv: Qkv::new(
                    linear(&p("self_attn.q_proj"), (num_heads * hd, h))?,
                    linear(&p("self_attn.k_proj"), (kv * hd, h))?,
                    linear(&p("self_attn.v_proj"), (kv * hd, h))?,
                )?,
                wo: linear(&p("self_attn.o_proj"), (h, num_heads * hd))?,
                ffn_norm: vb.get(h, &p("post_attention_layernorm"))?,
                gate_up: GateUp::new(
                    linear(&p("mlp.gate_proj"), (ffn, h))?,
                    linear(&p("mlp.up_proj"), (ffn, h))?,
                )?,
                w_down: linear(&p("mlp.down_proj"), (h, ffn))?,
            });
        }
        let tied = config
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let lm_head = if vb.contains_tensor("lm_head.weight") && !tied {
            linear("lm_head.weight", (cfg.vocab_size, h))?
        } else {
            Linear::dense(embed_w.clone())
        };
        cfg.params = params;
        let rope_base = get("rope_theta").unwrap_or(10_000.) as f32;
        let scaling = RopeScaling::from_config(config.get("rope_scaling")).map_err(|message| {
            ModelError::Format {
                path: config_path.into(),
                message,
            }
        })?;
        let inv = inv_frequencies(cfg.head_dim, rope_base, &scaling)?;
        let (cos, sin) = rope_tables(inv, cfg.context_len, device)?;
        Ok(Self {
            embed: Embedding::new(embed_w, h),
            norm: vb.get(h, "model.norm.weight")?,
            lm_head,
            layers,
            cos,
            sin,
            rms_eps: get("rms_norm_eps").unwrap_or(1e-5) as f32,
            rope_interleaved: false,
            device: device.clone(),
            cfg,
        })
    }

    fn rope_layout(&self) -> RopeLayout {
        if self.rope_interleaved {
            RopeLayout::Interleaved
        } else {
            RopeLayout::HalfSplit
        }
    }
}

/// How a checkpoint stretches its rotary frequencies past the context it was trained on.
#[derive(Clone, Debug, PartialEq)]
enum RopeScaling {
    None,
    /// Every frequency divided by the factor (`"type": "linear"`).
    Linear(f64),
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between
    /// (`"rope_type": "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    /// One divisor per frequency, as GGUF files store the above (`rope_freqs.weight`).
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// From a Hugging Face config's `rope_scaling` (absent, null or "default": none).
    fn from_config(v: Option<&serde_json::Value>) -> std::result::Result<Self, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(Self::None);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let num = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| format!("rope_scaling: missing or non-numeric `{k}`"))
        };
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear(num("factor")?)),
            "llama3" => Ok(Self::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_context: num("original_max_position_embeddings")?,
            }),
            other => Err(format!(
                "rope_scaling type `{other}` is not supported (default, linear and llama3 are)"
            )),
        }
    }
}

/// The rotary frequencies of a head: `base^(-2i / head_dim)`, then `scaling`.
fn inv_frequencies(head_dim: usize, base: f32, scaling: &RopeScaling) -> Result<Vec<f32>> {
    let half = head_dim / 2;
    let plain = (0..half).map(|i| 1. / (base as f64).powf(2. * i as f64 / head_dim as f64));
    let inv: Vec<f64> = match scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear(factor) => plain.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_context: old,
        } => plain
            .map(|f| {
                let wavelen = 2. * std::f64::consts::PI / f;
                if wavelen < old / high {
                    f
                } else if wavelen > old / low {
                    f / factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1. - smooth) * f / factor + smooth * f
                }
            })
            .collect(),
        RopeScaling::Divisors(d) => {
            if d.len() != half {
                return Err(ModelError::Unsupported(format!(
                    "rope_freqs has {} values for {half} frequencies",
                    d.len()
                )));
            }
            plain.zip(d).map(|(f, &d)| f / d as f64).collect()
        }
    };
    Ok(inv.into_iter().map(|f| f as f32).collect())
}

/// cos and sin of every position's angles, `[max_pos, head_dim / 2]` each.
fn rope_tables(inv: Vec<f32>, max_pos: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv.len();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, max_pos as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl CausalLm for Llama {
    fn config(&self) -> &LmConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, batch: &Batch, kv: &KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let tokens = batch.input_ids.dim(0)?;
        if let Some((k_cache, _)) = kv.layers.first() {
            prepare_attention(&batch.attention, c.num_heads, k_cache)?;
        }
        // Per-token rotary rows (f32).
        let cos = self.cos.index_select(&batch.positions, 0)?;
        let sin = self.sin.index_select(&batch.positions, 0)?;
        let scale = 1. / (c.head_dim as f32).sqrt();
        // The residual stream `x`; each block's output is added to it by the next norm, fused.
        let rows = &batch.precise_rows;
        let mut x = self.embed.forward(&batch.input_ids)?;
        let mut h = rms_norm(&x, &self.layers[0].attn_norm, self.rms_eps)?;
        for (i, (layer, (k_cache, v_cache))) in self.layers.iter().zip(&kv.layers).enumerate() {
            let (q, k, v) = layer.qkv.forward(&h, rows, c)?;
            let q = rotary_and_cache(
                &q,
                &k,
                &v,
                &cos,
                &sin,
                self.rope_layout(),
                k_cache,
                v_cache,
                &batch.slot_mapping,
            )?;
            let attn = paged_attention(&q, k_cache, v_cache, &batch.attention, scale)?;
            let attn = layer
                .wo
                .forward(&attn.reshape((tokens, c.num_heads * c.head_dim))?, rows)?;
            (x, h) = add_rms_norm(&attn, &x, &layer.ffn_norm, self.rms_eps)?;
            let mlp = layer
                .w_down
                .forward(&layer.gate_up.forward(&h, rows)?, rows)?;
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = add_rms_norm(&mlp, &x, &next.attn_norm, self.rms_eps)?,
                None => x = (x + mlp)?,
            }
        }
        // A step that samples nothing (only the first chunks of long prompts) has no logits.
        // It returns them empty from the CPU: on a GPU, candle's ops fail on tensors of no
        // elements (a launch of no blocks).
        if batch.logits_rows_host.is_empty() {
            return Ok(Tensor::zeros((0, c.vocab_size), DType::F32, &Device::Cpu)?);
        }
        // Only the rows that will be sampled go through the final norm and the (large) output
        // projection (in a decode step that is every row, in order: nothing to select).
        let every_row = batch.logits_rows_host.len() == tokens
            && (0..tokens as u32).eq(batch.logits_rows_host.iter().copied());
        let x = if every_row {
            x
        } else {
            x.index_select(&batch.logits_rows, 0)?
        };
        let x = rms_norm(&x, &self.norm, self.rms_eps)?;
        let logits = self.lm_head.forward(&x, &batch.logits_precise_rows())?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests;
