//! The response object of the Responses API and the events of its stream, as OpenAI shapes them.

use serde_json::{json, Value};

use super::super::logprobs::token_logprobs;
use super::request::ResponsesRequest;
use crate::engine::FinishReason;
use crate::serving::TokenLogprob;

/// What every response object of one call shares: its ids and the request's settings, echoed.
pub struct Shape {
    pub id: String,
    pub message_id: String,
    pub created_at: u64,
    pub model: String,
    /// The conversation the response reads and adds to.
    pub conversation: Option<String>,
    /// Run in the background (`background: true`).
    pub background: bool,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    previous_response_id: Option<String>,
    temperature: f32,
    top_p: f32,
    top_logprobs: i64,
    tool_choice: Value,
    /// `text` as the response echoes it: the output format asked for.
    text: Value,
    tools: Value,
    parallel_tool_calls: bool,
    truncation: &'static str,
    store: bool,
    user: Option<String>,
    metadata: Value,
}

/// How a generation ended, as a response's status says it.
pub fn status_of(finish: FinishReason) -> (&'static str, Value) {
    match finish {
        FinishReason::Stop => ("completed", Value::Null),
        FinishReason::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
    }
}

impl Shape {
    pub fn new(
        req: &ResponsesRequest,
        model: &str,
        store: bool,
        metadata: Value,
        conversation: Option<String>,
    ) -> Self {
        Self {
            id: super::new_id("resp"),
            message_id: super::new_id("msg"),
            created_at: super::now(),
            model: model.to_string(),
            conversation,
            background: req.background == Some(true),
            instructions: req.instructions.clone(),
            max_output_tokens: req.max_output_tokens,
            previous_response_id: req.previous_response_id.clone(),
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.unwrap_or(1.0),
            top_logprobs: req.top_logprobs.unwrap_or(0),
            tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            text: match req.text.as_ref().and_then(|t| t.get("format")) {
                Some(format @ Value::Object(_)) => json!({ "format": format }),
                _ => json!({"format": {"type": "text"}}),
            },
            tools: match &req.tools {
                Some(list @ Value::Array(_)) => list.clone(),
                _ => json!([]),
            },
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            truncation: if req.truncation.as_deref() == Some("auto") {
                "auto"
            } else {
                "disabled"
            },
            store,
            user: req.user.clone(),
            metadata,
        }
    }

    /// The response object.
    pub fn object(
        &self,
        status: &str,
        output: Vec<Value>,
        usage: Value,
        incomplete: Value,
        error: Value,
    ) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.background,
            "conversation": self.conversation.as_ref().map(|id| json!({"id": id})),
            "error": error,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "store": self.store,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_logprobs": self.top_logprobs,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "usage": usage,
            "user": self.user,
            "metadata": self.metadata,
        })
    }

    /// The assistant's message item, with its text as one `output_text` part (none while the
    /// stream has not opened it).
    pub fn message(&self, status: &str, part: Option<Value>) -> Value {
        json!({
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": part.into_iter().collect::<Vec<_>>(),
        })
    }
}

pub fn text_part(text: &str, logprobs: &[TokenLogprob]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": token_logprobs(logprobs)})
}

pub fn usage_json(input: usize, output: usize, cached: usize) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

/// The numbered events of one stream.
#[derive(Default)]
pub struct Events {
    next: u64,
}

impl Events {
    /// An event of `kind` with `fields`, numbered.
    pub fn make(&mut self, kind: &str, fields: Value) -> (String, Value) {
        let mut event = json!({"type": kind, "sequence_number": self.next});
        self.next += 1;
        if let (Some(event), Value::Object(fields)) = (event.as_object_mut(), fields) {
            event.extend(fields);
        }
        (kind.to_string(), event)
    }
}
