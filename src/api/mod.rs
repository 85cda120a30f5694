//! The HTTP edge (axum): routes, JSON in and out, SSE framing, OpenAI error bodies.

mod chat;
mod embeddings;
mod error;
mod json;
mod models;
mod types;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::ApiError;

use crate::serving::Registry;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

pub struct AppState {
    pub registry: Registry,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
