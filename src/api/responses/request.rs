//! The body of `POST /v1/responses`, and its validation: input items into chat messages, sampling
//! fields into serving's parameters. What this server cannot honour (hosted tools,
//! reasoning effort, images) is a 400 naming the field, as in chat completions.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::super::formats;
use super::super::tools::{Dialect, ToolUse};
use super::super::types::{metadata, wrong_type, SamplingFields};
use super::super::ApiError;
use crate::serving::{tools, ChatMessage, GenParams};

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_logprobs: Option<i64>,
    pub include: Option<Vec<String>>,
    #[serde(default)]
    pub stream: bool,
    pub store: Option<bool>,
    pub metadata: Option<Value>,
    pub user: Option<String>,
    pub text: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub reasoning: Option<Value>,
    pub truncation: Option<String>,
    pub background: Option<bool>,
    pub conversation: Option<Value>,
    pub prompt: Option<Value>,
    // Sampling fields beyond OpenAI's, as chat completions take them.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// The `include` values OpenAI defines. Only the logprobs one adds anything here: the others
/// concern tools and images, which this server's responses never hold.
const INCLUDES: [&str; 8] = [
    "message.output_text.logprobs",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
];

/// A validated request.
pub struct Parsed {
    pub params: GenParams,
    /// This call's input items, as `GET /v1/responses/{id}/input_items` lists them.
    pub items: Vec<Value>,
    /// The same as chat messages.
    pub messages: Vec<ChatMessage>,
    pub metadata: Value,
    pub store: bool,
    /// `truncation: "auto"`: drop the oldest messages of a conversation too long for the context.
    pub truncate: bool,
    /// The tools the model may call.
    pub tool_use: Option<ToolUse>,
    /// The conversation this response reads and adds to.
    pub conversation: Option<String>,
    /// Run with no client attached (`background: true`).
    pub background: bool,
}

