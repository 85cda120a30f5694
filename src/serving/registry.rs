//! The models this server has loaded, and loading them from catalog ids or paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_models::{LoadedModel, ModelKind};
use candle_core::Device;

use super::template::ChatTemplate;
use super::{ChatModel, EmbeddingModel};
use crate::catalog::{Catalog, CatalogEntry};
use crate::engine::{self, EngineConfig};
use crate::fetch;
use crate::runner::{self, ModelRunner};
use crate::scheduler::SchedulerConfig;

/// Catalog metadata of a loaded model, as `/v1/models` shows it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    pub kind: ModelKind,
    pub owned_by: String,
    pub created: u64,
    pub context_size: usize,
    pub max_tokens: usize,
    pub params: u64,
    pub tags: Vec<String>,
    pub input_cost: Option<f64>,
    pub output_cost: Option<f64>,
    pub endpoint_publication_date: Option<String>,
    pub license: Option<String>,
}

#[derive(Clone)]
pub enum Served {
    Chat(Arc<ChatModel>),
    Embedding(Arc<EmbeddingModel>),
}

impl Served {
    pub fn info(&self) -> &ModelInfo {
        match self {
            Served::Chat(m) => &m.info,
            Served::Embedding(m) => &m.info,
        }
    }
}

pub struct Registry {
    pub models: Vec<Served>,
}

impl Registry {
    pub fn get(&self, id: &str) -> Option<&Served> {
        self.models.iter().find(|m| m.info().id == id)
    }

    /// Stops every engine (in-flight requests end with an error).
    pub fn shutdown(&self) {
        for m in &self.models {
            if let Served::Chat(c) = m {
                c.engine.shutdown();
            }
        }
    }
}

/// How to load and size what `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Catalog ids or local paths; empty means the whole built-in catalog.
    pub sources: Vec<String>,
    pub device: Device,
    pub home: PathBuf,
    /// KV-cache budget per chat model; `None` sizes it from free memory.
    pub kv_cache_bytes: Option<u64>,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Fetches (when needed) and loads every requested model, starting an engine for each.
pub fn load_registry(opts: &ServeOptions) -> Result<Registry, LoadError> {
    let catalog = Catalog::builtin();
    let entries: Vec<CatalogEntry> = if opts.sources.is_empty() {
        catalog.entries.clone()
    } else {
        opts.sources
            .iter()
            .map(|s| resolve_source(&catalog, s))
            .collect::<Result<_, _>>()?
    };
    let mut models = Vec::new();
    for entry in entries {
        if models.iter().any(|m: &Served| m.info().id == entry.id) {
            return Err(LoadError(format!("two models share the id `{}`", entry.id)));
        }
        let path = fetch::fetch(&entry, &opts.home)
            .map_err(|e| LoadError(format!("model `{}`: {e}", entry.id)))?;
        let started = std::time::Instant::now();
        let loaded = candela_models::load(&path, &opts.device)
            .map_err(|e| LoadError(format!("model `{}`: {e}", entry.id)))?;
        let served = serve_model(&entry, loaded, opts)?;
        tracing::info!(model = %entry.id, path = %path.display(), secs = started.elapsed().as_secs_f32(), "loaded");
        models.push(served);
    }
    Ok(Registry { models })
}

/// A catalog id, or a path to a GGUF file or a Hugging Face directory.
fn resolve_source(catalog: &Catalog, source: &str) -> Result<CatalogEntry, LoadError> {
    if let Some(entry) = catalog.get(source) {
        return Ok(entry.clone());
    }
    let path = Path::new(source);
    if !path.exists() {
        return Err(LoadError(format!(
            "--model `{source}` is neither a catalog id ({}) nor an existing path",
            catalog.ids().join(", ")
        )));
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into());
    Ok(CatalogEntry {
        id: stem,
        kind: String::new(),
        source: source.to_string(),
        sha256: None,
        file: None,
        owned_by: Some("local".into()),
        tags: Vec::new(),
        context_size: None,
        max_tokens: None,
        input_cost: None,
        output_cost: None,
        endpoint_publication_date: None,
        license: None,
    })
}

fn serve_model(
    entry: &CatalogEntry,
    loaded: LoadedModel,
    opts: &ServeOptions,
) -> Result<Served, LoadError> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let info = |kind: ModelKind, context: usize, params: u64| ModelInfo {
        id: entry.id.clone(),
        kind,
        owned_by: entry.owned_by.clone().unwrap_or_else(|| "candela".into()),
        created,
        context_size: entry.context_size.unwrap_or(context).min(context),
        max_tokens: entry.max_tokens.unwrap_or(context).min(context),
        params,
        tags: entry.tags.clone(),
        input_cost: entry.input_cost,
        output_cost: entry.output_cost,
        endpoint_publication_date: entry.endpoint_publication_date.clone(),
        license: entry.license.clone(),
    };
    match loaded {
        LoadedModel::Embedding { model, tokenizer } => {
            let info = info(ModelKind::Embedding, model.max_tokens(), model.params());
            let m = EmbeddingModel::spawn(info, model, tokenizer)
                .map_err(|e| LoadError(e.to_string()))?;
            Ok(Served::Embedding(Arc::new(m)))
        }
        LoadedModel::Text(text) => {
            let candela_models::TextModel {
                model,
                tokenizer,
                chat_template,
                eos_token_ids,
                bos_token,
                eos_token,
            } = text;
            let template = ChatTemplate::new(chat_template, bos_token, eos_token)
                .map_err(|e| LoadError(format!("model `{}`: {e}", entry.id)))?;
            let cfg = model.config().clone();
            let budget = opts
                .kv_cache_bytes
                .unwrap_or_else(|| runner::default_kv_budget(&opts.device));
            // No use for more blocks than the running sequences can fill.
            let max_useful = opts.max_num_seqs * cfg.context_len.div_ceil(opts.block_size);
            let num_blocks =
                ModelRunner::blocks_for_budget(&cfg, opts.block_size, budget).min(max_useful);
            if num_blocks == 0 {
                return Err(LoadError(format!(
                    "model `{}`: the KV-cache budget ({budget} bytes) holds no block",
                    entry.id
                )));
            }
            let info = info(
                ModelKind::Chat,
                cfg.context_len.min(num_blocks * opts.block_size),
                cfg.params,
            );
            let runner = ModelRunner::new(model, num_blocks, opts.block_size)
                .map_err(|e| LoadError(format!("model `{}`: KV cache: {e}", entry.id)))?;
            tracing::info!(model = %entry.id, num_blocks, block_size = opts.block_size, tokens = num_blocks * opts.block_size, "KV cache");
            let engine = engine::spawn(
                &entry.id,
                runner,
                EngineConfig {
                    scheduler: SchedulerConfig {
                        max_num_seqs: opts.max_num_seqs,
                        max_batched_tokens: opts.max_num_batched_tokens,
                        num_blocks,
                        block_size: opts.block_size,
                    },
                },
            )
            .map_err(|e| LoadError(e.to_string()))?;
            Ok(Served::Chat(Arc::new(ChatModel::new(
                info,
                engine,
                tokenizer,
                template,
                eos_token_ids,
            ))))
        }
    }
}
