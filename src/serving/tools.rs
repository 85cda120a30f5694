//! Tool calling on any chat model: the tools are described to the model in a system message,
//! and a grammar makes each call it writes a well-formed `<tool_call>` block whose JSON names one
//! of the tools and whose `arguments` follow that tool's parameter schema.
//!
//! One format for every model (the one Hermes- and Qwen-style models are trained on) keeps the
//! path the same whatever the chat template knows; the grammar, not the model's training, is what
//! guarantees that a call parses.

use serde_json::{json, Value};

use super::structured::{compact_layout, Grammar, OutputFormat};

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";
pub const RESULT_OPEN: &str = "<tool_response>";

/// A function the model may call.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments object.
    pub parameters: Value,
}

/// When the model calls tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// It decides: an answer, or calls.
    Auto,
    /// At least one call.
    Required,
    /// One call of this tool.
    Named(String),
}

/// A call the model wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// The system message that lists the tools and says how to call them.
pub fn system_prompt(tools: &[Tool]) -> String {
    let mut out = String::from(
        "You can call functions to help answer. These are the functions, as JSON schemas, \
         between <tools> and </tools>:\n<tools>\n",
    );
    for t in tools {
        let mut function = json!({"name": t.name, "parameters": t.parameters});
        if let Some(d) = &t.description {
            function["description"] = json!(d);
        }
        out.push_str(&json!({"type": "function", "function": function}).to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\nTo call a function, answer with one block per call, each with the function's \
         name and its arguments as JSON:\n<tool_call>\n{\"name\": \"function name\", \
         \"arguments\": {\"argument\": \"value\"}}\n</tool_call>",
    );
    out
}

/// The grammar of the output: calls only, or (with `Auto`) either calls or an answer: JSON valid
/// against `answer` when given (a structured output's schema), else text that does not start
/// with `<`. Without `parallel`, at most one call.
pub fn grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    answer: Option<&Value>,
) -> OutputFormat {
    let callable: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    // One JSON grammar per tool, each with the tool's definitions at its root, where the
    // references of its parameter schema (as Pydantic writes them) look for them.
    let bodies: Vec<String> = callable
        .iter()
        .enumerate()
        .map(|(i, t)| format!("body_{i}: %json {}", call_schema(t)))
        .collect();
    let body = (0..bodies.len())
        .map(|i| format!("body_{i}"))
        .collect::<Vec<_>>()
        .join(" | ");
    let calls = if parallel && !matches!(choice, ToolChoice::Named(_)) {
        "calls: call (\"\\n\" call)*"
    } else {
        "calls: call"
    };
    let start = match (choice, answer) {
        (ToolChoice::Auto, Some(schema)) => {
            let mut schema = schema.clone();
            if let Value::Object(map) = &mut schema {
                map.entry("x-guidance").or_insert_with(compact_layout);
            }
            format!("start: calls | answer\nanswer: %json {schema}")
        }
        // An answer starts with neither `<` nor a space: the first character tells an answer
        // from calls.
        (ToolChoice::Auto, None) => {
            "start: calls | answer\nanswer: ANSWER?\nANSWER: /[^<\\s][\\s\\S]*/".to_string()
        }
        _ => "start: calls".to_string(),
    };
    let lark = format!(
        "{start}\n{calls}\ncall: \"{CALL_OPEN}\\n\" body \"\\n{CALL_CLOSE}\"\nbody: {body}\n{}\n",
        bodies.join("\n")
    );
    OutputFormat {
        grammar: Grammar::Lark(lark),
        param: "tools".into(),
    }
}

/// The schema of one call of `tool`: `{"name": its name, "arguments": its parameters}`. The
/// parameters' `$defs` and `definitions` move to the root, and their references to the root
/// itself or below it (`#`, `#/properties/...`) are pointed at the arguments.
fn call_schema(tool: &Tool) -> Value {
    let mut parameters = tool.parameters.clone();
    let mut root = json!({
        "type": "object",
        "required": ["name", "arguments"],
        "additionalProperties": false,
        "x-guidance": compact_layout(),
    });
    if let Value::Object(map) = &mut parameters {
        for key in ["$defs", "definitions"] {
            if let Some(defs) = map.remove(key) {
                root[key] = defs;
            }
        }
    }
    root["properties"] = json!({"name": {"const": tool.name}, "arguments": parameters});
    rebase_refs(&mut root);
    root
}

