//! The "dummy" load format: a Llama model with random weights at the shapes of a Hugging Face
//! `config.json`, and a synthetic tokenizer, so that speed can be measured at real sizes (e.g.
//! Llama-3.1-8B) without downloading weights. Throughput depends on shapes, not values.
//!
//! The tokenizer maps the word `w<i>` to token `i` (whitespace-separated), so a prompt of `n`
//! such words is exactly `n` tokens: `candela bench --tokenizer CONFIG.json` builds the same one.

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::Tokenizer;

use crate::llama::Llama;
use crate::{ModelError, Result, TextModel};

/// Weights drawn at random: norms are ones, matrices uniform in ±1/sqrt(fan-in), which keeps
/// activations finite through many layers.
pub(crate) struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match s.dims() {
            [_] => Tensor::ones(s, DType::F32, dev)?,
            dims => {
                let fan_in = *dims.last().unwrap_or(&1) as f64;
                let a = 1.0 / fan_in.sqrt();
                Tensor::rand(-a as f32, a as f32, s, dev)?
            }
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("dummy weights need a shape (asked for `{name}` without one)")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// `w0 w1 ...`: one token per whitespace-separated word `w<i>`, `i` below `vocab_size`.
pub fn synthetic_tokenizer(vocab_size: usize) -> Result<Tokenizer> {
    let vocab = (0..vocab_size)
        .map(|i| (format!("w{i}"), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("w0".into())
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    Ok(tokenizer)
}

/// The vocabulary size a config declares (for the synthetic tokenizer).
pub fn config_vocab_size(path: &Path) -> Result<usize> {
    crate::load::read_json(path)?
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| ModelError::Format {
            path: path.into(),
            message: "missing `vocab_size`".into(),
        })
}

/// Loads a `config.json` (or a directory holding one) as a dummy model with `dtype` weights.
pub fn load_dummy(path: &Path, device: &Device, dtype: DType) -> Result<TextModel> {
    let config_path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let config = crate::load::read_json(&config_path)?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if !matches!(model_type, "llama" | "mistral") {
        return Err(ModelError::Unsupported(format!(
            "{}: the dummy load format supports model_type llama and mistral, not `{model_type}`",
            config_path.display()
        )));
    }
    check_fits(&config_path, &config, device, dtype)?;
    let model = Llama::dummy(&config_path, &config, device, dtype)?;
    let vocab_size = config_vocab_size(&config_path)?;
    Ok(TextModel {
        model: Box::new(model),
        tokenizer: synthetic_tokenizer(vocab_size)?,
        chat_template: None,
        // Random weights would end streams at random; benchmarks set ignore_eos anyway.
        eos_token_ids: Vec::new(),
        bos_token: None,
        eos_token: None,
    })
}

/// The weights a Llama `config.json` declares, and those of its largest matrix (the embeddings).
fn weight_counts(config: &serde_json::Value) -> Option<(u64, u64)> {
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64());
    let hidden = get("hidden_size")?;
    let heads = get("num_attention_heads")?;
    let kv_heads = get("num_key_value_heads").unwrap_or(heads);
    let head_dim = get("head_dim").unwrap_or(hidden / heads.max(1));
    let vocab = get("vocab_size")?;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden;
    let mlp = 3 * hidden * get("intermediate_size")?;
    let layer = attention + mlp + 2 * hidden;
    let embeddings = vocab * hidden * if tied { 1 } else { 2 };
    let total = get("num_hidden_layers")? * layer + embeddings + hidden;
    Some((total, vocab * hidden))
}

/// Refuses, before allocating anything, random weights that the device's free memory cannot hold
/// (an 8B config in f32 on a CPU would otherwise be killed for memory minutes into loading).
fn check_fits(
    config_path: &Path,
    config: &serde_json::Value,
    device: &Device,
    dtype: DType,
) -> Result<()> {
    let (Some((params, largest)), Some(free)) =
        (weight_counts(config), candela_kernels::free_memory(device))
    else {
        return Ok(());
    };
    // Each matrix is drawn in f32 before it is converted: the largest one is there twice.
    let need = params * dtype.size_in_bytes() as u64 + largest * 4;
    if need <= free {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    let hint = match (dtype.size_in_bytes() > 2, device.is_cpu()) {
        (true, true) => {
            " (--dtype bfloat16 halves the weights, but a CPU computes in it slowly; \
             models/configs/llama-3.2-1b.json is a smaller shape)"
        }
        (true, false) => " (--dtype bfloat16 halves the weights)",
        _ => "",
    };
    Err(ModelError::Format {
        path: config_path.into(),
        message: format!(
            "random weights of {:.2}B parameters in {dtype:?} need about {:.1} GB, more than the \
             {:.1} GB free on this device{hint}",
            params as f64 / 1e9,
            gb(need),
            gb(free)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_tokenizer_counts_words() {
        let t = synthetic_tokenizer(100).unwrap();
        let ids = t.encode("w1 w2  w99", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, 2, 99]);
        assert_eq!(t.decode(&[5, 6], false).unwrap(), "w5 w6");
    }

    /// `json` as config.json in a fresh temporary folder of its own: `(folder, file)`.
    fn config_file(tag: &str, json: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("candela-dummy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        (dir, path)
    }

    #[test]
    fn a_tiny_config_loads_with_the_right_shapes() {
        let (dir, path) = config_file(
            "tiny",
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}"#,
        );
        let m = load_dummy(&path, &Device::Cpu, DType::F32).unwrap();
        let cfg = m.model.config();
        assert_eq!((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), (2, 2, 16));
        // embed + 2 layers of (q, k, v, o, gate, up, down) + lm_head
        let per_layer = 64 * 64 * 2 + 2 * (32 * 64) + 3 * (128 * 64);
        assert_eq!(cfg.params, (300 * 64 * 2 + 2 * per_layer) as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_configs_count_their_parameters() {
        let count = |name: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("configs")
                .join(name);
            weight_counts(&crate::load::read_json(&path).unwrap())
                .unwrap()
                .0 as f64
                / 1e9
        };
        assert!((count("llama-3.1-8b.json") - 8.03).abs() < 0.01);
        assert!((count("llama-3.2-1b.json") - 1.24).abs() < 0.01);
    }

    #[test]
    fn weights_beyond_free_memory_are_refused_before_loading() {
        let (dir, path) = config_file(
            "big",
            r#"{"model_type": "llama", "hidden_size": 65536, "intermediate_size": 262144,
                "num_hidden_layers": 400, "num_attention_heads": 512,
                "vocab_size": 1000000, "max_position_embeddings": 256}"#,
        );
        let started = std::time::Instant::now();
        let e = load_dummy(&path, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("GB free") && e.contains("--dtype bfloat16"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
