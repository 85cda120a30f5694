//! The Uploads API, for files sent in parts: `POST /v1/uploads` (`filename`, `purpose`, `bytes`,
//! `mime_type`) opens one for an hour, `POST /v1/uploads/{id}/parts` adds a part of up to 64 MB
//! (multipart, field `data`), `POST /v1/uploads/{id}/complete` puts the parts named by `part_ids`
//! together, in that order, into a file of the Files API (checked against `bytes`, and against
//! `md5` when given), and `POST /v1/uploads/{id}/cancel` drops it. Uploads belong to the caller's
//! project; another project's ids read as unknown.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Multipart, Path, State};
use axum::http::StatusCode;
use axum::Json;
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::Value;

use super::files::{blocking, check_purpose, owner, server_error};
use super::{json, ApiError, AppState};
use crate::platform::files::{FileRecord, NewFile};
use crate::platform::store::{now, Store, StoreError};
use crate::platform::uploads::{
    parts_dir, PartRecord, Refused, UploadRecord, MAX_PART_BYTES, PENDING, UPLOAD_TTL_S,
};
use crate::platform::Caller;

#[derive(Deserialize)]
pub struct CreateBody {
    filename: String,
    purpose: String,
    bytes: u64,
    mime_type: String,
}

#[derive(Deserialize)]
pub struct CompleteBody {
    part_ids: Vec<String>,
    md5: Option<String>,
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("No such Upload object: {id}"))
}

fn refused(id: &str, why: Refused) -> ApiError {
    match why {
        Refused::NotPending(status) => ApiError::invalid(
            None,
            format!("Upload {id} is {status}: only a pending upload takes parts, completes or is cancelled."),
        ),
        Refused::TooLarge(have) => ApiError::invalid(
            Some("data"),
            format!("This part would take upload {id} past the bytes it was created with; it has {have} bytes in parts."),
        ),
    }
}

async fn lookup(state: &AppState, project: &str, id: &str) -> Result<UploadRecord, ApiError> {
    let (owner, key) = (project.to_string(), id.to_string());
    blocking(state, move |s| s.upload(&owner, &key))
        .await?
        .ok_or_else(|| unknown(id))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let body: CreateBody = json::parse(body)?;
    check_purpose(&body.purpose)?;
    let limit = state.platform.config.max_file_bytes;
    if body.bytes == 0 || body.bytes > limit {
        return Err(ApiError::invalid(
            Some("bytes"),
            format!("Invalid value for 'bytes': it must be between 1 and {limit}, the largest file this server accepts (see `candela serve --max-file-bytes`)."),
        ));
    }
    for (field, value) in [("filename", &body.filename), ("mime_type", &body.mime_type)] {
        if value.trim().is_empty() {
            return Err(ApiError::invalid(
                Some(field),
                format!("Invalid value for '{field}': it must not be empty."),
            ));
        }
    }
    let created_at = now();
    let upload = UploadRecord {
        id: format!("upload_{}", uuid::Uuid::new_v4().simple()),
        project,
        filename: body.filename,
        purpose: body.purpose,
        mime_type: body.mime_type,
        bytes: body.bytes,
        created_at,
        expires_at: created_at + UPLOAD_TTL_S,
        status: "pending".into(),
        file_id: None,
    };
    let saved = upload.clone();
    blocking(&state, move |s| s.insert_upload(&saved)).await?;
    tracing::info!(id = %upload.id, bytes = upload.bytes, purpose = %upload.purpose, "upload created");
    Ok(Json(upload.json(created_at, None)))
}

