//! The endpoints of stored responses: `GET /v1/responses/{id}` (with `stream=true`, a background
//! response's events again), `DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel` and
//! `GET /v1/responses/{id}/input_items`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::super::files::blocking;
use super::super::{ApiError, AppState};
use super::{background, load, project, sse};
use crate::platform::Caller;

/// `GET /v1/responses/{id}`; with `stream=true` (a background response only) its events, from
/// after `starting_after` if given, while the server keeps them.
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let stored = load(&state, &caller, &id).await?;
    let stream = match query.get("stream").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream"),
                "'stream' must be true or false.",
            ))
        }
    };
    if !stream {
        return Ok(Json(stored.response).into_response());
    }
    let after = match query.get("starting_after") {
        None => None,
        Some(n) => Some(n.parse::<u64>().map_err(|_| {
            ApiError::invalid(
                Some("starting_after"),
                "'starting_after' must be an event's sequence number (an integer from 0).",
            )
        })?),
    };
    if stored.response["background"] != true {
        return Err(ApiError::invalid(
            Some("stream"),
            "Only background responses can be streamed again.",
        ));
    }
    match state.background.get(&project(&caller)?, &id) {
        Some(live) => Ok(sse(live.events(after))),
        None => Err(ApiError::invalid(
            Some("stream"),
            format!(
                "The events of response '{id}' are no longer kept (they are for {} minutes after \
                 it ends, on the server that ran it); retrieve it without 'stream'.",
                background::KEEP_FINISHED.as_secs() / 60
            ),
        )),
    }
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (owner, key) = (project(&caller)?, id.clone());
    // A background run still going stops first, or its end would store it again.
    if let Some(live) = state.background.get(&owner, &id) {
        live.cancel.notify_one();
        live.finished().await;
    }
    if blocking(&state, move |s| s.delete_response(&owner, &key)).await? {
        Ok(Json(
            json!({"id": id, "object": "response", "deleted": true}),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "No response found with id '{id}'."
        )))
    }
}

/// `POST /v1/responses/{id}/cancel`: stops a background response and answers it as it ended
/// (`cancelled`, with what it had written). One that has ended already is answered unchanged.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let stored = load(&state, &caller, &id).await?;
    if stored.response["background"] != true {
        return Err(ApiError::invalid(
            None,
            "Only responses created with background=true can be cancelled.",
        ));
    }
    match state.background.get(&project(&caller)?, &id) {
        Some(live) if !live.is_done() => {
            live.cancel.notify_one();
            live.finished().await;
            tracing::info!(id = %id, "background response cancelled");
            Ok(Json(load(&state, &caller, &id).await?.response))
        }
        // Running on another server on the same data directory: asked through the database
        // (see `watch`), and answered once it has stopped, or after ten seconds as it is then.
        None => {
            let (owner, key) = (project(&caller)?, id.clone());
            if blocking(&state, move |s| s.request_cancel(&owner, &key)).await? {
                for _ in 0..40 {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    // (Deleted meanwhile: the load below says so.)
                    let Ok(now) = load(&state, &caller, &id).await else {
                        break;
                    };
                    let status = &now.response["status"];
                    if status != "queued" && status != "in_progress" {
                        break;
                    }
                }
                tracing::info!(id = %id, "background response cancelled through the database");
            }
            Ok(Json(load(&state, &caller, &id).await?.response))
        }
        // Ended already (perhaps since it was read above): as it is now.
        _ => Ok(Json(load(&state, &caller, &id).await?.response)),
    }
}

/// `GET /v1/responses/{id}/input_items`: `limit` (1 to 100, default 20), `order` (`desc`, the
/// default, or `asc`), `after` (an item id).
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = super::super::page::Page::from_query(&query, 20, 100)?;
    let items = load(&state, &caller, &id).await?.input_items;
    Ok(Json(page.list_oldest_first(items)?))
}
