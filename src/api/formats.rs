//! Output formats as requests name them: OpenAI's `response_format` (chat and completions) and
//! `text.format` (responses), and vLLM's `structured_outputs` (`json`, `regex`, `choice`,
//! `grammar`) with its older `guided_*` fields, each turned into serving's [`OutputFormat`].

use serde_json::{json, Value};

use super::error::ApiError;
use super::types::wrong_type;
use crate::serving::{Grammar, OutputFormat};

/// `response_format`: `text` (or absent), `json_object`, or `json_schema` with its schema under
/// `json_schema.schema`.
pub fn response_format(value: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    const FIELD: &str = "response_format";
    let format = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(format @ Value::Object(_)) => format,
        Some(other) => return Err(wrong_type(FIELD, "an object", other)),
    };
    match format_type(FIELD, format)? {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputFormat::json_object(FIELD))),
        _ => {
            let param = "response_format.json_schema";
            match format.get("json_schema") {
                Some(spec @ Value::Object(_)) => named_schema(param, spec).map(Some),
                None | Some(Value::Null) => Err(missing(param)),
                Some(other) => Err(wrong_type(param, "an object", other)),
            }
        }
    }
}

/// The Responses API's `text.format`: the same types, with the schema's fields inline.
pub fn text_format(format: &Value) -> Result<Option<OutputFormat>, ApiError> {
    const FIELD: &str = "text.format";
    if !format.is_object() {
        return Err(wrong_type(FIELD, "an object", format));
    }
    match format_type(FIELD, format)? {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputFormat::json_object(FIELD))),
        _ => named_schema(FIELD, format).map(Some),
    }
}

fn format_type<'a>(field: &str, format: &'a Value) -> Result<&'a str, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some(kind @ ("text" | "json_object" | "json_schema")) => Ok(kind),
        _ => {
            let param = format!("{field}.type");
            Err(ApiError::invalid(
                Some(&param),
                format!(
                    "Invalid value for '{param}': expected 'text', 'json_object' or 'json_schema'."
                ),
            ))
        }
    }
}

/// A `{name, schema, strict, description}` object; `param` names it in errors.
fn named_schema(param: &str, spec: &Value) -> Result<OutputFormat, ApiError> {
    name(spec, &format!("{param}.name"))?;
    let schema_param = format!("{param}.schema");
    match spec.get("schema") {
        // OpenAI's schema is optional: without one, any JSON object.
        None | Some(Value::Null) => Ok(OutputFormat::json_object(&schema_param)),
        Some(schema @ (Value::Object(_) | Value::Bool(true))) => {
            Ok(OutputFormat::json_schema(schema.clone(), &schema_param))
        }
        Some(other) => Err(wrong_type(&schema_param, "an object", other)),
    }
}

pub fn missing(param: &str) -> ApiError {
    ApiError::invalid(
        Some(param),
        format!("Missing required parameter: '{param}'."),
    )
}

/// The required `name` of `object` (a schema's or a function's), as OpenAI restricts it:
/// 1 to 64 letters, digits, underscores or dashes; `param` names it in errors.
pub fn name(object: &Value, param: &str) -> Result<String, ApiError> {
    let name = match object.get("name") {
        Some(Value::String(name)) => name,
        None | Some(Value::Null) => return Err(missing(param)),
        Some(other) => return Err(wrong_type(param, "a string", other)),
    };
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "Invalid '{param}': '{name}'. Expected a string of 1 to 64 letters, digits, \
                 underscores or dashes."
            ),
        ));
    }
    Ok(name.clone())
}

/// vLLM's structured-output fields, for its users' requests to carry over.
#[derive(Debug, Default)]
pub struct VllmGuided {
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
}

/// The vLLM fields of a request, taken out of it.
#[macro_export]
macro_rules! vllm_guided {
    ($req:expr) => {
        $crate::api::formats::VllmGuided {
            structured_outputs: $req.structured_outputs.take(),
            guided_json: $req.guided_json.take(),
            guided_regex: $req.guided_regex.take(),
            guided_choice: $req.guided_choice.take(),
            guided_grammar: $req.guided_grammar.take(),
        }
    };
}

/// The output format of a chat or completions request: `response_format` or vLLM's fields, not
/// both.
pub fn request_format(
    openai: Option<&Value>,
    vllm: VllmGuided,
) -> Result<Option<OutputFormat>, ApiError> {
    match (response_format(openai)?, vllm.format()?) {
        (Some(_), Some(other)) => Err(ApiError::invalid(
            Some(&other.param),
            format!(
                "'{}' cannot be combined with 'response_format'.",
                other.param
            ),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

impl VllmGuided {
    /// The one format these fields ask for, if any; more than one is a 400.
    pub fn format(&self) -> Result<Option<OutputFormat>, ApiError> {
        let mut found = Vec::new();
        if let Some(Value::Object(so)) = &self.structured_outputs {
            // vLLM's options of a format, not formats: they change nothing here.
            const OPTIONS: [&str; 4] = [
                "disable_any_whitespace",
                "disable_additional_properties",
                "disable_fallback",
                "whitespace_pattern",
            ];
            for (key, value) in so {
                if !value.is_null() && !OPTIONS.contains(&key.as_str()) {
                    found.push((format!("structured_outputs.{key}"), key.as_str(), value));
                }
            }
        } else if let Some(
            other @ (Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_)),
        ) = &self.structured_outputs
        {
            return Err(wrong_type("structured_outputs", "an object", other));
        }
        for (name, kind, value) in [
            ("guided_json", "json", &self.guided_json),
            ("guided_regex", "regex", &self.guided_regex),
            ("guided_choice", "choice", &self.guided_choice),
            ("guided_grammar", "grammar", &self.guided_grammar),
        ] {
            if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
                found.push((name.to_string(), kind, value));
            }
        }
        match found.as_slice() {
            [] => Ok(None),
            [(param, kind, value)] => guided(param, kind, value).map(Some),
            [_, (param, ..), ..] => Err(ApiError::invalid(
                Some(param),
                "Only one kind of structured output (json, regex, choice or grammar) may be \
                 given.",
            )),
        }
    }
}

fn guided(param: &str, kind: &str, value: &Value) -> Result<OutputFormat, ApiError> {
    let grammar = match (kind, value) {
        ("json", Value::Object(_)) => Grammar::JsonSchema(value.clone()),
        // vLLM accepts the schema as a JSON string too.
        ("json", Value::String(s)) => {
            Grammar::JsonSchema(serde_json::from_str(s).map_err(|e| {
                ApiError::invalid(Some(param), format!("'{param}' is not valid JSON: {e}"))
            })?)
        }
        ("json_object", Value::Bool(true)) => Grammar::JsonSchema(json!({"type": "object"})),
        ("regex", Value::String(rx)) => Grammar::Regex(rx.clone()),
        ("choice", Value::Array(items)) if !items.is_empty() => {
            let choices = items
                .iter()
                .map(|c| c.as_str().map(|s| Value::String(s.to_string()).to_string()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| wrong_type(param, "an array of strings", value))?;
            Grammar::Lark(format!("start: {}", choices.join(" | ")))
        }
        ("grammar", Value::String(lark)) => Grammar::Lark(lark.clone()),
        ("json" | "json_object" | "regex" | "choice" | "grammar", _) => {
            return Err(ApiError::invalid(
                Some(param),
                format!("Invalid value for '{param}'."),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "Unknown structured output '{param}': expected json, json_object, regex, \
                     choice or grammar."
                ),
            ))
        }
    };
    Ok(OutputFormat {
        grammar,
        param: param.to_string(),
    })
}