/// `POST /v1/uploads/{id}/parts`: the part's bytes, streamed to disk, then listed.
pub async fn add_part(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let upload = lookup(&state, &project, &id).await?;
    if upload.status(now()) != PENDING {
        return Err(refused(
            &id,
            Refused::NotPending(upload.status(now()).into()),
        ));
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::invalid(
            None,
            format!("Expected a multipart/form-data body with 'data': {e}"),
        )
    })?;
    let bad_body = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(None, format!("The multipart body could not be read: {e}"))
    };
    let dir = parts_dir(&state.platform.config.data_dir, &id);
    let mut data = None;
    while let Some(mut field) = multipart.next_field().await.map_err(bad_body)? {
        if field.name() != Some("data") {
            continue;
        }
        let part_id = format!("part_{}", uuid::Uuid::new_v4().simple());
        let mut new =
            NewFile::create_in(&dir, part_id).map_err(|e| server_error("write a part", e))?;
        while let Some(chunk) = field.chunk().await.map_err(bad_body)? {
            let bytes = new.bytes + chunk.len() as u64;
            if bytes > MAX_PART_BYTES {
                return Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: Some("part_too_large".into()),
                    ..ApiError::invalid(
                        Some("data"),
                        format!("A part is at most {MAX_PART_BYTES} bytes."),
                    )
                });
            }
            if bytes > upload.bytes {
                return Err(ApiError::invalid(
                    Some("data"),
                    format!(
                        "This part is larger than upload {id}: it was created for {} bytes.",
                        upload.bytes
                    ),
                ));
            }
            new.write(&chunk)
                .map_err(|e| server_error("write a part", e))?;
        }
        data = Some(new);
    }
    let Some(new) = data else {
        return Err(ApiError::invalid(
            Some("data"),
            "Missing required parameter: 'data'.",
        ));
    };
    if new.bytes == 0 {
        return Err(ApiError::invalid(Some("data"), "The part is empty."));
    }
    let part = PartRecord {
        id: new.id.clone(),
        upload: id.clone(),
        bytes: new.bytes,
        created_at: now(),
    };
    let listed = part.clone();
    let added = blocking(&state, move |s| {
        let path = match new.keep() {
            Ok(path) => path,
            // The upload ended meanwhile (its folder went with it): say so, not a disk error.
            Err(e) => match s.upload(&project, &listed.upload)? {
                Some(u) if u.status(now()) != PENDING => {
                    return Ok(Err(Refused::NotPending(u.status(now()).into())))
                }
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "keeping part {}: {e}",
                        listed.id
                    )))
                }
            },
        };
        let added = s.add_part(&project, &listed, listed.created_at);
        if !matches!(added, Ok(Ok(()))) {
            let _ = std::fs::remove_file(path);
        }
        added
    })
    .await?;
    added.map_err(|why| refused(&id, why))?;
    tracing::info!(upload = %id, part = %part.id, bytes = part.bytes, "upload part stored");
    Ok(Json(part.json()))
}

/// What putting an upload's parts together came to.
enum Assembly {
    Done(FileRecord),
    Refused(ApiError),
}

/// `POST /v1/uploads/{id}/complete`.
pub async fn complete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    let body: CompleteBody = json::parse(body)?;
    let upload = lookup(&state, &project, &id).await?;
    let key = id.clone();
    let parts = blocking(&state, move |s| s.parts(&key)).await?;
    let chosen = choose_parts(&body.part_ids, &parts)?;
    let total: u64 = chosen.iter().map(|p| p.bytes).sum();
    if total != upload.bytes {
        return Err(ApiError::invalid(
            Some("part_ids"),
            format!(
                "The parts add up to {total} bytes, but upload {id} was created for {}.",
                upload.bytes
            ),
        ));
    }
    // From here until it ends, this call alone acts on the upload.
    let (owner, key) = (project.clone(), id.clone());
    let begun = blocking(&state, move |s| s.begin_completion(&owner, &key, now())).await?;
    begun.map_err(|why| refused(&id, why))?;
    let data_dir = state.platform.config.data_dir.clone();
    let store = state.platform.store.clone();
    let key = id.clone();
    let assembled = tokio::task::spawn_blocking(move || {
        let done = assemble(&data_dir, &store, &upload, &chosen, body.md5);
        if !matches!(done, Ok(Assembly::Done(_))) {
            if let Err(e) = store.abandon_completion(&upload.id) {
                tracing::warn!(upload = %upload.id, error = %e, "leaving an upload pending again");
            }
        }
        done
    })
    .await
    .map_err(|e| server_error("write a file", e))??;
    let file = match assembled {
        Assembly::Done(file) => file,
        Assembly::Refused(e) => return Err(e),
    };
    tracing::info!(upload = %id, file = %file.id, bytes = file.bytes, "upload completed");
    let upload = lookup(&state, &project, &key).await?;
    Ok(Json(upload.json(now(), Some(&file))))
}

