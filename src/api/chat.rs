//! `POST /v1/chat/completions` and the legacy `POST /v1/completions`, streamed (SSE) or not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};

use super::logprobs::{completion_logprobs, echo_len, echo_logprobs, token_logprobs};
use super::stored_chat::{Gathered, Storing};
use super::tools::{self, CallStream, Dialect, ToolUse};
use super::types::{logit_bias, ChatCompletionRequest, CompletionRequest, Prompt, Usage};
use super::{formats, json, ApiError, AppState};
use crate::engine::FinishReason;
use crate::platform::usage::{Meter, TokenClock};
use crate::platform::Caller;
use crate::scheduler::Priority;
use crate::serving::{
    ChatModel, GenChunk, GenParams, Generation, Served, ServingError, TokenLogprob, TurnEnd,
};
use candela_models::ModelKind;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// What every response of one request shares.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    started: std::time::Instant,
    meter: Option<Arc<Meter>>,
    /// Choices per prompt: the prefix cache serves the later ones, so only the first choice of
    /// each prompt reports its cached tokens.
    n: usize,
    /// With legacy completions' `echo`, each prompt's text, which its choices' text starts with.
    echo: Vec<String>,
    /// Chat with tools: an answer may be calls.
    tools: bool,
    /// The tools were the deprecated `functions`: a call is answered as `function_call`.
    functions: bool,
    /// `max_tokens: 0` with `echo`: the answer is the prompt alone (its one generated token is
    /// dropped).
    score_only: bool,
    /// `store: true`: the completion is kept once it is whole.
    store: Option<Arc<Storing>>,
    /// With `echo` and `logprobs`, the text of each prompt's first token.
    first_tokens: Vec<String>,
}

impl Meta {
    fn new(kind: Kind, model: &str, meter: Option<Arc<Meter>>, n: usize) -> Self {
        let prefix = if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Self {
            kind,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: now(),
            model: model.to_string(),
            started: std::time::Instant::now(),
            meter,
            n: n.max(1),
            echo: Vec::new(),
            tools: false,
            functions: false,
            score_only: false,
            store: None,
            first_tokens: Vec::new(),
        }
    }

    /// The text choice `index` starts with: its prompt's, with `echo`.
    fn echoed(&self, index: usize) -> &str {
        self.echo.get(index / self.n).map_or("", String::as_str)
    }

