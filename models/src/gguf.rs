//! GGUF files: metadata access and the tokenizer and chat template stored in them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::{ModelError, Result};

/// GGUF token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// An open GGUF file: its metadata and tensor index.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.into(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::Format {
            path: path.into(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.into(),
            content,
            reader,
        })
    }

    fn format_err(&self, message: String) -> ModelError {
        ModelError::Format {
            path: self.path.clone(),
            message,
        }
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.format_err(format!("missing metadata key `{key}`")))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| self.format_err(format!("`{key}`: {e}")))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.get(key)?;
        v.to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map_err(|e| self.format_err(format!("`{key}`: {e}")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| self.format_err(format!("`{key}`: {e}")))
    }

    fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let values = self
            .get(key)?
            .to_vec()
            .map_err(|e| self.format_err(format!("`{key}`: {e}")))?;
        values
            .iter()
            .map(|v| v.to_string().map(String::as_str))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.format_err(format!("`{key}`: {e}")))
    }

    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let path = self.path.clone();
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| ModelError::Format {
                path,
                message: format!("tensor `{name}`: {e}"),
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The chat template (Jinja) stored in the file, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.get_str("tokenizer.chat_template")
            .ok()
            .map(str::to_owned)
    }

    /// The token text of an id, for BOS/EOS strings that templates refer to.
    pub fn token_text(&self, id: u32) -> Option<String> {
        let tokens = self.get_str_array("tokenizer.ggml.tokens").ok()?;
        tokens.get(id as usize).map(|s| s.to_string())
    }

    /// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` (GPT-2 style vocabularies).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "{}: tokenizer model `{model}` (only byte-level BPE `gpt2` is supported)",
                self.path.display()
            )));
        }
        let tokens = self.get_str_array("tokenizer.ggml.tokens")?;
        let merges = self.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match self.get("tokenizer.ggml.token_type") {
            Ok(v) => v
                .to_vec()
                .map_err(|e| self.format_err(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            Err(_) => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| self.format_err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        // GPT-2 byte level, digits split one by one (SmolLM, Llama 3 and most modern BPE vocabularies).
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
        Ok(tokenizer)
    }
}
