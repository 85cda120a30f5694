//! The gate in front of `/v1`: who is calling (access token, anonymous, admin), whether the call
//! fits the caller's rate limits, and a usage meter for the calls that run a model.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::platform::ratelimit::{format_reset, Class, Decision};
use crate::platform::usage::Meter;
use crate::platform::{AuthError, Caller};

/// The bearer token of a request, or its `x-api-key`, if any (`None` for an empty one too).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    authorization(headers).or_else(|| {
        // Anthropic's SDK sends its key as `x-api-key`.
        let key = headers.get("x-api-key")?.to_str().ok()?.trim();
        (!key.is_empty()).then_some(key)
    })
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip())
}

/// Calls that run a model (a `POST` to a model endpoint): rate limited and metered.
fn metered_class(method: &axum::http::Method, path: &str) -> Option<Class> {
    if method != axum::http::Method::POST {
        return None;
    }
    match path {
        "/v1/embeddings" | "/v1/rerank" | "/rerank" | "/v2/rerank" | "/v1/score" | "/score" => {
            Some(Class::Embeddings)
        }
        "/v1/chat/completions" | "/v1/completions" | "/v1/responses" | "/v1/messages" => {
            Some(Class::Requests)
        }
        _ => None,
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: Some(
                match e {
                    AuthError::Missing | AuthError::Invalid => "invalid_api_key",
                    AuthError::Expired { .. } => "token_expired",
                    AuthError::Revoked { .. } => "token_revoked",
                }
                .into(),
            ),
            ..ApiError::invalid(None, e.to_string())
        }
    }
}

pub async fn gate(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let platform = &state.platform;
    let ip = client_ip(&req);
    let caller = match platform.authenticate(bearer(req.headers()), ip) {
        Ok(c) => c,
        Err(e) => {
            let mut resp = ApiError::from(e).into_response();
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    };
    let path = req.uri().path().to_string();
    let Some(class) = metered_class(req.method(), &path) else {
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    };
    if caller == Caller::Admin {
        return ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            ..ApiError::invalid(
                None,
                "The admin token manages the server; call models with a project's access token.",
            )
        }
        .into_response();
    }
    let tag = caller.tag();
    let limits = platform.limits(&caller, class);
    let decision = platform.limiter.check(&tag.subject, class, limits);
    let project = tag.project.clone();
    // Refused calls are recorded too (status 429, not charged).
    let meter = Arc::new(Meter::new(
        platform.clone(),
        tag,
        &path,
        class,
        limits.tokens,
    ));
    if let Some(limit) = decision.refused_by {
        platform.metrics.record_rate_limited(&path, limit);
        tracing::info!(project = %project, endpoint = %path, limit, "rate limited");
        let mut resp = too_many(&decision, &project, limit, class).into_response();
        meter.set_status(resp.status().as_u16());
        rate_headers(resp.headers_mut(), &decision);
        return resp;
    }
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(meter.clone());
    let mut resp = next.run(req).await;
    meter.set_status(resp.status().as_u16());
    // Names the model that served the call (what a virtual-model query resolved to).
    if let Some(v) = meter.model().and_then(|m| HeaderValue::from_str(&m).ok()) {
        resp.headers_mut().insert("x-candela-resolved-model", v);
    }
    let mut decision = decision;
    if let Some(wait) = meter.refused_for() {
        // Admitted, then refused once its size was known (tokens per minute).
        platform.metrics.record_rate_limited(&path, "tokens");
        decision.refused_by = Some("tokens");
        decision.retry_after = wait.min(platform.config.window);
    }
    rate_headers(resp.headers_mut(), &decision);
    resp
}

/// The 429 for a call whose tokens (prompt + max_tokens) do not fit the project's
/// tokens-per-minute budget now (or ever, when they exceed it).
pub fn tokens_refused(meter: &Meter, wait: std::time::Duration, requested: u64) -> ApiError {
    let limit = meter.token_limit().unwrap_or(0);
    let message = if wait == std::time::Duration::MAX {
        format!(
            "Request too large for project `{}` on tokens per minute (TPM): limit {limit}, requested {requested}. Lower max_tokens or the prompt.",
            meter.project()
        )
    } else {
        format!(
            "Rate limit reached for project `{}` on tokens per minute (TPM): limit {limit}, requested {requested}. Please try again in {}.",
            meter.project(),
            format_reset(wait)
        )
    };
    rate_limited("tokens", message)
}

/// OpenAI's 429: `type` names the limit ("requests" or "tokens").
fn rate_limited(limit: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        kind: limit,
        code: Some("rate_limit_exceeded".into()),
        ..ApiError::invalid(None, message)
    }
}

fn too_many(d: &Decision, project: &str, limit: &'static str, class: Class) -> ApiError {
    let budget = if limit == "tokens" {
        d.tokens.as_ref()
    } else {
        d.requests.as_ref()
    };
    let what = match (limit, class) {
        ("tokens", _) => "tokens per minute (TPM)",
        (_, Class::Embeddings) => "embeddings requests per minute (RPM)",
        _ => "requests per minute (RPM)",
    };
    rate_limited(
        limit,
        format!(
            "Rate limit reached for project `{project}` on {what}: limit {}. Please try again in {}.",
            budget.map_or(0, |b| b.limit),
            format_reset(d.retry_after)
        ),
    )
}

fn rate_headers(headers: &mut HeaderMap, d: &Decision) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    if let Some(b) = &d.requests {
        set("x-ratelimit-limit-requests", b.limit.to_string());
        set("x-ratelimit-remaining-requests", b.remaining.to_string());
        set("x-ratelimit-reset-requests", format_reset(b.reset));
    }
    if let Some(b) = &d.tokens {
        set("x-ratelimit-limit-tokens", b.limit.to_string());
        set("x-ratelimit-remaining-tokens", b.remaining.to_string());
        set("x-ratelimit-reset-tokens", format_reset(b.reset));
    }
    if d.refused_by.is_some() {
        let ms = d.retry_after.as_millis() as u64;
        set("retry-after", ms.div_ceil(1000).to_string());
        set("retry-after-ms", ms.to_string());
    }
}
