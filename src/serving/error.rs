use crate::engine::EngineError;

/// Why a request could not be served. The API layer maps each to a status and OpenAI error JSON.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The request is well-formed but its values are not acceptable; `param` names the field.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("{0}")]
    WrongModelType(String),
    /// A virtual-model query that does not parse.
    #[error("{0}")]
    InvalidQuery(String),
    /// A virtual-model query that no loaded model satisfies.
    #[error("{0}")]
    NoMatch(String),
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl ServingError {
    pub fn from_resolve(e: crate::platform::query::ResolveError) -> Self {
        match e {
            crate::platform::query::ResolveError::NoMatch { .. } => {
                ServingError::NoMatch(e.to_string())
            }
            other => ServingError::WrongModelType(other.to_string()),
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ServingError::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}