impl ResponsesRequest {
    pub fn parse(&self) -> Result<Parsed, ApiError> {
        self.refuse_unsupported()?;
        let top_logprobs = match self.top_logprobs {
            Some(k) if !(0..=20).contains(&k) => {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    format!("Invalid value for 'top_logprobs': {k}; it must be between 0 and 20."),
                ))
            }
            k => k.unwrap_or(0) as usize,
        };
        let mut logprobs = top_logprobs > 0;
        for (i, value) in self.include.iter().flatten().enumerate() {
            if !INCLUDES.contains(&value.as_str()) {
                let param = format!("include[{i}]");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!(
                        "Invalid value for '{param}': '{value}'. Supported values are: {}.",
                        INCLUDES.join(", ")
                    ),
                ));
            }
            logprobs |= value == "message.output_text.logprobs";
        }
        let sampling = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            ..SamplingFields::default()
        };
        let max_tokens = self.max_output_tokens.map(|m| (m, "max_output_tokens"));
        let (mut params, _) = sampling.to_params(max_tokens, logprobs.then_some(top_logprobs))?;
        params.format = match self.text.as_ref().and_then(|t| t.get("format")) {
            None | Some(Value::Null) => None,
            Some(format) => formats::text_format(format)?,
        };
        let tool_use = ToolUse::parse(
            Dialect::Responses,
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )?;
        if let Some(tool_use) = &tool_use {
            params.format = tool_use.grammar(params.format.take())?;
        }
        let truncate = match self.truncation.as_deref() {
            None | Some("disabled") => false,
            Some("auto") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("truncation"),
                    format!(
                        "Invalid value for 'truncation': '{other}'; expected 'auto' or 'disabled'."
                    ),
                ))
            }
        };
        let (items, messages) = match &self.input {
            None | Some(Value::Null) if self.previous_response_id.is_some() => {
                (Vec::new(), Vec::new())
            }
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    Some("input"),
                    "Missing required parameter: 'input'.",
                ))
            }
            Some(Value::String(text)) => {
                let item = message_item(None, "user", std::slice::from_ref(text));
                (vec![item], vec![chat_message("user", text.clone())])
            }
            Some(Value::Array(list)) => input_items(list)?,
            Some(other) => return Err(wrong_type("input", "a string or an array", other)),
        };
        let conversation = match &self.conversation {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(Value::Object(c)) => match c.get("id") {
                Some(Value::String(id)) => Some(id.clone()),
                None => {
                    return Err(ApiError::invalid(
                        Some("conversation.id"),
                        "Missing required parameter: 'conversation.id'.",
                    ))
                }
                Some(other) => return Err(wrong_type("conversation.id", "a string", other)),
            },
            Some(other) => return Err(wrong_type("conversation", "a string or an object", other)),
        };
        if conversation.is_some() && self.previous_response_id.is_some() {
            return Err(ApiError::invalid(
                Some("conversation"),
                "'conversation' and 'previous_response_id' cannot be used together: each \
                 names the history to continue.",
            ));
        }
        Ok(Parsed {
            background: self.background == Some(true),
            conversation,
            params,
            items,
            messages,
            metadata: metadata(self.metadata.as_ref())?,
            store: self.store.unwrap_or(true),
            truncate,
            tool_use,
        })
    }

    /// A 400 for each field whose value asks for what this server cannot do.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        match &self.text {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(other) => return Err(wrong_type("text", "an object", other)),
        }
        if let Some(reasoning) = &self.reasoning {
            match reasoning {
                Value::Null => {}
                Value::Object(fields) => {
                    for (key, value) in fields {
                        if !value.is_null() {
                            let param = format!("reasoning.{key}");
                            return Err(ApiError::invalid(
                                Some(&param),
                                format!(
                                    "Unsupported parameter: '{param}' is not supported with this \
                                     model: it does not reason before it answers."
                                ),
                            ));
                        }
                    }
                }
                other => return Err(wrong_type("reasoning", "an object", other)),
            }
        }
        if self.background == Some(true) && self.store == Some(false) {
            return Err(ApiError::invalid(
                Some("background"),
                "Background responses must be stored: 'background' needs 'store' true (the \
                 default).",
            ));
        }
        if self.prompt.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                Some("prompt"),
                "Prompt templates ('prompt') are not supported by this server; use 'input' and \
                 'instructions'.",
            ));
        }
        Ok(())
    }
}

fn chat_message(role: &str, content: String) -> ChatMessage {
    // Templates know `system`; `developer` is OpenAI's newer name for it.
    let role = if role == "developer" { "system" } else { role };
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

/// An input message as the API lists it: an id, typed text parts, a status.
fn message_item(id: Option<&str>, role: &str, texts: &[String]) -> Value {
    let content: Vec<Value> = texts
        .iter()
        .map(|t| {
            if role == "assistant" {
                json!({"type": "output_text", "text": t, "annotations": []})
            } else {
                json!({"type": "input_text", "text": t})
            }
        })
        .collect();
    let id = id.map_or_else(|| super::new_id("msg"), str::to_string);
    json!({"id": id, "type": "message", "role": role, "content": content, "status": "completed"})
}

/// `input` as a list: messages (`{"role", "content"}`, with or without `"type": "message"`),
/// each content a string or a list of text parts. Earlier output items may be passed back as
/// input, as OpenAI's own examples do.
pub(crate) fn input_items(list: &[Value]) -> Result<(Vec<Value>, Vec<ChatMessage>), ApiError> {
    const ROLES: [&str; 4] = ["user", "assistant", "system", "developer"];
    let mut items = Vec::with_capacity(list.len());
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let Value::Object(fields) = item else {
            return Err(wrong_type(&format!("input[{i}]"), "an object", item));
        };
        match fields.get("type").and_then(Value::as_str) {
            None | Some("message") => {}
            Some(kind @ ("function_call" | "function_call_output")) => {
                let (item, message) = call_item(i, kind, fields)?;
                items.push(item);
                // Consecutive calls are one assistant turn.
                match messages.last_mut() {
                    Some(last)
                        if kind == "function_call"
                            && last.role == "assistant"
                            && last.content.contains(tools::CALL_OPEN) =>
                    {
                        last.content = format!("{}\n{}", last.content, message.content);
                    }
                    _ => messages.push(message),
                }
                continue;
            }
            Some(kind) => {
                let param = format!("input[{i}].type");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!(
                        "Input items of type '{kind}' are not supported by this server: it takes \
                         messages, function calls and their outputs."
                    ),
                ));
            }
        }
        let role = match fields.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            None => {
                let param = format!("input[{i}].role");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!("Missing required parameter: '{param}'."),
                ));
            }
            Some(other) => {
                let param = format!("input[{i}].role");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!(
                        "Invalid value for '{param}': {other}; expected one of {}.",
                        ROLES.join(", ")
                    ),
                ));
            }
        };
        let texts = content_texts(i, fields)?;
        let id = fields.get("id").and_then(Value::as_str);
        items.push(message_item(id, role, &texts));
        messages.push(chat_message(role, texts.concat()));
    }
    Ok((items, messages))
}

