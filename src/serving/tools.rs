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
    let options: Vec<Value> = callable
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = json!({"anyOf": options, "x-guidance": compact_layout()});
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
        (ToolChoice::Auto, None) => {
            "start: calls | answer\nanswer: ANSWER?\nANSWER: /[^<][\\s\\S]*/".to_string()
        }
        _ => "start: calls".to_string(),
    };
    let lark = format!(
        "{start}\n{calls}\ncall: \"{CALL_OPEN}\\n\" body \"\\n{CALL_CLOSE}\"\nbody: %json {schema}\n"
    );
    OutputFormat {
        grammar: Grammar::Lark(lark),
        param: "tools".into(),
    }
}

/// The calls in `text`, when it is made of `<tool_call>` blocks (each holding a JSON object with
/// a string `name`); `None` for any other text. An output cut short (`cut`: it hit its token
/// limit) keeps the calls it completed, when it completed any.
pub fn parse_calls(text: &str, cut: bool) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim();
    if !rest.starts_with(CALL_OPEN) {
        return None;
    }
    let mut calls = Vec::new();
    while let Some(after) = rest.strip_prefix(CALL_OPEN) {
        let Some(call) = after.split_once(CALL_CLOSE).and_then(|(body, tail)| {
            let call: Value = serde_json::from_str(body.trim()).ok()?;
            Some((call, tail))
        }) else {
            break;
        };
        let (call, tail) = call;
        let name = call.get("name")?.as_str()?.to_string();
        let arguments = match call.get("arguments") {
            None | Some(Value::Null) => "{}".to_string(),
            Some(args) => args.to_string(),
        };
        calls.push(ToolCall { name, arguments });
        rest = tail.trim_start();
    }
    let whole =
        rest.is_empty() || (cut && (CALL_OPEN.starts_with(rest) || rest.starts_with(CALL_OPEN)));
    (whole && !calls.is_empty()).then_some(calls)
}

/// An assistant turn's calls, as the model would have written them.
pub fn render_calls(calls: &[ToolCall]) -> String {
    calls
        .iter()
        .map(|c| {
            let arguments: Value =
                serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone()));
            let body = json!({"name": c.name, "arguments": arguments});
            format!("{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A tool's result, as the user turn that hands it back.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
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
        assert_eq!(
            parse_calls("<tool_call>\n{\"name\": \"f\", \"argu", true),
            None
        );
        let no_name = "<tool_call>\n{\"arguments\": {}}\n</tool_call>";
        assert_eq!(parse_calls(no_name, false), None);
        let trailing = "<tool_call>\n{\"name\": \"f\"}\n</tool_call> and more";
        assert_eq!(parse_calls(trailing, false), None);
        assert_eq!(parse_calls(trailing, true), None);
    }

    #[test]
    fn an_output_cut_short_keeps_its_complete_calls() {
        let one = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let cut = format!("{one}\n<tool_call>\n{{\"name\": \"f\", \"argu");
        let calls = parse_calls(&cut, true).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, r#"{"a":1}"#);
        // Complete, the same text is not calls.
        assert_eq!(parse_calls(&cut, false), None);
        let barely = format!("{one}\n<tool_c");
        assert_eq!(parse_calls(&barely, true).map(|c| c.len()), Some(1));
    }
}
