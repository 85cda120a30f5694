//! The admin API (`/admin/v1/...`, guarded by `CANDELA_ADMIN_TOKEN`): projects and their limits,
//! access tokens; and `POST /v1/oauth/revoke`, where a token revokes itself.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{access, json, ApiError, AppState};
use crate::platform::store::{ProjectLimits, StoreError, TokenRecord};
use crate::platform::token;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(msg) => ApiError::invalid(None, msg),
            other => {
                tracing::error!(error = %other, "database");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    ..ApiError::invalid(None, "The server's database failed; see its log.")
                }
            }
        }
    }
}

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        kind: "permission_error",
        ..ApiError::invalid(None, message)
    }
}

/// Admits only the admin token.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.platform.config.admin_token.is_none() {
        return forbidden(
            "The admin API is disabled: start the server with CANDELA_ADMIN_TOKEN set.",
        )
        .into_response();
    }
    match access::bearer(req.headers()) {
        Some(t) if state.platform.is_admin(t) => next.run(req).await,
        Some(_) => ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key".into()),
            ..ApiError::invalid(
                None,
                "This call needs the admin token (CANDELA_ADMIN_TOKEN).",
            )
        }
        .into_response(),
        None => ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key".into()),
            ..ApiError::invalid(
                None,
                "This call needs the admin token: Authorization: Bearer $CANDELA_ADMIN_TOKEN.",
            )
        }
        .into_response(),
    }
}

pub fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "object": "access_token",
        "project": t.project,
        "name": t.name,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "revoked_at": t.revoked_at,
        "status": t.state(crate::platform::store::now()),
    })
}

#[derive(Deserialize)]
pub struct ProjectFilter {
    project: Option<String>,
}

pub async fn list_tokens(
    State(state): State<Arc<AppState>>,
    Query(filter): Query<ProjectFilter>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.platform.store.tokens(filter.project.as_deref())?;
    let data: Vec<Value> = tokens.iter().map(token_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    project: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

pub async fn create_token(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CreateToken = json::parse(body)?;
    let ttl = token::parse_ttl(req.ttl.as_deref().unwrap_or("30d"))
        .map_err(|e| ApiError::invalid(Some("ttl"), e))?;
    let (record, secret) = state
        .platform
        .store
        .create_token(&req.project, req.name.as_deref(), ttl)
        .map_err(|e| match e {
            // The one value the store checks is the project's name.
            StoreError::Invalid(msg) => ApiError::invalid(Some("project"), msg),
            other => other.into(),
        })?;
    state.platform.reload(true)?;
    tracing::info!(token_id = %record.id, project = %record.project, "token created");
    let mut body = token_json(&record);
    body["token"] = Value::String(secret.expose().to_string());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = state
        .platform
        .store
        .revoke(&id)?
        .ok_or_else(|| ApiError::not_found(format!("No access token has the id `{id}`.")))?;
    state.platform.reload(true)?;
    tracing::info!(token_id = %record.id, "token revoked");
    Ok(Json(token_json(&record)))
}

pub async fn list_projects(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let projects = state.platform.store.projects()?;
    Ok(Json(json!({"object": "list", "data": projects})))
}

pub async fn set_project(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        rpm: Option<u64>,
        tpm: Option<u64>,
        embeddings_rpm: Option<u64>,
    }
    let l: Limits = json::parse(body)?;
    let project = state.platform.store.set_project(
        &name,
        &ProjectLimits {
            rpm: l.rpm,
            tpm: l.tpm,
            embeddings_rpm: l.embeddings_rpm,
        },
    )?;
    state.platform.reload(true)?;
    Ok(Json(serde_json::to_value(project).unwrap_or_default()))
}

/// `POST /v1/oauth/revoke {"oauth2Token": "..."}`: the token in the body is the credential. As
/// in RFC 7009, an unknown token is not an error (`"revoked": false`).
pub async fn oauth_revoke(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    #[derive(Deserialize)]
    struct Revoke {
        #[serde(rename = "oauth2Token")]
        oauth2_token: String,
    }
    let req: Revoke = json::parse(body)?;
    let platform = state.platform.clone();
    let revoked = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let revoked = platform.store.revoke_secret(&req.oauth2_token)?;
        if revoked.is_some() {
            platform.reload(true)?;
        }
        Ok(revoked)
    })
    .await
    .map_err(|_| ApiError::invalid(None, "revocation failed"))??;
    if let Some(t) = &revoked {
        tracing::info!(token_id = %t.id, "token revoked by its holder");
    }
    Ok(Json(json!({"revoked": revoked.is_some()})))
}
