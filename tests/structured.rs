//! Structured output and tool calling through the real HTTP server and engine: JSON schemas,
//! JSON mode, vLLM's choice and regex, tool calls in chat and the Responses API (forced, named,
//! streamed, and handed back in the next turn) and the deprecated `functions`, each checked on
//! what the real model wrote.

#[macro_use]
mod common;

use common::platform::call;
use common::{chat, post, shared, CHAT};
use serde_json::{json, Value};

const CHAT_PATH: &str = "/v1/chat/completions";

fn content(r: &Value) -> &str {
    r["choices"][0]["message"]["content"].as_str().unwrap()
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                           "required": ["timezone"], "additionalProperties": false}}}
    ])
}

/// Checks a call against `weather_tools`' schemas.
fn check_call(name: &str, arguments: &str) {
    let args: Value = serde_json::from_str(arguments).unwrap();
    let keys: Vec<&String> = args.as_object().unwrap().keys().collect();
    match name {
        "get_weather" => {
            assert_eq!(keys, ["city", "unit"], "{arguments}");
            assert!(args["city"].is_string());
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        }
        "get_time" => {
            assert_eq!(keys, ["timezone"], "{arguments}");
            assert!(args["timezone"].is_string());
        }
        other => panic!("a call of an unknown tool {other}"),
    }
}

#[tokio::test]
async fn a_json_schema_shapes_the_answer_streamed_or_not_and_leaves_other_requests_alone() {
    let base = &shared().base;
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "mood": {"type": "string", "enum": ["happy", "sad"]}},
        "required": ["name", "age", "mood"], "additionalProperties": false});
    let body = chat(
        "Alice is 30 and cheerful. Describe her.",
        json!({"temperature": 0, "max_tokens": 60, "response_format": {"type": "json_schema",
               "json_schema": {"name": "person", "strict": true, "schema": schema}}}),
    );
    let plain = chat(
        "What is the capital of France?",
        json!({"temperature": 0, "max_tokens": 24}),
    );
    let (_, alone) = post(base, CHAT_PATH, plain.clone()).await;
    // The constrained request shares engine steps with a plain one, whose answer must not change.
    let ((status, r), (_, beside)) = tokio::join!(
        post(base, CHAT_PATH, body.clone()),
        post(base, CHAT_PATH, plain)
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(content(&beside), content(&alone));
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let person: Value = serde_json::from_str(content(&r)).unwrap();
    let keys: Vec<&String> = person.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["name", "age", "mood"], "{person}");
    assert!(person["name"].is_string() && person["age"].is_i64());
    assert!(["happy", "sad"].contains(&person["mood"].as_str().unwrap()));

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (events, done) = common::stream(base, CHAT_PATH, streamed).await;
    assert!(done);
    assert_eq!(common::stream_text(&events), content(&r));
}

