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
use crate::serving::{ChatMessage, ChatModel, GenParams, TurnEnd};

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
    let path = req.uri().path();
    if path != "/v1/messages" && !path.starts_with("/v1/messages/") {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    if resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        let e = ApiError {
            status: parts.status,
            ..ApiError::invalid(None, "The request failed; its error is too long to show.")
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(error(&e).to_string()));
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

/// The text of `blocks`, one a line; a 400 naming `{field}[i].type` for a block that is not
/// text.
fn join_texts(blocks: &[Value], field: &str, message: &str) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let text = text_of(b)
            .ok_or_else(|| ApiError::invalid(Some(&format!("{field}[{i}].type")), message))?;
        texts.push(text);
    }
    Ok(texts.join("\n"))
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
            let text = join_texts(blocks, "system", "System blocks must be of type 'text'.")?;
            out.push(json!({"role": "system", "content": text}));
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
                    let mut content = match &b["content"] {
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => join_texts(
                            parts,
                            &format!("{field}.content"),
                            "A tool result's content blocks must be of type 'text' on this server.",
                        )?,
                        _ => String::new(),
                    };
                    if b["is_error"] == true {
                        content = format!("Error: {content}");
                    }
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

/// Joins consecutive turns of one role into one, as Anthropic's API does (a user turn of tool
/// results and text comes to two user turns, which templates that want the roles to alternate
/// refuse).
fn join_turns(messages: &mut Vec<ChatMessage>) {
    let mut joined: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages.drain(..) {
        match joined.last_mut() {
            Some(last) if last.role == m.role => {
                last.content.push('\n');
                last.content.push_str(&m.content);
            }
            _ => joined.push(m),
        }
    }
    *messages = joined;
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
    let mut tool_use = tool_use(&req)?;
    let mut messages: Vec<ChatMessage> = chat_messages(req.system.as_ref(), &req.messages)?
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_chat(i))
        .collect::<Result<_, _>>()?;
    // A final assistant turn is a prefill: the answer goes on from its text.
    let end = match messages.last() {
        Some(m) if m.role == "assistant" => TurnEnd::Continued,
        _ => TurnEnd::Open,
    };
    if let (TurnEnd::Continued, Some(t)) = (end, tool_use.as_mut()) {
        if messages.last().is_some_and(|m| !m.content.is_empty()) {
            t.continuing()?;
        }
    }
    if let Some(t) = &tool_use {
        t.instruct(&mut messages);
        params.format = t.grammar(params.format.take())?;
    }
    tools::merge_tool_results(&mut messages);
    join_turns(&mut messages);
    let prompt = model.chat_prompt_ending(&messages, end)?;
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

/// The events of a streamed answer, from its chunks: text as a text block, and (when the answer
/// may be calls) each call as a `tool_use` block once its name is whole, its input as it grows.
#[derive(Default)]
struct Blocks {
    calls: Option<tools::CallStream>,
    /// The open block: its index and whether it is text.
    open: Option<(usize, bool)>,
    next: usize,
}

