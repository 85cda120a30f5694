//! The one mapping from failures to HTTP statuses and OpenAI's error JSON:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EngineError;
use crate::serving::ServingError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: Some("not_found".into()),
            ..Self::invalid(None, message)
        }
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<ServingError> for ApiError {
    fn from(e: ServingError) -> Self {
        let message = e.to_string();
        match e {
            ServingError::Invalid { param, .. } => {
                let code = message
                    .contains("maximum context length")
                    .then_some("context_length_exceeded");
                let err = ApiError::invalid(param.as_deref(), message);
                match code {
                    Some(c) => err.with_code(c),
                    None => err,
                }
            }
            ServingError::ModelNotFound(_) => ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(message).with_code("model_not_found")
            },
            ServingError::WrongModelType(_) => ApiError::invalid(Some("model"), message),
            ServingError::InvalidQuery(_) => {
                ApiError::invalid(Some("model"), message).with_code("invalid_model_query")
            }
            ServingError::NoMatch(_) => ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(message).with_code("model_not_found")
            },
            ServingError::Engine(EngineError::ShuttingDown) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                ..ApiError::invalid(None, message)
            },
            ServingError::Engine(_) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                ..ApiError::invalid(None, message)
            },
        }
    }
}
