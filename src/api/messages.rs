//! Anthropic's Messages API, as llama.cpp's server and vLLM serve it, for clients written
//! against the Anthropic SDK: `POST /v1/messages` (`system`, `messages` of text, `tool_use` and
//! `tool_result` blocks, `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k`,
//! `tools` and `tool_choice`; streamed as Anthropic's events) and `POST
//! /v1/messages/count_tokens`. A request is turned into the chat request it means and runs
//! through the same template, grammar and engine; errors come in Anthropic's shape (see
//! [`anthropic_errors`]), and the key may come as `x-api-key`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::{chat_model, lane, reserve, run_to_end, Finished};
use super::tools::{self, Dialect, ToolUse};
use super::types::{RequestMessage, SamplingFields, StringOrList};
use super::{json, ApiError, AppState};
use crate::engine::FinishReason;
use crate::platform::usage::{Meter, TokenClock};
use crate::scheduler::Priority;
use crate::serving::{ChatMessage, ChatModel, GenParams};

#[derive(Deserialize)]
pub struct MessagesRequest {
    model: String,
    messages: Vec<Turn>,
    system: Option<Content>,
    max_tokens: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    stream: bool,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
struct Turn {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Deserialize)]
struct Tool {
    name: String,
    description: Option<String>,
    input_schema: Value,
}

/// Anthropic's error shape for the ones this module makes.
fn error(e: &ApiError) -> Value {
    let kind = match e.status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    let message = match &e.param {
        Some(p) if !e.message.contains(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Rewrites the OpenAI error bodies of `/v1/messages` calls (those of the gate in front of it
/// too: a missing key, a rate limit) into Anthropic's shape.
pub async fn anthropic_errors(req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/messages") {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    if resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return parts.into_response();
    };
    let Some(inner) = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").cloned())
    else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let e = ApiError {
        status: parts.status,
        param: inner["param"].as_str().map(str::to_owned),
        ..ApiError::invalid(None, inner["message"].as_str().unwrap_or_default())
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(error(&e).to_string()))
}

/// A block's text, for the blocks that are only text.
fn text_of(block: &Value) -> Option<&str> {
    (block["type"] == "text")
        .then(|| block["text"].as_str())
        .flatten()
}

/// The Anthropic conversation as the chat messages it means (calls and their results as chat
/// completions take them), each checked.
fn chat_messages(
    system: Option<&Content>,
    turns: &[Turn],
) -> Result<Vec<RequestMessage>, ApiError> {
    let mut out = Vec::new();
    match system {
        Some(Content::Text(t)) => out.push(json!({"role": "system", "content": t})),
        Some(Content::Blocks(blocks)) => {
            let mut texts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                texts.push(text_of(b).ok_or_else(|| {
                    ApiError::invalid(
                        Some(&format!("system[{j}].type")),
                        "System blocks must be of type 'text'.",
                    )
                })?);
            }
            out.push(json!({"role": "system", "content": texts.join("\n")}));
        }
        None => {}
    }
    for (i, turn) in turns.iter().enumerate() {
        let role = turn.role.as_str();
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid(
                Some(&format!("messages[{i}].role")),
                format!("Unexpected role '{role}': messages are 'user' or 'assistant' turns (the system prompt is 'system')."),
            ));
        }
        let blocks = match &turn.content {
            Content::Text(t) => {
                out.push(json!({"role": role, "content": t}));
                continue;
            }
            Content::Blocks(blocks) => blocks,
        };
        let (mut texts, mut calls, mut results) = (Vec::new(), Vec::new(), Vec::new());
        for (j, b) in blocks.iter().enumerate() {
            let field = format!("messages[{i}].content[{j}]");
            match (role, b["type"].as_str()) {
                (_, Some("text")) => texts.push(text_of(b).unwrap_or_default().to_string()),
                ("assistant", Some("tool_use")) => calls.push(json!({
                    "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": b["input"].to_string()},
                })),
                ("user", Some("tool_result")) => {
                    let content = match &b["content"] {
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => {
                            parts.iter().filter_map(text_of).collect::<Vec<_>>().join("\n")
                        }
                        _ => String::new(),
                    };
                    results.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content}));
                }
                // An earlier answer's reasoning is not part of the prompt.
                ("assistant", Some("thinking" | "redacted_thinking")) => {}
                (_, kind) => {
                    return Err(ApiError::invalid(
                        Some(&format!("{field}.type")),
                        format!("Content blocks of type '{}' are not supported by this server in a {role} turn.", kind.unwrap_or("?")),
                    ))
                }
            }
        }
        out.extend(results);
        if !texts.is_empty() || !calls.is_empty() {
            let mut m = json!({"role": role, "content": texts.join("\n")});
            if !calls.is_empty() {
                m["tool_calls"] = Value::from(calls);
            }
            out.push(m);
        }
    }
    out.into_iter()
        .map(serde_json::from_value::<RequestMessage>)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::invalid(Some("messages"), format!("Invalid messages: {e}")))
}

