//! Tools as requests give them: chat's `tools` (`{"type": "function", "function": {...}}`) and
//! the Responses API's (`{"type": "function", "name": ...}`), `tool_choice` in either shape, and
//! the calls and results that earlier turns hand back.

use serde_json::{json, Value};

use super::error::ApiError;
use super::formats::{self, missing};
use super::types::wrong_type;
use crate::engine::FinishReason;
use crate::serving::tools::{self, CallEvent, CallTracker, Tool, ToolCall, ToolChoice};
use crate::serving::{ChatMessage, Grammar, OutputFormat};

/// Which API's shapes a request uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Chat completions: a function's fields under `function`.
    Chat,
    /// The Responses API: a function's fields inline.
    Responses,
}

/// The tools a request lets the model call, validated.
pub struct ToolUse {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// False with `tool_choice: "none"`: the model is told of the tools (as vLLM and OpenAI
    /// tell it) but answers in text, unconstrained.
    pub calls: bool,
}

impl ToolUse {
    /// For an answer that goes on from the final assistant message's text (a prefill), which is
    /// text: with `auto` it goes on as text, free of the calls' grammar; a choice that requires
    /// a call cannot go on from text.
    pub fn continuing(&mut self) -> Result<(), ApiError> {
        match self.choice {
            _ if !self.calls => Ok(()),
            ToolChoice::Auto => {
                self.calls = false;
                Ok(())
            }
            _ => Err(ApiError::invalid(
                Some("tool_choice"),
                "A 'tool_choice' that requires a call cannot go on from the final assistant \
                 message's text; use 'auto' or 'none', or end the messages with another role.",
            )),
        }
    }

    /// `None` when there are no tools.
    pub fn parse(
        dialect: Dialect,
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, t)| tool(dialect, i, t))
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => return Err(wrong_type("tools", "an array", other)),
        };
        for (i, t) in tools.iter().enumerate() {
            if tools[..i].iter().any(|u| u.name == t.name) {
                return Err(ApiError::invalid(
                    Some(&format!("tools[{i}]")),
                    format!("Duplicate tool name '{}'.", t.name),
                ));
            }
        }
        let mut calls = true;
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => {
                    calls = false;
                    ToolChoice::Auto
                }
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        Some("tool_choice"),
                        format!(
                            "Invalid value for 'tool_choice': '{other}'; expected 'none', 'auto', \
                             'required' or a function."
                        ),
                    ))
                }
            },
            Some(named @ Value::Object(_)) => {
                let name = match dialect {
                    Dialect::Chat => named.pointer("/function/name"),
                    Dialect::Responses => named.get("name"),
                };
                match (
                    named.get("type").and_then(Value::as_str),
                    name.and_then(Value::as_str),
                ) {
                    (Some("function"), Some(name)) => ToolChoice::Named(name.to_string()),
                    _ => {
                        let shape = match dialect {
                            Dialect::Chat => r#"{"type": "function", "function": {"name": ...}}"#,
                            Dialect::Responses => r#"{"type": "function", "name": ...}"#,
                        };
                        return Err(ApiError::invalid(
                            Some("tool_choice"),
                            format!("Invalid value for 'tool_choice': expected {shape}."),
                        ));
                    }
                }
            }
            Some(other) => return Err(wrong_type("tool_choice", "a string or an object", other)),
        };
        if tools.is_empty() {
            return match choice {
                ToolChoice::Auto => Ok(None),
                _ => Err(ApiError::invalid(
                    Some("tool_choice"),
                    "'tool_choice' is only allowed when 'tools' are specified.",
                )),
            };
        }
        if let ToolChoice::Named(name) = &choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid(
                    Some("tool_choice"),
                    format!("Invalid value for 'tool_choice': no tool named '{name}' in 'tools'."),
                ));
            }
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: parallel.unwrap_or(true),
            calls,
        }))
    }

    /// The grammar of the answer when it may be calls, with the request's own output format
    /// (`format`, a JSON schema) for an answer that is not calls; `format` itself otherwise.
    pub fn grammar(&self, format: Option<OutputFormat>) -> Result<Option<OutputFormat>, ApiError> {
        if !self.calls {
            return Ok(format);
        }
        let answer = match &format {
            None => None,
            Some(OutputFormat {
                grammar: Grammar::JsonSchema(schema),
                ..
            }) => Some(schema),
            Some(other) => {
                return Err(ApiError::invalid(
                    Some(&other.param),
                    format!(
                        "'{}' cannot be combined with 'tools': only a JSON schema or JSON mode \
                         can; pass \"tool_choice\": \"none\" to use it.",
                        other.param
                    ),
                ))
            }
        };
        Ok(Some(tools::grammar(
            &self.tools,
            &self.choice,
            self.parallel,
            answer,
        )))
    }

    /// Describes the tools to the model: in the conversation's system message, or in one of its
    /// own ahead of it.
    pub fn instruct(&self, messages: &mut Vec<ChatMessage>) {
        let prompt = tools::system_prompt(&self.tools);
        match messages.first_mut() {
            Some(m) if m.role == "system" => {
                m.content = format!("{}\n\n{prompt}", m.content);
            }
            _ => messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: prompt,
                },
            ),
        }
    }
}

