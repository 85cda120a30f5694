//! The Responses API through the real HTTP server and engine: answers that agree with chat
//! completions, the event stream, stored responses and `previous_response_id`, input items,
//! truncation, stored responses kept to the project that made them, and background responses
//! (polled, streamed again from any event, cancelled).

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::platform::{call, create_token, gated, ADMIN};
use common::{post, shared, CHAT};
use serde_json::{json, Value};

fn output_text(response: &Value) -> String {
    response["output"][0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect()
}

/// A streamed response's events, as (event name, data).
async fn stream(base: &str, body: Value) -> Vec<(String, Value)> {
    parsed(common::sse(base, "/v1/responses", body).await)
}

fn parsed(events: Vec<(Option<String>, String)>) -> Vec<(String, Value)> {
    events
        .into_iter()
        .map(|(name, data)| {
            (
                name.unwrap_or_default(),
                serde_json::from_str(&data).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_response_answers_as_chat_does_and_continues_a_stored_conversation() {
    let s = shared();
    let question = "What is the capital of France?";
    let (status, r) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": question, "temperature": 0, "max_output_tokens": 40,
               "metadata": {"ticket": "42"}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(
        (r["object"].as_str(), r["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert_eq!(r["model"], CHAT);
    assert_eq!(r["metadata"], json!({"ticket": "42"}));
    assert_eq!(r["output"][0]["role"], "assistant");
    // The same greedy answer and token counts as chat completions give the same message.
    let (_, chat) = post(
        &s.base,
        "/v1/chat/completions",
        common::chat(question, json!({"temperature": 0, "max_tokens": 40})),
    )
    .await;
    let answer = output_text(&r);
    assert_eq!(
        answer,
        chat["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(answer.contains("Paris"), "{answer}");
    let usage = &r["usage"];
    assert_eq!(usage["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(usage["output_tokens"], chat["usage"]["completion_tokens"]);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );

    // Stored: read back whole, with its input items.
    let id = r["id"].as_str().unwrap();
    let got = call(&s.base, "GET", &format!("/v1/responses/{id}"), None, None).await;
    assert_eq!((got.status, &got.body), (200, &r));

    // A follow-up sees the first turn: the prompt is the three-message chat's.
    let follow = "And of Germany?";
    let (status, r2) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": [{"role": "user", "content": [{"type": "input_text", "text": follow}]}],
               "previous_response_id": id, "temperature": 0, "max_output_tokens": 40}),
    )
    .await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], id);
    let (_, chat2) = post(
        &s.base,
        "/v1/chat/completions",
        json!({"model": CHAT, "temperature": 0, "max_tokens": 40, "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": follow}]}),
    )
    .await;
    assert_eq!(r2["usage"]["input_tokens"], chat2["usage"]["prompt_tokens"]);
    assert_eq!(
        output_text(&r2),
        chat2["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Input items: this call's only, newest first by default.
    let id2 = r2["id"].as_str().unwrap();
    let items = call(
        &s.base,
        "GET",
        &format!("/v1/responses/{id2}/input_items"),
        None,
        None,
    )
    .await;
    assert_eq!(items.status, 200, "{}", items.body);
    let data = items.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(
        data[0]["content"][0],
        json!({"type": "input_text", "text": follow})
    );
    assert_eq!(items.body["first_id"], data[0]["id"]);
    assert_eq!(items.body["has_more"], false);

    // Deleted: gone, and no longer a conversation to continue.
    let del = call(
        &s.base,
        "DELETE",
        &format!("/v1/responses/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(
        del.body,
        json!({"id": id, "object": "response", "deleted": true})
    );
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        assert_eq!(
            call(&s.base, "GET", &path, None, None).await.status,
            404,
            "{path}"
        );
    }
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "Hi", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "previous_response_id");
    assert_eq!(err["error"]["code"], "previous_response_not_found");

    // `store: false` keeps nothing.
    let (_, r3) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "Hi", "max_output_tokens": 2, "store": false, "temperature": 0}),
    )
    .await;
    assert_eq!(r3["status"], "incomplete");
    assert_eq!(
        r3["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    let path = format!("/v1/responses/{}", r3["id"].as_str().unwrap());
    assert_eq!(call(&s.base, "GET", &path, None, None).await.status, 404);
}

#[tokio::test]
async fn a_streamed_response_sends_openais_events_in_order() {
    let s = shared();
    let body = json!({"model": CHAT, "input": "Count from one to five.", "temperature": 0,
                      "max_output_tokens": 24, "include": ["message.output_text.logprobs"]});
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let events = stream(&s.base, streamed_body).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "response.output_text.delta")
        .count();
    assert!(deltas > 0, "{names:?}");
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]);
    assert_eq!(names, want);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    // The deltas add up to the final text, which is the unstreamed response's.
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    let last = &events.last().unwrap().1["response"];
    assert_eq!(output_text(last), streamed);
    assert_eq!(last["usage"]["output_tokens"], 24);
    let logprobs = last["output"][0]["content"][0]["logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(logprobs.len(), 24);
    let (_, whole) = post(&s.base, "/v1/responses", body).await;
    assert_eq!(output_text(&whole), streamed);
    // Stored before the last event: readable at once.
    let id = last["id"].as_str().unwrap();
    let got = call(&s.base, "GET", &format!("/v1/responses/{id}"), None, None).await;
    assert_eq!(got.body["output"], last["output"]);
}

#[tokio::test]
async fn truncation_auto_drops_the_oldest_messages_that_do_not_fit() {
    let s = shared();
    let long = "word ".repeat(9000);
    let input = json!([
        {"role": "user", "content": long},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Say hi."},
    ]);
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": input, "max_output_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    let (status, r) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": input, "max_output_tokens": 4, "truncation": "auto"}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["truncation"], "auto");
    assert!(
        r["usage"]["input_tokens"].as_u64().unwrap() < 100,
        "{}",
        r["usage"]
    );
}

#[tokio::test]
async fn stored_responses_belong_to_their_project() {
    let s = gated();
    let (_, mine) = create_token(s, "responses-a", "1h");
    let (_, theirs) = create_token(s, "responses-b", "1h");
    let body = json!({"model": CHAT, "input": "Say hi.", "max_output_tokens": 4});
    let r = within!(Duration::from_secs(1), {
        call(
            &s.base,
            "POST",
            "/v1/responses",
            Some(&mine),
            Some(body.clone()),
        )
        .await
        .status
            == 200
    });
    assert!(r < Duration::from_secs(1));
    let r = call(&s.base, "POST", "/v1/responses", Some(&mine), Some(body)).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.headers
            .get("x-candela-resolved-model")
            .map(String::as_str),
        Some(CHAT)
    );
    let paths = [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ];
    for path in &paths {
        assert_eq!(
            call(&s.base, "GET", path, Some(&mine), None).await.status,
            200
        );
        let other = call(&s.base, "GET", path, Some(&theirs), None).await;
        assert_eq!(other.status, 404, "{path}: {}", other.body);
    }
    let follow = json!({"model": CHAT, "input": "Again.", "previous_response_id": id, "max_output_tokens": 2});
    let other = call(
        &s.base,
        "POST",
        "/v1/responses",
        Some(&theirs),
        Some(follow.clone()),
    )
    .await;
    assert_eq!(other.status, 400);
    assert_eq!(other.body["error"]["param"], "previous_response_id");
    let del = format!("/v1/responses/{id}");
    assert_eq!(
        call(&s.base, "DELETE", &del, Some(&theirs), None)
            .await
            .status,
        404
    );
    assert_eq!(
        call(&s.base, "POST", "/v1/responses", Some(&mine), Some(follow))
            .await
            .status,
        200
    );
    // Metered as the project's calls on /v1/responses.
    let usage = call(&s.base, "GET", "/v1/usage", Some(&mine), None).await;
    assert!(
        usage.body["total"]["requests"].as_u64().unwrap() >= 3,
        "{}",
        usage.body
    );
    assert!(
        usage.body["total"]["output_tokens"].as_u64().unwrap() > 0,
        "{}",
        usage.body
    );
}

/// Polls the response `id` until it is neither queued nor running.
async fn settled(base: &str, id: &str) -> Value {
    let path = format!("/v1/responses/{id}");
    let start = Instant::now();
    loop {
        let r = call(base, "GET", &path, None, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if !matches!(r.body["status"].as_str(), Some("queued" | "in_progress")) {
            return r.body;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_background_response_runs_on_is_streamed_again_and_cancelled() {
    let s = shared();
    let body = json!({"model": CHAT, "input": "Name three colours.", "temperature": 0,
                      "max_output_tokens": 16});
    let mut background = body.clone();
    background["background"] = json!(true);
    let (status, queued) = post(&s.base, "/v1/responses", background).await;
    assert_eq!(status, 200, "{queued}");
    assert_eq!(
        (&queued["status"], &queued["background"]),
        (&json!("queued"), &json!(true))
    );
    let id = queued["id"].as_str().unwrap();
    // Polled to its end: the answer a client waiting for it gets.
    let done = settled(&s.base, id).await;
    let (_, waited) = post(&s.base, "/v1/responses", body).await;
    assert_eq!(done["status"], "incomplete");
    assert_eq!(output_text(&done), output_text(&waited));
    assert_eq!(done["usage"]["output_tokens"], 16);
    // Its events stay to be streamed again, whole or after a sequence number.
    let all = parsed(common::sse_get(&s.base, &format!("/v1/responses/{id}?stream=true")).await);
    assert_eq!(all[0].0, "response.created");
    assert_eq!(all[0].1["response"]["status"], "queued");
    assert_eq!(all[1].0, "response.in_progress");
    let last = all.last().unwrap();
    assert_eq!(last.0, "response.incomplete");
    assert_eq!(last.1["response"]["output"], done["output"]);
    let path = format!("/v1/responses/{id}?stream=true&starting_after=3");
    let tail = parsed(common::sse_get(&s.base, &path).await);
    assert_eq!(tail, all[4..]);
    // Cancelling an ended one changes nothing.
    let cancel = format!("/v1/responses/{id}/cancel");
    let again = call(&s.base, "POST", &cancel, None, None).await;
    assert_eq!(
        (again.status, &again.body["status"]),
        (200, &json!("incomplete"))
    );

    // A run that cannot end soon (a schema needing a long string): cancelled while it writes.
    let long = json!({"model": CHAT, "input": "Write an essay.", "background": true,
        "max_output_tokens": 4000, "text": {"format": {"type": "json_schema", "name": "essay",
        "schema": {"type": "object", "properties": {"essay": {"type": "string", "minLength": 8000}},
                   "required": ["essay"]}}}});
    let (_, running) = post(&s.base, "/v1/responses", long.clone()).await;
    let run_id = running["id"].as_str().unwrap().to_string();
    let follow = json!({"model": CHAT, "input": "More.", "previous_response_id": run_id});
    let (status, err) = post(&s.base, "/v1/responses", follow).await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("previous_response_id"))
    );
    let stream_path = format!("/v1/responses/{run_id}?stream=true");
    let watcher = tokio::spawn({
        let base = s.base.clone();
        async move { parsed(common::sse_get(&base, &stream_path).await) }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let path = format!("/v1/responses/{run_id}/cancel");
    let cancelled = call(&s.base, "POST", &path, None, None).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(cancelled.body["output"][0]["status"], "incomplete");
    let written = cancelled.body["usage"]["output_tokens"].as_u64().unwrap();
    assert!(written > 0 && written < 4000, "{written}");
    assert!(output_text(&cancelled.body).starts_with('{'));
    let stored = call(
        &s.base,
        "GET",
        &format!("/v1/responses/{run_id}"),
        None,
        None,
    )
    .await;
    assert_eq!(stored.body, cancelled.body);
    // The stream ends with the message closed and no completion event.
    let events = watcher.await.unwrap();
    assert_eq!(events.last().unwrap().0, "response.output_item.done");

    // Deleting a running one stops it; it stays deleted.
    let (_, running) = post(&s.base, "/v1/responses", long).await;
    let path = format!("/v1/responses/{}", running["id"].as_str().unwrap());
    assert_eq!(call(&s.base, "DELETE", &path, None, None).await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(call(&s.base, "GET", &path, None, None).await.status, 404);
}

#[tokio::test]
async fn background_responses_refuse_what_they_cannot_do() {
    let s = shared();
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "x", "background": true, "store": false}),
    )
    .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("background"))
    );
    let (_, plain) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "x", "max_output_tokens": 2}),
    )
    .await;
    let id = plain["id"].as_str().unwrap();
    let cancel = call(
        &s.base,
        "POST",
        &format!("/v1/responses/{id}/cancel"),
        None,
        None,
    )
    .await;
    assert_eq!(cancel.status, 400);
    for (query, param) in [("stream=true", "stream"), ("stream=yes", "stream")] {
        let r = call(
            &s.base,
            "GET",
            &format!("/v1/responses/{id}?{query}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (r.status, &r.body["error"]["param"]),
            (400, &json!(param)),
            "{query}"
        );
    }
    let (_, bg) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "x", "max_output_tokens": 2, "background": true}),
    )
    .await;
    let path = format!(
        "/v1/responses/{}?stream=true&starting_after=-1",
        bg["id"].as_str().unwrap()
    );
    let r = call(&s.base, "GET", &path, None, None).await;
    assert_eq!(
        (r.status, &r.body["error"]["param"]),
        (400, &json!("starting_after"))
    );
}

