//! The Conversations API: `POST /v1/conversations` (with up to 20 first `items` and
//! `metadata`), `GET`, `POST` (new `metadata`) and `DELETE /v1/conversations/{id}`, and its items:
//! `GET` (paged) and `POST /v1/conversations/{id}/items`, `GET` and `DELETE
//! /v1/conversations/{id}/items/{item_id}`. Items are the Responses API's input items (messages,
//! function calls and their outputs), checked as `input` is; a response created with
//! `conversation` reads them as its history and adds its input and output items at its end.
//! Conversations belong to the caller's project: another project's ids read as unknown.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::files::blocking;
use super::responses::{new_id, parse_items};
use super::types::{metadata, new_metadata, wrong_type};
use super::{json, ApiError, AppState};
use crate::platform::conversations::{repeated_id, Added, Conversation};
use crate::platform::Caller;

/// Items one call may add, as OpenAI allows.
const ITEMS_PER_CALL: usize = 20;

#[derive(Deserialize)]
pub struct CreateBody {
    items: Option<Value>,
    metadata: Option<Value>,
}

#[derive(Deserialize)]
pub struct ItemsBody {
    items: Option<Value>,
}

fn project(caller: &Caller) -> Result<String, ApiError> {
    super::files::owner(caller)
}

fn object(c: &Conversation) -> Value {
    json!({"id": c.id, "object": "conversation", "created_at": c.created_at, "metadata": c.metadata})
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("Conversation with id '{id}' not found."))
}

/// `items` checked as a response's `input` list is, its errors naming `items`.
fn items(value: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(wrong_type("items", "an array", other)),
    };
    if list.len() > ITEMS_PER_CALL {
        return Err(ApiError::invalid(
            Some("items"),
            format!(
                "Invalid 'items': array too long. Expected at most {ITEMS_PER_CALL} items, but \
                 got {}.",
                list.len()
            ),
        ));
    }
    parse_items(list).map(|(items, _)| items).map_err(|mut e| {
        if let Some(param) = e.param.as_mut().filter(|p| p.starts_with("input")) {
            *param = param.replacen("input", "items", 1);
            e.message = e.message.replace("'input[", "'items[");
        }
        e
    })
}

/// The conversation `id` of the caller's project, with its items.
pub async fn load(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Option<Vec<Value>>, ApiError> {
    let (owner, key) = (project(caller)?, id.to_string());
    blocking(state, move |s| s.conversation_items(&owner, &key)).await
}

/// A 400 naming `{field}[i].id` for an item whose id is taken: by another of `items`, or where
/// `taken` says.
pub fn check_ids(
    field: &str,
    items: &[Value],
    taken: impl FnMut(&str) -> bool,
) -> Result<(), ApiError> {
    match repeated_id(items, taken) {
        None => Ok(()),
        Some(dup) => Err(duplicate(field, items, dup)),
    }
}

fn duplicate(field: &str, items: &[Value], id: &str) -> ApiError {
    let at = items.iter().rposition(|i| i["id"] == id).unwrap_or(0);
    ApiError::invalid(
        Some(&format!("{field}[{at}].id")),
        format!("Duplicate item found with id '{id}': an item's id is its conversation's once."),
    )
}

/// Adds `items` at the end of the conversation `id` of `project`.
pub async fn append(
    state: &AppState,
    project: String,
    id: String,
    items: Vec<Value>,
) -> Result<Added, ApiError> {
    blocking(state, move |s| {
        s.add_conversation_items(&project, &id, &items)
    })
    .await
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: CreateBody = json::parse(body)?;
    let conversation = Conversation {
        id: new_id("conv"),
        created_at: super::responses::now() as i64,
        metadata: metadata(body.metadata.as_ref())?,
    };
    let items = items(body.items.as_ref())?;
    check_ids("items", &items, |_| false)?;
    let (owner, made) = (project(&caller)?, conversation.clone());
    blocking(&state, move |s| {
        s.create_conversation(&owner, &made, &items)
    })
    .await?;
    Ok(Json(object(&conversation)))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (project(&caller)?, id.clone());
    let found = blocking(&state, move |s| s.conversation(&owner, &key)).await?;
    Ok(Json(object(&found.ok_or_else(|| unknown(&id))?)))
}

/// `POST /v1/conversations/{id}`: replaces its `metadata`.
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
        if s.set_conversation_metadata(&owner, &key, &metadata)? {
            s.conversation(&owner, &key)
        } else {
            Ok(None)
        }
    })
    .await?;
    Ok(Json(object(&found.ok_or_else(|| unknown(&id))?)))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (project(&caller)?, id.clone());
    if !blocking(&state, move |s| s.delete_conversation(&owner, &key)).await? {
        return Err(unknown(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "conversation.deleted", "deleted": true}),
    ))
}

/// `GET /v1/conversations/{id}/items`: `limit` (1 to 100, default 20), `order` (`desc`, the
/// default, or `asc`), `after` (an item id). `include` is taken and adds nothing: these items
/// hold everything already.
pub async fn list_items(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = super::page::Page::from_query(&query, 20, 100)?;
    let items = load(&state, &caller, &id)
        .await?
        .ok_or_else(|| unknown(&id))?;
    Ok(Json(page.list_oldest_first(items)?))
}

/// `POST /v1/conversations/{id}/items`: adds up to 20 `items` at its end; answers them.
pub async fn add_items(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: ItemsBody = json::parse(body)?;
    if body.items.is_none() {
        return Err(ApiError::invalid(
            Some("items"),
            "Missing required parameter: 'items'.",
        ));
    }
    let items = items(body.items.as_ref())?;
    match append(&state, project(&caller)?, id.clone(), items.clone()).await? {
        Added::Done => {}
        Added::NoConversation => return Err(unknown(&id)),
        Added::Duplicate(dup) => return Err(duplicate("items", &items, &dup)),
    }
    Ok(Json(json!({
        "object": "list",
        "data": items,
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": false,
    })))
}

pub async fn get_item(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, item)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let items = load(&state, &caller, &id)
        .await?
        .ok_or_else(|| unknown(&id))?;
    items
        .into_iter()
        .find(|i| i["id"].as_str() == Some(&item))
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Item with id '{item}' not found in conversation '{id}'."
            ))
        })
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answers the conversation.
pub async fn delete_item(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, item)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key, gone) = (project(&caller)?, id.clone(), item.clone());
    let found = blocking(&state, move |s| {
        let Some(conversation) = s.conversation(&owner, &key)? else {
            return Ok(Err(unknown(&key)));
        };
        if !s.delete_conversation_item(&owner, &key, &gone)? {
            return Ok(Err(ApiError::not_found(format!(
                "Item with id '{gone}' not found in conversation '{key}'."
            ))));
        }
        Ok(Ok(conversation))
    })
    .await??;
    Ok(Json(object(&found)))
}
