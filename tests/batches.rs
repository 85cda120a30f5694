//! The Files and Batch APIs through the real HTTP server and engine: a JSONL file uploaded,
//! run as a batch and read back, validation failures, cancellation, a batch that survives a
//! server restart, and files and batches kept to the project that made them.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::platform::{call, create_token, gated, ADMIN};
use common::{client, post, shared, CHAT};
use serde_json::{json, Value};

/// `POST /v1/files` as the SDKs send it: multipart, `purpose` and `file`.
async fn upload(
    base: &str,
    token: Option<&str>,
    purpose: &str,
    name: &str,
    bytes: &[u8],
) -> (u16, Value) {
    let boundary = "candela-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut req = client()
        .post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .into_bytes()
}

fn chat_line(id: &str, body: Value) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

/// Polls a batch until it reaches a final status.
async fn wait(base: &str, token: Option<&str>, id: &str, secs: u64) -> Value {
    let limit = Duration::from_secs(secs);
    let started = Instant::now();
    loop {
        let b = call(base, "GET", &format!("/v1/batches/{id}"), token, None)
            .await
            .body;
        if ["completed", "failed", "cancelled", "expired"]
            .contains(&b["status"].as_str().unwrap_or(""))
        {
            return b;
        }
        assert!(
            started.elapsed() < limit,
            "batch not done after {limit:?}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A file's lines, parsed.
async fn lines_of(base: &str, token: Option<&str>, id: &Value) -> Vec<Value> {
    let mut req = client().get(format!("{base}/v1/files/{}/content", id.as_str().unwrap()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let text = req.send().await.unwrap().text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn create_batch(base: &str, token: Option<&str>, file: &Value, endpoint: &str) -> Value {
    let body =
        json!({"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h"});
    let r = call(base, "POST", "/v1/batches", token, Some(body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[tokio::test]
async fn a_batch_answers_as_the_endpoint_does_and_lists_its_failures() {
    let s = shared();
    let questions = ["What is the capital of France?", "What is 2+2?", "Say hi."];
    let body = |q: &str| json!({"model": CHAT, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16});
    let mut lines: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| chat_line(&format!("q{i}"), body(q)))
        .collect();
    lines.push(chat_line(
        "bad",
        json!({"model": CHAT, "messages": [], "max_tokens": 4}),
    ));
    let (status, file) = upload(&s.base, None, "batch", "in.jsonl", &jsonl(&lines)).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(
        (file["object"].as_str(), file["purpose"].as_str()),
        (Some("file"), Some("batch"))
    );
    assert_eq!(file["filename"], "in.jsonl");
    let batch = create_batch(&s.base, None, &file, "/v1/chat/completions").await;
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(batch["status"], "validating");
    let id = batch["id"].as_str().unwrap();
    let done = wait(&s.base, None, id, 120).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 3, "failed": 1})
    );
    for stamp in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[stamp].as_i64().is_some(), "{stamp}: {done}");
    }

    // Each answer is the one the endpoint gives the same body; usage adds up.
    let output = lines_of(&s.base, None, &done["output_file_id"]).await;
    assert_eq!(output.len(), 3);
    let (mut input_tokens, mut output_tokens) = (0, 0);
    for line in &output {
        let i: usize = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        let (_, direct) = post(&s.base, "/v1/chat/completions", body(questions[i])).await;
        let answer = &line["response"]["body"];
        assert_eq!(
            answer["choices"][0]["message"],
            direct["choices"][0]["message"]
        );
        input_tokens += answer["usage"]["prompt_tokens"].as_u64().unwrap();
        output_tokens += answer["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(done["usage"]["input_tokens"], input_tokens);
    assert_eq!(done["usage"]["output_tokens"], output_tokens);
    let errors = lines_of(&s.base, None, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "bad");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(errors[0]["response"]["body"]["error"]["param"], "messages");

    // The outputs are files of the project; deleting one removes it.
    let files = call(&s.base, "GET", "/v1/files?purpose=batch_output", None, None)
        .await
        .body;
    let ids: Vec<&Value> = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["id"])
        .collect();
    assert!(
        ids.contains(&&done["output_file_id"]) && ids.contains(&&done["error_file_id"]),
        "{files}"
    );
    let path = format!("/v1/files/{}", done["error_file_id"].as_str().unwrap());
    let del = call(&s.base, "DELETE", &path, None, None).await;
    assert_eq!(del.body["deleted"], true);
    assert_eq!(call(&s.base, "GET", &path, None, None).await.status, 404);
    assert_eq!(
        call(&s.base, "GET", &format!("{path}/content"), None, None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn a_bad_input_file_fails_the_batch_with_each_line_named() {
    let s = shared();
    let good = chat_line(
        "a",
        json!({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    let mut bytes = jsonl(&[good.clone(), good]);
    bytes.extend_from_slice(b"{oops\n");
    let (_, file) = upload(&s.base, None, "batch", "in.jsonl", &bytes).await;
    let batch = create_batch(&s.base, None, &file, "/v1/chat/completions").await;
    let id = batch["id"].as_str().unwrap();
    let done = wait(&s.base, None, id, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    let errors: Vec<(&str, i64)> = done["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["code"].as_str().unwrap(), e["line"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        errors,
        [("duplicate_custom_id", 2), ("invalid_json_line", 3)]
    );

    // Refused at once: an unknown file, a file of another purpose, an endpoint or window
    // batches do not serve; an upload without its fields.
    let (_, notes) = upload(&s.base, None, "user_data", "notes.txt", b"hello").await;
    for (body, param) in [
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": notes["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/models", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "1h"}),
            "completion_window",
        ),
        (
            json!({"endpoint": "/v1/completions", "completion_window": "24h"}),
            "input_file_id",
        ),
    ] {
        let r = call(&s.base, "POST", "/v1/batches", None, Some(body.clone())).await;
        assert_eq!(r.body["error"]["param"], param, "{body}: {}", r.body);
        assert!(r.status == 400 || r.status == 404, "{body}: {}", r.status);
    }
    assert_eq!(
        upload(&s.base, None, "homework", "a.txt", b"x").await.1["error"]["param"],
        "purpose"
    );
    assert_eq!(
        upload(&s.base, None, "batch", "a.jsonl", b"").await.1["error"]["param"],
        "file"
    );
}

#[tokio::test]
async fn a_cancelled_batch_keeps_its_answers_and_lists_what_did_not_run() {
    let s = shared();
    let lines: Vec<Value> = (0..300)
        .map(|i| json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                        "body": {"model": CHAT, "prompt": format!("Story {i}:"), "max_tokens": 32, "ignore_eos": true}}))
        .collect();
    let (_, file) = upload(&s.base, None, "batch", "many.jsonl", &jsonl(&lines)).await;
    let batch = create_batch(&s.base, None, &file, "/v1/completions").await;
    let id = batch["id"].as_str().unwrap();
    // Running, with progress shown.
    within!(Duration::from_secs(60), {
        let b = call(&s.base, "GET", &format!("/v1/batches/{id}"), None, None)
            .await
            .body;
        b["status"] == "in_progress" && b["request_counts"]["completed"].as_u64().unwrap() > 0
    });
    let r = call(
        &s.base,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "cancelling");
    let done = wait(&s.base, None, id, 30).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let completed = done["request_counts"]["completed"].as_u64().unwrap() as usize;
    assert!(completed > 0 && completed < 300, "{done}");
    let output = lines_of(&s.base, None, &done["output_file_id"]).await;
    assert_eq!(output.len(), completed);
    let errors = lines_of(&s.base, None, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 300 - completed);
    assert!(errors
        .iter()
        .all(|e| e["error"]["code"] == "batch_cancelled"));
    // Cancelling again is harmless; the engine has nothing left of it.
    let again = call(
        &s.base,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        None,
        None,
    )
    .await;
    assert_eq!(again.body["status"], "cancelled");
    let stats = s.chat_stats();
    within!(Duration::from_secs(5), {
        candela::engine::EngineStats::get(&stats.running) == 0
    });
}

#[tokio::test]
async fn a_batch_runs_again_after_a_restart() {
    let config = common::platform_config();
    let mut first = common::start_with(common::options(64 << 20), config.clone());
    let lines: Vec<Value> = (0..200)
        .map(|i| json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                        "body": {"model": CHAT, "prompt": format!("Poem {i}:"), "max_tokens": 24, "ignore_eos": true}}))
        .collect();
    let (_, file) = upload(&first.base, None, "batch", "in.jsonl", &jsonl(&lines)).await;
    let batch = create_batch(&first.base, None, &file, "/v1/completions").await;
    let id = batch["id"].as_str().unwrap().to_string();
    within!(Duration::from_secs(60), {
        let b = call(&first.base, "GET", &format!("/v1/batches/{id}"), None, None)
            .await
            .body;
        b["status"] == "in_progress"
    });
    first.shut_down();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Stopped part way, as the database says.
    let store = candela::platform::store::Store::open_dir(&config.data_dir).unwrap();
    let stored = store
        .batch(candela::platform::ANONYMOUS_PROJECT, &id)
        .unwrap()
        .unwrap();
    assert_eq!(stored.status(), "in_progress", "{}", stored.object);
    drop(store);
    let second = common::start_with(common::options(64 << 20), config);
    let done = wait(&second.base, None, &id, 300).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 200, "completed": 200, "failed": 0})
    );
    let output = lines_of(&second.base, None, &done["output_file_id"]).await;
    let mut ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
}

#[tokio::test]
async fn files_and_batches_belong_to_their_project() {
    let s = gated();
    let (_, mine) = create_token(s, "files-a", "1h");
    let (_, theirs) = create_token(s, "files-b", "1h");
    let line = chat_line(
        "a",
        json!({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    let file = within!(Duration::from_secs(1), {
        upload(
            &s.base,
            Some(&mine),
            "batch",
            "in.jsonl",
            &jsonl(std::slice::from_ref(&line)),
        )
        .await
        .0 == 200
    });
    assert!(file < Duration::from_secs(1));
    let (_, file) = upload(&s.base, Some(&mine), "batch", "in.jsonl", &jsonl(&[line])).await;
    let fid = file["id"].as_str().unwrap();
    let batch = create_batch(&s.base, Some(&mine), &file, "/v1/chat/completions").await;
    let bid = batch["id"].as_str().unwrap();
    for path in [
        format!("/v1/files/{fid}"),
        format!("/v1/files/{fid}/content"),
        format!("/v1/batches/{bid}"),
    ] {
        assert_eq!(
            call(&s.base, "GET", &path, Some(&mine), None).await.status,
            200,
            "{path}"
        );
        assert_eq!(
            call(&s.base, "GET", &path, Some(&theirs), None)
                .await
                .status,
            404,
            "{path}"
        );
    }
    for path in ["/v1/files", "/v1/batches"] {
        let list = call(&s.base, "GET", path, Some(&theirs), None).await.body;
        assert_eq!(list["data"], json!([]), "{path}");
    }
    let steal = json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let r = call(&s.base, "POST", "/v1/batches", Some(&theirs), Some(steal)).await;
    assert_eq!(r.body["error"]["param"], "input_file_id");
    assert_eq!(
        call(
            &s.base,
            "POST",
            &format!("/v1/batches/{bid}/cancel"),
            Some(&theirs),
            None
        )
        .await
        .status,
        404
    );
    assert_eq!(
        call(
            &s.base,
            "DELETE",
            &format!("/v1/files/{fid}"),
            Some(&theirs),
            None
        )
        .await
        .status,
        404
    );
    // The admin token manages the server and owns no files.
    assert_eq!(
        call(&s.base, "GET", "/v1/files", Some(ADMIN), None)
            .await
            .status,
        403
    );
    let done = wait(&s.base, Some(&mine), bid, 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    // A batch's requests are the project's usage.
    let usage = call(&s.base, "GET", "/v1/usage", Some(&mine), None)
        .await
        .body;
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
    assert_eq!(
        usage["total"]["input_tokens"], done["usage"]["input_tokens"],
        "{usage}"
    );
}

/// Responses run in a batch as the endpoint runs them; `background` has no place there.
#[tokio::test]
async fn a_batch_of_responses_refuses_background_ones() {
    let s = shared();
    let line = |id: &str, body: Value| json!({"custom_id": id, "method": "POST", "url": "/v1/responses", "body": body});
    let lines = [
        line(
            "plain",
            json!({"model": CHAT, "input": "Say hi.", "max_output_tokens": 4}),
        ),
        line(
            "background",
            json!({"model": CHAT, "input": "Say hi.", "max_output_tokens": 4, "background": true}),
        ),
    ];
    let (_, file) = upload(&s.base, None, "batch", "responses.jsonl", &jsonl(&lines)).await;
    let batch = create_batch(&s.base, None, &file, "/v1/responses").await;
    let done = wait(&s.base, None, batch["id"].as_str().unwrap(), 120).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 1, "failed": 1}),
        "{done}"
    );
    let output = lines_of(&s.base, None, &done["output_file_id"]).await;
    assert_eq!(output[0]["response"]["body"]["status"], "incomplete");
    let errors = lines_of(&s.base, None, &done["error_file_id"]).await;
    assert_eq!(errors[0]["custom_id"], "background");
    assert_eq!(
        errors[0]["response"]["body"]["error"]["param"],
        "background"
    );
}
