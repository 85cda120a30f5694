//! OpenAI request and response bodies, and the validation that turns requests into serving's
//! typed parameters. Unknown request fields are accepted and ignored, as vLLM's server does; the
//! OpenAI fields this server does not act on yet (tools, `best_of`, `suffix`) are
//! refused with a 400 naming them wherever their value would change the answer, rather than
//! ignored.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use crate::sampling::SamplingParams;
use crate::serving::{tools, ChatMessage, GenParams, TurnEnd};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and legacy completions (copied out of each request, since
/// `#[serde(flatten)]` would lose the field paths that error messages name).
#[derive(Debug, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Generate until `max_tokens` even past end-of-sequence (for benchmarks).
    pub ignore_eos: Option<bool>,
}

macro_rules! sampling_fields {
    ($req:expr) => {
        SamplingFields {
            temperature: $req.temperature,
            top_p: $req.top_p,
            top_k: $req.top_k,
            min_p: $req.min_p,
            seed: $req.seed,
            stop: $req.stop.take(),
            n: $req.n,
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            repetition_penalty: $req.repetition_penalty,
            ignore_eos: $req.ignore_eos,
        }
    };
}

impl ChatCompletionRequest {
    pub fn sampling(&mut self) -> SamplingFields {
        sampling_fields!(self)
    }
}

impl CompletionRequest {
    pub fn sampling(&mut self) -> SamplingFields {
        sampling_fields!(self)
    }

    /// A 400 for each field the server cannot honour yet, unless its value asks for nothing:
    /// `best_of` beyond `n`, a `suffix`.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let n = self.n.unwrap_or(1);
        match self.best_of {
            Some(b) if b < n => {
                return Err(ApiError::invalid(
                    Some("best_of"),
                    format!("Invalid value for 'best_of': {b}; it must be at least n ({n})."),
                ))
            }
            Some(b) if b > n => {
                return Err(ApiError::invalid(
                    Some("best_of"),
                    format!(
                        "'best_of' greater than n ({b} > {n}) is not supported by this server."
                    ),
                ))
            }
            _ => {}
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                Some("suffix"),
                "'suffix' is not supported by this server.",
            ));
        }
        Ok(())
    }
}

/// Most tokens one `logit_bias` may name.
const MAX_LOGIT_BIAS: usize = 1024;

/// OpenAI's `logit_bias`, `{"token id": bias}` with each bias in [-100, 100], as (token, bias)
/// pairs; every id must be below `vocab`.
pub fn logit_bias(bias: &Option<Value>, vocab: u32) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match bias {
        None => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(wrong_type("logit_bias", "an object", other)),
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!(
                "Invalid value for 'logit_bias': {} tokens; at most {MAX_LOGIT_BIAS} may be biased.",
                map.len()
            ),
        ));
    }
    map.iter()
        .map(|(key, value)| {
            let token = key.trim().parse::<u32>().ok().filter(|&t| t < vocab);
            let Some(token) = token else {
                return Err(ApiError::invalid(
                    Some("logit_bias"),
                    format!(
                        "Invalid key in 'logit_bias': '{key}'; keys must be token ids below the \
                         vocabulary size ({vocab})."
                    ),
                ));
            };
            match value.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((token, b as f32)),
                _ => Err(ApiError::invalid(
                    Some("logit_bias"),
                    format!(
                        "Invalid value for 'logit_bias' token {key}: {value}; it must be a number \
                         between -100 and 100."
                    ),
                )),
            }
        })
        .collect()
}

/// Most `metadata` pairs, and the longest key and value, as OpenAI allows.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY: usize = 64;
const METADATA_VALUE: usize = 512;

/// The `metadata` of an update, which replaces the object's: required (`null` clears it).
pub fn new_metadata(value: Option<&Value>) -> Result<Value, ApiError> {
    match value {
        Some(given) => metadata(Some(given)),
        None => Err(ApiError::invalid(
            Some("metadata"),
            "Missing required parameter: 'metadata'.",
        )),
    }
}

/// `metadata`: at most 16 string values, keys up to 64 characters, values up to 512.
pub fn metadata(value: Option<&Value>) -> Result<Value, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(wrong_type("metadata", "an object", other)),
    };
    if map.len() > METADATA_PAIRS {
        return Err(ApiError::invalid(
            Some("metadata"),
            format!(
                "Invalid 'metadata': too many properties. Expected at most {METADATA_PAIRS}, but got {}.",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        if key.chars().count() > METADATA_KEY {
            return Err(ApiError::invalid(
                Some("metadata"),
                format!(
                    "Invalid 'metadata': key '{key}' is longer than {METADATA_KEY} characters."
                ),
            ));
        }
        match value {
            Value::String(s) if s.chars().count() <= METADATA_VALUE => {}
            Value::String(_) => {
                return Err(ApiError::invalid(
                    Some(&format!("metadata.{key}")),
                    format!("Invalid 'metadata.{key}': longer than {METADATA_VALUE} characters."),
                ))
            }
            other => return Err(wrong_type(&format!("metadata.{key}"), "a string", other)),
        }
    }
    Ok(Value::Object(map.clone()))
}

/// How a chat's prompt ends, from vLLM's `add_generation_prompt` and `continue_final_message`.
pub fn turn_end(
    add_generation_prompt: Option<bool>,
    continue_final: Option<bool>,
) -> Result<TurnEnd, ApiError> {
    match (continue_final, add_generation_prompt) {
        (Some(true), Some(true)) => Err(ApiError::invalid(
            Some("continue_final_message"),
            "'continue_final_message' and 'add_generation_prompt' cannot both be true: the \
             answer either goes on from the final message or opens a new turn.",
        )),
        (Some(true), _) => Ok(TurnEnd::Continued),
        (_, Some(false)) => Ok(TurnEnd::Closed),
        _ => Ok(TurnEnd::Open),
    }
}

/// OpenAI's message for a field of the wrong JSON type.
pub fn wrong_type(field: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(
        Some(field),
        format!("Invalid type for '{field}': expected {expected}, but got {got} instead."),
    )
}

fn check_range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::invalid(
            Some(param),
            format!("Invalid value for '{param}': {x} is out of range; it must be between {lo} and {hi}."),
        )),
        _ => Ok(()),
    }
}