    /// One line per finished request: ids, sizes and timings, never content.
    fn log(
        &self,
        stream: bool,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
        failed: bool,
    ) {
        tracing::info!(
            id = %self.id,
            model = %self.model,
            stream,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            failed,
            ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The chat model that `model` names or resolves to, noted in the meter.
pub(super) fn chat_model(
    state: &AppState,
    model: &str,
    meter: Option<&Meter>,
) -> Result<Arc<ChatModel>, ApiError> {
    match state.registry.resolve(model, Some(ModelKind::Chat))? {
        Served::Chat(m) => {
            if let Some(meter) = meter {
                meter.set_model(&m.info);
            }
            Ok(m)
        }
        Served::Embedding(m) => Err(ServingError::WrongModelType(format!(
            "The model `{}` is an embedding model; use it with /v1/embeddings.",
            m.info.id
        ))
        .into()),
    }
}

/// Reserves the call's tokens (its prompts, and `max_tokens` for each choice when given) under
/// the project's tokens-per-minute limit.
pub(super) fn reserve(
    meter: Option<&Meter>,
    prompt_tokens: usize,
    params: &GenParams,
    choices: usize,
) -> Result<(), ApiError> {
    let Some(meter) = meter else { return Ok(()) };
    let output = params.max_tokens.unwrap_or(0).saturating_mul(choices);
    let tokens = prompt_tokens.saturating_add(output) as u64;
    meter
        .reserve_tokens(tokens)
        .map_err(|wait| super::access::tokens_refused(meter, wait, tokens))
}

/// Starts `n` generations of one prompt; each choice after the first gets its own seed.
fn start_n(
    model: &ChatModel,
    prompt: &[u32],
    params: &GenParams,
    n: usize,
    param: &str,
) -> Result<Vec<Generation>, ApiError> {
    (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.sampling.seed = p.sampling.seed.map(|s| s.wrapping_add(i as u64));
            Ok(model.start(prompt.to_vec(), p, param)?)
        })
        .collect()
}

/// The scheduling lane of a request: interactive, unless a batch runs it.
pub(super) fn lane(lane: Option<Extension<Priority>>) -> Priority {
    lane.map_or_else(Priority::default, |Extension(p)| p)
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    meter: Option<Extension<Arc<Meter>>>,
    priority: Option<Extension<Priority>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let mut req: ChatCompletionRequest = json::parse(body)?;
    let model = chat_model(&state, &req.model, meter.as_deref())?;
    let metadata = super::types::metadata(req.metadata.as_ref())?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("Invalid value for 'top_logprobs': {k}; it must be between 0 and 20."),
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "'top_logprobs' requires 'logprobs' to be true.",
            ))
        }
        (false, _) => None,
    };
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let (mut params, n) = req.sampling().to_params(max_tokens, logprobs)?;
    params.sampling.logit_bias = logit_bias(&req.logit_bias, model.vocab_size())?;
    params.priority = lane(priority);
    params.format =
        formats::request_format(req.response_format.as_ref(), crate::vllm_guided!(req))?;
    let functions = tools::legacy_functions(
        req.functions.as_ref(),
        req.function_call.as_ref(),
        req.tools.as_ref(),
    )?;
    let legacy = functions.is_some();
    let mut tool_use = match functions {
        Some(functions) => Some(functions),
        None => ToolUse::parse(
            Dialect::Chat,
            req.tools.as_ref(),
            req.tool_choice.as_ref(),
            req.parallel_tool_calls,
        )?,
    };
    let mut messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_chat(i))
        .collect::<Result<Vec<_>, _>>()?;
    let end = super::types::turn_end(req.add_generation_prompt, req.continue_final_message)?;
    if let (TurnEnd::Continued, Some(t)) = (end, tool_use.as_mut()) {
        if messages.last().is_some_and(|m| !m.content.is_empty()) {
            t.continuing()?;
        }
    }
    if let Some(tool_use) = &tool_use {
        tool_use.instruct(&mut messages);
        let named = |mut e: ApiError| {
            if legacy {
                e.message = e.message.replace("'tools'", "'functions'");
            }
            e
        };
        params.format = tool_use.grammar(params.format.take()).map_err(named)?;
        if let Some(format) = params
            .format
            .as_mut()
            .filter(|f| legacy && f.param == "tools")
        {
            // A function's schema that does not compile is named as the request named it.
            format.param = "functions".into();
        }
    }
    tools::merge_tool_results(&mut messages);
    let prompt = model.chat_prompt_ending(&messages, end)?;
    model.prepare(&params).await?;
    reserve(meter.as_deref(), prompt.len(), &params, n)?;
    let gens = start_n(&model, &prompt, &params, n, "messages")?;
    if let Some(m) = &meter {
        m.set_tokens(prompt.len() as u64, 0);
    }
    let mut meta = Meta::new(Kind::Chat, &model.info.id, meter, n);
    meta.tools = tool_use.is_some_and(|t| t.calls);
    meta.functions = legacy;
    let caller = caller.as_ref().map(|Extension(c)| c);
    meta.store = Storing::new(&state, caller, req.store, metadata, &meta.id, &req.messages);
    let resp = if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        stream_response(meta, gens, include_usage, prompt.len())
    } else {
        full_response(meta, gens, prompt.len()).await?
    };
    Ok(resp)
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    meter: Option<Extension<Arc<Meter>>>,
    priority: Option<Extension<Priority>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let mut req: CompletionRequest = json::parse(body)?;
    let model = chat_model(&state, &req.model, meter.as_deref())?;
    req.refuse_unsupported()?;
    let logprobs = match req.logprobs {
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                format!("Invalid value for 'logprobs': {k}; it must be between 0 and 20."),
            ))
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    // `max_tokens: 0` with `echo` scores the prompt and writes nothing, as OpenAI's completions
    // did: one token is generated and left out of the answer and its usage.
    let score_only = req.max_tokens == Some(0);
    if score_only && (!req.echo || req.stream) {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "Invalid value for 'max_tokens': 0; it must be at least 1 (0 is allowed with 'echo' \
             and without 'stream', to score the prompt).",
        ));
    }
    let max_tokens = match score_only {
        true => Some((1, "max_tokens")),
        false => Some((req.max_tokens.unwrap_or(16), "max_tokens")),
    };
    let (mut params, n) = req.sampling().to_params(max_tokens, logprobs)?;
    let vocab = model.vocab_size();
    params.sampling.logit_bias = logit_bias(&req.logit_bias, vocab)?;
    params.priority = lane(priority);
    params.format =
        formats::request_format(req.response_format.as_ref(), crate::vllm_guided!(req))?;
    if req.echo {
        params.prompt_logprobs = logprobs;
    }
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        Prompt::Text(t) => vec![model.completion_prompt(t)?],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| model.completion_prompt(t))
            .collect::<Result<_, _>>()?,
        Prompt::Tokens(t) => vec![t.clone()],
        Prompt::TokenLists(ts) => ts.clone(),
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid(
            Some("prompt"),
            "'prompt' must not be empty.",
        ));
    }
    if prompts.iter().flatten().any(|&t| t >= vocab) {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!("'prompt' holds a token id outside the vocabulary (size {vocab})."),
        ));
    }
    let prompt_total: usize = prompts.iter().map(Vec::len).sum();
    model.prepare(&params).await?;
    reserve(meter.as_deref(), prompt_total, &params, n * prompts.len())?;
    let mut gens = Vec::new();
    for p in &prompts {
        gens.extend(start_n(&model, p, &params, n, "prompt")?);
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    if let Some(m) = &meter {
        m.set_tokens(prompt_tokens as u64, 0);
    }
    let mut meta = Meta::new(Kind::Completion, &model.info.id, meter, n);
    meta.score_only = score_only;
    if req.echo {
        // The prompts as given, or decoded where they are token ids.
        let decode = |ids: &[u32]| {
            model.tokenizer().decode(ids, true).map_err(|e| {
                ApiError::invalid(
                    Some("prompt"),
                    format!("'prompt' could not be decoded: {e}"),
                )
            })
        };
        if params.prompt_logprobs.is_some() {
            meta.first_tokens = prompts
                .iter()
                .map(|p| model.tokenizer().decode(&p[..1], false).unwrap_or_default())
                .collect();
        }
        meta.echo = match &req.prompt {
            Prompt::Text(t) => vec![t.clone()],
            Prompt::Texts(ts) => ts.clone(),
            Prompt::Tokens(t) => vec![decode(t)?],
            Prompt::TokenLists(ts) => ts.iter().map(|t| decode(t)).collect::<Result<_, _>>()?,
        };
    }
    let resp = if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        stream_response(meta, gens, include_usage, prompt_tokens)
    } else {
        full_response(meta, gens, prompt_tokens).await?
    };
    Ok(resp)
}

