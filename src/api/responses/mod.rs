//! The Responses API: `POST /v1/responses` (streamed as typed events or not), and for stored
//! responses `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`,
//! `GET /v1/responses/{id}/input_items`; `previous_response_id` continues a stored conversation.
//! `background: true` runs a response with no client attached (see `background`).
//! A response is stored (`store`, true by default, as OpenAI's are) in the platform's database,
//! under the caller's project: another project's ids read as unknown.

pub mod background;
mod count;
mod output;
mod request;
mod stored;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use super::chat::{chat_model, lane, reserve, run_to_end};
use super::files::blocking;
use super::logprobs::token_logprobs;
use super::tools::ToolUse;
use super::{json, ApiError, AppState};
use crate::engine::FinishReason;
use crate::platform::conversations::Added;
use crate::platform::responses::StoredResponse;
use crate::platform::usage::{Meter, TokenClock};
use crate::platform::Caller;
use crate::serving::{tools, ChatMessage, ChatModel, Generation, ServingError};
use output::{status_of, text_part, usage_json, Events, Shape};
use request::ResponsesRequest;

pub use count::input_tokens;
pub(crate) use request::input_items as parse_items;
pub use stored::{cancel, delete, input_items, retrieve};

/// Now, in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An id of OpenAI's form: a prefix (`resp`, `msg`) and 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// The project whose stored responses a call reads (the admin token has none).
fn project(caller: &Caller) -> Result<String, ApiError> {
    super::files::owner(caller)
}

async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<StoredResponse, ApiError> {
    let (project, key) = (project(caller)?, id.to_string());
    blocking(state, move |s| s.response(&project, &key))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No response found with id '{id}'.")))
}

/// Serving's errors with the prompt named as this API names it (`input`).
fn as_input(e: ServingError) -> ApiError {
    let mut err = ApiError::from(e);
    if matches!(err.param.as_deref(), Some("messages" | "prompt")) {
        err.param = Some("input".into());
        err.message = err.message.replace("`messages`", "`input`");
    }
    err
}

/// The prompt: the instructions as a system message, then the conversation. With `truncate`,
/// the oldest messages are dropped until the prompt leaves room for the output.
fn prompt(
    model: &ChatModel,
    instructions: Option<&str>,
    tool_use: Option<&ToolUse>,
    conversation: &[ChatMessage],
    truncate: bool,
    max_tokens: Option<usize>,
) -> Result<Vec<u32>, ApiError> {
    let system: Option<ChatMessage> = instructions.filter(|i| !i.is_empty()).map(|i| ChatMessage {
        role: "system".into(),
        content: i.into(),
    });
    let mut skip = 0;
    loop {
        let mut messages: Vec<ChatMessage> = system
            .iter()
            .chain(&conversation[skip..])
            .cloned()
            .collect();
        if let Some(tool_use) = tool_use {
            tool_use.instruct(&mut messages);
        }
        super::tools::merge_tool_results(&mut messages);
        let prompt = model.chat_prompt(&messages).map_err(as_input)?;
        let fits = prompt.len() + max_tokens.unwrap_or(1) <= model.context_limit();
        if fits || !truncate || skip + 1 >= conversation.len() {
            return Ok(prompt);
        }
        skip += 1;
    }
}