/// Copies the `chosen` parts of `upload`, in order, into a new file of the Files API and lists
/// it, checking `md5` when given.
fn assemble(
    data_dir: &std::path::Path,
    store: &Store,
    upload: &UploadRecord,
    chosen: &[PartRecord],
    md5_given: Option<String>,
) -> Result<Assembly, ApiError> {
    let key = &upload.id;
    let dir = parts_dir(data_dir, key);
    let mut file = NewFile::create(data_dir).map_err(|e| server_error("write a file", e))?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in chosen {
        let mut from = std::fs::File::open(dir.join(&part.id))
            .map_err(|e| server_error("read an upload's part", e))?;
        loop {
            let n = from
                .read(&mut buf)
                .map_err(|e| server_error("read an upload's part", e))?;
            if n == 0 {
                break;
            }
            md5.update(&buf[..n]);
            file.write(&buf[..n])
                .map_err(|e| server_error("write a file", e))?;
        }
    }
    let digest = hex(&md5.finalize());
    if let Some(expected) = md5_given.filter(|m| !m.is_empty()) {
        if !expected.eq_ignore_ascii_case(&digest) {
            return Ok(Assembly::Refused(ApiError::invalid(
                Some("md5"),
                format!("The parts' MD5 is {digest}, not the '{expected}' given."),
            )));
        }
    }
    let record = FileRecord {
        id: file.id.clone(),
        project: upload.project.clone(),
        filename: upload.filename.clone(),
        purpose: upload.purpose.clone(),
        bytes: file.bytes,
        created_at: now(),
    };
    let path = file.keep().map_err(|e| server_error("write a file", e))?;
    let done = store
        .complete_upload(&upload.project, key, &record)
        .map_err(|e| server_error("record a file", e));
    match done {
        Ok(Ok(())) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(Assembly::Done(record))
        }
        Ok(Err(why)) => {
            let _ = std::fs::remove_file(&path);
            Ok(Assembly::Refused(refused(key, why)))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// The parts `ids` names, in its order: each one of the upload's, and named once.
fn choose_parts(ids: &[String], parts: &[PartRecord]) -> Result<Vec<PartRecord>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(
            Some("part_ids"),
            "Invalid value for 'part_ids': name the upload's parts, in order.",
        ));
    }
    let by_id: HashMap<&str, &PartRecord> = parts.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut seen = HashSet::new();
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let field = format!("part_ids[{i}]");
            if !seen.insert(id.as_str()) {
                return Err(ApiError::invalid(
                    Some(&field),
                    format!("Part '{id}' is named twice."),
                ));
            }
            by_id.get(id.as_str()).map(|p| (*p).clone()).ok_or_else(|| {
                ApiError::invalid(Some(&field), format!("No part '{id}' in this upload."))
            })
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /v1/uploads/{id}/cancel`.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = owner(&caller)?;
    lookup(&state, &project, &id).await?;
    let (owner, key) = (project.clone(), id.clone());
    let dir = parts_dir(&state.platform.config.data_dir, &id);
    let cancelled = blocking(&state, move |s| {
        let cancelled = s.cancel_upload(&owner, &key, now())?;
        if cancelled.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(cancelled)
    })
    .await?;
    cancelled.map_err(|why| refused(&id, why))?;
    tracing::info!(upload = %id, "upload cancelled");
    let upload = lookup(&state, &project, &id).await?;
    Ok(Json(upload.json(now(), None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: &str, bytes: u64) -> PartRecord {
        PartRecord {
            id: id.into(),
            upload: "upload_1".into(),
            bytes,
            created_at: 0,
        }
    }

    #[test]
    fn parts_are_taken_in_the_order_named_each_once() {
        let parts = [part("p1", 3), part("p2", 4)];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let chosen = choose_parts(&ids(&["p2", "p1"]), &parts).unwrap();
        assert_eq!(
            chosen.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["p2", "p1"]
        );
        let twice = choose_parts(&ids(&["p1", "p1"]), &parts).unwrap_err();
        assert_eq!(twice.param.as_deref(), Some("part_ids[1]"));
        let other = choose_parts(&ids(&["p1", "p9"]), &parts).unwrap_err();
        assert_eq!(other.param.as_deref(), Some("part_ids[1]"));
        let none = choose_parts(&[], &parts).unwrap_err();
        assert_eq!(none.param.as_deref(), Some("part_ids"));
        assert_eq!(
            hex(&Md5::digest(b"abc")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }
}