/// The deprecated `functions` and `function_call` of chat completions, as the `tools` and
/// `tool_choice` they stand for (one call an answer: they predate parallel calls). `None` when
/// the request has no functions.
pub fn legacy_functions(
    functions: Option<&Value>,
    function_call: Option<&Value>,
    tools: Option<&Value>,
) -> Result<Option<ToolUse>, ApiError> {
    let list = match functions {
        None | Some(Value::Null) => {
            return match function_call {
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(ApiError::invalid(
                    Some("function_call"),
                    "'function_call' is only allowed when 'functions' are specified.",
                )),
            }
        }
        Some(Value::Array(list)) => list,
        Some(other) => return Err(wrong_type("functions", "an array", other)),
    };
    if tools.is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid(
            Some("functions"),
            "'functions' and 'tools' cannot be used together: 'tools' replaces the deprecated \
             'functions'.",
        ));
    }
    let tools: Vec<Value> = list
        .iter()
        .map(|f| json!({"type": "function", "function": f}))
        .collect();
    let choice = match function_call {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "none" || s == "auto" => Some(json!(s)),
        Some(Value::Object(named)) => match named.get("name") {
            Some(Value::String(name)) => {
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            None => return Err(missing("function_call.name")),
            Some(other) => return Err(wrong_type("function_call.name", "a string", other)),
        },
        Some(other) => {
            return Err(ApiError::invalid(
                Some("function_call"),
                format!(
                    "Invalid value for 'function_call': {other}; expected \"none\", \"auto\" or \
                     {{\"name\": ...}}."
                ),
            ))
        }
    };
    ToolUse::parse(
        Dialect::Chat,
        Some(&Value::from(tools)),
        choice.as_ref(),
        Some(false),
    )
    .map_err(|mut e| {
        let Some(param) = e.param.take() else {
            return e;
        };
        // The fields as this request named them.
        let named = match param.strip_prefix("tools[") {
            Some(rest) => {
                let (i, tail) = rest.split_once(']').unwrap_or((rest, ""));
                let tail = tail.strip_prefix(".function").unwrap_or(tail);
                format!("functions[{i}]{tail}")
            }
            None => param.replace("tool_choice", "function_call"),
        };
        e.message = e
            .message
            .replace(&param, &named)
            .replace("'tools'", "'functions'");
        e.param = Some(named);
        e
    })
}

