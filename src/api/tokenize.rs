//! vLLM's `POST /tokenize` and `POST /detokenize`: the token ids a model's tokenizer gives a
//! `prompt`, or a chat's `messages` rendered by its template as `/v1/chat/completions` renders
//! them (`tools` described too), with their count and the model's context; and the text of token
//! ids. For counting a prompt's tokens before sending it, or checking a template. Nothing runs on
//! the model, so these calls are neither rate limited nor metered.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::tools::{self, Dialect, ToolUse};
use super::types::{turn_end, RequestMessage};
use super::{json, ApiError, AppState};
use crate::serving::Served;

#[derive(Deserialize)]
pub struct TokenizeBody {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<RequestMessage>>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    /// Default: true for a `prompt`; false for `messages`, whose template writes them.
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
    /// With `messages`: open the assistant's turn, as chat completions do (default true).
    add_generation_prompt: Option<bool>,
    /// With `messages`: end inside the final assistant message, to go on from its text.
    continue_final_message: Option<bool>,
}

#[derive(Deserialize)]
pub struct DetokenizeBody {
    model: Option<String>,
    tokens: Vec<i64>,
}

/// The model `model` names, or the first one loaded (the default chat model) when none is.
fn model(state: &AppState, model: Option<&str>) -> Result<Served, ApiError> {
    match model {
        Some(m) => Ok(state.registry.resolve(m, None)?),
        None => state.registry.models.first().cloned().ok_or_else(|| {
            ApiError::invalid(Some("model"), "Missing required parameter: 'model'.")
        }),
    }
}

/// The model's tokenizer, its vocabulary size and context.
fn parts(served: &Served) -> (&Tokenizer, u32, usize) {
    match served {
        Served::Chat(m) => (m.tokenizer(), m.vocab_size(), m.context_limit()),
        Served::Embedding(m) => {
            let (vocab, context) = m.limits();
            (m.tokenizer(), vocab, context)
        }
    }
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeBody = json::parse(body)?;
    let served = model(&state, req.model.as_deref())?;
    let (tokenizer, _, context) = parts(&served);
    let (text, special, field) = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => (
            prompt.clone(),
            req.add_special_tokens.unwrap_or(true),
            "prompt",
        ),
        (None, Some(messages)) => {
            let Served::Chat(chat) = &served else {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("The model `{}` is an embedding model, with no chat template; send a 'prompt'.", served.info().id),
                ));
            };
            let mut messages = messages
                .iter()
                .enumerate()
                .map(|(i, m)| m.to_chat(i))
                .collect::<Result<Vec<_>, _>>()?;
            let tool_use = ToolUse::parse(
                Dialect::Chat,
                req.tools.as_ref(),
                req.tool_choice.as_ref(),
                None,
            )?;
            if let Some(tool_use) = &tool_use {
                tool_use.instruct(&mut messages);
            }
            tools::merge_tool_results(&mut messages);
            let end = turn_end(req.add_generation_prompt, req.continue_final_message)?;
            let text = chat.render(&messages, end)?;
            (text, req.add_special_tokens.unwrap_or(false), "messages")
        }
        _ => {
            return Err(ApiError::invalid(
                None,
                "Send one of 'prompt' (a string) and 'messages' (a chat).",
            ))
        }
    };
    let encoding = tokenizer.encode(text.as_str(), special).map_err(|e| {
        ApiError::invalid(
            Some(field),
            format!("The {field} could not be tokenized: {e}"),
        )
    })?;
    let tokens = encoding.get_ids();
    let token_strs = req.return_token_strs.then(|| encoding.get_tokens());
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": context,
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeBody = json::parse(body)?;
    let served = model(&state, req.model.as_deref())?;
    let (tokenizer, vocab, _) = parts(&served);
    let ids = req
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| match u32::try_from(t) {
            Ok(id) if id < vocab => Ok(id),
            _ => Err(ApiError::invalid(
                Some(&format!("tokens[{i}]")),
                format!("Invalid value for 'tokens[{i}]': {t} is not a token id of this model (0 to {}).", vocab.saturating_sub(1)),
            )),
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = tokenizer.decode(&ids, false).map_err(|e| {
        ApiError::invalid(
            Some("tokens"),
            format!("The tokens could not be decoded: {e}"),
        )
    })?;
    Ok(Json(json!({"prompt": prompt})))
}
