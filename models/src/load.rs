//! Turning a path on disk into a ready model and its tokenizer.

use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::bert::BertEmbedder;
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::{CausalLm, Embedder, ModelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// A generative model with what serving needs to talk to it.
pub struct TextModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// Jinja chat template, when the checkpoint has one.
    pub chat_template: Option<String>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub enum LoadedModel {
    Text(TextModel),
    Embedding {
        model: Box<dyn Embedder>,
        tokenizer: Tokenizer,
    },
}

impl LoadedModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            LoadedModel::Text(_) => ModelKind::Chat,
            LoadedModel::Embedding { .. } => ModelKind::Embedding,
        }
    }
}

/// Loads a GGUF file (Llama architecture) or a Hugging Face directory (BERT encoders or Llama
/// safetensors) onto `device`. `dtype` is what a Llama checkpoint's dense weights, activations
/// and KV cache use (see [`crate::default_dtype`]). GGUF files keep their quantized weights; on
/// the CPU they compute in f32 (candela's quantized kernel takes f32 activations), elsewhere in
/// `dtype`. Embedding models run in f32.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if path.is_dir() {
        return load_hf_dir(path, device, dtype);
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return load_gguf(path, device, dtype);
    }
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    }
    Err(ModelError::Unsupported(format!(
        "{}: expected a .gguf file or a directory with config.json",
        path.display()
    )))
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let mut gguf = GgufFile::open(path)?;
    let tokenizer = gguf.tokenizer()?;
    let eos = gguf.get_u32("tokenizer.ggml.eos_token_id").ok();
    let bos = gguf.get_u32("tokenizer.ggml.bos_token_id").ok();
    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    // Chat models often end a turn with a token other than the file's EOS.
    for extra in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
        if let Some(id) = tokenizer.token_to_id(extra) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let model = Llama::from_gguf(&mut gguf, device, dtype)?;
    Ok(LoadedModel::Text(TextModel {
        model: Box::new(model),
        chat_template: gguf.chat_template(),
        bos_token: bos.and_then(|id| gguf.token_text(id)),
        eos_token: eos.and_then(|id| gguf.token_text(id)),
        eos_token_ids,
        tokenizer,
    }))
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format {
        path: path.into(),
        message: e.to_string(),
    })
}

fn load_tokenizer_json(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tokenizer = Tokenizer::from_file(&path)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
    // Padding is the engine's business; some exported tokenizers pad every input to 128.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

fn load_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let config = read_json(&dir.join("config.json"))?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    match model_type {
        "bert" => Ok(LoadedModel::Embedding {
            model: Box::new(BertEmbedder::load(dir, device)?),
            tokenizer: load_tokenizer_json(dir)?,
        }),
        "llama" | "mistral" => {
            let tokenizer = load_tokenizer_json(dir)?;
            let tok_config = read_json(&dir.join("tokenizer_config.json")).ok();
            let token_str = |key: &str| -> Option<String> {
                let v = tok_config.as_ref()?.get(key)?;
                v.as_str()
                    .or_else(|| v.get("content")?.as_str())
                    .map(str::to_owned)
            };
            let mut eos_token_ids: Vec<u32> = match config.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => ids
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
                None => Vec::new(),
            };
            if let Some(id) = token_str("eos_token").and_then(|t| tokenizer.token_to_id(&t)) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
            Ok(LoadedModel::Text(TextModel {
                model: Box::new(Llama::from_safetensors(dir, &config, device, dtype)?),
                chat_template: token_str("chat_template"),
                bos_token: token_str("bos_token"),
                eos_token: token_str("eos_token"),
                eos_token_ids,
                tokenizer,
            }))
        }
        other => Err(ModelError::Unsupported(format!(
            "{}: model_type `{other}` (supported: llama, mistral, bert)",
            dir.display()
        ))),
    }
}