/// An answer with calls in the deprecated shape of `functions`: a message's (or a streamed
/// delta's) first call as its `function_call`, and `function_call` as the finish reason.
pub fn as_function_call(message: &mut Value, finish: Option<&'static str>) -> Option<&'static str> {
    let calls = message.as_object_mut().and_then(|m| m.remove("tool_calls"));
    // The first call's entries: one in a message; in a delta, its name and arguments may come
    // as several entries of index 0.
    let entries = calls
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let mut call = serde_json::Map::new();
    for entry in entries.filter(|c| c.get("index").is_none_or(|i| i.as_u64() == Some(0))) {
        if let Some(name) = entry.pointer("/function/name") {
            call.insert("name".into(), name.clone());
        }
        if let Some(Value::String(more)) = entry.pointer("/function/arguments") {
            match call.get_mut("arguments") {
                Some(Value::String(arguments)) => arguments.push_str(more),
                _ => drop(call.insert("arguments".into(), json!(more))),
            }
        }
    }
    if !call.is_empty() {
        message["function_call"] = Value::Object(call);
    }
    finish.map(|f| {
        if f == "tool_calls" {
            "function_call"
        } else {
            f
        }
    })
}

/// Joins the results of parallel calls, one user turn each as they come, into one turn: chat
/// templates that want user and assistant turns to alternate refuse two user turns in a row.
pub fn merge_tool_results(messages: &mut Vec<ChatMessage>) {
    let is_result = |m: &ChatMessage| m.role == "user" && m.content.starts_with(tools::RESULT_OPEN);
    let mut merged: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages.drain(..) {
        match merged.last_mut() {
            Some(last) if is_result(last) && is_result(&m) => {
                last.content.push('\n');
                last.content.push_str(&m.content);
            }
            _ => merged.push(m),
        }
    }
    *messages = merged;
}

fn tool(dialect: Dialect, i: usize, t: &Value) -> Result<Tool, ApiError> {
    let at = |field: &str| format!("tools[{i}].{field}");
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                Some(&at("type")),
                format!(
                    "Invalid value for '{}': '{other}'; this server calls function tools only.",
                    at("type")
                ),
            ))
        }
        None => return Err(missing(&at("type"))),
    }
    let (f, prefix) = match dialect {
        Dialect::Chat => match t.get("function") {
            Some(f @ Value::Object(_)) => (f, "function."),
            None | Some(Value::Null) => return Err(missing(&at("function"))),
            Some(other) => return Err(wrong_type(&at("function"), "an object", other)),
        },
        Dialect::Responses => (t, ""),
    };
    let name = formats::name(f, &at(&format!("{prefix}name")))?;
    let params_param = at(&format!("{prefix}parameters"));
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => return Err(wrong_type(&params_param, "an object", other)),
    };
    let description = f
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

/// Chat's `tool_calls` of an assistant message (`messages[i].tool_calls`), as the calls they
/// record.
pub fn message_calls(index: usize, value: &Value) -> Result<Vec<ToolCall>, ApiError> {
    let param = format!("messages[{index}].tool_calls");
    let Value::Array(list) = value else {
        return Err(wrong_type(&param, "an array", value));
    };
    list.iter()
        .enumerate()
        .map(|(j, call)| recorded_call(&format!("{param}[{j}].function"), call.get("function")))
        .collect()
}

/// The deprecated `function_call` of an assistant message (`messages[i].function_call`).
pub fn message_function_call(index: usize, value: &Value) -> Result<ToolCall, ApiError> {
    recorded_call(&format!("messages[{index}].function_call"), Some(value))
}

/// A call an earlier turn made, `{"name", "arguments"}` (`at` names it in errors).
fn recorded_call(at: &str, function: Option<&Value>) -> Result<ToolCall, ApiError> {
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
    let arguments = match function.and_then(|f| f.get("arguments")) {
        Some(Value::String(s)) => Some(s.clone()),
        None | Some(Value::Null) => Some("{}".to_string()),
        Some(_) => None,
    };
    match (name, arguments) {
        (Some(name), Some(arguments)) => Ok(ToolCall {
            name: name.to_string(),
            arguments,
        }),
        _ => Err(ApiError::invalid(
            Some(at),
            format!(
                "Invalid value for '{at}': expected {{\"name\": string, \"arguments\": string}}."
            ),
        )),
    }
}

/// OpenAI's id for a call: `call_` and 24 random characters.
pub fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

/// Chat's `tool_calls` for the calls of one answer; a stream's deltas number them (`index`).
pub fn chat_calls(calls: &[ToolCall], numbered: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if numbered {
                call["index"] = json!(i);
            }
            call
        })
        .collect()
}

/// A chat message's fields for one answer: its text, or its calls when the text is calls.
pub fn chat_answer(text: String, finish: FinishReason) -> (Value, &'static str) {
    match tools::parse_calls(&text, finish == FinishReason::Length) {
        Some(calls) => (
            json!({"role": "assistant", "content": null, "tool_calls": chat_calls(&calls, false)}),
            calls_finish(finish),
        ),
        None => (
            json!({"role": "assistant", "content": text}),
            finish.as_str(),
        ),
    }
}

