//! The platform through the real HTTP server and the real CLI: access tokens (create, use,
//! expire, revoke), projects and their isolation, anonymous access, rate limits, request limits,
//! usage metering, /metrics and virtual models on every endpoint.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{TestServer, CHAT, EMBED};
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-tests";

/// Tokens required (anonymous denied), an admin token, a 2-second rate-limit window, and the
/// start-up speed calibration on.
fn gated() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut opts = common::options(256 << 20);
        opts.calibrate = true;
        let mut config = common::platform_config();
        config.allow_anonymous = false;
        config.admin_token = Some(ADMIN.into());
        config.window = Duration::from_secs(2);
        common::start_with(opts, config)
    })
}

/// Anonymous calls allowed, at most 3 per minute per address.
fn open() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut config = common::platform_config();
        config.anonymous_limits.rpm = Some(3);
        common::start_with(common::options(128 << 20), config)
    })
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Value,
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let client = common::client();
    let url = format!("{base}{path}");
    let mut req = match method {
        "GET" => client.get(url),
        "DELETE" => client.delete(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
}

/// Runs the candela binary on a server's data directory.
fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(args)
        .env("CANDELA_HOME", &server.data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `candela token create`, returning (id, secret): the secret is alone on the last line.
fn create_token(server: &TestServer, project: &str, ttl: &str) -> (String, String) {
    let (ok, stdout, stderr) = cli(
        server,
        &[
            "token",
            "create",
            "--project",
            project,
            "--ttl",
            ttl,
            "--name",
            "test",
        ],
    );
    assert!(ok, "{stderr}");
    let secret = stdout.lines().last().unwrap().trim().to_string();
    let (ok, list, _) = cli(server, &["token", "list", "--project", project]);
    assert!(ok);
    let id = list
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .find(|id| secret.contains(id.as_str()))
        .expect("token list shows the new token's id");
    (id, secret)
}

/// Polls until `$check` (an expression that may `.await`) holds, for at most `$limit` (changes
/// made by the CLI reach the server within a second); evaluates to the time it took.
macro_rules! within {
    ($limit:expr, $check:expr) => {{
        let started = Instant::now();
        loop {
            if $check {
                break started.elapsed();
            }
            assert!(started.elapsed() < $limit, "not within {:?}", $limit);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

/// A small chat call to server `s` with `token` (or none).
async fn chat_as(s: &TestServer, token: Option<&str>) -> Reply {
    call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        token,
        Some(chat_body(CHAT)),
    )
    .await
}

/// Waits until the server accepts a token just made with the CLI (within a second).
async fn accepted(s: &TestServer, token: &str) -> Duration {
    within!(Duration::from_secs(1), {
        call(&s.base, "GET", "/v1/models", Some(token), None)
            .await
            .status
            == 200
    })
}

#[tokio::test]
async fn token_lifecycle_create_use_expire_revoke() {
    let s = gated();
    // No token, a malformed one, an unknown one: 401 in OpenAI's shape.
    let r = chat_as(s, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
    assert_eq!(
        r.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    for bad in [
        "nope",
        "cdl_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = call(&s.base, "GET", "/v1/models", Some(bad), None).await;
        assert_eq!(r.status, 401, "{bad}");
    }

    let (id, secret) = create_token(s, "lifecycle", "30d");
    let ok = within!(Duration::from_secs(1), {
        chat_as(s, Some(&secret)).await.status == 200
    });
    assert!(ok < Duration::from_secs(1));

    // The database holds only a hash of the secret. (Read by another process: closing a file
    // descriptor of the database in this one would drop the server's SQLite locks.)
    let secret_part = secret.rsplit('_').next().unwrap();
    let found = Command::new("grep")
        .args(["-rqa", secret_part])
        .arg(&s.data_dir)
        .status()
        .unwrap();
    assert_eq!(
        found.code(),
        Some(1),
        "the secret is stored in {:?}",
        s.data_dir
    );

    let (ok, out, _) = cli(s, &["token", "revoke", &id]);
    assert!(ok && out.contains(&id));
    within!(Duration::from_secs(1), {
        let r = chat_as(s, Some(&secret)).await;
        r.status == 401
            && r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("revoked")
    });
    let (_, list, _) = cli(s, &["token", "list", "--project", "lifecycle"]);
    assert!(list.contains("status=revoked") && !list.contains(secret_part));

    // A short validity period runs out.
    let (_, short) = create_token(s, "lifecycle", "2s");
    accepted(s, &short).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let r = loop {
        let r = call(&s.base, "GET", "/v1/models", Some(&short), None).await;
        if r.status != 200 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn admin_api_and_self_revocation() {
    let s = gated();
    let body = json!({"project": "admin-made", "ttl": "1h", "name": "svc"});
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/admin/v1/tokens",
            None,
            Some(body.clone())
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/admin/v1/tokens",
            Some("wrong"),
            Some(body.clone())
        )
        .await
        .status,
        401
    );
    let created = call(&s.base, "POST", "/admin/v1/tokens", Some(ADMIN), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let secret = created.body["token"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(&s.base, "GET", "/v1/models", Some(&secret), None)
            .await
            .status,
        200
    );

    let listed = call(
        &s.base,
        "GET",
        "/admin/v1/tokens?project=admin-made",
        Some(ADMIN),
        None,
    )
    .await;
    let data = listed.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], id.as_str());
    assert!(!listed.body.to_string().contains(&secret));

    let set = call(
        &s.base,
        "POST",
        "/admin/v1/projects/admin-made",
        Some(ADMIN),
        Some(json!({"rpm": 50})),
    )
    .await;
    assert_eq!(set.body["rpm"], 50, "{}", set.body);

    // The token revokes itself, as the hosted service's endpoint allows.
    let r = call(
        &s.base,
        "POST",
        "/v1/oauth/revoke",
        None,
        Some(json!({"oauth2Token": secret})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["revoked"], true);
    assert_eq!(
        call(&s.base, "GET", "/v1/models", Some(&secret), None)
            .await
            .status,
        401
    );
    let r = call(
        &s.base,
        "POST",
        "/v1/oauth/revoke",
        None,
        Some(json!({"oauth2Token": "unknown"})),
    )
    .await;
    assert_eq!(r.body["revoked"], false);
    let r = call(&s.base, "POST", "/v1/oauth/revoke", None, Some(json!({}))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "oauth2Token");

    let r = call(
        &s.base,
        "DELETE",
        "/admin/v1/tokens/nope",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

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
        .last()
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
async fn rate_limits_refuse_with_headers_and_recover_after_the_window() {
    let s = gated();
    let (_, token) = create_token(s, "limited", "1h");
    let (ok, out, err) = cli(s, &["project", "set", "limited", "--rpm", "2"]);
    assert!(ok && out.contains("rpm=2"), "{err}");
    accepted(s, &token).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the limit itself is in the snapshot too
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..3 {
        let r = chat_as(s, Some(&token)).await;
        statuses.push(r.status);
        if r.status == 429 {
            refused = Some(r);
        } else {
            assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    let r = refused.unwrap();
    assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
    let retry: u64 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(r.headers.contains_key("x-ratelimit-reset-requests"));
    // Embeddings have their own budget.
    let e = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": "x"})),
    )
    .await;
    assert_eq!(e.status, 200);
    tokio::time::sleep(Duration::from_millis(retry * 1000 + 100)).await;
    let r = chat_as(s, Some(&token)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A tokens-per-minute limit: each call reserves its prompt + max_tokens when it starts (so
    // calls cannot overrun the budget together), and is charged what it used when it ends.
    cli(
        s,
        &["project", "set", "limited", "--rpm", "0", "--tpm", "100"],
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let with_max = |m: u64| {
        let mut body = chat_body(CHAT);
        body["max_tokens"] = json!(m);
        body
    };
    let post = |body: Value| {
        let token = token.clone();
        async move {
            call(
                &s.base,
                "POST",
                "/v1/chat/completions",
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let too_large = post(with_max(200)).await;
    assert_eq!(too_large.status, 429, "{}", too_large.body);
    assert!(too_large.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    let first = post(with_max(8)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "100");
    let mut refused = None;
    for _ in 0..4 {
        let r = post(with_max(8)).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the tokens-per-minute limit refused a call");
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert!(refused.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn anonymous_calls_have_their_own_lower_limit() {
    let s = open();
    // A key that is not a candela token (what OpenAI clients send when they need one) is anonymous.
    for (i, key) in [None, Some("EMPTY"), Some("sk-no-key-required")]
        .into_iter()
        .enumerate()
    {
        let r = chat_as(s, key).await;
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "3");
    }
    let r = chat_as(s, None).await;
    assert_eq!(r.status, 429);
    assert!(r.headers["retry-after"].parse::<u64>().unwrap() <= 60);
    // A project's token is not limited by the anonymous budget.
    let (_, token) = create_token(s, "named", "1h");
    within!(Duration::from_secs(1), {
        chat_as(s, Some(&token)).await.status == 200
    });
    // Anonymous usage is its own project.
    let u = call(&s.base, "GET", "/v1/usage", None, None).await;
    assert_eq!(u.body["project"], "anonymous");
    // The refused call is recorded too, as failed.
    assert_eq!(u.body["total"]["requests"], 4);
    assert_eq!(u.body["total"]["failed_requests"], 1);
}

#[tokio::test]
async fn request_limits_413_and_embedding_inputs() {
    let s = gated();
    let (_, token) = create_token(s, "sizes", "1h");
    accepted(s, &token).await;
    let big = "x".repeat(3 * 1024 * 1024);
    let r = call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        Some(&token),
        Some(json!({"model": CHAT, "messages": [{"role": "user", "content": big}]})),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    let inputs: Vec<String> = (0..26).map(|i| format!("text {i}")).collect();
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": inputs})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "input");
    let r = call(
        &s.base,
        "POST",
        "/v1/embeddings",
        Some(&token),
        Some(json!({"model": EMBED, "input": &inputs[..25]})),
    )
    .await;
    assert_eq!(r.status, 200);
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
