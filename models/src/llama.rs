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
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::SeqAttention;

    /// Llama 3.1's scaling, against values computed with Hugging Face's formula
    /// (`_compute_llama3_parameters`, in f64): high frequencies kept, low ones divided by the
    /// factor, the band between blended. Linear and per-frequency divisors divide; unknown kinds
    /// are refused by name.
    #[test]
    fn rope_scaling_follows_hugging_face() {
        let config = serde_json::json!({
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"
        });
        let scaling = RopeScaling::from_config(Some(&config)).unwrap();
        let inv = inv_frequencies(128, 500_000., &scaling).unwrap();
        let want = [
            (0, 1.0),
            (20, 0.016_560_44),
            (27, 0.003_942_276),
            (30, 0.001_371_893_6),
            (33, 0.000_312_693_75),
            (36, 7.784_655e-5),
            (48, 6.647_87e-6),
            (63, 3.068_926e-7),
        ];
        for (i, w) in want {
            assert!(((inv[i] - w) / w).abs() < 1e-5, "{i}: {} vs {w}", inv[i]);
        }
        let plain = inv_frequencies(128, 500_000., &RopeScaling::None).unwrap();
        let linear =
            RopeScaling::from_config(Some(&serde_json::json!({"type": "linear", "factor": 2.0})));
        let halved = inv_frequencies(128, 500_000., &linear.unwrap()).unwrap();
        assert!(plain
            .iter()
            .zip(&halved)
            .all(|(p, h)| (p / 2. - h).abs() <= p * 1e-6));
        let divisors = RopeScaling::Divisors(vec![4.0; 64]);
        let quartered = inv_frequencies(128, 500_000., &divisors).unwrap();
        assert!(plain
            .iter()
            .zip(&quartered)
            .all(|(p, q)| (p / 4. - q).abs() <= p * 1e-6));
        assert!(inv_frequencies(128, 1e4, &RopeScaling::Divisors(vec![1.0; 3])).is_err());
        assert_eq!(RopeScaling::from_config(None), Ok(RopeScaling::None));
        let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let err = RopeScaling::from_config(Some(&yarn)).unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }

    /// Random weights of a tiny two-layer Llama under their Hugging Face names, and its
    /// config.json: `heads` heads (`kv_heads` kv heads) of `head_dim`.
    fn tiny_weights(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> (serde_json::Value, HashMap<String, Tensor>) {
        let (hidden, kv, ffn, vocab) = (heads * head_dim, kv_heads * head_dim, 128, 100);
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": 2, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        });
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        let mut put = |name: String, shape: &[usize]| {
            let t = match shape {
                [n] => Tensor::rand(0.5f32, 1.5, *n, &dev).unwrap(),
                [_, fan_in] => {
                    Tensor::randn(0f32, 1.2 / (*fan_in as f32).sqrt(), shape, &dev).unwrap()
                }
                _ => unreachable!("vectors and matrices"),
            };
            weights.insert(name, t);
        };
        put("model.embed_tokens.weight".into(), &[vocab, hidden]);
        put("model.norm.weight".into(), &[hidden]);
        put("lm_head.weight".into(), &[vocab, hidden]);
        for i in 0..2 {
            let p = |n: &str| format!("model.layers.{i}.{n}.weight");
            put(p("input_layernorm"), &[hidden]);
            put(p("post_attention_layernorm"), &[hidden]);
            put(p("self_attn.q_proj"), &[hidden, hidden]);
            put(p("self_attn.k_proj"), &[kv, hidden]);
            put(p("self_attn.v_proj"), &[kv, hidden]);
            put(p("self_attn.o_proj"), &[hidden, hidden]);
            put(p("mlp.gate_proj"), &[ffn, hidden]);
            put(p("mlp.up_proj"), &[ffn, hidden]);
            put(p("mlp.down_proj"), &[hidden, ffn]);
        }
        (config, weights)
    }

    /// A tiny checkpoint on disk: [`tiny_weights`] saved as safetensors beside a config.json.
    fn tiny_checkpoint(
        dir: &Path,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> serde_json::Value {
        let (config, weights) = tiny_weights(heads, kv_heads, head_dim);
        std::fs::create_dir_all(dir).unwrap();
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
        config
    }

    /// [`tiny_weights`] (4 heads over 2 kv heads of 64) as a GGUF file in a fresh folder `name`
    /// (returned, with the open file), as llama.cpp's converter lays them out: the matrices in
    /// Q4_1, the token embeddings (tied to the output) in Q8_0, the norms in f32.
    fn tiny_gguf(name: &str) -> (std::path::PathBuf, GgufFile) {
        use candle_core::quantized::gguf_file::{self, Value};
        use candle_core::quantized::{GgmlDType, QTensor};
        let (config, weights) = tiny_weights(4, 2, 64);
        let mut names = vec![
            ("token_embd".to_string(), "model.embed_tokens".to_string()),
            ("output_norm".to_string(), "model.norm".to_string()),
        ];
        for i in 0..2 {
            for (gguf, hf) in [
                ("attn_norm", "input_layernorm"),
                ("ffn_norm", "post_attention_layernorm"),
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
                ("attn_output", "self_attn.o_proj"),
                ("ffn_gate", "mlp.gate_proj"),
                ("ffn_up", "mlp.up_proj"),
                ("ffn_down", "mlp.down_proj"),
            ] {
                names.push((format!("blk.{i}.{gguf}"), format!("model.layers.{i}.{hf}")));
            }
        }
        let tensors: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|(gguf, hf)| {
                let t = &weights[&format!("{hf}.weight")];
                let kind = match (t.rank(), gguf.as_str()) {
                    (1, _) => GgmlDType::F32,
                    (_, "token_embd") => GgmlDType::Q8_0,
                    _ => GgmlDType::Q4_1,
                };
                (
                    format!("{gguf}.weight"),
                    QTensor::quantize(t, kind).unwrap(),
                )
            })
            .collect();
        let n = |key: &str| Value::U32(config[key].as_u64().unwrap() as u32);
        let metadata = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", n("num_attention_heads")),
            ("llama.attention.head_count_kv", n("num_key_value_heads")),
            ("llama.embedding_length", n("hidden_size")),
            ("llama.block_count", n("num_hidden_layers")),
            ("llama.context_length", n("max_position_embeddings")),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let dir = checkpoint_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        let mut file = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        (dir, GgufFile::open(&path).unwrap())
    }

    /// Logits (on the host) of the last token of a `prompt_len`-token prompt and then of one
    /// decoded token, through the paged KV cache on the model's device.
    fn run(model: &Llama, prompt_len: usize) -> Vec<Vec<f32>> {
        let dev = model.device().clone();
        let cfg = model.config();
        let block_size = 16;
        let kv = KvCache::new(cfg, 8, block_size, cfg.dtype, &dev).unwrap();
        let table = vec![5u32, 0, 3, 6];
        let slot = |p: u32| table[p as usize / block_size] * block_size as u32 + p % 16;
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 37 + 3) % 100).collect();
        let seq = |start, len, ctx| SeqAttention {
            query_start: start,
            query_len: len,
            context_len: ctx,
            block_table: table.clone(),
        };
        let n = prompt_len as u32;
        let positions: Vec<u32> = (0..n).collect();
        let slots: Vec<u32> = positions.iter().map(|&p| slot(p)).collect();
        // The prompt in two chunks, as a long prompt goes: the first samples nothing, so it has
        // no logits; the second reads the first's keys and values from the cache.
        let half = prompt_len / 2;
        let chunk = Batch::new(
            &prompt[..half],
            &positions[..half],
            &slots[..half],
            vec![seq(0, half, half)],
            &[],
            vec![true; half],
            &dev,
        )
        .unwrap();
        let none = model.forward(&chunk, &kv).unwrap();
        assert_eq!(none.dims(), [0, cfg.vocab_size]);
        let rest = prompt_len - half;
        let prefill = Batch::new(
            &prompt[half..],
            &positions[half..],
            &slots[half..],
            vec![seq(0, rest, prompt_len)],
            &[rest as u32 - 1],
            vec![true; rest],
            &dev,
        )
        .unwrap();
        let first = model.forward(&prefill, &kv).unwrap();
        let decode = Batch::new(
            &[7],
            &[n],
            &[slot(n)],
            vec![seq(0, 1, prompt_len + 1)],
            &[0],
            vec![false],
            &dev,
        )
        .unwrap();
        let second = model.forward(&decode, &kv).unwrap();
        [first, second]
            .iter()
            .map(|l| {
                l.squeeze(0)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    /// `got` (bf16) within 10 % of `want` (f32), and its first choice about as good as f32's.
    /// (bf16 keeps 8 bits of mantissa; through two layers of random weights its largest logit
    /// error reached 7.6 % of the largest logit in 600 runs, so 5 % failed one run in 35.)
    fn assert_follows(want: &[Vec<f32>], got: &[Vec<f32>], what: &str) {
        for (want, got) in want.iter().zip(got) {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = want
                .iter()
                .zip(got)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err < 0.1 * scale,
                "{what}: bf16 off by {err} (logits up to {scale})"
            );
            // The weights are random, so the two best logits may be closer than bf16 can tell
            // apart.
            let best = (0..got.len())
                .max_by(|&a, &b| got[a].total_cmp(&got[b]))
                .unwrap();
            let top = want.iter().fold(f32::MIN, |m, &x| m.max(x));
            assert!(
                want[best] >= top - 2. * err,
                "{what}: bf16's first choice trails by {}",
                top - want[best]
            );
        }
    }

    /// The first GPU; `None` without one (a test then passes without checking), but a panic with
    /// `CANDELA_REQUIRE_GPU=1` (scripts/gpu-bench.sh), where a device that does not open fails.
    fn gpu_or_skip() -> Option<Device> {
        match candela_kernels::cuda_device(0) {
            Ok(gpu) => Some(gpu),
            Err(e) if std::env::var_os("CANDELA_REQUIRE_GPU").is_some_and(|v| v == "1") => {
                panic!("CANDELA_REQUIRE_GPU=1 but the CUDA device did not open: {e}")
            }
            Err(_) => None,
        }
    }

    fn checkpoint_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("candela-llama-{name}-{}", std::process::id()))
    }

    /// bf16 against f32 on the CPU: a small model, and the one the GPU test runs.
    #[test]
    fn bf16_follows_f32() {
        for (heads, kv_heads, head_dim, prompt_len) in [(4, 2, 16, 5), (4, 2, 64, 40)] {
            let dir = checkpoint_dir(&format!("cpu-{head_dim}"));
            let config = tiny_checkpoint(&dir, heads, kv_heads, head_dim);
            let load = |dtype| Llama::from_safetensors(&dir, &config, &Device::Cpu, dtype).unwrap();
            let (f32_model, bf16_model) = (load(DType::F32), load(DType::BF16));
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(bf16_model.config().dtype, DType::BF16);
            let what = format!("head_dim {head_dim}");
            assert_follows(
                &run(&f32_model, prompt_len),
                &run(&bf16_model, prompt_len),
                &what,
            );
        }
    }

    /// A GGUF model computes in f32 on the CPU (candela's quantized kernel takes f32
    /// activations) and refuses another dtype there by name.
    #[test]
    fn gguf_computes_in_f32_on_the_cpu() {
        let (dir, mut gguf) = tiny_gguf("gguf-cpu");
        let err = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::BF16).err();
        assert!(
            err.as_ref().is_some_and(|e| e.to_string().contains("BF16")),
            "{err:?}"
        );
        let model = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::F32).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(model.config().dtype, DType::F32);
        let logits = run(&model, 40);
        assert!(logits.iter().flatten().all(|x| x.is_finite()));
    }

    /// The whole forward pass on a GPU (stacked projections read as views, the tensor-core
    /// prefill kernel, the decode kernel, fused norms and activations) in bf16, against f32 on
    /// the CPU. Skips without a GPU (fails instead with `CANDELA_REQUIRE_GPU=1`).
    #[test]
    fn gpu_bf16_follows_cpu_f32() {
        let Some(gpu) = gpu_or_skip() else { return };
        let dir = checkpoint_dir("gpu");
        let config = tiny_checkpoint(&dir, 4, 2, 64);
        let cpu = Llama::from_safetensors(&dir, &config, &Device::Cpu, DType::F32).unwrap();
        let on_gpu = Llama::from_safetensors(&dir, &config, &gpu, DType::BF16).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_follows(&run(&cpu, 40), &run(&on_gpu, 40), "gpu");
    }

    /// A GGUF model on a GPU in bf16 (its matrices through candle's quantized kernels in f32,
    /// everything else through candela's bf16 kernels) against the same file in f32 on the CPU.
    #[test]
    fn gpu_gguf_bf16_follows_cpu_f32() {
        let Some(gpu) = gpu_or_skip() else { return };
        let (dir, mut gguf) = tiny_gguf("gguf-gpu");
        let cpu = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::F32).unwrap();
        let on_gpu = Llama::from_gguf(&mut gguf, &gpu, DType::BF16).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(on_gpu.config().dtype, DType::BF16);
        assert_follows(&run(&cpu, 40), &run(&on_gpu, 40), "gguf on the gpu");
    }
}