/// A generation run to its end.
pub(super) struct Finished {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// With `prompt_logprobs`: an entry per prompt token.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop_sequence: Option<String>,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

pub(super) async fn run_to_end(
    mut gen: Generation,
    meter: Option<Arc<Meter>>,
) -> Result<Finished, ServingError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut finish = FinishReason::Length;
    let mut clock = TokenClock::default();
    while let Some(chunk) = gen.next().await {
        let chunk = chunk?;
        if let Some(m) = &meter {
            clock.tick(m);
        }
        text.push_str(&chunk.text);
        logprobs.extend(chunk.logprobs);
        if let Some(f) = chunk.finish {
            finish = f;
        }
    }
    Ok(Finished {
        text,
        logprobs,
        prompt_logprobs: gen.prompt_logprobs.take(),
        finish,
        stop_sequence: gen.stop_sequence().map(str::to_owned),
        completion_tokens: gen.completion_tokens,
        cached_tokens: gen.cached_tokens,
    })
}

/// A chat choice of a whole answer: its message (its calls, when the answer is calls) and why
/// it ended.
fn chat_choice(
    meta: &Meta,
    index: usize,
    text: String,
    finish: FinishReason,
    logprobs: &[TokenLogprob],
) -> Value {
    let logprobs = (!logprobs.is_empty()).then(|| logprobs_json(Kind::Chat, logprobs, 0));
    let (message, finish) = if meta.tools {
        let (mut message, finish) = tools::chat_answer(text, finish);
        let finish = match meta.functions {
            true => tools::as_function_call(&mut message, Some(finish)).unwrap_or(finish),
            false => finish,
        };
        (message, finish)
    } else {
        (
            json!({"role": "assistant", "content": text}),
            finish.as_str(),
        )
    };
    json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
}

