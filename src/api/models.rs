//! `GET /v1/models` and `GET /v1/models/{id}`: OpenAI's fields first, the catalog's beside them.

use std::sync::Arc;

use axum::extract::{Path, State};
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
        "type": match info.kind { ModelKind::Chat => "chat", ModelKind::Embedding => "embedding" },
        "context_size": info.context_size,
        "max_tokens": info.max_tokens,
        "params": info.params,
        "tags": info.tags,
        "input_cost": info.input_cost,
        "output_cost": info.output_cost,
        "endpoint_publication_date": info.endpoint_publication_date,
        "license": info.license,
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
    state
        .registry
        .get(&id)
        .map(|m| Json(model_json(m.info())))
        .ok_or_else(|| ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(format!("The model `{id}` does not exist."))
                .with_code("model_not_found")
        })
}
