//! The models this server has loaded, and loading them from catalog ids or paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela_models::{LoadedModel, ModelKind};
use candle_core::{DType, Device};

use super::calibrate;
use super::template::ChatTemplate;
use super::ServingError;
use super::{ChatModel, EmbeddingModel};
use crate::catalog::{Catalog, CatalogEntry, ModelType};
use crate::engine::{self, EngineConfig};
use crate::fetch;
use crate::platform::query;
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
    /// Measured speed on this machine (decode tokens/s for chat, tokens/s for embeddings), from
    /// the start-up calibration; what `@fastest` ranks by.
    pub tokens_per_second: Option<f64>,
    /// `completion` when the catalog says so (a chat-capable text model otherwise).
    pub completion_only: bool,
}

impl ModelInfo {
    pub fn published(&self) -> Option<chrono::NaiveDate> {
        let date = self.endpoint_publication_date.as_deref()?;
        chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ModelKind::Chat if self.completion_only => "completion",
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        }
    }
}

/// A query, what it resolved to, and why each loaded model was kept or dropped.
pub struct Explained {
    pub query: query::Query,
    pub outcome: Result<query::Resolution, query::ResolveError>,
    pub reasons: Vec<query::Explain>,
}

/// The kind of model an endpoint needs (`None`: any, for `/v1/models/resolve`).
pub type Want = Option<ModelKind>;

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
    /// The loaded model with this id (case-insensitively, as OpenAI's API matches ids).
    pub fn get(&self, id: &str) -> Option<&Served> {
        let id = id.trim();
        self.models.iter().find(|m| m.info().id == id).or_else(|| {
            self.models
                .iter()
                .find(|m| m.info().id.eq_ignore_ascii_case(id))
        })
    }

    /// The model a request's `model` field names: a loaded model's id, or a virtual-model query
    /// (`chat@fastest`, `smollm?context_size>4000`, or a bare tag) resolved against the models
    /// loaded now.
    pub fn resolve(&self, model: &str, want: Want) -> Result<Served, ServingError> {
        if model.trim().is_empty() {
            return Err(ServingError::invalid(
                "model",
                "You must provide a model: an id from /v1/models or a query such as `chat@fastest`.",
            ));
        }
        if let Some(m) = self.get(model) {
            return match want {
                Some(kind) if m.info().kind != kind => Err(ServingError::WrongModelType(format!(
                    "The model `{model}` is {} model and cannot serve this endpoint; {}.",
                    article(m.info().kind_name()),
                    match kind {
                        ModelKind::Chat => "use it with /v1/embeddings",
                        ModelKind::Embedding => "use an embedding model",
                    }
                ))),
                _ => Ok(m.clone()),
            };
        }
        self.explain(model, want)?
            .outcome
            .map(|r| self.models[r.index].clone())
            .map_err(ServingError::from_resolve)
    }

    /// Parses `model` as a query and resolves it, keeping the reasons.
    pub fn explain(&self, model: &str, want: Want) -> Result<Explained, ServingError> {
        let tag = model.trim();
        let tagged = self
            .models
            .iter()
            .any(|m| m.info().tags.iter().any(|t| t.eq_ignore_ascii_case(tag)));
        if !query::is_query(model) && !tagged && self.get(tag).is_none() {
            return Err(ServingError::ModelNotFound(model.to_string()));
        }
        let q = query::parse(model).map_err(|e| ServingError::InvalidQuery(e.to_string()))?;
        let candidates: Vec<query::Candidate> = self
            .models
            .iter()
            .map(|m| {
                let i = m.info();
                query::Candidate {
                    id: &i.id,
                    kind: i.kind_name(),
                    serves: want.is_none_or(|k| k == i.kind),
                    tags: &i.tags,
                    context_size: i.context_size as u64,
                    max_tokens: i.max_tokens as u64,
                    params: i.params,
                    input_cost: i.input_cost,
                    output_cost: i.output_cost,
                    published: i.published(),
                    tokens_per_second: i.tokens_per_second,
                }
            })
            .collect();
        let outcome = query::resolve(&q, &candidates);
        let reasons = match &outcome {
            Ok(r) => r.explain.clone(),
            Err(_) => query::explain(&q, &candidates),
        };
        Ok(Explained {
            query: q,
            outcome,
            reasons,
        })
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
    /// Most prompt tokens per step (see [`SchedulerConfig::max_prefill_tokens`]).
    pub max_batch_prefill_tokens: usize,
    /// A catalog file to use instead of the built-in one.
    pub catalog: Option<PathBuf>,
    /// Measure each model's speed at start-up (what `@fastest` ranks by).
    pub calibrate: bool,
    /// `--load-format dummy`: each source is a Llama `config.json`, loaded with random weights.
    pub dummy_weights: bool,
    /// Dense weights and activations; `None`: bf16 on a GPU, f32 on the CPU.
    pub dtype: Option<DType>,
    /// What the KV cache holds; `None`: [`runner::default_kv_dtype`].
    pub kv_cache_dtype: Option<DType>,
    /// Compute prompt tokens at the model's higher precision (`serve --prompt-precision`; see
    /// [`runner::default_precise_prompts`]).
    pub precise_prompts: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Fetches (when needed) and loads every requested model, starting an engine for each.
/// With no `--model`, the whole catalog is served: an entry that fails to load is logged and
/// skipped (serve what loads). A model asked for by `--model` must load.
pub fn load_registry(opts: &ServeOptions) -> Result<Registry, LoadError> {
    let catalog = match &opts.catalog {
        Some(path) => Catalog::load(path).map_err(|e| LoadError(e.to_string()))?,
        None => Catalog::builtin(),
    };
    let whole_catalog = opts.sources.is_empty();
    let entries: Vec<CatalogEntry> = if whole_catalog {
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
        match load_one(&entry, opts) {
            Ok(served) => models.push(served),
            Err(e) if whole_catalog => tracing::error!(model = %entry.id, error = %e, "not served"),
            Err(e) => return Err(e),
        }
    }
    if models.is_empty() {
        return Err(LoadError(
            "no model could be loaded; see the errors above".into(),
        ));
    }
    // Every KV cache is sized and allocated: from now on the pool may keep what steps free.
    candela_kernels::keep_freed_memory(&opts.device)
        .map_err(|e| LoadError(format!("device memory pool: {e}")))?;
    Ok(Registry { models })
}

fn load_one(entry: &CatalogEntry, opts: &ServeOptions) -> Result<Served, LoadError> {
    if entry.kind == Some(ModelType::Vision) {
        return Err(LoadError(format!(
            "model `{}`: vision models are not supported yet",
            entry.id
        )));
    }
    let path = fetch::fetch(entry, &opts.home)
        .map_err(|e| LoadError(format!("model `{}`: {e}", entry.id)))?;
    let started = std::time::Instant::now();
    let dtype = opts
        .dtype
        .unwrap_or_else(|| candela_models::default_dtype(&opts.device));
    let loaded = if opts.dummy_weights {
        candela_models::dummy::load_dummy(&path, &opts.device, dtype).map(LoadedModel::Text)
    } else {
        candela_models::load(&path, &opts.device, dtype)
    }
    .map_err(|e| LoadError(format!("model `{}`: {e}", entry.id)))?;
    let served = serve_model(entry, loaded, opts)?;
    tracing::info!(model = %entry.id, path = %path.display(), secs = started.elapsed().as_secs_f32(), tokens_per_second = ?served.info().tokens_per_second, "loaded");
    Ok(served)
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
    Ok(CatalogEntry::local(stem, source.to_string()))
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
        params: entry.params.unwrap_or(params),
        tags: entry.tags.clone(),
        input_cost: entry.input_cost,
        output_cost: entry.output_cost,
        endpoint_publication_date: entry.endpoint_publication_date.clone(),
        license: entry.license.clone(),
        tokens_per_second: None,
        completion_only: entry.kind == Some(ModelType::Completion),
    };
    let loaded_type = match &loaded {
        LoadedModel::Embedding { .. } => "an embedding model",
        LoadedModel::Text(_) => "a text-generation model",
    };
    let declared_ok = match entry.kind {
        None => true,
        Some(ModelType::Embedding) => matches!(loaded, LoadedModel::Embedding { .. }),
        Some(_) => matches!(loaded, LoadedModel::Text(_)),
    };
    if !declared_ok {
        return Err(LoadError(format!(
            "model `{}`: the catalog says type {:?} but the weights are {loaded_type}",
            entry.id,
            entry.kind.unwrap_or(ModelType::Chat)
        )));
    }
    match loaded {
        LoadedModel::Embedding { model, tokenizer } => {
            let info = info(ModelKind::Embedding, model.max_tokens(), model.params());
            let mut m = EmbeddingModel::spawn(info, model, tokenizer)
                .map_err(|e| LoadError(e.to_string()))?;
            if opts.calibrate {
                m.info.tokens_per_second = calibrate::embedding(&m);
            }
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
            let kv_dtype = opts
                .kv_cache_dtype
                .unwrap_or_else(|| runner::default_kv_dtype(&opts.device, cfg.dtype));
            if !opts.device.is_cpu() && kv_dtype != cfg.dtype {
                return Err(LoadError(format!(
                    "model `{}`: a KV cache of {kv_dtype:?} on a GPU (the CUDA kernels read the cache in the model's dtype, {:?}; set --dtype instead)",
                    entry.id, cfg.dtype
                )));
            }
            let num_blocks =
                ModelRunner::blocks_for_budget(&cfg, opts.block_size, kv_dtype, budget)
                    .min(max_useful);
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
            let runner = ModelRunner::new(
                model,
                num_blocks,
                opts.block_size,
                kv_dtype,
                opts.precise_prompts,
            )
            .map_err(|e| LoadError(format!("model `{}`: KV cache: {e}", entry.id)))?;
            tracing::info!(model = %entry.id, num_blocks, block_size = opts.block_size, tokens = num_blocks * opts.block_size, dtype = ?kv_dtype, "KV cache");
            let engine = engine::spawn(
                &entry.id,
                runner,
                EngineConfig {
                    scheduler: SchedulerConfig {
                        max_num_seqs: opts.max_num_seqs,
                        max_batched_tokens: opts.max_num_batched_tokens,
                        max_prefill_tokens: opts.max_batch_prefill_tokens,
                        num_blocks,
                        block_size: opts.block_size,
                    },
                },
            )
            .map_err(|e| LoadError(e.to_string()))?;
            let mut m = ChatModel::new(
                info,
                engine,
                tokenizer,
                template,
                eos_token_ids,
                cfg.vocab_size,
            );
            if opts.calibrate {
                m.info.tokens_per_second = calibrate::chat(&m);
            }
            Ok(Served::Chat(Arc::new(m)))
        }
    }
}

fn article(kind: &str) -> String {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {kind}")
    } else {
        format!("a {kind}")
    }
}