async fn full_response(
    meta: Meta,
    gens: Vec<Generation>,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let results =
        futures::future::join_all(gens.into_iter().map(|g| run_to_end(g, meta.meter.clone())))
            .await;
    let mut choices = Vec::new();
    let (mut completion, mut cached) = (0, 0);
    for (index, r) in results.into_iter().enumerate() {
        let mut f = r.inspect_err(|_| meta.log(false, prompt_tokens, completion, cached, true))?;
        if meta.score_only {
            f.text.clear();
            f.logprobs.clear();
            f.completion_tokens = 0;
            f.finish = FinishReason::Length;
        }
        completion += f.completion_tokens;
        if index % meta.n == 0 {
            cached += f.cached_tokens;
        }
        let logprobs = (!f.logprobs.is_empty()).then(|| logprobs_json(meta.kind, &f.logprobs, 0));
        choices.push(match meta.kind {
            Kind::Chat => chat_choice(&meta, index, f.text, f.finish, &f.logprobs),
            Kind::Completion => {
                let logprobs = match &f.prompt_logprobs {
                    Some(prompt) => {
                        let first = meta
                            .first_tokens
                            .get(index / meta.n)
                            .map_or("", String::as_str);
                        Some(echo_logprobs(first, prompt, &f.logprobs))
                    }
                    None => logprobs,
                };
                json!({
                    "index": index,
                    "text": format!("{}{}", meta.echoed(index), f.text),
                    "logprobs": logprobs,
                    "finish_reason": f.finish.as_str(),
                })
            }
        });
    }
    let object = if meta.kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if let Some(m) = &meta.meter {
        m.set_tokens(prompt_tokens as u64, completion as u64);
    }
    let object = json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": Usage::new(prompt_tokens, completion, cached),
    });
    if let Some(store) = &meta.store {
        store.keep(&object).await?;
    }
    Ok(Json(object).into_response())
}

fn logprobs_json(kind: Kind, lps: &[TokenLogprob], text_offset: usize) -> Value {
    match kind {
        Kind::Chat => json!({"content": token_logprobs(lps)}),
        Kind::Completion => completion_logprobs(
            lps.iter()
                .map(|lp| (lp.token.as_str(), Some(lp.logprob), Some(&lp.top[..]))),
            text_offset,
        ),
    }
}

