//! Request bodies: JSON parsed at the edge into typed requests, with errors that name the field.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Parses a request body, mapping every failure to a 400 (or the body-limit status) in OpenAI's shape.
pub fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: Some("request_too_large".into()),
                ..ApiError::invalid(
                    None,
                    "The request body is larger than this server accepts (see `candela serve --max-body-bytes`).",
                )
            }
        } else {
            ApiError {
                status: rej.status(),
                ..ApiError::invalid(None, rej.body_text())
            }
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = parsed.map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(
                None,
                format!("We could not parse the JSON body of your request ({inner}). The body must be valid JSON."),
            );
        }
        let msg = inner.to_string();
        // Missing fields are reported at their parent; name the field itself.
        if let Some(field) = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            let param = if path == "." { field.to_string() } else { format!("{path}.{field}") };
            return ApiError::invalid(Some(&param), format!("Missing required parameter: '{param}'."));
        }
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        ApiError::invalid(Some(&path), format!("Invalid value for '{path}': {msg}."))
    })?;
    de.end().map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request ({e})."),
        )
    })?;
    Ok(value)
}
