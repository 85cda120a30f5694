//! Stored chat completions: `store: true` (with `metadata`) on `POST /v1/chat/completions` keeps
//! the completion, streamed or not, and its messages; `GET /v1/chat/completions` lists them
//! (`model`, `metadata[key]=value`, `after`, `limit`, `order`, oldest first by default),
//! `GET`, `POST` (new `metadata`) and `DELETE /v1/chat/completions/{id}` read, update and delete
//! one, and `GET /v1/chat/completions/{id}/messages` pages its messages. They belong to the
//! caller's project: another project's ids read as unknown.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde_json::{json, Value};

use super::files::blocking;
use super::page::Page;
use super::types::{new_metadata, MessageContent, RequestMessage};
use super::{json, ApiError, AppState};
use crate::engine::FinishReason;
use crate::platform::chat_completions::StoredCompletion;
use crate::platform::Caller;
use crate::serving::TokenLogprob;

/// What a completion asked to be stored keeps besides itself.
pub struct Storing {
    pub state: Arc<AppState>,
    pub project: String,
    pub metadata: Value,
    /// The request's messages, as they are listed.
    pub messages: Vec<Value>,
}

impl Storing {
    /// `None` unless the request says `store: true`.
    pub fn new(
        state: &Arc<AppState>,
        caller: Option<&Caller>,
        store: Option<bool>,
        metadata: Value,
        id: &str,
        messages: &[RequestMessage],
    ) -> Option<Arc<Self>> {
        if store != Some(true) {
            return None;
        }
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| stored_message(format!("{id}-{i}"), m))
            .collect();
        Some(Arc::new(Self {
            state: state.clone(),
            project: caller.map_or_else(
                || crate::platform::ANONYMOUS_PROJECT.to_string(),
                |c| c.tag().project,
            ),
            metadata,
            messages,
        }))
    }

    /// Stores `completion` (the `chat.completion` object).
    pub async fn keep(&self, completion: &Value) -> Result<(), ApiError> {
        let mut completion = completion.clone();
        completion["metadata"] = self.metadata.clone();
        let stored = StoredCompletion {
            id: completion["id"].as_str().unwrap_or_default().to_string(),
            created_at: completion["created"].as_i64().unwrap_or(0),
            completion,
            messages: self.messages.clone(),
        };
        let project = self.project.clone();
        blocking(&self.state, move |s| {
            s.put_chat_completion(&project, &stored)
        })
        .await
    }
}

/// A request message as stored completions list it: its id, and its text as `content` (with the
/// parts as `content_parts` when it came in parts).
fn stored_message(id: String, m: &RequestMessage) -> Value {
    let mut v = json!({"id": id, "role": m.role, "content": null});
    match &m.content {
        Some(MessageContent::Text(t)) => v["content"] = json!(t),
        Some(MessageContent::Parts(parts)) => {
            let text: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
            v["content"] = json!(text);
            v["content_parts"] = parts
                .iter()
                .map(|p| json!({"type": p.kind, "text": p.text}))
                .collect();
        }
        None => {}
    }
    for (key, field) in [
        ("tool_calls", &m.tool_calls),
        ("function_call", &m.function_call),
        ("name", &m.name),
        ("tool_call_id", &m.tool_call_id),
    ] {
        if let Some(value) = field.as_ref().filter(|v| !v.is_null()) {
            v[key] = value.clone();
        }
    }
    v
}

/// One streamed choice, gathered to be stored whole at the end.
#[derive(Default)]
pub struct Gathered {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    /// The ids its streamed calls were given, in order.
    call_ids: Vec<String>,
}

impl Gathered {
    pub fn add(&mut self, chunk: &crate::serving::GenChunk) {
        self.text.push_str(&chunk.text);
        self.logprobs.extend(chunk.logprobs.iter().cloned());
        self.finish = chunk.finish.or(self.finish);
    }

    /// Notes the ids of the calls a streamed delta starts.
    pub fn note_calls(&mut self, delta: &Value) {
        let started = delta["tool_calls"].as_array().into_iter().flatten();
        let ids = started.filter_map(|c| c["id"].as_str()).map(str::to_string);
        self.call_ids.extend(ids);
    }

    /// Gives the calls of the choice built whole the ids the stream gave them.
    pub fn same_ids(&self, choice: &mut Value) {
        if let Some(calls) = choice["message"]["tool_calls"].as_array_mut() {
            for (call, id) in calls.iter_mut().zip(&self.call_ids) {
                call["id"] = json!(id);
            }
        }
    }
}

fn project(caller: &Caller) -> Result<String, ApiError> {
    super::files::owner(caller)
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("Chat completion with id '{id}' not found."))
}

/// `GET /v1/chat/completions`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_query_oldest_first(&query, 20, 100)?;
    let owner = project(&caller)?;
    let mut all = blocking(&state, move |s| s.chat_completions(&owner)).await?;
    if let Some(model) = query.get("model") {
        all.retain(|c| c["model"].as_str() == Some(model));
    }
    for (key, value) in &query {
        if let Some(field) = key
            .strip_prefix("metadata[")
            .and_then(|k| k.strip_suffix(']'))
        {
            all.retain(|c| c["metadata"][field].as_str() == Some(value));
        }
    }
    Ok(Json(page.list_oldest_first(all)?))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (project(&caller)?, id.clone());
    let found = blocking(&state, move |s| s.chat_completion(&owner, &key)).await?;
    Ok(Json(found.ok_or_else(|| unknown(&id))?.completion))
}

/// `POST /v1/chat/completions/{id}`: replaces its `metadata`.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: serde_json::Map<String, Value> = json::parse(body)?;
    let metadata = new_metadata(body.get("metadata"))?;
    let (owner, key) = (project(&caller)?, id.clone());
    let found = blocking(&state, move |s| {
        s.set_chat_completion_metadata(&owner, &key, &metadata)
    })
    .await?;
    Ok(Json(found.ok_or_else(|| unknown(&id))?))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (project(&caller)?, id.clone());
    if !blocking(&state, move |s| s.delete_chat_completion(&owner, &key)).await? {
        return Err(unknown(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "chat.completion.deleted", "deleted": true}),
    ))
}

/// `GET /v1/chat/completions/{id}/messages`: `limit` (default 20), `order` (`asc`, the
/// default, or `desc`), `after` (a message id).
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_query_oldest_first(&query, 20, 100)?;
    let (owner, key) = (project(&caller)?, id.clone());
    let found = blocking(&state, move |s| s.chat_completion(&owner, &key)).await?;
    let messages = found.ok_or_else(|| unknown(&id))?.messages;
    Ok(Json(page.list_oldest_first(messages)?))
}