/// The tools and the choice among them, as chat completions take them.
fn tool_use(req: &MessagesRequest) -> Result<Option<ToolUse>, ApiError> {
    let Some(list) = &req.tools else {
        return Ok(None);
    };
    let functions: Vec<Value> = list
        .iter()
        .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
        .collect();
    let mut parallel = None;
    let choice = match &req.tool_choice {
        None => None,
        Some(c) => {
            parallel = c["disable_parallel_tool_use"].as_bool().map(|d| !d);
            Some(match c["type"].as_str() {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => json!({"type": "function", "function": {"name": c["name"]}}),
                _ => {
                    return Err(ApiError::invalid(
                        Some("tool_choice.type"),
                        "'tool_choice.type' is one of 'auto', 'any', 'tool' and 'none'.",
                    ))
                }
            })
        }
    };
    ToolUse::parse(
        Dialect::Chat,
        Some(&Value::from(functions)),
        choice.as_ref(),
        parallel,
    )
}

/// What a request comes to: the model, its prompt, how to generate, and whether an answer
/// may be calls.
struct Prepared {
    model: Arc<ChatModel>,
    prompt: Vec<u32>,
    params: GenParams,
    calls: bool,
}

fn prepare(
    state: &AppState,
    mut req: MessagesRequest,
    meter: Option<&Meter>,
    priority: Priority,
) -> Result<Prepared, ApiError> {
    let model = chat_model(state, &req.model, meter)?;
    let sampling = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: None,
        seed: None,
        stop: req.stop_sequences.take().map(StringOrList::Many),
        n: None,
        presence_penalty: None,
        frequency_penalty: None,
        repetition_penalty: None,
        ignore_eos: None,
    };
    let max_tokens = req.max_tokens.map(|m| (m, "max_tokens"));
    let (mut params, _) = sampling.to_params(max_tokens, None).map_err(|mut e| {
        if e.param.as_deref() == Some("stop") {
            e.param = Some("stop_sequences".into());
        }
        e
    })?;
    params.priority = priority;
    let tool_use = tool_use(&req)?;
    let mut messages: Vec<ChatMessage> = chat_messages(req.system.as_ref(), &req.messages)?
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_chat(i))
        .collect::<Result<_, _>>()?;
    if let Some(t) = &tool_use {
        t.instruct(&mut messages);
        params.format = t.grammar(params.format.take())?;
    }
    tools::merge_tool_results(&mut messages);
    let prompt = model.chat_prompt(&messages)?;
    Ok(Prepared {
        model,
        prompt,
        params,
        calls: tool_use.is_some_and(|t| t.calls),
    })
}

/// The answer's content blocks and why it stopped.
fn answer(f: Finished, calls: bool) -> (Vec<Value>, &'static str, Option<String>) {
    let stop = |f: &Finished| match (f.finish, &f.stop_sequence) {
        (FinishReason::Length, _) => "max_tokens",
        (FinishReason::Stop, Some(_)) => "stop_sequence",
        (FinishReason::Stop, None) => "end_turn",
    };
    let reason = stop(&f);
    if calls {
        let (message, finish) = tools::chat_answer(f.text.clone(), f.finish);
        if let Some(list) = message["tool_calls"].as_array() {
            let blocks = list
                .iter()
                .map(|c| {
                    let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                    let input = serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({}));
                    json!({"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": input})
                })
                .collect();
            let reason = if finish == "tool_calls" {
                "tool_use"
            } else {
                reason
            };
            return (blocks, reason, None);
        }
    }
    let blocks = vec![json!({"type": "text", "text": f.text})];
    (blocks, reason, f.stop_sequence)
}

