//! `GET /v1/models` and `GET /v1/models/{id}`: OpenAI's fields first, the catalog's beside them.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use candela_models::ModelKind;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::serving::ModelInfo;

pub fn model_json(info: &ModelInfo) -> Value {
    json!({
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "type": info.kind_name(),
        "context_size": info.context_size,
        "max_tokens": info.max_tokens,
        "params": info.params,
        "tags": info.tags,
        "input_cost": info.input_cost,
        "output_cost": info.output_cost,
        "endpoint_publication_date": info.endpoint_publication_date,
        "license": info.license,
        "tokens_per_second": info.tokens_per_second,
    })
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .registry
        .models
        .iter()
        .map(|m| model_json(m.info()))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // A virtual-model query names a model too (`/v1/models/chat@fastest`).
    let served = state.registry.resolve(&id, None)?;
    Ok(Json(model_json(served.info())))
}

#[derive(serde::Deserialize)]
pub struct ResolveParams {
    query: Option<String>,
    /// `chat`, `completions` or `embeddings`: resolve as that endpoint would; default any type.
    endpoint: Option<String>,
}

/// `GET /v1/models/resolve?query=chat@fastest[&endpoint=chat]`: what a query resolves to, and why
/// each loaded model was kept or dropped.
pub async fn resolve(
    State(state): State<Arc<AppState>>,
    Query(p): Query<ResolveParams>,
) -> Result<Response, ApiError> {
    let query = p
        .query
        .ok_or_else(|| ApiError::invalid(Some("query"), "Missing required parameter: 'query'."))?;
    let want = match p.endpoint.as_deref() {
        None | Some("any") => None,
        Some("chat" | "completions") => Some(ModelKind::Chat),
        Some("embeddings") => Some(ModelKind::Embedding),
        Some(other) => {
            return Err(ApiError::invalid(
                Some("endpoint"),
                format!("Invalid value for 'endpoint': `{other}`; expected chat, completions or embeddings."),
            ))
        }
    };
    if state.registry.get(&query).is_some() {
        let served = state.registry.resolve(&query, want)?;
        return Ok(Json(json!({
            "query": query,
            "model": served.info().id,
            "reason": "the query is the id of a loaded model",
            "data": [model_json(served.info())],
        }))
        .into_response());
    }
    let explained = state.registry.explain(&query, want)?;
    let candidates: Vec<Value> = explained
        .reasons
        .iter()
        .map(|e| json!({"id": e.id, "outcome": e.outcome}))
        .collect();
    let r = match explained.outcome {
        Ok(r) => r,
        Err(e) => {
            // The error, with the reasons beside it.
            let err = ApiError::from(crate::serving::ServingError::from_resolve(e));
            let mut body = serde_json::to_value(err.body()).unwrap_or_default();
            body["query"] = json!(explained.query.to_string());
            body["candidates"] = json!(candidates);
            return Ok((err.status, Json(body)).into_response());
        }
    };
    let chosen = &state.registry.models[r.index];
    Ok(Json(json!({
        "query": explained.query.to_string(),
        "model": chosen.info().id,
        "ranker": r.ranker.to_string(),
        "ranked": r.matched.iter().map(|&i| state.registry.models[i].info().id.clone()).collect::<Vec<_>>(),
        "candidates": candidates,
        "data": [model_json(chosen.info())],
    }))
    .into_response())
}