impl SamplingFields {
    /// Validates the fields. `max_tokens` may come from another field (`max_completion_tokens`);
    /// `logprobs` is the validated number of alternatives, when wanted.
    pub fn to_params(
        &self,
        max_tokens: Option<(i64, &'static str)>,
        logprobs: Option<usize>,
    ) -> Result<(GenParams, usize), ApiError> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                "Invalid value for 'top_p': it must be greater than 0.",
            ));
        }
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        check_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    format!(
                    "Invalid value for 'top_k': {k}; it must be -1 (off) or a positive integer."
                ),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=128).contains(&n) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("Invalid value for 'n': {n}; it must be between 1 and 128."),
            ));
        }
        let max_tokens_param = max_tokens.map_or("", |(_, param)| param);
        let max_tokens = match max_tokens {
            Some((m, param)) if m < 1 => {
                return Err(ApiError::invalid(
                    Some(param),
                    format!("Invalid value for '{param}': {m}; it must be at least 1."),
                ))
            }
            Some((m, _)) => Some(m as usize),
            None => None,
        };
        let stop = self.stop.as_ref().map(|s| match s {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        });
        let stop = stop.unwrap_or_default();
        if stop.len() > 16 {
            return Err(ApiError::invalid(
                Some("stop"),
                "Invalid value for 'stop': at most 16 stop sequences are allowed.",
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            min_p: self.min_p.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            logprobs,
            logit_bias: Vec::new(),
        };
        let params = GenParams {
            sampling,
            max_tokens,
            max_tokens_param,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            priority: Default::default(),
            format: None,
            prompt_logprobs: None,
        };
        Ok((params, n as usize))
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Value>,
    /// An assistant turn's call in the deprecated function calling.
    pub function_call: Option<Value>,
    /// Kept with a stored completion's messages.
    pub name: Option<Value>,
    pub tool_call_id: Option<Value>,
}

impl RequestMessage {
    pub fn to_chat(&self, index: usize) -> Result<ChatMessage, ApiError> {
        const ROLES: [&str; 6] = [
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
            "function",
        ];
        if !ROLES.contains(&self.role.as_str()) {
            let param = format!("messages[{index}].role");
            return Err(ApiError::invalid(
                Some(&param),
                format!(
                    "Invalid value for '{param}': '{}'; expected one of {}.",
                    self.role,
                    ROLES.join(", ")
                ),
            ));
        }
        let content = match &self.content {
            // An assistant turn may be empty (one that only called tools, say); the others
            // say something.
            None if self.role == "assistant" => String::new(),
            None => {
                let param = format!("messages[{index}].content");
                return Err(ApiError::invalid(
                    Some(&param),
                    format!("Missing required parameter: '{param}'."),
                ));
            }
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            let param = format!("messages[{index}].content[{j}]");
                            return Err(ApiError::invalid(
                                Some(&param),
                                format!("Content part type '{}' is not supported by this model; only 'text' parts are.", p.kind),
                            ));
                        }
                    }
                }
                text
            }
        };
        // Templates know `system`; `developer` is OpenAI's newer name for it. Calls and their
        // results are written as the tool-calling format has the model read them.
        let (role, content) = match self.role.as_str() {
            "developer" => ("system", content),
            "tool" | "function" => ("user", tools::render_result(&content)),
            "assistant" => {
                let calls = match (&self.tool_calls, &self.function_call) {
                    (Some(calls), _) if !calls.is_null() => {
                        Some(super::tools::message_calls(index, calls)?)
                    }
                    (_, Some(call)) if !call.is_null() => {
                        Some(vec![super::tools::message_function_call(index, call)?])
                    }
                    _ => None,
                };
                match calls {
                    None => ("assistant", content),
                    Some(calls) if content.is_empty() => ("assistant", tools::render_calls(&calls)),
                    Some(calls) => {
                        let calls = tools::render_calls(&calls);
                        ("assistant", format!("{content}\n{calls}"))
                    }
                }
            }
            role => (role, content),
        };
        Ok(ChatMessage {
            role: role.to_string(),
            content,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    /// Keep the completion (see `stored_chat`), with `metadata`.
    pub store: Option<bool>,
    pub metadata: Option<Value>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's: close the last turn instead of opening the assistant's (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: answer by going on from the final assistant message's text.
    pub continue_final_message: Option<bool>,
    // The deprecated function calling (see `tools::legacy_functions`).
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    /// vLLM's structured outputs (see `formats::VllmGuided`).
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// See [`logit_bias`].
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    /// Legacy API: number of top alternatives per token.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    // Not acted on yet: see `refuse_unsupported`.
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    /// JSON output, as in chat (vLLM's extension of this API).
    pub response_format: Option<Value>,
    /// vLLM's structured outputs (see `formats::VllmGuided`).
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// See [`logit_bias`].
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached,
            }),
        }
    }
}