fn usage(input: usize, output: usize, cached: usize) -> Value {
    json!({
        "input_tokens": input - cached.min(input),
        "output_tokens": output,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    meter: Option<Extension<Arc<Meter>>>,
    priority: Option<Extension<Priority>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let req: MessagesRequest = json::parse(body)?;
    if req.max_tokens.is_none() {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "Missing required parameter: 'max_tokens'.",
        ));
    }
    let stream = req.stream;
    let p = prepare(&state, req, meter.as_deref(), lane(priority))?;
    p.model.prepare(&p.params).await?;
    let prompt_tokens = p.prompt.len();
    reserve(meter.as_deref(), prompt_tokens, &p.params, 1)?;
    let model_id = p.model.info.id.clone();
    let gen = p.model.start(p.prompt, p.params, "messages")?;
    if let Some(m) = &meter {
        m.set_tokens(prompt_tokens as u64, 0);
    }
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    if !stream {
        let f = run_to_end(gen, meter.clone()).await?;
        let (output, cached) = (f.completion_tokens, f.cached_tokens);
        if let Some(m) = &meter {
            m.set_tokens(prompt_tokens as u64, output as u64);
        }
        let (content, reason, stop_sequence) = answer(f, p.calls);
        tracing::info!(id = %id, model = %model_id, prompt_tokens, completion_tokens = output, "message");
        return Ok(Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model_id,
            "content": content, "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": usage(prompt_tokens, output, cached),
        }))
        .into_response());
    }
    Ok(stream_events(
        id,
        model_id,
        gen,
        prompt_tokens,
        p.calls,
        meter,
    ))
}

/// A streamed message: text as it comes; an answer that may be calls is sent whole once it is
/// known, as its blocks (a call's input in one `input_json_delta`).
fn stream_events(
    id: String,
    model: String,
    mut gen: crate::serving::Generation,
    prompt_tokens: usize,
    calls: bool,
    meter: Option<Arc<Meter>>,
) -> Response {
    if let Some(m) = &meter {
        m.stream_started();
    }
    let event = |kind: &str, data: Value| Event::default().event(kind).data(data.to_string());
    let opening = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(prompt_tokens, 0, 0),
            }}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let send = |e: Event| {
            let tx = tx.clone();
            async move { tx.send(e).await.is_ok() }
        };
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut clock = TokenClock::default();
        let mut opened = false;
        while let Some(chunk) = gen.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let e = ApiError::from(e);
                    if let Some(m) = &meter {
                        m.fail(e.status.as_u16());
                        m.finish();
                    }
                    send(event("error", error(&e))).await;
                    return;
                }
            };
            if let Some(m) = &meter {
                clock.tick(m);
            }
            if let Some(f) = chunk.finish {
                finish = f;
            }
            if calls {
                text.push_str(&chunk.text);
                continue;
            }
            if !opened {
                opened = true;
                let start = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
                if !send(event("content_block_start", start)).await {
                    return;
                }
            }
            if !chunk.text.is_empty() {
                let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": chunk.text}});
                if !send(event("content_block_delta", delta)).await {
                    return;
                }
            }
        }
        let f = Finished {
            text,
            logprobs: Vec::new(),
            prompt_logprobs: None,
            finish,
            stop_sequence: gen.stop_sequence().map(str::to_owned),
            completion_tokens: gen.completion_tokens,
            cached_tokens: gen.cached_tokens,
        };
        let output = f.completion_tokens;
        if let Some(m) = &meter {
            m.set_tokens(prompt_tokens as u64, output as u64);
            m.finish();
        }
        let (blocks, reason, stop_sequence) = answer(f, calls);
        let mut events = Vec::new();
        if calls {
            for (index, b) in blocks.into_iter().enumerate() {
                let (start, delta) = match b["type"].as_str() {
                    Some("tool_use") => (
                        json!({"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}),
                        json!({"type": "input_json_delta", "partial_json": b["input"].to_string()}),
                    ),
                    _ => (
                        json!({"type": "text", "text": ""}),
                        json!({"type": "text_delta", "text": b["text"]}),
                    ),
                };
                events.push(event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": start}),
                ));
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": delta}),
                ));
                events.push(event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
        } else {
            if !opened {
                let start = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
                events.push(event("content_block_start", start));
            }
            events.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
        }
        events.push(event(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": output}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        tracing::info!(id = %id, prompt_tokens, completion_tokens = output, "message");
        for e in events {
            if !send(e).await {
                return;
            }
        }
    });
    let events = stream::iter(opening)
        .chain(tokio_stream::wrappers::ReceiverStream::new(rx))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as `create` counts them.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: MessagesRequest = json::parse(body)?;
    let p = prepare(&state, req, None, Priority::default())?;
    Ok(Json(json!({"input_tokens": p.prompt.len()})))
}
