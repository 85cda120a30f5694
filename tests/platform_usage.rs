//! What the platform records and resolves, through the real HTTP server and the real CLI: usage
//! metering, /metrics, virtual models on every endpoint, the catalog, and edge cases users hit.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::platform::*;
use common::{CHAT, EMBED};
use serde_json::{json, Value};
use std::process::Command;

#[tokio::test]
async fn usage_totals_match_what_clients_received_and_projects_are_isolated() {
    let s = gated();
    let (_, mine) = create_token(s, "metered", "1h");
    let (_, theirs) = create_token(s, "neighbour", "1h");
    accepted(s, &theirs).await;
    let mut received = (0u64, 0u64, 0u64); // requests, prompt tokens, completion tokens
    let mut add = |usage: &Value| {
        received.0 += 1;
        received.1 += usage["prompt_tokens"].as_u64().unwrap();
        received.2 += usage["completion_tokens"].as_u64().unwrap_or(0);
    };
    for max_tokens in [3, 7] {
        let mut body = chat_body(CHAT);
        body["max_tokens"] = json!(max_tokens);
        let r = call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            Some(&mine),
            Some(body),
        )
        .await;
        add(&r.body["usage"]);
    }
    let r = call(
        &s.base,
        "POST",
        "/v1/completions",
        Some(&mine),
        Some(json!({"model": CHAT, "prompt": "Once upon", "max_tokens": 5})),
    )
    .await;
    add(&r.body["usage"]);
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&mine),
        Some(json!({"model": EMBED, "input": ["a", "b c"]})),
    )
    .await;
    add(&r.body["usage"]);
    // A streamed call, its usage from the last chunk.
    let resp = common::client()
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(&mine)
        .json(&json!({"model": CHAT, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let last: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .next_back()
        .unwrap();
    add(&last["usage"]);
    // A failed call is recorded as failed and not charged.
    let mut bad = chat_body(CHAT);
    bad["temperature"] = json!(9);
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            Some(&mine),
            Some(bad)
        )
        .await
        .status,
        400
    );
    // The neighbour's call is not ours.
    chat_as(s, Some(&theirs)).await;

    let usage = call(&s.base, "GET", "/v1/usage", Some(&mine), None).await;
    assert_eq!(usage.status, 200, "{}", usage.body);
    assert_eq!(usage.body["project"], "metered");
    let total = &usage.body["total"];
    assert_eq!(
        total["requests"].as_u64().unwrap(),
        received.0 + 1,
        "{}",
        usage.body
    );
    assert_eq!(total["failed_requests"], 1);
    assert_eq!(total["input_tokens"].as_u64().unwrap(), received.1);
    assert_eq!(total["output_tokens"].as_u64().unwrap(), received.2);
    for row in usage.body["data"].as_array().unwrap() {
        assert_eq!(row["project"], "metered");
    }
    let models: Vec<&str> = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert!(
        models.contains(&CHAT) && models.contains(&EMBED),
        "{models:?}"
    );

    // Another project's usage is not readable with this token; the admin reads any.
    let r = call(
        &s.base,
        "GET",
        "/v1/usage?project=neighbour",
        Some(&mine),
        None,
    )
    .await;
    assert_eq!(r.status, 403);
    let r = call(
        &s.base,
        "GET",
        "/v1/usage?project=neighbour",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.body["total"]["requests"], 1);
    let r = call(
        &s.base,
        "GET",
        "/v1/usage?from=yesterday",
        Some(&mine),
        None,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "from");

    // The CLI reads the same log.
    let (ok, out, err) = cli(s, &["usage", "--project", "metered", "--json"]);
    assert!(ok, "{err}");
    let cli_usage: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cli_usage["total"], usage.body["total"]);
    let (_, table, _) = cli(s, &["usage", "--project", "metered"]);
    assert!(table.contains(CHAT) && table.contains("metered"));
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let s = gated();
    let (_, token) = create_token(s, "scraped", "1h");
    within!(Duration::from_secs(1), {
        chat_as(s, Some(&token)).await.status == 200
    });
    // Behind the admin token, since one is set.
    assert_eq!(
        call(&s.base, "GET", "/metrics", None, None).await.status,
        401
    );
    let resp = common::client()
        .get(format!("{}/metrics", s.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    assert!(text.contains("# TYPE candela_requests_total counter"));
    assert!(!text.contains(&token));
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert!(
        value("candela_requests_total", Some(("model", CHAT))) >= 1.0,
        "{text}"
    );
    assert!(value("candela_generation_tokens_total", Some(("model", CHAT))) >= 1.0);
    assert!(
        value(
            "candela_time_to_first_token_seconds_count",
            Some(("model", CHAT))
        ) >= 1.0
    );
    assert!(
        value(
            "candela_inter_token_latency_seconds_count",
            Some(("model", CHAT))
        ) >= 1.0
    );
    assert!(value("candela_kv_cache_blocks", Some(("state", "total"))) > 0.0);
    for family in [
        "candela_num_requests_running",
        "candela_num_requests_waiting",
        "candela_prefix_cache_hit_ratio",
        "candela_kv_cache_usage_ratio",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == family),
            "{family} missing"
        );
    }
}