/// Points the references into the parameters' own root at `#/properties/arguments`.
fn rebase_refs(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(r) if key == "$ref" => {
                        let inside = r == "#"
                            || r.starts_with("#/properties/")
                            || r.starts_with("#/items")
                            || r.starts_with("#/anyOf")
                            || r.starts_with("#/oneOf")
                            || r.starts_with("#/allOf");
                        if inside {
                            *r = format!("#/properties/arguments{}", &r[1..]);
                        }
                    }
                    other => rebase_refs(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rebase_refs),
        _ => {}
    }
}

/// A call as far as a stream has written it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialCall {
    pub name: String,
    /// The arguments' JSON text so far, as the model wrote it.
    pub arguments: String,
    /// The arguments and the call's block are closed.
    pub complete: bool,
}

/// The start of a call's JSON, up to its name, and what comes between the name and the
/// arguments, in the layout the grammar writes (see `grammar`) and `render_calls` renders.
const NAME_OPEN: &str = "{\"name\": \"";
const ARGUMENTS: &str = "\", \"arguments\": ";
const BODY_CLOSE: &str = "}\n";

/// The calls in `text` (an answer's text so far, starting with `<tool_call>`) as far as they
/// go: each with its name once written whole and its arguments so far; and how many bytes the
/// complete ones take. It reads the grammar's layout, so it can follow a stream token by token.
pub fn scan_calls(text: &str) -> (Vec<PartialCall>, usize) {
    let mut calls = Vec::new();
    let mut consumed = 0;
    let mut rest = text;
    while let Some(r) = rest
        .strip_prefix(CALL_OPEN)
        .and_then(|r| r.strip_prefix('\n'))
        .and_then(|r| r.strip_prefix(NAME_OPEN))
    {
        // Names are letters, digits, `_` and `-`: the first quote ends one.
        let Some(end) = r.find('"') else { break };
        let name = r[..end].to_string();
        let Some(r) = r[end..].strip_prefix(ARGUMENTS) else {
            calls.push(PartialCall {
                name,
                arguments: String::new(),
                complete: false,
            });
            break;
        };
        let (len, closed) = json_prefix_len(r);
        let closing = format!("{BODY_CLOSE}{CALL_CLOSE}");
        let tail = closed
            .then(|| r[len..].strip_prefix(closing.as_str()))
            .flatten();
        calls.push(PartialCall {
            name,
            arguments: r[..len].to_string(),
            complete: tail.is_some(),
        });
        let Some(tail) = tail else { break };
        consumed = text.len() - tail.len();
        rest = tail.strip_prefix('\n').unwrap_or(tail);
    }
    (calls, consumed)
}

/// What a stream of calls adds as it grows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEvent {
    /// Call `index` has its name.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments.
    Arguments { index: usize, delta: String },
}

/// Follows the calls of a streamed answer: feed it the whole text so far, and it says what is
/// new since the last time.
#[derive(Default)]
pub struct CallTracker {
    /// Per call started: the bytes of its arguments reported.
    sent: Vec<usize>,
}

impl CallTracker {
    pub fn update(&mut self, text: &str) -> Vec<CallEvent> {
        let (calls, _) = scan_calls(text);
        let mut events = Vec::new();
        for (index, call) in calls.into_iter().enumerate() {
            if index == self.sent.len() {
                events.push(CallEvent::Start {
                    index,
                    name: call.name,
                });
                self.sent.push(0);
            }
            let sent = self.sent[index];
            if call.arguments.len() > sent {
                events.push(CallEvent::Arguments {
                    index,
                    delta: call.arguments[sent..].to_string(),
                });
                self.sent[index] = call.arguments.len();
            }
        }
        events
    }

    /// Calls started so far.
    pub fn started(&self) -> usize {
        self.sent.len()
    }
}

/// How many bytes of `s` the JSON value it starts with takes so far, and whether it is closed.
/// Strings are skipped whole (their escapes too), so only brackets outside them count.
fn json_prefix_len(s: &str) -> (usize, bool) {
    let (mut depth, mut in_string, mut escaped) = (0i32, false, false);
    for (i, b) in s.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth <= 0 {
                    return (i + 1, true);
                }
            }
            _ => {}
        }
    }
    (s.len(), false)
}

