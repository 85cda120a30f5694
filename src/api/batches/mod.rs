//! The Batch API: `POST /v1/batches` runs every request of an uploaded JSONL file through
//! `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` or `/v1/responses` in the
//! background, in the engine's batch lane (interactive requests are admitted first and preempted
//! last), and writes the answers to an output file and the failures to an error file.
//! `GET /v1/batches/{id}` shows its progress (`request_counts`), `GET /v1/batches` lists them,
//! `POST /v1/batches/{id}/cancel` stops one, keeping the answers so far. Batches are stored in
//! the platform's database and those unfinished when the server stops run again when it starts.

mod runner;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::files::{blocking, lookup, owner};
use super::types::metadata;
use super::{json, ApiError, AppState};
use crate::platform::batches::BatchRecord;
use crate::platform::store::now;
use crate::platform::Caller;

pub use runner::resume;

/// The endpoints a batch may target.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// How long a batch may take before it expires, OpenAI's only window.
const WINDOW_SECS: i64 = 24 * 3600;

#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("No batch found with id '{id}'."))
}

async fn load(state: &AppState, project: &str, id: &str) -> Result<BatchRecord, ApiError> {
    let (owner, key) = (project.to_string(), id.to_string());
    blocking(state, move |s| s.batch(&owner, &key))
        .await?
        .ok_or_else(|| unknown(id))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let req: CreateBatch = json::parse(body)?;
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::invalid(
            Some("endpoint"),
            format!(
                "Invalid value for 'endpoint': '{}'. Supported values are: {}.",
                req.endpoint,
                ENDPOINTS.join(", ")
            ),
        ));
    }
    if req.completion_window != "24h" {
        return Err(ApiError::invalid(
            Some("completion_window"),
            format!(
                "Invalid value for 'completion_window': '{}'. Supported values are: '24h'.",
                req.completion_window
            ),
        ));
    }
    let metadata = metadata(req.metadata.as_ref())?;
    let file = lookup(&state, &project, &req.input_file_id)
        .await
        .map_err(|e| ApiError {
            param: Some("input_file_id".into()),
            ..e
        })?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            Some("input_file_id"),
            format!(
                "The file '{}' has purpose '{}'; a batch's input file must be uploaded with purpose 'batch'.",
                file.id, file.purpose
            ),
        ));
    }
    let created = now();
    let object = json!({
        "id": format!("batch_{}", uuid::Uuid::new_v4().simple()),
        "object": "batch",
        "endpoint": req.endpoint,
        "errors": null,
        "input_file_id": file.id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": created,
        "in_progress_at": null,
        "expires_at": created + WINDOW_SECS,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "usage": runner::Usage::default().json(),
        "metadata": metadata,
    });
    let token_id = match &caller {
        Caller::Project { token_id, .. } => Some(token_id.clone()),
        _ => None,
    };
    let record = BatchRecord {
        project,
        token_id,
        object,
    };
    let saved = record.clone();
    blocking(&state, move |s| s.put_batch(&saved)).await?;
    tracing::info!(id = %record.id(), endpoint = %req.endpoint, input_file = %file.id, "batch created");
    let object = record.object.clone();
    runner::spawn(state, record);
    Ok(Json(object))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    Ok(Json(load(&state, &project, &id).await?.object))
}

/// `GET /v1/batches`: newest first, `limit` (1 to 100, default 20) and `after`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let page = super::page::Page::from_query(&query, 20, 100)?;
    let mut batches: Vec<Value> = blocking(&state, move |s| s.batches(&project))
        .await?
        .into_iter()
        .map(|b| b.object)
        .collect();
    if page.ascending {
        batches.reverse();
    }
    Ok(Json(page.list(batches)?))
}

/// Moves a validating or running batch to `cancelling`; its runner stops within a second and
/// ends it `cancelled`, with the answers it had.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    // A few tries: the runner saves its progress under the same compare-and-set.
    for _ in 0..10 {
        let record = load(&state, &project, &id).await?;
        let status = record.status().to_string();
        if !matches!(status.as_str(), "validating" | "in_progress") {
            if matches!(status.as_str(), "cancelling" | "cancelled") {
                return Ok(Json(record.object));
            }
            return Err(ApiError::invalid(
                None,
                format!("Cannot cancel a batch with status '{status}'."),
            ));
        }
        let mut object = record.object;
        object["status"] = json!("cancelling");
        object["cancelling_at"] = json!(now());
        let saved = object.clone();
        if blocking(&state, move |s| s.update_batch(&status, &saved)).await? {
            tracing::info!(id = %id, "batch cancelling");
            return Ok(Json(object));
        }
    }
    Err(ApiError::invalid(
        None,
        "The batch changed while it was being cancelled; try again.",
    ))
}
