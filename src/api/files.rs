//! The Files API: `POST /v1/files` (multipart upload, streamed to disk), `GET /v1/files`,
//! `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`. Files belong to
//! the caller's project; another project's ids read as unknown.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Extension, Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::platform::files::{files_dir, FileRecord, NewFile, UPLOAD_PURPOSES};
use crate::platform::store::{now, Store, StoreError};
use crate::platform::Caller;

/// The project a files, batches or conversations call acts for. The admin token manages the
/// server and owns none of them.
pub fn owner(caller: &Caller) -> Result<String, ApiError> {
    match caller {
        Caller::Admin => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            ..ApiError::invalid(
                None,
                "The admin token manages the server; use a project's access token for files, \
                 batches and conversations.",
            )
        }),
        other => Ok(other.tag().project),
    }
}

/// A 400 naming `purpose` unless it is one the Files API takes.
pub fn check_purpose(purpose: &str) -> Result<(), ApiError> {
    if UPLOAD_PURPOSES.contains(&purpose) {
        return Ok(());
    }
    Err(ApiError::invalid(
        Some("purpose"),
        format!(
            "Invalid value for 'purpose': '{purpose}'. Supported values are: {}.",
            UPLOAD_PURPOSES.join(", ")
        ),
    ))
}

pub fn server_error(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "server_error",
        ..ApiError::invalid(None, format!("The server could not {what}; see its log."))
    }
}

/// Runs a database call off the async workers.
pub async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.platform.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| server_error("reach its database", e))?
        .map_err(|e| server_error("reach its database", e))
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"))
}

pub async fn lookup(state: &AppState, project: &str, id: &str) -> Result<FileRecord, ApiError> {
    let (owner, key) = (project.to_string(), id.to_string());
    blocking(state, move |s| s.file(&owner, &key))
        .await?
        .ok_or_else(|| unknown(id))
}

/// Keeps a file written in full (flushed, moved into place) and lists it under `project`.
pub async fn keep_file(
    state: &AppState,
    project: &str,
    filename: String,
    purpose: &str,
    file: NewFile,
) -> Result<FileRecord, ApiError> {
    let (project, purpose) = (project.to_string(), purpose.to_string());
    let store = state.platform.store.clone();
    tokio::task::spawn_blocking(move || {
        let record = FileRecord {
            id: file.id.clone(),
            project,
            filename,
            purpose,
            bytes: file.bytes,
            created_at: now(),
        };
        file.keep().map_err(|e| server_error("write a file", e))?;
        store
            .insert_file(&record)
            .map_err(|e| server_error("record a file", e))?;
        Ok(record)
    })
    .await
    .map_err(|e| server_error("write a file", e))?
}

pub async fn upload(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::invalid(
            None,
            format!("Expected a multipart/form-data body with 'file' and 'purpose': {e}"),
        )
    })?;
    let bad_body = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(None, format!("The multipart body could not be read: {e}"))
    };
    let limit = state.platform.config.max_file_bytes;
    let (mut file, mut purpose) = (None, None);
    while let Some(mut field) = multipart.next_field().await.map_err(bad_body)? {
        match field.name() {
            Some("file") => {
                let name = field.file_name().unwrap_or("upload").to_string();
                let dir = state.platform.config.data_dir.clone();
                let mut new = NewFile::create(&dir).map_err(|e| server_error("write a file", e))?;
                while let Some(chunk) = field.chunk().await.map_err(bad_body)? {
                    if new.bytes + chunk.len() as u64 > limit {
                        return Err(ApiError {
                            status: StatusCode::PAYLOAD_TOO_LARGE,
                            code: Some("file_too_large".into()),
                            ..ApiError::invalid(
                                Some("file"),
                                format!("The file is larger than this server accepts ({limit} bytes; see `candela serve --max-file-bytes`)."),
                            )
                        });
                    }
                    new.write(&chunk)
                        .map_err(|e| server_error("write a file", e))?;
                }
                file = Some((name, new));
            }
            Some("purpose") => purpose = Some(field.text().await.map_err(bad_body)?),
            _ => {}
        }
    }
    let Some((filename, new)) = file else {
        return Err(ApiError::invalid(
            Some("file"),
            "Missing required parameter: 'file'.",
        ));
    };
    let purpose = match purpose {
        Some(p) => {
            check_purpose(&p)?;
            p
        }
        None => {
            return Err(ApiError::invalid(
                Some("purpose"),
                "Missing required parameter: 'purpose'.",
            ))
        }
    };
    if new.bytes == 0 {
        return Err(ApiError::invalid(Some("file"), "The file is empty."));
    }
    let record = FileRecord {
        id: new.id.clone(),
        project,
        filename,
        purpose,
        bytes: new.bytes,
        created_at: now(),
    };
    let saved = record.clone();
    blocking(&state, move |s| {
        new.keep()
            .map_err(|e| StoreError::Invalid(format!("keeping file {}: {e}", saved.id)))?;
        s.insert_file(&saved)
    })
    .await?;
    tracing::info!(id = %record.id, bytes = record.bytes, purpose = %record.purpose, "file stored");
    Ok(Json(record.json()))
}

/// `GET /v1/files`: `purpose`, `limit` (1 to 10,000, default 10,000), `order` (`desc`, the
/// default, or `asc`), `after` (a file id).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let page = super::page::Page::from_query(&query, 10_000, 10_000)?;
    let purpose = query.get("purpose").cloned();
    let files = blocking(&state, move |s| s.files(&project, purpose.as_deref())).await?;
    let objects: Vec<Value> = files.iter().map(FileRecord::json).collect();
    Ok(Json(page.list_oldest_first(objects)?))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    Ok(Json(lookup(&state, &project, &id).await?.json()))
}

/// The file's bytes, streamed from disk.
pub async fn content(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let project = owner(&caller)?;
    let record = lookup(&state, &project, &id).await?;
    let path = files_dir(&state.platform.config.data_dir).join(&record.id);
    let mut file = std::fs::File::open(&path).map_err(|e| server_error("read a file", e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; 256 << 10];
        let read = file.read(&mut buf);
        let chunk = match read {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                Ok(Bytes::from(buf))
            }
            Err(e) => Err(e),
        };
        let failed = chunk.is_err();
        if tx.blocking_send(chunk).is_err() || failed {
            return;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, record.bytes.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", header_safe(&record.filename)),
            ),
        ],
        body,
    )
        .into_response())
}

/// A filename as a header may carry it: printable ASCII without quotes or backslashes.
fn header_safe(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            ' '..='~' => c,
            _ => '_',
        })
        .collect()
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let (owner, key) = (project, id.clone());
    let dir = files_dir(&state.platform.config.data_dir);
    let deleted = blocking(&state, move |s| {
        let deleted = s.delete_file(&owner, &key)?;
        if deleted {
            let _ = std::fs::remove_file(dir.join(&key));
        }
        Ok(deleted)
    })
    .await?;
    if !deleted {
        return Err(unknown(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
