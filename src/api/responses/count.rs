//! `POST /v1/responses/input_tokens`: how many tokens the prompt of a Responses API request
//! would take, its history (`previous_response_id`, `conversation`), `instructions` and `tools`
//! included, computed as `POST /v1/responses` computes it, without running the model. `model`
//! defaults to the first chat model loaded. Not metered.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::Json;
use serde_json::{json, Value};

use super::super::chat::chat_model;
use super::super::{json, ApiError, AppState};
use super::request::ResponsesRequest;
use super::{history, prompt};
use crate::platform::Caller;
use crate::serving::Served;

pub async fn input_tokens(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut body: Value = json::parse(body)?;
    if let Some(fields) = body.as_object_mut().filter(|b| !b.contains_key("model")) {
        let default = state.registry.models.iter().find_map(|m| match m {
            Served::Chat(c) => Some(c.info.id.clone()),
            Served::Embedding(_) => None,
        });
        fields.insert("model".into(), default.into());
    }
    let req: ResponsesRequest = json::parse(Ok(Bytes::from(body.to_string())))?;
    let model = chat_model(&state, &req.model, None)?;
    let parsed = req.parse()?;
    let mut conversation = history(&state, &caller, &req, &parsed).await?;
    conversation.extend(parsed.messages);
    let prompt = prompt(
        &model,
        req.instructions.as_deref(),
        parsed.tool_use.as_ref(),
        &conversation,
        parsed.truncate,
        parsed.params.max_tokens,
    )?;
    Ok(Json(
        json!({"object": "response.input_tokens", "input_tokens": prompt.len()}),
    ))
}