#[tokio::test]
async fn a_conversation_is_a_responses_history_that_grows_with_each_response() {
    let s = shared();
    let first = json!({"type": "message", "role": "user", "content": "My name is Ada."});
    let (status, conv) = post(
        &s.base,
        "/v1/conversations",
        json!({"items": [first], "metadata": {"topic": "names"}}),
    )
    .await;
    assert_eq!(status, 200, "{conv}");
    assert_eq!(conv["object"], "conversation");
    assert_eq!(conv["metadata"], json!({"topic": "names"}));
    let id = conv["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("conv_"));
    let question = "What is my name?";
    let (_, r) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "conversation": id, "input": question, "temperature": 0,
               "max_output_tokens": 12}),
    )
    .await;
    assert_eq!(r["conversation"], json!({"id": id}));
    // The history is read as if it had been sent as input.
    let (_, same) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": [first, {"role": "user", "content": question}],
               "temperature": 0, "max_output_tokens": 12}),
    )
    .await;
    assert_eq!(output_text(&r), output_text(&same));
    assert_eq!(r["usage"]["input_tokens"], same["usage"]["input_tokens"]);
    assert_eq!(same["conversation"], Value::Null);
    // The response's input and output were added, in order.
    let items_path = format!("/v1/conversations/{id}/items");
    let list = call(
        &s.base,
        "GET",
        &format!("{items_path}?order=asc"),
        None,
        None,
    )
    .await;
    let items = list.body["data"].as_array().unwrap();
    let roles: Vec<&str> = items.iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "user", "assistant"]);
    assert_eq!(items[2]["id"], r["output"][0]["id"]);
    assert_eq!(items[1]["content"][0]["text"], question);
    // The next response reads all of it (`conversation` as an object too).
    let (_, next) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "conversation": {"id": id}, "input": "Thanks.",
               "max_output_tokens": 2}),
    )
    .await;
    assert!(next["usage"]["input_tokens"].as_u64() > r["usage"]["input_tokens"].as_u64());
    // Items added, read, paged newest first, deleted.
    let (status, added) = post(
        &s.base,
        &items_path,
        json!({"items": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let item = added["data"][0]["id"].as_str().unwrap().to_string();
    let got = call(&s.base, "GET", &format!("{items_path}/{item}"), None, None).await;
    assert_eq!(got.body["content"][0]["text"], "hi");
    let page = call(&s.base, "GET", &format!("{items_path}?limit=2"), None, None).await;
    assert_eq!(page.body["data"][0]["id"], item.as_str());
    assert_eq!(page.body["has_more"], true);
    let after = page.body["last_id"].as_str().unwrap();
    let rest = call(
        &s.base,
        "GET",
        &format!("{items_path}?after={after}"),
        None,
        None,
    )
    .await;
    assert_eq!(rest.body["data"].as_array().unwrap().len(), 4);
    let gone = call(
        &s.base,
        "DELETE",
        &format!("{items_path}/{item}"),
        None,
        None,
    )
    .await;
    assert_eq!((gone.status, &gone.body["id"]), (200, &json!(id)));
    let again = call(&s.base, "GET", &format!("{items_path}/{item}"), None, None).await;
    assert_eq!(again.status, 404);
    // Metadata replaced; the conversation deleted with its items.
    let path = format!("/v1/conversations/{id}");
    let (_, updated) = post(&s.base, &path, json!({"metadata": {"topic": "other"}})).await;
    assert_eq!(updated["metadata"], json!({"topic": "other"}));
    let deleted = call(&s.base, "DELETE", &path, None, None).await;
    assert_eq!(
        deleted.body,
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    assert_eq!(
        call(&s.base, "GET", &items_path, None, None).await.status,
        404
    );
}

#[tokio::test]
async fn conversations_refuse_bad_items_and_belong_to_their_project() {
    let s = shared();
    let many: Vec<Value> = (0..21)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    for (body, param) in [
        (json!({"items": many}), "items"),
        (
            json!({"items": [{"role": "wizard", "content": "x"}]}),
            "items[0].role",
        ),
        (json!({"items": [{"role": "user"}]}), "items[0].content"),
        (json!({"items": "x"}), "items"),
        (json!({"metadata": "x"}), "metadata"),
    ] {
        let (status, err) = post(&s.base, "/v1/conversations", body).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some(param)),
            "{err}"
        );
    }
    // An item's id is its conversation's once.
    let item = json!({"id": "msg_dup", "role": "user", "content": "x"});
    let (status, err) = post(&s.base, "/v1/conversations", json!({"items": [item, item]})).await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("items[1].id"))
    );
    let (_, conv) = post(&s.base, "/v1/conversations", json!({"items": [item]})).await;
    let id = conv["id"].as_str().unwrap();
    let path = format!("/v1/conversations/{id}/items");
    let (status, err) = post(&s.base, &path, json!({"items": [item]})).await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("items[0].id"))
    );
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": [item], "conversation": id}),
    )
    .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("input[0].id"))
    );
    let listed = call(&s.base, "GET", &path, None, None).await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1);
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "x", "conversation": id, "previous_response_id": "resp_1"}),
    )
    .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("conversation"))
    );
    let (status, err) = post(
        &s.base,
        "/v1/responses",
        json!({"model": CHAT, "input": "x", "conversation": "conv_unknown"}),
    )
    .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("conversation"))
    );
    let (status, _) = post(&s.base, &format!("/v1/conversations/{id}"), json!({})).await;
    assert_eq!(status, 400);

    let g = gated();
    let (_, mine) = create_token(g, "conversations-a", "1h");
    let (_, theirs) = create_token(g, "conversations-b", "1h");
    let made = call(
        &g.base,
        "POST",
        "/v1/conversations",
        Some(&mine),
        Some(json!({})),
    )
    .await;
    let id = made.body["id"].as_str().unwrap();
    for path in [
        format!("/v1/conversations/{id}"),
        format!("/v1/conversations/{id}/items"),
    ] {
        assert_eq!(
            call(&g.base, "GET", &path, Some(&mine), None).await.status,
            200
        );
        assert_eq!(
            call(&g.base, "GET", &path, Some(&theirs), None)
                .await
                .status,
            404
        );
    }
    let body = json!({"model": CHAT, "input": "x", "conversation": id, "max_output_tokens": 2});
    let other = call(&g.base, "POST", "/v1/responses", Some(&theirs), Some(body)).await;
    assert_eq!(other.status, 400);
    let path = format!("/v1/conversations/{id}");
    assert_eq!(
        call(&g.base, "DELETE", &path, Some(&theirs), None)
            .await
            .status,
        404
    );
    // The admin token manages the server and has no conversations.
    let admin = call(&g.base, "GET", &path, Some(ADMIN), None).await;
    assert_eq!(
        (admin.status, &admin.body["error"]["type"]),
        (403, &json!("permission_error"))
    );
    assert_eq!(
        call(&g.base, "DELETE", &path, Some(&mine), None)
            .await
            .status,
        200
    );
}