/// The calls in `text`, when it is made of `<tool_call>` blocks; `None` for any other text. An
/// output cut short (`cut`: it hit its token limit) gives the calls it started, the last one's
/// arguments perhaps cut too (as a stream of it has sent them).
pub fn parse_calls(text: &str, cut: bool) -> Option<Vec<ToolCall>> {
    if !text.starts_with(CALL_OPEN) {
        return None;
    }
    let (scanned, consumed) = scan_calls(text);
    let whole = text[consumed..].trim_end().is_empty()
        && scanned.iter().all(|c| {
            c.complete && serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object())
        });
    let calls: Vec<ToolCall> = scanned
        .into_iter()
        .map(|c| ToolCall {
            name: c.name,
            arguments: c.arguments,
        })
        .collect();
    ((whole || cut) && !calls.is_empty()).then_some(calls)
}

/// An assistant turn's calls, as the model would have written them.
pub fn render_calls(calls: &[ToolCall]) -> String {
    calls
        .iter()
        .map(|c| {
            // Arguments that are not a JSON object are passed on as a string.
            let arguments = match serde_json::from_str::<Value>(&c.arguments) {
                Ok(v @ Value::Object(_)) => v.to_string(),
                _ => Value::String(c.arguments.clone()).to_string(),
            };
            let name = Value::String(c.name.clone());
            format!("{CALL_OPEN}\n{{\"name\": {name}, \"arguments\": {arguments}{BODY_CLOSE}{CALL_CLOSE}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A tool's result, as the user turn that hands it back.
pub fn render_result(content: &str) -> String {
    format!("{RESULT_OPEN}\n{content}\n</tool_response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_through_their_rendering() {
        let calls = vec![
            ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            ToolCall {
                name: "now".into(),
                arguments: "{}".into(),
            },
        ];
        assert_eq!(parse_calls(&render_calls(&calls), false), Some(calls));
    }

    #[test]
    fn answers_and_cut_calls_are_not_calls() {
        assert_eq!(parse_calls("Paris is sunny.", false), None);
        let started = "<tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(parse_calls(started, false), None);
        // Cut short, it is the call a stream has begun to send: a name, no arguments yet.
        let begun = parse_calls(started, true).unwrap();
        assert_eq!(
            (begun[0].name.as_str(), begun[0].arguments.as_str()),
            ("f", "")
        );
        assert_eq!(parse_calls("<tool_call>\n{\"na", true), None);
        let no_name = "<tool_call>\n{\"arguments\": {}}\n</tool_call>";
        assert_eq!(parse_calls(no_name, false), None);
        let trailing = "<tool_call>\n{\"name\": \"f\"}\n</tool_call> and more";
        assert_eq!(parse_calls(trailing, false), None);
    }

    #[test]
    fn a_stream_of_calls_is_followed_as_it_grows() {
        let text = concat!(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par}is\\\"\", \"n\": [1, {\"a\": 2}]}}\n</tool_call>\n",
            "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"
        );
        let mut last: Vec<PartialCall> = Vec::new();
        for end in (0..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let (calls, _) = scan_calls(&text[..end]);
            // Names appear whole; arguments only grow.
            for (i, c) in calls.iter().enumerate() {
                assert!(["get_weather", "now"].contains(&c.name.as_str()), "{c:?}");
                if let Some(before) = last.get(i) {
                    assert!(
                        c.arguments.starts_with(&before.arguments),
                        "{before:?} then {c:?}"
                    );
                }
            }
            last = calls;
        }
        let (calls, consumed) = scan_calls(text);
        assert_eq!(consumed, text.len());
        assert!(calls.iter().all(|c| c.complete));
        assert_eq!(
            calls[0].arguments,
            r#"{"city": "Par}is\"", "n": [1, {"a": 2}]}"#
        );
        assert_eq!(calls[1].arguments, "{}");
        assert_eq!(parse_calls(text, false).map(|c| c.len()), Some(2));
    }

    #[test]
    fn an_output_cut_short_gives_the_calls_it_started() {
        let one = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let cut = format!("{one}\n<tool_call>\n{{\"name\": \"g\", \"arguments\": {{\"b\": ");
        let calls = parse_calls(&cut, true).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, r#"{"a": 1}"#);
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("g", r#"{"b": "#)
        );
        // Not cut, the same text is not calls.
        assert_eq!(parse_calls(&cut, false), None);
    }
}