#[tokio::test]
async fn virtual_models_resolve_on_every_endpoint() {
    let s = gated();
    let (_, token) = create_token(s, "virtual", "1h");
    accepted(s, &token).await;
    let t = Some(token.as_str());
    // The calibrated speed is in the catalog.
    let models = call(&s.base, "GET", "/v1/models", t, None).await;
    for m in models.body["data"].as_array().unwrap() {
        assert!(m["tokens_per_second"].as_f64().unwrap() > 0.0, "{m}");
    }
    let one = call(&s.base, "GET", &format!("/v1/models/{CHAT}"), t, None).await;
    assert_eq!(one.body["id"], CHAT);
    assert_eq!(one.body["object"], "model");

    for query in [
        "chat@fastest",
        "smollm@latest?context_size>1000",
        "huggingfacetb @ smallest ? params < 1e9 & input_cost <= 1",
        "chat",
    ] {
        let r = call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            t,
            Some(chat_body(query)),
        )
        .await;
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        assert_eq!(r.body["model"], CHAT);
        assert_eq!(r.headers["x-candela-resolved-model"], CHAT);
    }
    let r = call(
        &s.base,
        "POST",
        "/v1/completions",
        t,
        Some(json!({"model": "smollm@biggest", "prompt": "Hi", "max_tokens": 2})),
    )
    .await;
    assert_eq!((r.status, r.body["model"].as_str()), (200, Some(CHAT)));
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        t,
        Some(json!({"model": "embeddings@fastest", "input": "hello"})),
    )
    .await;
    assert_eq!((r.status, r.body["model"].as_str()), (200, Some(EMBED)));
    assert_eq!(r.headers["x-candela-resolved-model"], EMBED);

    // No match: 404 quoting the query. Malformed: 400 pointing at the bad part. Wrong type: 400.
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        t,
        Some(chat_body("llama@biggest?input_cost<0.5")),
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("llama@biggest?input_cost<0.5"));
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        t,
        Some(chat_body("chat@fastes")),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "model");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fastes"));
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        t,
        Some(chat_body("chat?context_sise>1")),
    )
    .await;
    assert!(
        r.status == 400
            && r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("context_sise")
    );
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        t,
        Some(chat_body("embeddings@fastest")),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        t,
        Some(json!({"model": "chat@latest", "input": "x"})),
    )
    .await;
    assert_eq!(r.status, 400);

    // What a query resolves to, and why.
    let r = call(
        &s.base,
        "GET",
        "/v1/models/resolve?query=smollm%40latest%3Fcontext_size%3E1000",
        t,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["model"], CHAT);
    assert_eq!(r.body["candidates"].as_array().unwrap().len(), 2);
    let r = call(
        &s.base,
        "GET",
        "/v1/models/resolve?query=nothing%40latest",
        t,
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

#[test]
fn a_bad_catalog_is_a_start_up_error_naming_file_line_and_field() {
    let dir = common::temp_dir("catalog");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("catalog.toml");
    std::fs::write(
        &path,
        "[[model]]\nid = \"m\"\ntype = \"chat\"\nsource = \"m.gguf\"\ninput_cost = \"cheap\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(["serve", "--port", "0", "--catalog", path.to_str().unwrap()])
        .env("CANDELA_HOME", &dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("catalog.toml") && err.contains("line 5") && err.contains("input_cost"),
        "{err}"
    );
}

#[tokio::test]
async fn edges_a_user_hits() {
    let s = gated();
    // A token works the moment `token create` returns, whatever the scheme's case.
    let (_, token) = create_token(s, "edges", "1h");
    let r = call(&s.base, "GET", "/v1/models", Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let upper = common::client()
        .get(format!("{}/v1/models", s.base))
        .header("authorization", format!("BEARER {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(upper.status(), 200);
    let t = Some(token.as_str());

    // Ids match case-insensitively; an empty model or a query without `?` is a 400, not a 404.
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        t,
        Some(chat_body("SMOLLM2-135M-Instruct")),
    )
    .await;
    assert_eq!((r.status, r.body["model"].as_str()), (200, Some(CHAT)));
    for bad in ["", "  ", "chat&context_size>1"] {
        let r = call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            t,
            Some(chat_body(bad)),
        )
        .await;
        assert_eq!(r.status, 400, "{bad:?}: {}", r.body);
        assert_eq!(r.body["error"]["param"], "model");
    }
    // A failed resolution still says why each model was dropped.
    let r = call(
        &s.base,
        "GET",
        "/v1/models/resolve?query=chat%40latest%3Fcontext_size%3E100000",
        t,
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body["candidates"].as_array().unwrap().len(),
        2,
        "{}",
        r.body
    );

    // n > 1: the prompt counts once, and so do its cached tokens.
    let mut body = chat_body(CHAT);
    body["n"] = json!(3);
    let r = call(&s.base, "POST", "/v1/chat/completions", t, Some(body)).await;
    let usage = &r.body["usage"];
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            <= usage["prompt_tokens"].as_u64().unwrap(),
        "{usage}"
    );

    // A stream the client abandons is charged what it generated, not nothing.
    let (_, quitter) = create_token(s, "abandoned", "1h");
    let resp = common::client()
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(&quitter)
        .json(
            &json!({"model": CHAT, "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 400, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut bytes = futures::StreamExt::boxed(resp.bytes_stream());
    for _ in 0..5 {
        futures::StreamExt::next(&mut bytes).await;
    }
    drop(bytes);
    let charged = within!(Duration::from_secs(5), {
        let u = call(&s.base, "GET", "/v1/usage", Some(&quitter), None).await;
        u.body["total"]["output_tokens"].as_u64().unwrap_or(0) > 0
    });
    let u = call(&s.base, "GET", "/v1/usage", Some(&quitter), None).await;
    let out = u.body["total"]["output_tokens"].as_u64().unwrap();
    assert!(out < 400, "{out} tokens charged after {charged:?}");
    assert!(u.body["total"]["input_tokens"].as_u64().unwrap() > 0);
}
