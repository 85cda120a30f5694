//! The HTTP edge (axum): routes, JSON in and out, SSE framing, OpenAI error bodies.

mod access;
mod admin;
mod batches;
mod chat;
mod conversations;
mod embeddings;
mod error;
mod files;
mod formats;
mod json;
mod logprobs;
mod messages;
mod models;
mod page;
mod rerank;
mod responses;
mod stored_chat;
mod tokenize;
mod tools;
mod types;
mod uploads;
mod usage;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};

pub use error::ApiError;
pub use responses::background::Runs as BackgroundRuns;

use crate::platform::Platform;
use crate::serving::Registry;

pub struct AppState {
    pub registry: Registry,
    pub platform: Arc<Platform>,
    /// Held while this server owns the data directory's unfinished batches (see
    /// `batches::resume`), so that a second server on the same directory does not run them too.
    pub batch_lock: std::sync::OnceLock<std::fs::File>,
    /// Background responses running, and those finished lately (their events).
    pub background: Arc<responses::background::Runs>,
}

/// Takes up the work that stopped servers left in the data directory: unfinished batches run
/// again (on the one server holding the directory's batch lock), and background responses whose
/// server has stopped are marked failed, now and every minute (a server on the same directory
/// may stop while this one runs); uploads past their hour are expired and their parts removed.
pub async fn resume(state: Arc<AppState>) {
    tokio::spawn(sweep(state.clone()));
    batches::resume(state).await;
}

async fn sweep(state: Arc<AppState>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        let data_dir = state.platform.config.data_dir.clone();
        let now = crate::platform::store::now();
        let swept = files::blocking(&state, move |s| {
            crate::platform::uploads::sweep(s, &data_dir, now)
        });
        if let Err(e) = swept.await {
            tracing::warn!(error = %e.message, "expiring uploads");
        }
        let runs = state.background.clone();
        match files::blocking(&state, move |s| runs.sweep(s)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                responses = n,
                "background responses of a stopped server marked failed"
            ),
            Err(e) => {
                tracing::warn!(error = %e.message, "marking background responses of stopped servers")
            }
        }
    }
}

/// The endpoints that run a model, without the gate: the public router puts them behind it, and
/// batches call them in-process.
fn model_endpoints() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::create))
}

pub fn router(state: Arc<AppState>) -> Router {
    // Everything under /v1 that needs a caller: an access token, or anonymous when allowed.
    let api = model_endpoints()
        .route("/v1/chat/completions", get(stored_chat::list))
        .route(
            "/v1/chat/completions/{id}",
            get(stored_chat::retrieve)
                .post(stored_chat::update)
                .delete(stored_chat::delete),
        )
        .route(
            "/v1/chat/completions/{id}/messages",
            get(stored_chat::messages),
        )
        .route("/v1/models", get(models::list))
        .route("/v1/models/resolve", get(models::resolve))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/input_tokens", post(responses::input_tokens))
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/conversations", post(conversations::create))
        .route(
            "/v1/conversations/{id}",
            get(conversations::retrieve)
                .post(conversations::update)
                .delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/items",
            get(conversations::list_items).post(conversations::add_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item_id}",
            get(conversations::get_item).delete(conversations::delete_item),
        )
        .route(
            "/v1/files",
            post(files::upload)
                // Uploads are streamed to disk under their own limit (`max_file_bytes`).
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/uploads", post(uploads::create))
        .route(
            "/v1/uploads/{id}/parts",
            // Parts are streamed to disk under their own limit (64 MB).
            post(uploads::add_part).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/uploads/{id}/complete", post(uploads::complete))
        .route("/v1/uploads/{id}/cancel", post(uploads::cancel))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/rerank", post(rerank::rerank))
        .route("/v2/rerank", post(rerank::rerank))
        .route("/v1/score", post(rerank::score))
        .route("/score", post(rerank::score))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), access::gate));
    let admin = Router::new()
        .route(
            "/admin/v1/tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route("/admin/v1/tokens/{id}", delete(admin::revoke_token))
        .route("/admin/v1/projects", get(admin::list_projects))
        .route(
            "/admin/v1/projects/{name}",
            post(admin::set_project)
                .put(admin::set_project)
                .patch(admin::set_project),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(usage::metrics))
        .route("/v1/oauth/revoke", post(admin::oauth_revoke))
        .merge(api)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(messages::anthropic_errors))
        .layer(DefaultBodyLimit::max(state.platform.config.max_body_bytes))
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let failed: Vec<&str> = state
        .registry
        .models
        .iter()
        .filter_map(|m| match m {
            crate::serving::Served::Chat(c) if !c.engine.is_healthy() => Some(c.info.id.as_str()),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unhealthy", "failed_models": failed})),
        )
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "Unknown request URL: {}. Please check the URL and method.",
        uri.path()
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(None, "Method not allowed for this URL.")
    }
}