#[tokio::test]
async fn json_mode_choice_and_regex_hold_on_chat_and_completions() {
    let base = &shared().base;
    let (status, r) = post(
        base,
        CHAT_PATH,
        chat(
            "List three colors.",
            json!({"temperature": 0, "max_tokens": 100, "response_format": {"type": "json_object"}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let object: Value = serde_json::from_str(content(&r)).unwrap();
    assert!(object.is_object(), "{object}");

    // With tools the model may call, an answer that is not calls still follows the schema.
    let (status, r) = post(
        base,
        CHAT_PATH,
        chat(
            "Alice is 30. Describe her.",
            json!({"temperature": 0, "max_tokens": 100, "tools": weather_tools(),
                   "parallel_tool_calls": false,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
                       "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                       "required": ["name", "age"], "additionalProperties": false}}}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let message = &r["choices"][0]["message"];
    assert_eq!(
        r["choices"][0]["finish_reason"],
        if message["tool_calls"].is_array() {
            "tool_calls"
        } else {
            "stop"
        },
        "{r}"
    );
    match message["tool_calls"].as_array() {
        Some(calls) => calls.iter().for_each(|c| {
            check_call(
                c["function"]["name"].as_str().unwrap(),
                c["function"]["arguments"].as_str().unwrap(),
            )
        }),
        None => {
            let person: Value = serde_json::from_str(message["content"].as_str().unwrap()).unwrap();
            assert!(
                person["name"].is_string() && person["age"].is_i64(),
                "{person}"
            );
        }
    }

    for temperature in [0.0, 1.0] {
        let (_, r) = post(
            base,
            CHAT_PATH,
            chat(
                "Is the sky blue?",
                json!({"temperature": temperature, "max_tokens": 10,
                       "structured_outputs": {"choice": ["yes", "no", "maybe"]}}),
            ),
        )
        .await;
        assert!(["yes", "no", "maybe"].contains(&content(&r)), "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    let (status, r) = post(
        base,
        "/v1/completions",
        json!({"model": CHAT, "prompt": "Call me at ", "temperature": 0.8, "seed": 7,
               "max_tokens": 30, "guided_regex": r"\(\d{3}\) \d{3}-\d{4}"}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    let shape: String = text
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert_eq!(shape, "(999) 999-9999", "{text}");
}

#[tokio::test]
async fn forced_and_named_tool_calls_follow_the_tools_schemas_and_continue_the_conversation() {
    let base = &shared().base;
    let question = "What is the weather in Paris?";
    let (status, r) = post(
        base,
        CHAT_PATH,
        chat(
            question,
            json!({"temperature": 0, "max_tokens": 80, "tools": weather_tools(),
                   "tool_choice": "required", "parallel_tool_calls": false}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    assert!(choice["message"]["content"].is_null());
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["type"], "function");
    let call = &calls[0]["function"];
    check_call(
        call["name"].as_str().unwrap(),
        call["arguments"].as_str().unwrap(),
    );

    // Named: that tool, streamed as one delta that agrees with the unstreamed call.
    let named = json!({"temperature": 0, "max_tokens": 80, "tools": weather_tools(),
                       "tool_choice": {"type": "function", "function": {"name": "get_time"}}});
    let (_, whole) = post(base, CHAT_PATH, chat(question, named.clone())).await;
    let whole_call = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(whole_call["name"], "get_time");
    check_call("get_time", whole_call["arguments"].as_str().unwrap());
    let mut streamed = chat(question, named);
    streamed["stream"] = json!(true);
    streamed["store"] = json!(true);
    let (events, done) = common::stream(base, CHAT_PATH, streamed).await;
    assert!(done);
    // The call streams as OpenAI streams one: its id and name first, then its arguments in
    // pieces that add up to the unstreamed call's.
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"].get("tool_calls"))
        .flat_map(|calls| calls.as_array().unwrap())
        .collect();
    assert!(deltas.len() > 2, "{events:?}");
    assert!(deltas.iter().all(|d| d["index"] == 0));
    assert_eq!(deltas[0]["function"]["name"], whole_call["name"]);
    assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
    assert!(deltas[1..].iter().all(|d| d.get("id").is_none()));
    let arguments: String = deltas
        .iter()
        .map(|d| d["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(arguments, whole_call["arguments"].as_str().unwrap());
    // Kept whole (`store`) as it streamed: the same call under the same id.
    let path = format!("{CHAT_PATH}/{}", events[0]["id"].as_str().unwrap());
    let kept = common::platform::call(base, "GET", &path, None, None)
        .await
        .body;
    let kept_call = &kept["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(kept_call["id"], deltas[0]["id"], "{kept}");
    assert_eq!(kept_call["function"]["arguments"], arguments.as_str());
    let last = events
        .iter()
        .rev()
        .find(|e| !e["choices"][0]["finish_reason"].is_null());
    assert_eq!(last.unwrap()["choices"][0]["finish_reason"], "tool_calls");

    // The call and its result, handed back, are part of the next prompt.
    let followup = json!({"model": CHAT, "temperature": 0, "max_tokens": 30, "tool_choice": "none",
        "tools": weather_tools(),
        "messages": [{"role": "user", "content": question}, choice["message"].clone(),
                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"sky\": \"sunny\", \"temp_c\": 21}"}]});
    let (status, next) = post(base, CHAT_PATH, followup).await;
    assert_eq!(status, 200, "{next}");
    assert!(next["choices"][0]["message"]["tool_calls"].is_null());
    assert!(
        next["usage"]["prompt_tokens"].as_u64() > r["usage"]["prompt_tokens"].as_u64(),
        "{next}"
    );
}

#[tokio::test]
async fn responses_call_tools_take_their_outputs_back_and_follow_a_text_format() {
    let base = &shared().base;
    let tools: Vec<Value> = weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let mut f = t["function"].clone();
            f["type"] = json!("function");
            f
        })
        .collect();
    let (status, r) = post(
        base,
        "/v1/responses",
        json!({"model": CHAT, "input": "What is the weather in Paris?", "tools": tools,
               "tool_choice": "required", "parallel_tool_calls": false, "temperature": 0,
               "max_output_tokens": 80}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["tools"][0]["name"], "get_weather");
    let item = &r["output"][0];
    assert_eq!(item["type"], "function_call", "{r}");
    assert!(item["call_id"].as_str().unwrap().starts_with("call_"));
    check_call(
        item["name"].as_str().unwrap(),
        item["arguments"].as_str().unwrap(),
    );

    let (status, next) = post(
        base,
        "/v1/responses",
        json!({"model": CHAT, "previous_response_id": r["id"], "temperature": 0,
               "max_output_tokens": 20, "tools": tools, "tool_choice": "none",
               "input": [{"type": "function_call_output", "call_id": item["call_id"], "output": "sunny, 21C"}]}),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["output"][0]["type"], "message");
    assert!(
        next["usage"]["input_tokens"].as_u64() > r["usage"]["input_tokens"].as_u64(),
        "{next}"
    );
    let path = format!("/v1/responses/{}/input_items", next["id"].as_str().unwrap());
    let items = call(base, "GET", &path, None, None).await;
    assert_eq!(
        items.body["data"][0]["type"], "function_call_output",
        "{}",
        items.body
    );

    let format = json!({"type": "json_schema", "name": "city", "strict": true, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": false}});
    let (status, r) = post(
        base,
        "/v1/responses",
        json!({"model": CHAT, "input": "Name a city in Japan.", "temperature": 0,
               "max_output_tokens": 60, "text": {"format": format}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["text"]["format"]["name"], "city");
    let text = r["output"][0]["content"][0]["text"].as_str().unwrap();
    let city: Value = serde_json::from_str(text).unwrap();
    assert!(
        city["city"].is_string() && city["country"].is_string(),
        "{city}"
    );
}

/// The deprecated `functions` and `function_call`: the same call as the tool it stands for,
/// answered as `function_call`, streamed in its pieces, and handed back with a `function` turn.
#[tokio::test]
async fn deprecated_functions_call_as_their_tools_do() {
    let base = &shared().base;
    let question = "What is the weather in Paris?";
    let functions: Vec<Value> = weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"].clone())
        .collect();
    let legacy = json!({"temperature": 0, "max_tokens": 80, "functions": functions,
                        "function_call": {"name": "get_weather"}});
    let (status, r) = post(base, CHAT_PATH, chat(question, legacy.clone())).await;
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "function_call", "{r}");
    assert!(choice["message"].get("tool_calls").is_none(), "{r}");
    let call = &choice["message"]["function_call"];
    assert_eq!(call["name"], "get_weather");
    check_call("get_weather", call["arguments"].as_str().unwrap());
    let named = json!({"temperature": 0, "max_tokens": 80, "tools": weather_tools(),
                       "parallel_tool_calls": false,
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (_, tooled) = post(base, CHAT_PATH, chat(question, named)).await;
    assert_eq!(
        tooled["choices"][0]["message"]["tool_calls"][0]["function"],
        *call
    );

    let mut streamed = chat(question, legacy);
    streamed["stream"] = json!(true);
    let (events, done) = common::stream(base, CHAT_PATH, streamed).await;
    assert!(done);
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"].get("function_call"))
        .collect();
    assert_eq!(deltas[0]["name"], "get_weather");
    assert!(deltas[1..].iter().all(|d| d.get("name").is_none()));
    let arguments: String = deltas
        .iter()
        .map(|d| d["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(arguments, call["arguments"].as_str().unwrap());
    assert!(events
        .iter()
        .all(|e| e["choices"][0]["delta"].get("tool_calls").is_none()));
    let last = events
        .iter()
        .rev()
        .find(|e| !e["choices"][0]["finish_reason"].is_null());
    assert_eq!(
        last.unwrap()["choices"][0]["finish_reason"],
        "function_call"
    );

    let followup = json!({"model": CHAT, "temperature": 0, "max_tokens": 20,
        "functions": functions, "function_call": "none",
        "messages": [{"role": "user", "content": question}, choice["message"].clone(),
                     {"role": "function", "name": "get_weather", "content": "sunny, 21C"}]});
    let (status, next) = post(base, CHAT_PATH, followup).await;
    assert_eq!(status, 200, "{next}");
    assert!(next["choices"][0]["message"]["function_call"].is_null());
    assert!(next["usage"]["prompt_tokens"].as_u64() > r["usage"]["prompt_tokens"].as_u64());
}
