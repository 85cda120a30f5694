//! `POST /v1/embeddings`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

use super::types::{EmbeddingInput, EmbeddingRequest};
use super::{json, ApiError, AppState};
use crate::platform::usage::Meter;
use crate::serving::{EmbeddingModel, Served, ServingError};
use candela_models::ModelKind;

/// The embedding model `model` names, noted on the call's meter.
pub(super) fn embedding_model(
    state: &AppState,
    model: &str,
    meter: Option<&Meter>,
) -> Result<Arc<EmbeddingModel>, ApiError> {
    let model = match state.registry.resolve(model, Some(ModelKind::Embedding))? {
        Served::Embedding(m) => m,
        Served::Chat(m) => {
            return Err(ServingError::WrongModelType(format!(
            "The model `{}` is a chat model and cannot create embeddings; use an embedding model.",
            m.info.id
        ))
            .into())
        }
    };
    if let Some(m) = meter {
        m.set_model(&model.info);
    }
    Ok(model)
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    meter: Option<Extension<Arc<Meter>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let req: EmbeddingRequest = json::parse(body)?;
    let model = embedding_model(&state, &req.model, meter.as_deref())?;
    let max_inputs = state.platform.config.max_embedding_inputs;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!(
                    "Invalid value for 'encoding_format': '{other}'; expected 'float' or 'base64'."
                ),
            ))
        }
    };
    if let Some(d) = req.dimensions {
        if d != model.dim as i64 {
            return Err(ApiError::invalid(
                Some("dimensions"),
                format!("This model produces {}-dimensional embeddings and cannot change that (got dimensions={d}).", model.dim),
            ));
        }
    }
    let texts: &[String] = match &req.input {
        EmbeddingInput::Text(t) => std::slice::from_ref(t),
        EmbeddingInput::Texts(ts) => ts,
        _ => &[],
    };
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            Some("input"),
            format!("input[{i}] is an empty string; inputs must not be empty."),
        ));
    }
    let count = match &req.input {
        EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
        EmbeddingInput::Texts(ts) => ts.len(),
        EmbeddingInput::TokenLists(ts) => ts.len(),
    };
    if count == 0 || count > max_inputs {
        return Err(ApiError::invalid(
            Some("input"),
            format!("'input' must hold between 1 and {max_inputs} items; got {count}."),
        ));
    }
    let tokens = match req.input {
        EmbeddingInput::Text(t) => model.tokenize(&[t])?,
        EmbeddingInput::Texts(ts) => model.tokenize(&ts)?,
        EmbeddingInput::Tokens(t) => vec![t],
        EmbeddingInput::TokenLists(ts) => ts,
    };
    model.check_ids(&tokens)?;
    if let Some(i) = tokens.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            Some("input"),
            format!("input[{i}] is empty; inputs must not be empty."),
        ));
    }
    let prompt_tokens: usize = tokens.iter().map(Vec::len).sum();
    let vectors = model.embed(tokens).await?;
    if let Some(m) = &meter {
        m.set_tokens(prompt_tokens as u64, 0);
    }
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let resp = Json(json!({
        "object": "list",
        "data": data,
        "model": model.info.id,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response();
    Ok(resp)
}