/// The finish reason of an answer that is calls: `length` when the limit cut it short.
fn calls_finish(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "tool_calls",
        FinishReason::Length => "length",
    }
}

/// One streamed chat choice whose answer may be calls. The grammar lets an answer with tools
/// start with `<` only when it is calls, so text is streamed as soon as its first character is
/// not `<`; calls are streamed as OpenAI streams them: each call's id and name once its name is
/// whole, then its arguments as they grow.
#[derive(Default)]
pub struct CallStream {
    held: String,
    text: bool,
    calls: CallTracker,
}

impl CallStream {
    /// The delta to send for a chunk (`{}` for none) and the finish reason to report.
    pub fn push(
        &mut self,
        text: &str,
        finish: Option<FinishReason>,
    ) -> (Value, Option<&'static str>) {
        let content = |t: &str| {
            if t.is_empty() {
                json!({})
            } else {
                json!({"content": t})
            }
        };
        if self.text {
            return (content(text), finish.map(FinishReason::as_str));
        }
        self.held.push_str(text);
        if !self.held.is_empty() && !self.held.starts_with('<') {
            self.text = true;
            let held = std::mem::take(&mut self.held);
            return (content(&held), finish.map(FinishReason::as_str));
        }
        let deltas: Vec<Value> = self
            .calls
            .update(&self.held)
            .into_iter()
            .map(|event| match event {
                CallEvent::Start { index, name } => json!({
                    "index": index, "id": call_id(), "type": "function",
                    "function": {"name": name, "arguments": ""},
                }),
                CallEvent::Arguments { index, delta } => {
                    json!({"index": index, "function": {"arguments": delta}})
                }
            })
            .collect();
        let delta = if deltas.is_empty() {
            json!({})
        } else {
            json!({"tool_calls": deltas})
        };
        let Some(finish) = finish else {
            return (delta, None);
        };
        if self.calls.started() == 0 {
            // Nothing that reads as a call: the text as it is.
            return (content(&self.held), Some(finish.as_str()));
        }
        let cut = finish == FinishReason::Length;
        let reason = match tools::parse_calls(&self.held, cut) {
            Some(_) => calls_finish(finish),
            None => finish.as_str(),
        };
        (delta, Some(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_in_the_deprecated_shape_joins_the_pieces_of_its_first_call() {
        // A delta that holds the call's start and the first of its arguments.
        let mut delta = json!({"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
            {"index": 0, "function": {"arguments": "{\"a\""}},
        ]});
        assert_eq!(as_function_call(&mut delta, None), None);
        assert_eq!(
            delta,
            json!({"function_call": {"name": "f", "arguments": "{\"a\""}})
        );
        let mut message = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ]});
        assert_eq!(
            as_function_call(&mut message, Some("tool_calls")),
            Some("function_call")
        );
        assert_eq!(
            message,
            json!({"role": "assistant", "content": null,
                   "function_call": {"name": "f", "arguments": "{}"}})
        );
        let mut text = json!({"content": "hi"});
        assert_eq!(as_function_call(&mut text, Some("stop")), Some("stop"));
        assert_eq!(text, json!({"content": "hi"}));
    }

    #[test]
    fn functions_stand_for_tools_and_errors_name_them() {
        let functions = json!([{"name": "f", "parameters": {"type": "object"}}]);
        let named = json!({"name": "f"});
        let uses = legacy_functions(Some(&functions), Some(&named), None)
            .unwrap()
            .unwrap();
        assert_eq!(uses.tools[0].name, "f");
        assert!(matches!(uses.choice, ToolChoice::Named(ref n) if n == "f"));
        assert!(!uses.parallel);
        let param = |functions: Value, call: Option<Value>| {
            legacy_functions(Some(&functions), call.as_ref(), None)
                .err()
                .and_then(|e| e.param)
        };
        assert_eq!(
            param(json!([{"description": "x"}]), None).as_deref(),
            Some("functions[0].name")
        );
        assert_eq!(
            param(json!([{"name": "f", "parameters": 3}]), None).as_deref(),
            Some("functions[0].parameters")
        );
        assert_eq!(
            param(functions.clone(), Some(json!({"name": "g"}))).as_deref(),
            Some("function_call")
        );
        assert!(legacy_functions(None, None, None).unwrap().is_none());
    }
}