/// A `function_call` item handed back (`call_id`, `name`, `arguments`), or the
/// `function_call_output` that answers it (`call_id`, `output`).
fn call_item(
    i: usize,
    kind: &str,
    fields: &Map<String, Value>,
) -> Result<(Value, ChatMessage), ApiError> {
    let text = |key: &str| match fields.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => {
            let param = format!("input[{i}].{key}");
            Err(ApiError::invalid(
                Some(&param),
                format!("Missing required parameter: '{param}'."),
            ))
        }
        Some(other) => Err(wrong_type(&format!("input[{i}].{key}"), "a string", other)),
    };
    let call_id = text("call_id")?;
    let mut item = Value::Object(fields.clone());
    if kind == "function_call" {
        let call = tools::ToolCall {
            name: text("name")?,
            arguments: text("arguments")?,
        };
        if !item.get("id").is_some_and(Value::is_string) {
            item["id"] = json!(super::new_id("fc"));
        }
        item["status"] = json!("completed");
        let content = tools::render_calls(std::slice::from_ref(&call));
        Ok((item, chat_message("assistant", content)))
    } else {
        let output = text("output")?;
        item["call_id"] = json!(call_id);
        if !item.get("id").is_some_and(Value::is_string) {
            item["id"] = json!(super::new_id("fco"));
        }
        Ok((item, chat_message("user", tools::render_result(&output))))
    }
}