/// Items of the merged per-choice streams.
enum Item {
    /// With `echo` and `logprobs`: the prompt's log-probabilities, before the choice's first
    /// chunk.
    Prompt(usize, Vec<Option<TokenLogprob>>),
    Chunk(usize, Result<GenChunk, ServingError>),
    Done {
        index: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
}

fn choice_stream(
    index: usize,
    gen: Generation,
    meter: Option<Arc<Meter>>,
) -> BoxStream<'static, Item> {
    let state = Some((gen, TokenClock::default()));
    stream::unfold(state, move |state| {
        let meter = meter.clone();
        async move {
            let (mut gen, mut clock) = state?;
            match gen.next().await {
                Some(chunk) => {
                    if let Some(m) = &meter {
                        clock.tick(m);
                    }
                    let prompt = gen.prompt_logprobs.take().map(|p| Item::Prompt(index, p));
                    let items = prompt.into_iter().chain([Item::Chunk(index, chunk)]);
                    Some((items.collect::<Vec<_>>(), Some((gen, clock))))
                }
                None => Some((
                    vec![Item::Done {
                        index,
                        completion_tokens: gen.completion_tokens,
                        cached_tokens: gen.cached_tokens,
                    }],
                    None,
                )),
            }
        }
    })
    .flat_map(stream::iter)
    .boxed()
}