/// A stored conversation's messages.
fn messages_of(stored: &[Value]) -> Vec<ChatMessage> {
    stored
        .iter()
        .filter_map(|m| {
            Some(ChatMessage {
                role: m.get("role")?.as_str()?.to_string(),
                content: m.get("content")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// What is stored once the response is complete (when `store`).
struct Record {
    project: String,
    items: Vec<Value>,
    conversation: Vec<Value>,
}

impl Record {
    fn finish(self, shape: &Shape, response: &Value, answer: &str) -> StoredResponse {
        let mut conversation = self.conversation;
        conversation.push(json!({"role": "assistant", "content": answer}));
        StoredResponse {
            id: shape.id.clone(),
            project: self.project,
            created_at: shape.created_at as i64,
            response: response.clone(),
            input_items: self.items,
            conversation,
        }
    }
}

fn log(
    shape: &Shape,
    stream: bool,
    tokens: (usize, usize, usize),
    failed: bool,
    started: std::time::Instant,
) {
    let (prompt_tokens, completion_tokens, cached_tokens) = tokens;
    tracing::info!(
        id = %shape.id,
        model = %shape.model,
        stream,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        failed,
        ms = started.elapsed().as_millis() as u64,
        "response"
    );
}

/// The history a request continues: the conversation of its `previous_response_id`, or the
/// items of its `conversation`, read from the store.
async fn history(
    state: &AppState,
    caller: &Caller,
    req: &ResponsesRequest,
    parsed: &request::Parsed,
) -> Result<Vec<ChatMessage>, ApiError> {
    Ok(match &req.previous_response_id {
        Some(id) => {
            let previous = load(state, caller, id).await.map_err(|e| match e.status {
                axum::http::StatusCode::NOT_FOUND => ApiError::invalid(
                    Some("previous_response_id"),
                    format!("Previous response with id '{id}' not found."),
                )
                .with_code("previous_response_not_found"),
                _ => e,
            })?;
            let status = &previous.response["status"];
            if status == "queued" || status == "in_progress" {
                return Err(ApiError::invalid(
                    Some("previous_response_id"),
                    format!("Previous response '{id}' has not finished (it is {status})."),
                ));
            }
            messages_of(&previous.conversation)
        }
        None => match &parsed.conversation {
            Some(id) => {
                let items = super::conversations::load(state, caller, id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::invalid(
                            Some("conversation"),
                            format!("Conversation with id '{id}' not found."),
                        )
                    })?;
                // This call's items join the conversation: their ids must be new to it.
                let taken = |new: &str| items.iter().any(|i| i["id"] == new);
                super::conversations::check_ids("input", &parsed.items, taken)?;
                parse_items(&items)?.1
            }
            None => Vec::new(),
        },
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    meter: Option<Extension<Arc<Meter>>>,
    priority: Option<Extension<crate::scheduler::Priority>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let meter = meter.map(|Extension(m)| m);
    let req: ResponsesRequest = json::parse(body)?;
    let model = chat_model(&state, &req.model, meter.as_deref())?;
    let parsed = req.parse()?;
    let mut conversation = history(&state, &caller, &req, &parsed).await?;
    conversation.extend(parsed.messages);
    let mut params = parsed.params;
    params.priority = lane(priority);
    if parsed.background && params.priority == crate::scheduler::Priority::Batch {
        return Err(ApiError::invalid(
            Some("background"),
            "'background' cannot be used in a batch: a batch already runs its requests in the \
             background.",
        ));
    }
    let prompt = prompt(
        &model,
        req.instructions.as_deref(),
        parsed.tool_use.as_ref(),
        &conversation,
        parsed.truncate,
        params.max_tokens,
    )?;
    let prompt_tokens = prompt.len();
    model.prepare(&params).await?;
    reserve(meter.as_deref(), prompt_tokens, &params, 1)?;
    let gen = model.start(prompt, params, "input").map_err(as_input)?;
    if let Some(m) = &meter {
        m.set_tokens(prompt_tokens as u64, 0);
    }
    let shape = Shape::new(
        &req,
        &model.info.id,
        parsed.store,
        parsed.metadata,
        parsed.conversation.clone(),
    );
    let owner = project(&caller)?;
    let thread = parsed.conversation.map(|id| Thread {
        project: owner.clone(),
        id,
        items: parsed.items.clone(),
    });
    let record = parsed.store.then(|| Record {
        project: owner,
        items: parsed.items,
        conversation: conversation
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect(),
    });
    let run = Run {
        state,
        tools: parsed.tool_use.as_ref().is_some_and(|t| t.calls),
        shape,
        meter,
        record,
        prompt_tokens,
        started,
        cancel: None,
        thread,
    };
    if run.shape.background {
        run.background(gen, req.stream).await
    } else if req.stream {
        Ok(run.stream(gen))
    } else {
        run.whole(gen).await
    }
}

/// Stops the background run `id` when a cancel for it comes through the database (sent to
/// another server on the same data directory) or it is deleted there; checked every second
/// while it runs.
async fn watch(state: Arc<AppState>, live: Arc<background::Live>, id: String) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.tick().await;
    while !live.is_done() {
        every.tick().await;
        let key = id.clone();
        if let Ok(false) = blocking(&state, move |s| s.run_wanted(&key)).await {
            live.cancel.notify_one();
            return;
        }
    }
}

/// One response being generated.
struct Run {
    state: Arc<AppState>,
    /// An answer may be calls.
    tools: bool,
    shape: Shape,
    meter: Option<Arc<Meter>>,
    record: Option<Record>,
    prompt_tokens: usize,
    started: std::time::Instant,
    /// A background run stops when told.
    cancel: Option<Arc<Notify>>,
    /// The conversation this response adds its items to.
    thread: Option<Thread>,
}

/// A conversation (`conversation`) and the input items a response adds to it.
struct Thread {
    project: String,
    id: String,
    items: Vec<Value>,
}

/// An event stream as server-sent events.
fn sse(events: mpsc::Receiver<(String, Value)>) -> Response {
    let events = tokio_stream::wrappers::ReceiverStream::new(events).map(|(kind, event)| {
        Ok::<_, Infallible>(Event::default().event(kind).data(event.to_string()))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

impl Run {
    /// Stores the finished response (when asked to) and records its usage.
    async fn settle(
        &mut self,
        stream: bool,
        object: &Value,
        answer: &str,
        completion: usize,
        cached: usize,
    ) -> Result<(), ApiError> {
        if let Some(m) = &self.meter {
            m.set_tokens(self.prompt_tokens as u64, completion as u64);
        }
        log(
            &self.shape,
            stream,
            (self.prompt_tokens, completion, cached),
            false,
            self.started,
        );
        if let Some(thread) = self.thread.take() {
            let mut items = thread.items;
            items.extend(object["output"].as_array().into_iter().flatten().cloned());
            let id = thread.id.clone();
            // Added before the response is stored as ended, so that a client that sees it end
            // finds its items in the conversation; the response stands whatever became of the
            // conversation meanwhile.
            let added = super::conversations::append(&self.state, thread.project, thread.id, items);
            match added.await {
                Ok(Added::Done) => {}
                Ok(Added::NoConversation) => {
                    tracing::warn!(conversation = %id, "the conversation was deleted while a response to it ran")
                }
                Ok(Added::Duplicate(item)) => {
                    tracing::warn!(conversation = %id, item = %item, "an item was added to the conversation while a response to it ran")
                }
                Err(e) => {
                    tracing::warn!(conversation = %id, error = %e.message, "adding a response's items to its conversation")
                }
            }
        }
        if let Some(record) = self.record.take() {
            let stored = record.finish(&self.shape, object, answer);
            self.store(stored).await?;
        }
        Ok(())
    }

    /// Stores the response. A background one's end is stored only while it is queued or
    /// running: not over a deletion, nor over the failure that a server taking it for a stopped
    /// one's stored.
    async fn store(&self, stored: StoredResponse) -> Result<(), ApiError> {
        if !self.shape.background {
            return blocking(&self.state, move |s| s.put_response(&stored)).await;
        }
        let id = stored.id.clone();
        if !blocking(&self.state, move |s| s.finish_response(&stored)).await? {
            tracing::info!(id = %id, "a background response ended after it was deleted or failed");
        }
        Ok(())
    }

    async fn whole(mut self, gen: Generation) -> Result<Response, ApiError> {
        let f = run_to_end(gen, self.meter.clone()).await.map_err(|e| {
            log(
                &self.shape,
                false,
                (self.prompt_tokens, 0, 0),
                true,
                self.started,
            );
            ApiError::from(e)
        })?;
        let (status, incomplete) = status_of(f.finish);
        let cut = f.finish == FinishReason::Length;
        let calls = self
            .tools
            .then(|| tools::parse_calls(&f.text, cut))
            .flatten();
        let output = match calls {
            Some(calls) => {
                let (scanned, _) = tools::scan_calls(&f.text);
                let complete = |i: usize| scanned.get(i).is_some_and(|c| c.complete);
                let ids = || (new_id("fc"), super::tools::call_id());
                calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| call_item(call, complete(i), ids()))
                    .collect()
            }
            None => vec![self
                .shape
                .message(status, Some(text_part(&f.text, &f.logprobs)))],
        };
        let usage = usage_json(self.prompt_tokens, f.completion_tokens, f.cached_tokens);
        let object = self
            .shape
            .object(status, output, usage, incomplete, Value::Null);
        self.settle(
            false,
            &object,
            &f.text,
            f.completion_tokens,
            f.cached_tokens,
        )
        .await?;
        Ok(Json(object).into_response())
    }

    fn stream(self, gen: Generation) -> Response {
        if let Some(m) = &self.meter {
            m.stream_started();
        }
        let (tx, rx) = mpsc::channel::<(String, Value)>(64);
        tokio::spawn(self.events(gen, tx));
        sse(rx)
    }

    /// Stores the response as queued, then runs it with no client attached: its events go to
    /// the server's log of background runs. Answers the queued response, or with `stream` the
    /// run's events as they come (a client leaving does not stop the run).
    async fn background(mut self, gen: Generation, stream: bool) -> Result<Response, ApiError> {
        let queued = self
            .shape
            .object("queued", Vec::new(), Value::Null, Value::Null, Value::Null);
        let Some(record) = &self.record else {
            return Err(ApiError::invalid(
                Some("store"),
                "Background responses are stored.",
            ));
        };
        let (id, project) = (self.shape.id.clone(), record.project.clone());
        let row = StoredResponse {
            id: id.clone(),
            project: project.clone(),
            created_at: self.shape.created_at as i64,
            response: queued.clone(),
            input_items: record.items.clone(),
            conversation: record.conversation.clone(),
        };
        let runs = self.state.background.clone();
        let boot = runs.boot.clone();
        blocking(&self.state, move |s| s.queue_response(&row, &boot)).await?;
        if let Some(m) = &self.meter {
            m.stream_started();
        }
        let live = runs.start(&id, &project);
        self.cancel = Some(live.cancel.clone());
        tokio::spawn(watch(self.state.clone(), live.clone(), id.clone()));
        tracing::info!(id = %id, "background response queued");
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel::<(String, Value)>(64);
        tokio::spawn(self.events(gen, tx));
        let (started, run_id) = (state.clone(), id.clone());
        let follow = runs.follow(id.clone(), live.clone(), rx, |object| async move {
            let moved = blocking(&started, move |s| {
                s.replace_response_in(&project, &run_id, "queued", &object)
            });
            if let Err(e) = moved.await {
                tracing::warn!(error = %e.message, "storing a background response's start");
            }
        });
        tokio::spawn(async move {
            follow.await;
            // A run that could not store its end (or stopped short) ends failed rather than
            // running forever for those who poll it.
            let ids = vec![id];
            let message = "The server could not store this background response's end.";
            match blocking(&state, move |s| s.fail_responses(&ids, message)).await {
                Ok(0) => {}
                Ok(_) => tracing::warn!("a background response ended without storing its end"),
                Err(e) => tracing::warn!(error = %e.message, "ending a background response"),
            }
        });
        if stream {
            Ok(sse(live.events(None)))
        } else {
            Ok(Json(queued).into_response())
        }
    }

    /// Sends the stream's events; returns early (dropping the generation, which cancels it)
    /// when the client has gone.
    async fn events(mut self, mut gen: Generation, tx: mpsc::Sender<(String, Value)>) {
        let mut numbered = Events::default();
        macro_rules! send {
            ($kind:expr, $fields:expr) => {
                if tx.send(numbered.make($kind, $fields)).await.is_err() {
                    return;
                }
            };
        }
        let shape = &self.shape;
        let (item_id, at) = (
            shape.message_id.clone(),
            json!({"output_index": 0, "content_index": 0}),
        );
        let place = |mut fields: Value| {
            fields["item_id"] = json!(item_id);
            fields["output_index"] = at["output_index"].clone();
            fields["content_index"] = at["content_index"].clone();
            fields
        };
        let opened =
            |status| shape.object(status, Vec::new(), Value::Null, Value::Null, Value::Null);
        let created = if shape.background {
            "queued"
        } else {
            "in_progress"
        };
        send!("response.created", json!({"response": opened(created)}));
        send!(
            "response.in_progress",
            json!({"response": opened("in_progress")})
        );
        let opening = [
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": shape.message("in_progress", None)}),
            ),
            (
                "response.content_part.added",
                place(json!({"part": text_part("", &[])})),
            ),
        ];
        // With tools, the message opens once its first character shows it is not calls (see
        // `CallStream`); until then its text is held.
        let mut held = self.tools.then(String::new);
        if held.is_none() {
            for (kind, fields) in opening.clone() {
                send!(kind, fields);
            }
        }
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        let mut finish = FinishReason::Length;
        let mut clock = TokenClock::default();
        // Calls stream as they grow: each call's item once its name is whole, then its
        // arguments. `call_ids` holds each started call's item id and call id.
        let mut tracker = tools::CallTracker::default();
        let mut call_ids: Vec<(String, String)> = Vec::new();
        // A background run told to stop ends `cancelled`, with what it had written.
        let mut cancelled = false;
        loop {
            let next = match &self.cancel {
                Some(stop) => tokio::select! {
                    biased;
                    () = stop.notified() => {
                        cancelled = true;
                        None
                    }
                    next = gen.next() => next,
                },
                None => gen.next().await,
            };
            let Some(chunk) = next else { break };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let err = ApiError::from(e);
                    if let Some(m) = &self.meter {
                        m.set_tokens(self.prompt_tokens as u64, gen.completion_tokens as u64);
                        m.fail(err.status.as_u16());
                        m.finish();
                    }
                    let tokens = (self.prompt_tokens, gen.completion_tokens, gen.cached_tokens);
                    log(shape, true, tokens, true, self.started);
                    let item = shape.message("incomplete", Some(text_part(&text, &logprobs)));
                    let error = json!({"code": "server_error", "message": err.message});
                    let failed =
                        shape.object("failed", vec![item], Value::Null, Value::Null, error);
                    // Stored failed, so that a client polling a background response sees it end.
                    if let Some(record) = self.record.take() {
                        let stored = record.finish(shape, &failed, &text);
                        if let Err(e) = self.store(stored).await {
                            tracing::warn!(id = %shape.id, error = %e.message, "storing a failed response");
                        }
                    }
                    send!("response.failed", json!({"response": failed}));
                    return;
                }
            };
            if let Some(m) = &self.meter {
                clock.tick(m);
            }
            text.push_str(&chunk.text);
            let delta = match &mut held {
                Some(h) => {
                    h.push_str(&chunk.text);
                    if h.starts_with('<') {
                        for event in tracker.update(h) {
                            let (kind, fields) = match event {
                                tools::CallEvent::Start { index, name } => {
                                    let ids = (new_id("fc"), super::tools::call_id());
                                    let item = json!({
                                        "id": ids.0, "type": "function_call", "status": "in_progress",
                                        "call_id": ids.1, "name": name, "arguments": "",
                                    });
                                    call_ids.push(ids);
                                    (
                                        "response.output_item.added",
                                        json!({"output_index": index, "item": item}),
                                    )
                                }
                                tools::CallEvent::Arguments { index, delta } => (
                                    "response.function_call_arguments.delta",
                                    json!({"item_id": call_ids[index].0, "output_index": index, "delta": delta}),
                                ),
                            };
                            send!(kind, fields);
                        }
                        None
                    } else if h.is_empty() {
                        None
                    } else {
                        for (kind, fields) in opening.clone() {
                            send!(kind, fields);
                        }
                        held.take()
                    }
                }
                None => Some(chunk.text),
            };
            if let Some(delta) = delta.filter(|d| !d.is_empty() || !chunk.logprobs.is_empty()) {
                let delta = json!({"delta": delta, "logprobs": token_logprobs(&chunk.logprobs)});
                send!("response.output_text.delta", place(delta));
            }
            logprobs.extend(chunk.logprobs);
            if let Some(f) = chunk.finish {
                finish = f;
            }
        }
        let (completion_tokens, cached_tokens) = (gen.completion_tokens, gen.cached_tokens);
        drop(gen);
        let (status, incomplete) = match cancelled {
            true => ("cancelled", Value::Null),
            false => status_of(finish),
        };
        let item_status = if cancelled { "incomplete" } else { status };
        let (calls, _) = tools::scan_calls(&text);
        let output = if held.is_some() && !call_ids.is_empty() {
            let mut items = Vec::new();
            for (index, (call, (item_id, call_id))) in calls.iter().zip(&call_ids).enumerate() {
                let whole = tools::ToolCall {
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                };
                let item = call_item(&whole, call.complete, (item_id.clone(), call_id.clone()));
                send!(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": call.arguments})
                );
                send!(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item})
                );
                items.push(item);
            }
            items
        } else {
            if let Some(h) = held.take() {
                // Held to the end: text that looked like calls but is not.
                for (kind, fields) in opening.clone() {
                    send!(kind, fields);
                }
                if !h.is_empty() {
                    send!(
                        "response.output_text.delta",
                        place(json!({"delta": h, "logprobs": []}))
                    );
                }
            }
            let part = text_part(&text, &logprobs);
            let done = json!({"text": text, "logprobs": part["logprobs"].clone()});
            send!("response.output_text.done", place(done));
            send!("response.content_part.done", place(json!({"part": part})));
            let item = shape.message(item_status, Some(part));
            send!(
                "response.output_item.done",
                json!({"output_index": 0, "item": item})
            );
            vec![item]
        };
        let usage = usage_json(self.prompt_tokens, completion_tokens, cached_tokens);
        let object = shape.object(status, output, usage, incomplete, Value::Null);
        // Stored and metered before the last event, so that a client reading it back next
        // finds it.
        let settled = self
            .settle(true, &object, &text, completion_tokens, cached_tokens)
            .await;
        let shape = &self.shape;
        if let Some(m) = &self.meter {
            if let Err(e) = &settled {
                m.fail(e.status.as_u16());
            }
            m.finish();
        }
        match settled {
            // Streaming has no event for a cancelled response: its stream ends here.
            Ok(()) if cancelled => {}
            Ok(()) => {
                let kind = if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                send!(kind, json!({"response": object}));
            }
            Err(e) => {
                let error = json!({"code": "server_error", "message": e.message});
                let failed = shape.object(
                    "failed",
                    object["output"].as_array().cloned().unwrap_or_default(),
                    object["usage"].clone(),
                    Value::Null,
                    error,
                );
                send!("response.failed", json!({"response": failed}));
            }
        }
    }
}

/// A call as a Responses output item.
fn call_item(call: &tools::ToolCall, complete: bool, (id, call_id): (String, String)) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": if complete { "completed" } else { "incomplete" },
        "call_id": call_id,
        "name": call.name,
        "arguments": call.arguments,
    })
}
