//! `GET /v1/usage` (calls, tokens and estimated cost per project, model and day) and
//! `GET /metrics` (Prometheus).

use std::sync::Arc;

use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin::forbidden;
use super::{access, ApiError, AppState};
use crate::platform::metrics::{
    to_prometheus_text, EngineSample, CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE,
};
use crate::platform::usage::{self, totals};
use crate::platform::{Caller, ANONYMOUS_PROJECT};
use crate::serving::Served;

#[derive(Deserialize)]
pub struct UsageQuery {
    project: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

pub async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let (from, to) = usage::period(q.from.as_deref(), q.to.as_deref())
        .map_err(|e| ApiError::invalid(Some(e.param), e.to_string()))?;
    // A token sees its own project; anonymous callers see the anonymous project; the admin all.
    let own = match &caller {
        Caller::Admin => None,
        Caller::Project { project, .. } => Some(project.as_str()),
        Caller::Anonymous(_) => Some(ANONYMOUS_PROJECT),
    };
    let project = match (own, q.project.as_deref()) {
        (Some(own), Some(asked)) if own != asked => {
            return Err(forbidden(format!(
                "This token can read the usage of its own project (`{own}`) only."
            )))
        }
        (Some(own), _) => Some(own.to_string()),
        (None, asked) => asked.map(str::to_owned),
    };
    state.platform.flush_usage().await;
    let platform = state.platform.clone();
    let p = project.clone();
    let rows = tokio::task::spawn_blocking(move || platform.store.usage(p.as_deref(), from, to))
        .await
        .map_err(|_| ApiError::invalid(None, "usage query failed"))??;
    let iso = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    Ok(Json(json!({
        "object": "list",
        "project": project,
        "from": iso(from),
        "to": iso(to),
        "currency": "EUR",
        "data": rows,
        "total": totals(&rows),
    })))
}

pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if state.platform.config.admin_token.is_some()
        && !access::bearer(&headers).is_some_and(|t| state.platform.is_admin(t))
    {
        return ApiError {
            status: axum::http::StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key".into()),
            ..ApiError::invalid(
                None,
                "/metrics needs the admin token (CANDELA_ADMIN_TOKEN).",
            )
        }
        .into_response();
    }
    let samples: Vec<EngineSample> = state
        .registry
        .models
        .iter()
        .filter_map(|m| match m {
            Served::Chat(c) => {
                let s = &c.engine.stats;
                let get = crate::engine::EngineStats::get;
                Some(EngineSample {
                    model: &c.info.id,
                    running: get(&s.running),
                    waiting: get(&s.waiting),
                    kv_blocks_used: get(&s.kv_blocks_used),
                    kv_blocks_total: get(&s.kv_blocks_total),
                    prefix_queried_tokens: get(&s.prefix_queried_tokens),
                    prefix_hit_tokens: get(&s.prefix_hit_tokens),
                    preemptions: get(&s.preemptions),
                    generated_tokens: get(&s.generated_tokens),
                    computed_tokens: get(&s.computed_tokens),
                    steps: get(&s.steps),
                    step_seconds: get(&s.step_micros) as f64 * 1e-6,
                    step_launch_seconds: get(&s.step_launch_micros) as f64 * 1e-6,
                })
            }
            Served::Embedding(_) => None,
        })
        .collect();
    let body = state.platform.metrics.render(&samples);
    // Prometheus asks for OpenMetrics; anyone else (curl, classic parsers) gets the classic format.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            to_prometheus_text(&body),
        )
            .into_response()
    }
}