fn stream_response(
    meta: Meta,
    gens: Vec<Generation>,
    include_usage: bool,
    prompt_tokens: usize,
) -> Response {
    if let Some(m) = &meta.meter {
        m.stream_started();
    }
    let per_prompt = meta.n;
    let meta = Arc::new(meta);
    let n = gens.len();
    let merged = stream::select_all(
        gens.into_iter()
            .enumerate()
            .map(|(i, g)| choice_stream(i, g, meta.meter.clone())),
    );
    let object = if meta.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let usage_field = move |v: &mut Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
    };
    let chunk = {
        let meta = meta.clone();
        move |choices: Vec<Value>| {
            let mut v = json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": choices});
            usage_field(&mut v);
            v
        }
    };
    // Chat streams open each choice with the assistant role; with `echo`, completion streams
    // open each with its prompt.
    let opening: Vec<Value> = if meta.kind == Kind::Chat {
        (0..n)
            .map(|i| chunk(vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})]))
            .collect()
    } else if !meta.echo.is_empty() && meta.first_tokens.is_empty() {
        // (With `logprobs`, each prompt comes with its log-probabilities once they are known.)
        (0..n)
            .map(|i| chunk(vec![json!({"index": i, "text": meta.echoed(i), "logprobs": null, "finish_reason": null})]))
            .collect()
    } else {
        Vec::new()
    };
    let mut offsets = vec![0usize; n];
    let mut calls: Vec<CallStream> = (0..n).map(|_| CallStream::default()).collect();
    let (tooled, functions) = (meta.tools, meta.functions);
    // (completion tokens, cached tokens, failure status): the usage chunk needs totals known only
    // at the end.
    let totals = Arc::new(std::sync::Mutex::new((0usize, 0usize, None::<u16>)));
    let body_totals = totals.clone();
    let kind = meta.kind;
    // With `store`, each choice is gathered to be kept whole at the end.
    let gathered = meta.store.as_ref().map(|_| {
        let choices = (0..n).map(|_| Gathered::default()).collect::<Vec<_>>();
        Arc::new(std::sync::Mutex::new(choices))
    });
    let gather = gathered.clone();
    let body_meta = meta.clone();
    let body = merged.filter_map(move |item| {
        if let (Some(g), Item::Chunk(i, Ok(c))) = (&gather, &item) {
            let mut g = g.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(choice) = g.get_mut(*i) {
                choice.add(c);
            }
        }
        let mut t = body_totals.lock().unwrap_or_else(|p| p.into_inner());
        let out: Option<Value> = match item {
            _ if t.2.is_some() => None,
            Item::Prompt(i, prompt) => {
                let first = body_meta.first_tokens.get(i / per_prompt).map_or("", String::as_str);
                let logprobs = echo_logprobs(first, &prompt, &[]);
                offsets[i] = echo_len(first, &prompt);
                Some(chunk(vec![json!({"index": i, "text": body_meta.echoed(i), "logprobs": logprobs, "finish_reason": null})]))
            }
            Item::Chunk(i, Ok(c)) if kind == Kind::Chat && tooled => {
                let (mut delta, mut finish) = calls[i].push(&c.text, c.finish);
                if let Some(choice) = gather.as_ref().and_then(|g| g.lock().ok()).as_mut().and_then(|g| g.get_mut(i)) {
                    choice.note_calls(&delta);
                }
                if functions {
                    finish = tools::as_function_call(&mut delta, finish);
                }
                if delta == json!({}) && finish.is_none() && c.logprobs.is_empty() {
                    None
                } else {
                    let logprobs = (!c.logprobs.is_empty()).then(|| logprobs_json(kind, &c.logprobs, 0));
                    Some(chunk(vec![json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})]))
                }
            }
            Item::Chunk(i, Ok(c)) => {
                if c.text.is_empty() && c.finish.is_none() && c.logprobs.is_empty() {
                    None
                } else {
                    let logprobs = (!c.logprobs.is_empty()).then(|| logprobs_json(kind, &c.logprobs, offsets[i]));
                    // As the whole response counts them: by the tokens' own text.
                    offsets[i] += match c.logprobs.is_empty() {
                        true => c.text.len(),
                        false => c.logprobs.iter().map(|lp| lp.token.len()).sum(),
                    };
                    let finish = c.finish.map(FinishReason::as_str);
                    Some(chunk(vec![match kind {
                        Kind::Chat => {
                            let delta = if c.text.is_empty() { json!({}) } else { json!({"content": c.text}) };
                            json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
                        }
                        Kind::Completion => json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": finish}),
                    }]))
                }
            }
            Item::Chunk(_, Err(e)) => {
                let err = ApiError::from(e);
                t.2 = Some(err.status.as_u16());
                Some(serde_json::to_value(err.body()).unwrap_or(Value::Null))
            }
            Item::Done { index, completion_tokens, cached_tokens } => {
                t.0 += completion_tokens;
                if index % per_prompt == 0 {
                    t.1 += cached_tokens;
                }
                None
            }
        };
        futures::future::ready(out)
    });
    let meta_tail = meta.clone();
    let tail = stream::once(async move {
        let (completion, cached, failed) = *totals.lock().unwrap_or_else(|p| p.into_inner());
        meta_tail.log(true, prompt_tokens, completion, cached, failed.is_some());
        if let Some(m) = &meta_tail.meter {
            m.set_tokens(prompt_tokens as u64, completion as u64);
            if let Some(status) = failed {
                m.fail(status);
            }
            // Recorded before the last event, so a client that reads its usage next sees it.
            m.finish();
        }
        let failed = failed.is_some();
        if let (Some(store), Some(gathered), false) = (&meta_tail.store, &gathered, failed) {
            // Kept before the last event, so that a client reading it back next finds it.
            let choices: Vec<Value> = std::mem::take(&mut *gathered.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut choice = chat_choice(&meta_tail, i, c.text.clone(), c.finish.unwrap_or(FinishReason::Length), &c.logprobs);
                    c.same_ids(&mut choice);
                    choice
                })
                .collect();
            let whole = json!({
                "id": meta_tail.id, "object": "chat.completion", "created": meta_tail.created,
                "model": meta_tail.model, "choices": choices,
                "usage": Usage::new(prompt_tokens, completion, cached),
            });
            if let Err(e) = store.keep(&whole).await {
                tracing::warn!(id = %meta_tail.id, error = %e.message, "storing a streamed chat completion");
            }
        }
        let usage = (include_usage && !failed).then(|| {
            json!({
                "id": meta_tail.id, "object": object, "created": meta_tail.created, "model": meta_tail.model,
                "choices": [], "usage": Usage::new(prompt_tokens, completion, cached),
            })
        });
        stream::iter(usage)
    })
    .flatten();
    let events = stream::iter(opening)
        .chain(body)
        .chain(tail)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(stream::once(async { Ok(Event::default().data("[DONE]")) }));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