impl Blocks {
    fn event(kind: &str, data: Value) -> Event {
        Event::default().event(kind).data(data.to_string())
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((index, _)) = self.open.take() {
            out.push(Self::event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn start(&mut self, block: Value, text: bool, out: &mut Vec<Event>) -> usize {
        self.close(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((index, text));
        out.push(Self::event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn text(&mut self, text: &str, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let index = match self.open {
            Some((index, true)) => index,
            _ => self.start(json!({"type": "text", "text": ""}), true, out),
        };
        let delta = json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}});
        out.push(Self::event("content_block_delta", delta));
    }

    /// A chunk's events, and the finish reason the chat stream would report.
    fn push(
        &mut self,
        text: &str,
        finish: Option<FinishReason>,
    ) -> (Vec<Event>, Option<&'static str>) {
        let mut out = Vec::new();
        let Some(calls) = &mut self.calls else {
            self.text(text, &mut out);
            return (out, finish.map(FinishReason::as_str));
        };
        let (delta, reason) = calls.push(text, finish);
        if let Some(t) = delta["content"].as_str() {
            self.text(t, &mut out);
        }
        for d in delta["tool_calls"].as_array().into_iter().flatten() {
            if let Some(id) = d.get("id") {
                let block = json!({"type": "tool_use", "id": id, "name": d["function"]["name"], "input": {}});
                self.start(block, false, &mut out);
            }
            let part = d["function"]["arguments"].as_str().unwrap_or_default();
            if let (Some((index, false)), false) = (self.open, part.is_empty()) {
                let delta = json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": part}});
                out.push(Self::event("content_block_delta", delta));
            }
        }
        (out, reason)
    }
}

/// A streamed message, as Anthropic streams one. The response body drives the generation, so a
/// client that leaves stops it (and its meter records the call as cut short).
fn stream_events(
    id: String,
    model: String,
    gen: crate::serving::Generation,
    prompt_tokens: usize,
    calls: bool,
    meter: Option<Arc<Meter>>,
) -> Response {
    if let Some(m) = &meter {
        m.stream_started();
    }
    let opening = vec![
        Blocks::event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": usage(prompt_tokens, 0, 0),
            }}),
        ),
        Blocks::event("ping", json!({"type": "ping"})),
    ];
    let blocks = Blocks {
        calls: calls.then(tools::CallStream::default),
        ..Blocks::default()
    };
    struct State {
        gen: crate::serving::Generation,
        blocks: Blocks,
        clock: TokenClock,
        reason: Option<&'static str>,
        done: bool,
    }
    let state = State {
        gen,
        blocks,
        clock: TokenClock::default(),
        reason: None,
        done: false,
    };
    let body = stream::unfold(state, move |mut s| {
        let (id, meter) = (id.clone(), meter.clone());
        async move {
            if s.done {
                return None;
            }
            let Some(chunk) = s.gen.next().await else {
                // The end: close the open block, then say why it stopped and what it used.
                s.done = true;
                let mut out = Vec::new();
                s.blocks.close(&mut out);
                let (output, cached) = (s.gen.completion_tokens, s.gen.cached_tokens);
                let stop_sequence = s.gen.stop_sequence().map(str::to_owned);
                let reason = match (s.reason, &stop_sequence) {
                    (Some("tool_calls"), _) => "tool_use",
                    (Some("length"), _) => "max_tokens",
                    (_, Some(_)) => "stop_sequence",
                    _ => "end_turn",
                };
                let stop_sequence = (reason == "stop_sequence")
                    .then_some(stop_sequence)
                    .flatten();
                if let Some(m) = &meter {
                    m.set_tokens(prompt_tokens as u64, output as u64);
                    m.finish();
                }
                tracing::info!(id = %id, prompt_tokens, completion_tokens = output, "message");
                out.push(Blocks::event(
                    "message_delta",
                    json!({"type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                    "usage": usage(prompt_tokens, output, cached)}),
                ));
                out.push(Blocks::event(
                    "message_stop",
                    json!({"type": "message_stop"}),
                ));
                return Some((out, s));
            };
            match chunk {
                Ok(c) => {
                    if let Some(m) = &meter {
                        s.clock.tick(m);
                    }
                    let (out, reason) = s.blocks.push(&c.text, c.finish);
                    s.reason = reason.or(s.reason);
                    Some((out, s))
                }
                Err(e) => {
                    s.done = true;
                    let e = ApiError::from(e);
                    if let Some(m) = &meter {
                        m.set_tokens(prompt_tokens as u64, s.gen.completion_tokens as u64);
                        m.fail(e.status.as_u16());
                        m.finish();
                    }
                    Some((vec![Blocks::event("error", error(&e))], s))
                }
            }
        }
    })
    .flat_map(stream::iter);
    let events = stream::iter(opening).chain(body).map(Ok::<_, Infallible>);
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