/// The text parts of input message `i`.
fn content_texts(i: usize, fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let param = format!("input[{i}].content");
    match fields.get("content") {
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                let key = if kind == "refusal" { "refusal" } else { "text" };
                match (kind, part.get(key)) {
                    ("input_text" | "output_text" | "text" | "refusal", Some(Value::String(t))) => {
                        Ok(t.clone())
                    }
                    ("input_text" | "output_text" | "text" | "refusal", _) => {
                        let param = format!("{param}[{j}].{key}");
                        Err(ApiError::invalid(
                            Some(&param),
                            format!("Missing required parameter: '{param}'."),
                        ))
                    }
                    _ => {
                        let param = format!("{param}[{j}]");
                        Err(ApiError::invalid(
                            Some(&param),
                            format!(
                                "Content part type '{kind}' is not supported by this model; only \
                                 text parts are."
                            ),
                        ))
                    }
                }
            })
            .collect(),
        None | Some(Value::Null) => Err(ApiError::invalid(
            Some(&param),
            format!("Missing required parameter: '{param}'."),
        )),
        Some(other) => Err(wrong_type(&param, "a string or an array", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<Parsed, ApiError> {
        let mut body = body;
        body["model"] = json!("m");
        serde_json::from_value::<ResponsesRequest>(body)
            .unwrap()
            .parse()
    }

    fn param(body: Value) -> String {
        match parse(body) {
            Err(e) => e.param.unwrap_or_default(),
            Ok(_) => "accepted".into(),
        }
    }

    #[test]
    fn input_becomes_items_and_messages() {
        let p = parse(json!({"input": "Hi"})).unwrap();
        assert_eq!(p.messages.len(), 1);
        assert_eq!(
            (p.messages[0].role.as_str(), p.messages[0].content.as_str()),
            ("user", "Hi")
        );
        assert_eq!(
            p.items[0]["content"][0],
            json!({"type": "input_text", "text": "Hi"})
        );
        assert!(p.items[0]["id"].as_str().unwrap().starts_with("msg_"));
        assert!(p.store);

        let p = parse(json!({"input": [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "One "}, {"type": "input_text", "text": "two"}]},
            {"id": "msg_kept", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Three", "annotations": []}]},
        ]}))
        .unwrap();
        let roles: Vec<_> = p.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(p.messages[1].content, "One two");
        assert_eq!(p.items[0]["role"], "developer");
        assert_eq!(p.items[2]["id"], "msg_kept");
        assert_eq!(p.items[2]["content"][0]["type"], "output_text");
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let image = json!({"type": "input_image", "image_url": "http://x/y.png"});
        let cases = [
            (json!({}), "input"),
            (json!({"input": 3}), "input"),
            (json!({"input": [{"role": "user"}]}), "input[0].content"),
            (
                json!({"input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"role": "user", "content": [image]}]}),
                "input[0].content[0]",
            ),
            (
                json!({"input": [{"type": "function_call_output", "output": "4"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": [{"type": "file_search_call", "id": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"input": "x", "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
                "text.format.name",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "function"},
                       "tools": [{"type": "function", "name": "f"}]}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning.effort",
            ),
            (
                json!({"input": "x", "background": true, "store": false}),
                "background",
            ),
            (
                json!({"input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"}),
                "conversation",
            ),
            (json!({"input": "x", "conversation": 3}), "conversation"),
            (json!({"input": "x", "conversation": {}}), "conversation.id"),
            (json!({"input": "x", "truncation": "middle"}), "truncation"),
            (
                json!({"input": "x", "include": ["everything"]}),
                "include[0]",
            ),
            (json!({"input": "x", "top_logprobs": 21}), "top_logprobs"),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "temperature": 3}), "temperature"),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata.k"),
            (
                json!({"input": "x", "metadata": (0..17).map(|i| (i.to_string(), json!("v"))).collect::<Map<_, _>>()}),
                "metadata",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(param(body.clone()), want, "{body}");
        }
        // Values that ask for nothing pass.
        for body in [
            json!({"input": "x", "tools": [], "tool_choice": "auto", "reasoning": {"effort": null}}),
            json!({"input": "x", "text": {"format": {"type": "text"}}, "background": false}),
            json!({"input": "x", "text": {"format": {"type": "json_object"}}}),
            json!({"input": "x", "text": {"format": {"type": "json_object"}},
                   "tools": [{"type": "function", "name": "f"}]}),
            json!({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c", "output": "4"}],
                   "tools": [{"type": "function", "name": "f"}], "tool_choice": "required"}),
            json!({"input": "x", "truncation": "auto", "include": ["reasoning.encrypted_content"]}),
            json!({"previous_response_id": "resp_1"}),
        ] {
            assert_eq!(param(body.clone()), "accepted", "{body}");
        }
    }

    #[test]
    fn logprobs_come_with_the_include_or_top_logprobs() {
        let wanted = |body| parse(body).unwrap().params.sampling.logprobs;
        assert_eq!(wanted(json!({"input": "x"})), None);
        assert_eq!(
            wanted(json!({"input": "x", "include": ["message.output_text.logprobs"]})),
            Some(0)
        );
        assert_eq!(wanted(json!({"input": "x", "top_logprobs": 3})), Some(3));
    }
}
